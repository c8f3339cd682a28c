#!/usr/bin/env python
"""One prepared GPU check (one script per device lease): loss cost, training throughput and MFU, kNN search, evaluation, HF path.

Made for one lease of the ``device`` tool's H200 (15 minutes of device time in all): one
command, a global time budget (``--budget-s``, default 270 s) split into per-section time
boxes, each section in its own child process so that an out-of-memory error, a CUDA fault or
a hang in one section is recorded and the others still run. Results are written after every
section to ``<out>.json`` and ``<out>.md`` (default ``bench/results/gpu-check``), with the
device, driver, torch version and date.

Sections (``--sections``, in this order):

- ``device``: GPU, driver, CUDA, torch; the bf16 peak measured as an 8192^3 matrix product
  (the MFU denominator; :data:`H200_BF16_DENSE_TFLOPS` is the documented figure).
- ``loss``: forward + backward time and peak allocated memory of plain CE, the TRIME loss
  (local and long rules) and the dense N x N replica of the original, over the same
  full-softmax head, in bf16 and fp16, N = 4,096 ... 65,536, V = 32k and 267k, d = 1,024
  (the loss functions are :mod:`bench.loss`'s). A size that runs out of memory is recorded,
  and larger sizes of that method are skipped.
- ``train``: fairseq ``Trainer.train_step`` words/s of ``trime_loss``,
  ``trime_long_loss_same_device`` and ``trime_ext_loss`` against ``adaptive_loss`` for the
  247M ``transformer_lm_wiki103`` (adaptive input and softmax, L = 3,072, 4 segments per
  step), bf16, one process, interleaved (:mod:`bench.train`'s machinery), with model FLOPs
  counted two ways (analytically from the model's matrices and the batch's cluster
  membership, and by ``torch.utils.flop_counter``) and the MFU against the measured peak.
- ``knn``: exact top-k search on the GPU (:mod:`trime.retrieval.torch_knn`, the
  ``trime-eval --knn-search torch`` backend) over 2M and 8M synthetic 1024-d fp16 keys,
  queries/s at k = 1,024 for inner product and L2, recall against an fp32 search and FAISS
  ``IndexFlat`` on a subset. faiss-gpu is not on the machine and cannot be carried (see
  :data:`FAISS_GPU_NOTE`).
- ``eval``: ``trime-build-datastore`` on the GPU, then ``trime-eval`` tokens/s with
  ``--memory none``, ``long`` and ``external --knn-search torch`` on the same model.
- ``hf``: :func:`trime.hf.causal_lm_loss` (none, local, long) against the plain HF loss on
  a GPT-2-small-sized random model in bf16 (skipped if ``trime.hf`` cannot be imported).

The training, evaluation and HF data are synthetic (Zipf-distributed token ids over a
267,735-word dictionary, the size of WikiText-103's): speed does not depend on the text.

``--dry-run`` runs every section at tiny sizes on the CPU (tests/test_gpu_check.py), so a
typo cannot cost a GPU lease. On the device, ``bench/gpu_check.sh`` installs the
bring-alongs (``make gpu-bringalong``) first; see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from bench.common import cuda_peak_bytes, machine_info, time_once, today, write_json

_REPO = Path(__file__).resolve().parent.parent

SECTIONS = ("device", "loss", "train", "knn", "eval", "hf")
# bf16 dense peak of one H200 as measured in this workplace (8192^3 bf16 matmul, random data:
# 788 TFLOP/s; KINDS.md of the device tool, 2026-10-28, and 769-798 on 2026-11-04). NVIDIA's
# datasheet says 989 TFLOP/s dense (1,979 with 2:4 sparsity); no GEMM reaches it at 700 W.
H200_BF16_DENSE_TFLOPS = 790.0
H200_BF16_DATASHEET_TFLOPS = 989.0
# Sizes checked with `pip download --no-deps` (cp312, manylinux x86_64) on 2026-12-01.
FAISS_GPU_NOTE = (
    "faiss-gpu is not on the device and cannot be carried: faiss-gpu-cu12 1.14.1.post1 (cp312) is a 48.4 MB "
    "wheel that needs nvidia-cublas-cu12 (581 MB) and nvidia-cuda-runtime-cu12 (3.5 MB), since the machine has "
    "only CUDA 13 libraries; 633 MB in all against a 64 MiB carry limit (no faiss-gpu-cu13 wheel exists). "
    "The exact torch search (trime-eval --knn-search torch) replaces it."
)
WIKITEXT103_WORDS = 267_735
MIB = 2**20

# ----------------------------------------------------------------------------- profiles

GPU_PROFILE: dict[str, Any] = {
    "device": "cuda",
    "budget_s": 270.0,
    # share of the global budget per section (normalised over the sections run)
    "boxes": {"device": 8, "loss": 60, "train": 75, "knn": 35, "eval": 65, "hf": 27},
    "peak": {"n": 8192, "warmup": 3, "repeats": 10},
    "loss": {
        "sizes": [4096, 8192, 16384, 32768, 65536],
        "vocabs": [32768, WIKITEXT103_WORDS],
        "dim": 1024,
        "seg_len": 1024,
        "dtypes": ["bf16", "fp16"],
        "repeats": 3,
        "methods": ["ce", "trime_local", "trime_long", "dense_local", "dense_long"],
    },
    # train: the batches of the train section and the eval section's datastore (one key per token)
    "data": {"vocab": WIKITEXT103_WORDS, "train_tokens": 1_100_000, "valid_tokens": 100_000, "zipf": 1.0},
    "train": {
        "arch": ["--arch", "transformer_lm_wiki103"],
        "tokens_per_sample": 3072,
        "segments": 4,
        "precision": "bf16",
        "warmup": 2,
        "rounds": 3,
        "steps": 2,
        "criteria": ["adaptive_loss", "trime_loss", "trime_long_loss_same_device", "trime_ext_loss"],
    },
    "knn": {
        "counts": [2_000_000, 8_000_000],
        "dim": 1024,
        "k": 1024,
        "query_batch": 2048,
        "max_batches": 8,
        "metrics": ["ip", "l2"],
        "score_bytes": 4 << 30,
        "check_keys": 262_144,
        "check_queries": 64,
    },
    "eval": {"context_window": 2560, "mem_size": 12288, "k": 1024, "max_tokens": 24576, "precision": "bf16"},
    "hf": {
        "config": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024},
        "batch": 8,
        "seq_len": 1024,
        "memories": ["none", "local", "long"],
        "repeats": 5,
    },
}

DRY_PROFILE: dict[str, Any] = {
    "device": "cpu",
    # generous: on a loaded CI machine the dry run must not skip anything (the test checks every item)
    "budget_s": 900.0,
    "boxes": dict(GPU_PROFILE["boxes"]),
    "peak": {"n": 128, "warmup": 1, "repeats": 2},
    "loss": {
        "sizes": [128, 256],
        "vocabs": [300, 500],
        "dim": 16,
        "seg_len": 64,
        "dtypes": ["bf16", "fp16"],
        "repeats": 1,
        "methods": GPU_PROFILE["loss"]["methods"],
        # exercise the out-of-memory branch: dense_long "runs out of memory" from N = 128 on
        "simulate_oom": {"method": "dense_long", "n": 128},
    },
    "data": {"vocab": 1000, "train_tokens": 12_000, "valid_tokens": 1_500, "zipf": 1.0},
    "train": {
        "arch": [
            "--arch", "transformer_lm_wiki103", "--decoder-layers", "2", "--decoder-embed-dim", "32",
            "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2",
            "--adaptive-input-cutoff", "100,400", "--adaptive-softmax-cutoff", "100,400",
        ],
        "tokens_per_sample": 64,
        "segments": 4,
        "precision": "fp32",
        "warmup": 1,
        "rounds": 2,
        "steps": 1,
        "criteria": GPU_PROFILE["train"]["criteria"],
    },
    "knn": {
        "counts": [2000, 4000],
        "dim": 32,
        "k": 16,
        "query_batch": 64,
        "max_batches": 2,
        "metrics": ["ip", "l2"],
        "score_bytes": 64 << 10,
        "check_keys": 1000,
        "check_queries": 16,
    },
    "eval": {"context_window": 16, "mem_size": 256, "k": 16, "max_tokens": 1024, "precision": "fp32"},
    "hf": {
        "config": {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 300, "n_positions": 128,
                   "bos_token_id": 0, "eos_token_id": 0},
        "batch": 2,
        "seq_len": 64,
        "memories": ["none", "local", "long"],
        "repeats": 1,
    },
}


# ----------------------------------------------------------------------------- child-side helpers


class Recorder:
    """A section's results, written atomically to ``path`` after every change (survives a kill)."""

    def __init__(self, path: str, deadline: float) -> None:
        self.path, self.deadline, self.data = path, deadline, {}

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)

    def left(self) -> float:
        return self.deadline - time.time()

    def skip(self, what: str, why: str = "section time box used up") -> None:
        self.data.setdefault("skipped", {})[what] = why
        self.save()


def _torch(cfg: dict):
    import torch

    if cfg["device"] == "cpu":
        torch.set_num_threads(1)  # the dry run: tiny sizes, where threads only add overhead
    return torch


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def _sync_fn(device: str) -> Callable[[], None] | None:
    if device == "cuda":
        import torch

        return torch.cuda.synchronize
    return None


def _short(exc: BaseException, limit: int = 300) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:limit] if str(exc).strip() else ''}"


# ----------------------------------------------------------------------------- section: device


def _driver_info() -> dict[str, Any]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return {"nvidia_smi": f"not available ({exc.__class__.__name__})"}
    if out.returncode != 0:
        return {"nvidia_smi": f"exit {out.returncode}: {out.stderr.strip()[:200]}"}
    fields = [f.strip() for f in out.stdout.strip().splitlines()[0].split(",")]
    keys = ("name", "driver", "memory_total", "max_sm_clock", "power_limit")
    return dict(zip(keys, fields))


def section_device(cfg: dict, rec: Recorder) -> None:
    torch = _torch(cfg)
    info = machine_info()
    info.update(_driver_info())
    if cfg["device"] == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                    cudnn=torch.backends.cudnn.version())
    rec["env"] = info
    p = cfg["peak"]
    n, device = p["n"], cfg["device"]
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    for _ in range(p["warmup"]):
        a @ b
    times = [time_once(lambda: a @ b, device) for _ in range(p["repeats"])]
    mean = statistics.mean(times)
    rec["matmul_peak"] = {
        "what": f"{n}^3 bf16 torch matmul, random data, mean of {p['repeats']} after {p['warmup']} warm-ups",
        "seconds": times,
        "tflops": 2 * n**3 / mean / 1e12,
        "documented_tflops": H200_BF16_DENSE_TFLOPS,
        "datasheet_tflops": H200_BF16_DATASHEET_TFLOPS,
    }


# ----------------------------------------------------------------------------- section: loss


def _loss_module():
    """bench/loss.py's loss functions (shared, not copied); fails clearly if its names changed."""
    from bench import loss as loss_bench

    missing = [name for name in ("METHOD_SPECS", "_step", "DTYPES") if not hasattr(loss_bench, name)]
    if missing:
        raise RuntimeError(f"bench/loss.py no longer defines {missing}; update bench/gpu_check.py")
    return loss_bench


def section_loss(cfg: dict, rec: Recorder) -> None:
    torch = _torch(cfg)
    from trime.loss import DEFAULT_BLOCK_SIZE

    loss_bench = _loss_module()
    p, device = cfg["loss"], cfg["device"]
    unknown = [m for m in p["methods"] if m not in loss_bench.METHOD_SPECS]
    if unknown:
        raise RuntimeError(f"bench/loss.py has no methods {unknown}")
    step_cfg = {"seg_len": p["seg_len"], "block_size": DEFAULT_BLOCK_SIZE}
    rec["settings"] = dict(p, block_size=DEFAULT_BLOCK_SIZE, device=device,
                           memory="torch.cuda.max_memory_allocated above what was allocated before the call"
                           if device == "cuda" else "not measured on the CPU (dry run)")
    simulate = p.get("simulate_oom")
    results: list[dict] = []
    oom_at: dict[tuple, int] = {}  # (dtype, vocab, method) -> smallest N that ran out of memory
    last_seconds: dict[tuple, float] = {}
    for n in p["sizes"]:
        for vocab in p["vocabs"]:
            for dtype_name in p["dtypes"]:
                key = (dtype_name, vocab)
                estimate = 2.5 * last_seconds.get(key, 0.0)
                if rec.left() < max(estimate, 1.0):
                    rec.skip(f"{dtype_name} V={vocab} N={n}", f"section time box: {rec.left():.0f} s left, "
                             f"estimated {estimate:.0f} s")
                    continue
                started = time.time()
                entry: dict[str, Any] = {"dtype": dtype_name, "vocab": vocab, "n": n, "dim": p["dim"], "methods": {}}
                results.append(entry)
                dtype = getattr(torch, loss_bench.DTYPES[dtype_name])
                gen = torch.Generator(device=device).manual_seed(n + vocab)
                try:
                    h = torch.randn(n, p["dim"], device=device, generator=gen).to(dtype).requires_grad_(True)
                    weight = (torch.randn(vocab, p["dim"], device=device, generator=gen) / math.sqrt(p["dim"]))
                    weight = weight.to(dtype).requires_grad_(True)
                    targets = torch.randint(0, vocab, (n,), device=device, generator=gen)
                except Exception as exc:  # noqa: BLE001 - recorded, not fatal
                    entry["error"] = _short(exc)
                if "error" in entry:
                    h = weight = targets = None
                    _free(device)  # outside the except block: the traceback no longer holds the tensors
                    continue
                calls = {}
                for method in p["methods"]:
                    smaller = oom_at.get((dtype_name, vocab, method))
                    if smaller is not None:
                        entry["methods"][method] = {"ok": False, "oom": True, "error": f"skipped: out of memory at N={smaller}"}
                        continue
                    call = loss_bench._step(method, h, weight, targets, step_cfg)
                    if simulate and simulate["method"] == method and n >= simulate["n"]:
                        def call(_call=call):  # the dry run's stand-in for a real CUDA OOM
                            raise torch.OutOfMemoryError("CUDA out of memory (simulated by the dry run)")
                    try:
                        first = time.perf_counter()
                        loss_value = call()  # warm-up (includes torch.compile of the memory kernels, if any)
                        first = time.perf_counter() - first
                        if device == "cuda":
                            peak = cuda_peak_bytes(call)
                            peak_mb = peak["peak_delta_bytes"] / MIB
                        else:
                            peak_mb = None
                        calls[method] = call
                        entry["methods"][method] = {"ok": True, "loss": loss_value, "peak_mb": peak_mb, "first_call_s": first}
                    except Exception as exc:  # noqa: BLE001
                        oom = _is_oom(exc)
                        entry["methods"][method] = {"ok": False, "oom": oom, "error": _short(exc)}
                        if oom:
                            oom_at[(dtype_name, vocab, method)] = n
                    if not entry["methods"][method]["ok"]:
                        h.grad = weight.grad = None
                        _free(device)  # outside the except block, so the failed call's tensors are released
                times: dict[str, list[float]] = {m: [] for m in calls}
                names = list(calls)
                for r in range(p["repeats"]):
                    for method in names[r % max(1, len(names)):] + names[: r % max(1, len(names))]:
                        try:
                            times[method].append(time_once(calls[method], device))
                        except Exception as exc:  # noqa: BLE001 - e.g. OOM from fragmentation
                            entry["methods"][method].update(ok=False, oom=_is_oom(exc), error=_short(exc))
                            calls.pop(method, None)
                    if len(calls) < len(names):
                        h.grad = weight.grad = None
                        _free(device)
                    names = [m for m in names if m in calls]
                for method, ts in times.items():
                    if ts and entry["methods"][method].get("ok"):
                        entry["methods"][method]["median_ms"] = 1000 * statistics.median(ts)
                base = entry["methods"].get("ce", {}).get("median_ms")
                for res in entry["methods"].values():
                    if base and res.get("median_ms"):
                        res["time_vs_ce"] = res["median_ms"] / base
                del h, weight, targets, calls
                _free(device)
                entry["seconds"] = time.time() - started
                # the next N's cost, from this N's steady calls (warm-ups may include a one-off torch.compile)
                last_seconds[key] = sum(r.get("median_ms", 0.0) for r in entry["methods"].values()) / 1000 * (
                    p["repeats"] + 2)
                rec["results"] = results
                line = ", ".join(
                    f"{m} {r['median_ms']:.1f} ms" if r.get("median_ms") else f"{m} {'OOM' if r.get('oom') else 'failed'}"
                    for m, r in entry["methods"].items()
                )
                print(f"[loss] {dtype_name} V={vocab} N={n}: {line}", flush=True)
    rec["results"] = results
    rec["dense_oom_at"] = {f"{d}/V{v}/{m}": n for (d, v, m), n in oom_at.items()}


# ----------------------------------------------------------------------------- synthetic data, checkpoint


def _register_trime() -> None:
    """trime's criteria, archs and task in fairseq's registries (without relying on the autoload .pth)."""
    from trime.plugin import register

    register()


def ensure_databin(cfg: dict) -> Path:
    """A fairseq data-bin of Zipf-distributed synthetic tokens (train/valid/test), built once per run."""
    import numpy as np
    import torch
    from fairseq.data import Dictionary, indexed_dataset

    d = cfg["data"]
    out = Path(cfg["work"]) / "data-bin"
    if (out / "done").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    ranks = np.arange(1, d["vocab"] + 1, dtype=np.float64)
    probs = ranks ** -d["zipf"]
    probs /= probs.sum()
    counts = np.maximum(1, (probs * 1e9).astype(np.int64))
    dictionary = Dictionary()
    for i, c in enumerate(counts):
        dictionary.add_symbol(f"w{i}", n=int(c))
    dictionary.save(str(out / "dict.txt"))
    rng = np.random.default_rng(0)
    first = dictionary.nspecial
    line = 512
    for split, tokens in (("train", d["train_tokens"]), ("valid", d["valid_tokens"]), ("test", d["valid_tokens"])):
        ids = rng.choice(d["vocab"], size=tokens, p=probs).astype(np.int32) + first
        builder = indexed_dataset.make_builder(str(out / f"{split}.bin"), impl="mmap", vocab_size=len(dictionary))
        for lo in range(0, tokens, line - 1):
            chunk = np.append(ids[lo : lo + line - 1], dictionary.eos())
            builder.add_item(torch.from_numpy(chunk.astype(np.int64)))
        builder.finalize(str(out / f"{split}.idx"))
    (out / "done").write_text("ok\n")
    return out


def train_argv(cfg: dict, data: Path, criterion: str) -> list[str]:
    t = cfg["train"]
    argv = [
        str(data), "--task", "trime_lm", "--keep-order", "--sample-break-mode", "none",
        "--tokens-per-sample", str(t["tokens_per_sample"]), "--max-tokens", str(t["segments"] * t["tokens_per_sample"]),
        *t["arch"], "--criterion", criterion, "--optimizer", "adam", "--lr", "0.0001", "--seed", "1",
        "--num-workers", "0", "--ddp-backend", "legacy_ddp", "--save-dir", str(Path(cfg["work"]) / "ckpt"),
        "--no-progress-bar", "--log-format", "none", "--no-save-optimizer-state",
    ]
    if cfg["device"] == "cpu":
        argv.append("--cpu")
    if t["precision"] == "bf16":
        argv.append("--bf16")
    elif t["precision"] == "fp16":
        argv.append("--fp16")
    if criterion == "trime_ext_loss":
        argv += ["--cross-sent-ratio", "0.9"]
    return argv


def ensure_checkpoint(cfg: dict, data: Path, trainer=None) -> Path:
    """A fairseq checkpoint of the benchmark model (the train section's, or a fresh one)."""
    path = Path(cfg["work"]) / "ckpt" / "checkpoint_gpu_check.pt"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if trainer is None:
        from bench.train import trainer_from_argv

        _register_trime()
        _, trainer = trainer_from_argv(train_argv(cfg, data, "trime_ext_loss"), seed=1)
    trainer.consolidate_optimizer()  # save_checkpoint reads the gathered optimizer state
    trainer.save_checkpoint(str(path), {"train_iterator": {"epoch": 1}, "val_loss": None})
    return path


# ----------------------------------------------------------------------------- section: train


def _linear_weights(module) -> int:
    """Multiply-adds per row of the matrices in ``module`` (sum of the 2-D ``weight`` sizes)."""
    return sum(m.weight.numel() for m in module.modules() if getattr(m, "weight", None) is not None and m.weight.dim() == 2
               and not type(m).__name__.endswith("Embedding"))


def analytic_model_flops(model, sample: dict, seq_len: int) -> dict[str, Any]:
    """Model FLOPs of one training step (forward + backward = 3 x forward), counted from the matrices.

    Decoder layers: 2 FLOPs per multiply-add of every weight matrix per token, plus attention scores
    and values, 2 x 2 x L x d per token and layer (the full L x L product, as executed). Adaptive input:
    each band's projection for the tokens in that band. Adaptive softmax: the head for every target,
    and a tail cluster's projections for the targets in it (fairseq computes only those).
    """
    dec = model.decoder
    tokens, target = sample["net_input"]["src_tokens"], sample["target"]
    n = int(tokens.numel())
    d = int(dec.embed_dim) if hasattr(dec, "embed_dim") else int(dec.layers[0].embed_dim)
    layers = len(dec.layers)
    parts = {"layers": 2 * _linear_weights(dec.layers) * n, "attention": 2 * 2 * layers * seq_len * d * n}
    emb = dec.embed_tokens
    if hasattr(emb, "cutoff") and hasattr(emb, "embeddings"):
        bounds = [0, *list(emb.cutoff)]
        parts["adaptive_input"] = sum(
            2 * _linear_weights(band) * int(((tokens >= bounds[i]) & (tokens < bounds[i + 1])).sum())
            for i, band in enumerate(emb.embeddings)
        )
    asm = getattr(dec, "adaptive_softmax", None)
    if asm is not None:
        cut = list(asm.cutoff)
        parts["softmax_head"] = 2 * _linear_weights(asm.head) * n
        parts["softmax_tail"] = sum(
            2 * _linear_weights(tail) * int(((target >= cut[i]) & (target < cut[i + 1])).sum())
            for i, tail in enumerate(asm.tail)
        )
    else:
        parts["output"] = 2 * int(dec.output_projection.weight.numel()) * n
    forward = sum(parts.values())
    return {"forward_parts": parts, "step_flops": 3 * forward, "tokens": n}


def section_train(cfg: dict, rec: Recorder) -> None:
    torch = _torch(cfg)
    from torch.utils.flop_counter import FlopCounterMode

    from bench.train import first_batches, interleaved_train_steps, summarize_steps, trainer_from_argv

    _register_trime()
    t, device = cfg["train"], cfg["device"]
    started = time.time()
    data = ensure_databin(cfg)
    rec["data"] = {"seconds": time.time() - started, **cfg["data"]}
    trainers, build_s, errors = {}, {}, {}
    task = None
    for criterion in t["criteria"]:
        t0 = time.time()
        try:
            task, trainers[criterion] = trainer_from_argv(train_argv(cfg, data, criterion), seed=1)
            build_s[criterion] = time.time() - t0
        except Exception as exc:  # noqa: BLE001
            errors[criterion] = _short(exc)
            traceback.print_exc()
    rec["build_seconds"] = build_s
    if errors:
        rec["errors"] = errors
    if not trainers:
        raise RuntimeError(f"no trainer could be built: {errors}")
    base = t["criteria"][0] if t["criteria"][0] in trainers else next(iter(trainers))
    model = trainers[base].model
    params = sum(p.numel() for p in model.parameters())
    count = t["warmup"] + t["rounds"] * t["steps"] + 1
    batches = first_batches(task, count, t["segments"], t["tokens_per_sample"])
    ntokens = int(batches[0]["ntokens"])
    rec["model"] = {"argv_arch": t["arch"], "params": params, "precision": t["precision"],
                    "tokens_per_step": ntokens, "segments": t["segments"], "tokens_per_sample": t["tokens_per_sample"]}
    # leave ~25% of the box for FLOP counting and the checkpoint
    deadline = time.perf_counter() + 0.6 * rec.left()
    times, rounds = interleaved_train_steps(trainers, batches, t["warmup"], t["rounds"], t["steps"],
                                            sync=_sync_fn(device), deadline=deadline)
    summary = summarize_steps(times, rounds, ntokens, base)
    rec["baseline"] = base
    rec["results"] = summary
    flop_batch = batches[-1]
    analytic = analytic_model_flops(model, flop_batch, t["tokens_per_sample"])
    rec["flops"] = {"analytic": analytic, "counted_per_step": {}}
    peak = cfg.get("peak_tflops") or H200_BF16_DENSE_TFLOPS
    model_flops_per_token = analytic["step_flops"] / analytic["tokens"]
    mfu = {}
    for name, res in summary.items():
        achieved = model_flops_per_token * res["words_per_s"]
        mfu[name] = {
            "model_tflops_per_s": achieved / 1e12,
            "mfu_vs_measured_peak": achieved / (peak * 1e12),
            "mfu_vs_documented_790": achieved / (H200_BF16_DENSE_TFLOPS * 1e12),
            "mfu_vs_datasheet_989": achieved / (H200_BF16_DATASHEET_TFLOPS * 1e12),
        }
    rec["mfu"] = {"peak_tflops_used": peak, "peak_source": "measured (device section)" if cfg.get("peak_tflops")
                  else "documented constant", "per_criterion": mfu}
    if device == "cuda":
        rec["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if "trime_ext_loss" in trainers and rec.left() > 5:  # the eval section's model (else it builds one)
        t0 = time.time()
        ensure_checkpoint(cfg, data, trainers["trime_ext_loss"])
        rec["checkpoint_seconds"] = time.time() - t0
    # FLOPs as executed, counted by torch (matrix products), one step per criterion; the memory kernels
    # run eagerly here so that the counter sees plain torch ops (not a torch.compile'd graph)
    from trime.loss_compile import compile_mode, set_compile

    mode = compile_mode()
    set_compile("never")
    try:
        for name, trainer in trainers.items():
            if rec.left() < 10:
                rec.skip(f"flop count {name}")
                continue
            with FlopCounterMode(display=False) as counter:
                trainer.train_step([flop_batch])
            counted = int(counter.get_total_flops())
            rec["flops"]["counted_per_step"][name] = counted
            mfu[name]["counted_flops_per_s"] = counted / summary[name]["median_step_s"]
            rec.save()
    finally:
        set_compile(mode)


# ----------------------------------------------------------------------------- section: knn


def section_knn(cfg: dict, rec: Recorder) -> None:
    torch = _torch(cfg)
    from trime.retrieval.torch_knn import TorchExactSearch

    p, device = cfg["knn"], cfg["device"]
    faiss_info: dict[str, Any] = {"faiss_gpu": FAISS_GPU_NOTE}
    try:
        import faiss

        from trime.retrieval.faiss_index import num_gpus

        faiss_info.update(version=faiss.__version__, gpus=num_gpus())
    except ImportError as exc:
        faiss = None
        faiss_info["import"] = _short(exc)
    rec["faiss"] = faiss_info
    dtype = torch.float16 if device == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    runs = []
    keys = search = None
    for count in p["counts"]:
        if rec.left() < 5:
            rec.skip(f"{count} keys")
            continue
        keys = search = None  # the previous keys (the search object holds them too)
        _free(device)
        t0 = time.time()
        try:
            keys = torch.randn(count, p["dim"], device=device, dtype=dtype, generator=gen)
        except Exception as exc:  # noqa: BLE001
            runs.append({"count": count, "error": _short(exc)})
            keys = None
            continue
        queries = torch.randn(p["query_batch"] * p["max_batches"], p["dim"], device=device, dtype=dtype, generator=gen)
        for metric in p["metrics"]:
            run: dict[str, Any] = {"count": count, "dim": p["dim"], "metric": metric, "k": p["k"],
                                   "key_dtype": str(dtype).replace("torch.", ""), "query_batch": p["query_batch"]}
            runs.append(run)
            try:
                search = TorchExactSearch(keys, metric=metric, device=device, dtype=dtype, score_bytes=p["score_bytes"])
                run["setup_s"] = time.time() - t0
                run["gpu_bytes"] = search.nbytes
                search.search(queries[: p["query_batch"]], p["k"])  # warm-up
                batch_s = []
                for b in range(p["max_batches"]):
                    if b > 0 and rec.left() < 3 * max(batch_s):
                        break
                    q = queries[b * p["query_batch"] : (b + 1) * p["query_batch"]]
                    batch_s.append(time_once(lambda q=q, search=search: search.search(q, p["k"]), device))
                run["batch_seconds"] = batch_s
                run["queries_per_s"] = p["query_batch"] / statistics.median(batch_s)
                run["fp32_products"] = search.fp32_products
                print(f"[knn] {count:,} keys {metric}: {run['queries_per_s']:,.0f} queries/s at k={p['k']}", flush=True)
            except Exception as exc:  # noqa: BLE001
                run["error"] = _short(exc)
                run["oom"] = _is_oom(exc)
            rec["runs"] = runs
            t0 = time.time()
    rec["runs"] = runs
    if keys is None or rec.left() < 5:
        rec.skip("exactness check")
        return
    # exactness: half-precision search vs an fp32 search of the same keys, and vs FAISS IndexFlat (CPU)
    sub = keys[: p["check_keys"]]
    q = torch.randn(p["check_queries"], p["dim"], device=device, dtype=dtype, generator=gen)
    check: dict[str, Any] = {"keys": int(sub.shape[0]), "queries": p["check_queries"], "k": p["k"]}
    for metric in p["metrics"]:
        half_scores, half_ids = TorchExactSearch(sub, metric=metric, device=device, dtype=dtype).search(q, p["k"])
        ref_scores, ref_ids = TorchExactSearch(sub.float(), metric=metric, device=device,
                                               dtype=torch.float32).search(q.float(), p["k"])
        item = {"recall_vs_fp32": _recall(half_ids, ref_ids),
                "max_abs_score_diff_vs_fp32": float((half_scores - ref_scores).abs().max())}
        if faiss is not None:
            sub_np, q_np = sub.float().cpu().numpy(), q.float().cpu().numpy()
            index = faiss.IndexFlatIP(p["dim"]) if metric == "ip" else faiss.IndexFlatL2(p["dim"])
            index.add(sub_np)
            dist, ids = index.search(q_np, p["k"])
            item["recall_fp32_vs_faiss_flat"] = _recall(ref_ids.cpu(), torch.from_numpy(ids))
            faiss_scores = dist if metric == "ip" else -dist
            item["max_abs_score_diff_fp32_vs_faiss"] = float(abs(ref_scores.cpu().numpy() - faiss_scores).max())
        check[metric] = item
    rec["exactness"] = check


def _recall(found, reference) -> float:
    hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found.cpu(), reference.cpu())]
    return sum(hits) / (reference.shape[0] * reference.shape[1])


# ----------------------------------------------------------------------------- section: eval


def section_eval(cfg: dict, rec: Recorder) -> None:
    _torch(cfg)
    _register_trime()
    from trime.eval.evaluate import run as evaluate_run
    from trime.retrieval.build_datastore import main as datastore_main

    p, device = cfg["eval"], cfg["device"]
    data = ensure_databin(cfg)
    t0 = time.time()
    ckpt = ensure_checkpoint(cfg, data)
    rec["checkpoint"] = {"path": str(ckpt), "seconds": time.time() - t0}
    precision = [] if p["precision"] == "fp32" else [f"--{p['precision']}"]
    cpu = ["--cpu"] if device == "cpu" else []
    store = Path(cfg["work"]) / "datastore"
    t0 = time.time()
    datastore_main([str(data), "--path", str(ckpt), "--output", str(store), "--no-index", "--no-progress-bar",
                    "--max-tokens", str(p["max_tokens"]), *precision, *cpu])
    meta = json.loads((store / "meta.json").read_text())
    rec["datastore"] = {"keys": meta["count"], "dim": meta["dim"], "key_dtype": meta["key_dtype"],
                        "seconds": time.time() - t0, "keys_per_s": meta["count"] / (time.time() - t0)}
    common = [str(data), "--path", str(ckpt), "--gen-subset", "valid", "--context-window", str(p["context_window"]),
              "--max-tokens", str(p["max_tokens"]), "--no-progress-bar", *precision, *cpu]
    runs = {
        "warm-up (none)": ["--memory", "none"],
        "none": ["--memory", "none"],
        "long": ["--memory", "long", "--mem-size", str(p["mem_size"])],
        "external": ["--memory", "external", "--mem-size", str(p["mem_size"]), "--datastore", str(store),
                     "--knn-search", "torch", "--k", str(p["k"])],
    }
    results = {}
    for name, extra in runs.items():
        if rec.left() < 5:
            rec.skip(f"trime-eval {name}")
            continue
        t0 = time.time()
        try:
            record = evaluate_run(common + extra)
            row = record["results"][-1]
            results[name] = {"tokens_per_s": row["tokens_per_s"], "tokens": row["tokens"], "ppl": row.get("ppl"),
                             "loop_seconds": row["seconds"], "wall_seconds": time.time() - t0, "argv": extra}
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a TrimeError is a SystemExit
            results[name] = {"error": _short(exc), "argv": extra}
        rec["results"] = results
    base = results.get("none", {}).get("tokens_per_s")
    for res in results.values():
        if base and res.get("tokens_per_s"):
            res["vs_none"] = res["tokens_per_s"] / base
    rec["results"] = results
    rec["settings"] = p


# ----------------------------------------------------------------------------- section: hf


def section_hf(cfg: dict, rec: Recorder) -> None:
    torch = _torch(cfg)
    try:
        import trime.hf as trime_hf
    except Exception as exc:  # noqa: BLE001 - another helper's package, maybe not there yet
        rec["skipped_reason"] = f"skipped: trime.hf not available ({_short(exc)})"
        return
    from transformers import GPT2Config, GPT2LMHeadModel

    p, device = cfg["hf"], cfg["device"]
    dtype = torch.bfloat16
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**p["config"])).to(device=device, dtype=dtype)
    model.train()
    params = sum(x.numel() for x in model.parameters())
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, p["config"]["vocab_size"], (p["batch"], p["seq_len"]), device=device, generator=gen)
    rec["model"] = {"config": p["config"], "params": params, "dtype": "bf16", "batch": [p["batch"], p["seq_len"]]}

    def plain() -> float:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return float(loss.detach())

    def trime_call(memory: str) -> Callable[[], float]:
        def call() -> float:
            model.zero_grad(set_to_none=True)
            out = trime_hf.causal_lm_loss(model, ids, memory=memory, attention_mask=None)
            out.loss.backward()
            return float(out.loss.detach())

        return call

    calls = {"hf_plain": plain, **{f"trime_{m}": trime_call(m) for m in p["memories"]}}
    methods: dict[str, Any] = {}
    for name, call in list(calls.items()):
        try:
            loss = call()
            peak = cuda_peak_bytes(call)["peak_delta_bytes"] / MIB if device == "cuda" else None
            methods[name] = {"ok": True, "loss": loss, "peak_mb": peak}
        except Exception as exc:  # noqa: BLE001
            methods[name] = {"ok": False, "oom": _is_oom(exc), "error": _short(exc)}
            calls.pop(name)
        if not methods[name]["ok"]:
            _free(device)
    times: dict[str, list[float]] = {n: [] for n in calls}
    names = list(calls)
    for r in range(p["repeats"]):
        if rec.left() < 3:
            rec.skip(f"repeats from {r + 1}")
            break
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(time_once(calls[name], device))
    base = statistics.median(times["hf_plain"]) if times.get("hf_plain") else None
    for name, ts in times.items():
        if ts:
            methods[name]["median_ms"] = 1000 * statistics.median(ts)
            if base:
                methods[name]["time_vs_plain"] = statistics.median(ts) / base
    if methods.get("hf_plain", {}).get("ok") and methods.get("trime_none", {}).get("ok"):
        methods["trime_none"]["loss_minus_plain"] = methods["trime_none"]["loss"] - methods["hf_plain"]["loss"]
    rec["methods"] = methods


SECTION_FUNCS: dict[str, Callable[[dict, Recorder], None]] = {
    "device": section_device,
    "loss": section_loss,
    "train": section_train,
    "knn": section_knn,
    "eval": section_eval,
    "hf": section_hf,
}


def run_section_child(name: str, cfg_path: str, partial: str) -> int:
    cfg = json.loads(Path(cfg_path).read_text())
    rec = Recorder(partial, cfg["deadline"])
    rec.save()
    try:
        SECTION_FUNCS[name](cfg, rec)
        if cfg.get("simulate_hang") == name:  # tests: a section that never returns is killed at its box
            time.sleep(3600)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - recorded for the report
        traceback.print_exc()
        rec["error"] = _short(exc, 500)
        rec["oom"] = _is_oom(exc) if isinstance(exc, Exception) else False
        return 1
    finally:
        compile_module = sys.modules.get("trime.loss_compile")
        if compile_module is not None:  # how the memory kernels ran
            rec["trime_loss_compile"] = {"mode": compile_module.compile_mode(),
                                         "eager_because": compile_module.STATE.broken}
    return 0


# ----------------------------------------------------------------------------- parent side


def section_boxes(profile: dict, sections: list[str], budget_s: float) -> dict[str, float]:
    """Seconds per section: the budget split in proportion to the profile's shares."""
    shares = {s: profile["boxes"][s] for s in sections}
    total = sum(shares.values())
    return {s: budget_s * share / total for s, share in shares.items()}


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    profile = DRY_PROFILE if args.dry_run else GPU_PROFILE
    budget = args.budget_s or profile["budget_s"]
    sections = [s for s in SECTIONS if s in args.sections]
    boxes = section_boxes(profile, sections, budget)
    started = time.time()
    work = Path(args.work or tempfile.mkdtemp(prefix="trime-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "check": "trime GPU check (python -m bench.gpu_check)",
        "date": today(),
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)),
        "profile": "dry-run (CPU, tiny sizes)" if args.dry_run else "gpu",
        "command": " ".join(["python -m bench.gpu_check", *sys.argv[1:]]),
        "budget_s": budget,
        "setup_s": args.setup_seconds,
        "trime_compile": args.compile,
        "sections": {},
    }
    out = args.out
    for name in sections:
        elapsed = time.time() - started
        box = min(boxes[name], budget - elapsed)
        if box < 3:
            report["sections"][name] = {"status": "skipped: global budget used up", "box_s": box}
            write_report(report, out)
            continue
        cfg = dict(profile, work=str(work), deadline=time.time() + box, simulate_hang=args.simulate_hang)
        peak = report["sections"].get("device", {}).get("result", {}).get("matmul_peak", {}).get("tflops")
        if peak and not args.dry_run:
            cfg["peak_tflops"] = peak
        cfg_path, partial = work / f"{name}.cfg.json", work / f"{name}.result.json"
        cfg_path.write_text(json.dumps(cfg))
        if partial.exists():
            partial.unlink()
        print(f"== {name}: time box {box:.0f} s ({budget - elapsed:.0f} s of the budget left)", flush=True)
        t0 = time.time()
        grace = args.grace_s
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "bench.gpu_check", "--_section", name, "--_cfg", str(cfg_path),
                 "--_partial", str(partial)],
                cwd=_REPO,
                timeout=box + grace,
                env=dict(os.environ, TRIME_COMPILE=args.compile, PYTHONUNBUFFERED="1"),
            )
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {box + grace:.0f} s (killed; partial results kept)"
        result = json.loads(partial.read_text()) if partial.exists() else {}
        if result.get("error"):
            status = ("out of memory: " if result.get("oom") else "failed: ") + result["error"]
        elif status == "ok" and result.get("skipped_reason"):
            status = result["skipped_reason"]
        elif status == "ok" and result.get("skipped"):
            status = f"ok (partly skipped: {len(result['skipped'])} item(s) over the time box)"
        report["sections"][name] = {"status": status, "seconds": time.time() - t0, "box_s": box, "result": result}
        print(f"== {name}: {status} ({time.time() - t0:.0f} s)", flush=True)
        write_report(report, out)
    report["total_s"] = time.time() - started
    write_report(report, out)
    return report


# ----------------------------------------------------------------------------- report


def _flops(x: float | None) -> str:
    """FLOPs or FLOP/s with a unit prefix (T, G, M)."""
    if x is None:
        return "–"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} "


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def render_markdown(report: dict[str, Any]) -> str:
    secs = report["sections"]
    env = secs.get("device", {}).get("result", {}).get("env", {})
    lines = [
        "# GPU check (bench/gpu_check.py)",
        "",
        f"Run {report.get('started_utc')} UTC ({report['profile']}); budget {report['budget_s']:.0f} s, total "
        f"{_fmt(report.get('total_s'), 0)} s; set-up (bring-alongs) {_fmt(report.get('setup_s'), 0)} s; trime.loss "
        f"memory kernels: compile {report.get('trime_compile', 'auto')}.",
        f"Device: {env.get('gpu') or env.get('name') or env.get('cpu_model', '–')}; driver {env.get('driver', '–')}; "
        f"CUDA {env.get('cuda', '–')}; torch {env.get('torch', '–')}; python {env.get('python', '–')}.",
        f"Command: `{report.get('command')}`",
        "",
        "| section | status | seconds | time box |",
        "|---|---|---:|---:|",
    ]
    for name, sec in secs.items():
        lines.append(f"| {name} | {sec['status']} | {_fmt(sec.get('seconds'), 0)} | {_fmt(sec.get('box_s'), 0)} |")
    lines.append("")
    renderers = {"device": _md_device, "loss": _md_loss, "train": _md_train, "knn": _md_knn, "eval": _md_eval, "hf": _md_hf}
    for name, sec in secs.items():
        result = sec.get("result") or {}
        if result:
            lines += [f"## {name}", ""] + renderers[name](result) + [""]
            if result.get("skipped"):
                lines += ["Skipped: " + "; ".join(f"{k} ({v})" for k, v in result["skipped"].items()), ""]
            if result.get("error"):
                lines += [f"Error: `{result['error']}`", ""]
    return "\n".join(lines)


def _md_device(r: dict) -> list[str]:
    peak = r.get("matmul_peak", {})
    return [f"bf16 matmul peak: **{_fmt(peak.get('tflops'), 1)} TFLOP/s** ({peak.get('what', '')}); documented "
            f"{H200_BF16_DENSE_TFLOPS:.0f}, datasheet {H200_BF16_DATASHEET_TFLOPS:.0f}."]


def _md_loss(r: dict) -> list[str]:
    methods = (r.get("settings") or {}).get("methods", [])
    head = "| dtype | V | N | " + " | ".join(f"{m} ms (x CE) / MB" for m in methods) + " |"
    lines = [head, "|" + "---|" * (3 + len(methods))]
    for e in r.get("results", []):
        cells = []
        for m in methods:
            res = e["methods"].get(m, {})
            if res.get("median_ms") is not None:
                cells.append(f"{res['median_ms']:.1f} ({_fmt(res.get('time_vs_ce'))}x) / {_fmt(res.get('peak_mb'), 0)}")
            elif res:
                cells.append("OOM" if res.get("oom") else "failed")
            else:
                cells.append("–")
        lines.append(f"| {e['dtype']} | {e['vocab']:,} | {e['n']:,} | " + " | ".join(cells) + " |")
    if r.get("dense_oom_at"):
        lines += ["", "Out of memory from: " + ", ".join(f"{k} at N={v:,}" for k, v in r["dense_oom_at"].items())]
    first = {}
    for e in r.get("results", []):
        for m, res in e["methods"].items():
            if res.get("first_call_s") is not None:
                first[m] = max(first.get(m, 0.0), res["first_call_s"])
    if first:
        lines += ["", "Slowest first (warm-up) call, which includes any torch.compile of the memory kernels: "
                  + ", ".join(f"{m} {v:.1f} s" for m, v in first.items()) + "."]
    lines += ["", "Times: median of the interleaved repeats after a warm-up call; memory: peak allocated above the "
              "inputs (torch.cuda.max_memory_allocated)."]
    return lines


def _md_train(r: dict) -> list[str]:
    m = r.get("model", {})
    base = r.get("baseline")
    lines = [f"Model: `{' '.join(m.get('argv_arch', []))}`, {_fmt(m.get('params'))} parameters, {m.get('precision')}, "
             f"{_fmt(m.get('tokens_per_step'))} tokens per step ({m.get('segments')} x {m.get('tokens_per_sample')}).", "",
             f"| criterion | words/s | ratio vs {base} | per-round ratios | MFU | counted matmul rate |",
             "|---|---:|---:|---|---:|---:|"]
    mfu = (r.get("mfu") or {}).get("per_criterion", {})
    for name, res in (r.get("results") or {}).items():
        f = mfu.get(name, {})
        lines.append(f"| `{name}` | {_fmt(res['words_per_s'], 0)} | {_fmt(res.get('ratio_vs_' + str(base)), 3)} | "
                     f"{res.get('per_round_ratio_vs_' + str(base))} | {_fmt(f.get('mfu_vs_measured_peak'), 3)} | "
                     f"{_flops(f.get('counted_flops_per_s'))}FLOP/s |")
    fl = r.get("flops", {}).get("analytic", {})
    if fl:
        counted = r["flops"].get("counted_per_step", {})
        lines += ["", f"Model FLOPs per step (analytic, forward + backward): {_flops(fl['step_flops'])}FLOP (forward: "
                  + ", ".join(f"{k} {_flops(v)}FLOP" for k, v in fl["forward_parts"].items()) + "). Counted by "
                  "torch.utils.flop_counter (matrix products only, one step): "
                  + (", ".join(f"`{k}` {_flops(v)}FLOP" for k, v in counted.items()) or "–") + "."]
        mfu = r.get("mfu") or {}
        lines += ["", f"MFU = analytic model FLOPs per token x words/s / {_fmt(mfu.get('peak_tflops_used'), 1)} TFLOP/s "
                  f"({mfu.get('peak_source')}); the TRIME criteria are credited with the same model FLOPs (their memory "
                  "scores are extra work, visible in the counted column)."]
    if r.get("errors"):
        lines += ["", "Not built: " + "; ".join(f"{k}: {v}" for k, v in r["errors"].items())]
    return lines


def _md_knn(r: dict) -> list[str]:
    lines = [r.get("faiss", {}).get("faiss_gpu", ""), "",
             "| keys | dim | metric | k | queries/s | query batch | GPU bytes |", "|---:|---:|---|---:|---:|---:|---:|"]
    for run in r.get("runs", []):
        qps = _fmt(run.get("queries_per_s"), 0) if run.get("queries_per_s") else ("OOM" if run.get("oom") else run.get("error"))
        lines.append(f"| {run['count']:,} | {run.get('dim', '–')} | {run.get('metric', '–')} | {run.get('k', '–')} | {qps} | "
                     f"{run.get('query_batch', '–')} | {_fmt(run.get('gpu_bytes'))} |")
    ex = r.get("exactness")
    if ex:
        lines += ["", f"Exactness on {ex['keys']:,} keys, {ex['queries']} queries, k={ex['k']}: " + "; ".join(
            f"{m}: " + ", ".join(f"{k} {_fmt(v, 4)}" for k, v in ex[m].items()) for m in ("ip", "l2") if m in ex)]
    return lines


def _md_eval(r: dict) -> list[str]:
    ds = r.get("datastore", {})
    lines = [f"Datastore: {_fmt(ds.get('keys'))} keys ({ds.get('key_dtype')}) extracted in {_fmt(ds.get('seconds'), 1)} s.", "",
             "| run | tokens/s | vs none | ppl | tokens |", "|---|---:|---:|---:|---:|"]
    for name, res in (r.get("results") or {}).items():
        if "error" in res:
            lines.append(f"| {name} | failed: {res['error']} | | | |")
        else:
            lines.append(f"| {name} | {_fmt(res['tokens_per_s'], 0)} | {_fmt(res.get('vs_none'), 3)} | "
                         f"{_fmt(res.get('ppl'))} | {_fmt(res.get('tokens'))} |")
    return lines


def _md_hf(r: dict) -> list[str]:
    if r.get("skipped_reason"):
        return [r["skipped_reason"]]
    m = r.get("model", {})
    lines = [f"GPT-2 {m.get('config')}, {_fmt(m.get('params'))} parameters, bf16, batch {m.get('batch')}.", "",
             "| loss | ms (fwd+bwd) | vs plain HF | peak MB | loss |", "|---|---:|---:|---:|---:|"]
    for name, res in (r.get("methods") or {}).items():
        if res.get("ok"):
            lines.append(f"| {name} | {_fmt(res.get('median_ms'), 1)} | {_fmt(res.get('time_vs_plain'), 3)} | "
                         f"{_fmt(res.get('peak_mb'), 0)} | {_fmt(res.get('loss'), 4)} |")
        else:
            lines.append(f"| {name} | {'OOM' if res.get('oom') else 'failed'}: {res.get('error')} | | | |")
    return lines


def merge_reports(paths: list[str]) -> dict[str, Any]:
    """One report from a run and its reruns (e.g. ``--sections train`` after a failure)."""
    merged: dict[str, Any] = {}
    for path in paths:
        with open(path) as fh:
            report = json.load(fh)
        sections = {**merged.get("sections", {}), **report["sections"]}
        runs = merged.get("merged_runs", []) + [{k: report.get(k) for k in ("started_utc", "command", "setup_s")}]
        merged = {**merged, **report, "sections": sections, "merged_runs": runs}
    merged["total_s"] = sum(s.get("seconds") or 0 for s in merged["sections"].values())
    return merged


def write_report(report: dict[str, Any], out: str) -> None:
    write_json(out + ".json", report)
    tmp = f"{out}.md.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(render_markdown(report) + "\n")
    os.replace(tmp, out + ".md")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="every section at tiny sizes on the CPU")
    p.add_argument("--budget-s", type=float, default=None, help="global time budget (default 270 s; dry run 900 s)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--out", default=None, help="output prefix (default bench/results/gpu-check)")
    p.add_argument("--work", default=None, help="scratch directory (default: a new temp dir)")
    p.add_argument("--setup-seconds", type=float, default=None, help="set-up time to record (from gpu_check.sh)")
    p.add_argument("--compile", default=os.environ.get("TRIME_COMPILE", "auto"), choices=["auto", "always", "never"],
                   help="trime.loss memory kernels: torch.compile (auto: for large calls) or eager ($TRIME_COMPILE)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="measure nothing: merge earlier reports (a later file's sections replace an earlier's) into --out")
    p.add_argument("--grace-s", type=float, default=15.0, help="seconds a section may run over its box before it is killed")
    p.add_argument("--simulate-hang", default=None, help=argparse.SUPPRESS)  # tests: this section hangs
    p.add_argument("--_section", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_cfg", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_partial", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._section is None:
        args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
        unknown = sorted(set(args.sections) - set(SECTIONS))
        if unknown:
            p.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
        if args.out is None:
            args.out = str(_REPO / "bench" / "results" / "gpu-check")
        if not args.dry_run and args.merge is None:
            import torch

            if not torch.cuda.is_available():
                p.error("CUDA is not available: run this on the GPU machine (bench/gpu_check.sh), or use --dry-run")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._section is not None:
        return run_section_child(args._section, args._cfg, args._partial)
    report = merge_reports(args.merge) if args.merge else run_check(args)
    if args.merge:
        write_report(report, args.out)
    print(render_markdown(report))
    print(f"wrote {args.out}.json and {args.out}.md", flush=True)
    failed = [n for n, s in report["sections"].items() if not (s["status"].startswith("ok") or "skipped" in s["status"])]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
