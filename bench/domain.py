"""``python -m bench.domain``: swap a WikiText model's datastore for another domain's, and delete a document.

The analogue of TRIME's Table 5 (Zhong et al. 2022: a WikiText-103 model evaluated on BooksCorpus with its
Wikipedia datastore, then with a BooksCorpus datastore swapped in, without retraining), plus a deletion
measurement (issue 25). Every step is a public trime command in its own process (wall time, peak RSS and the
load average at its end are recorded), and every step is reused on a re-run, so an interrupted run resumes.

Model: the TrimeLM_ext of ``make real-model`` (SmolLM2-135M, LoRA fine-tuned on WikiText-2 with TRIME's
external-memory loss): ``<work>/models/trimelm_ext``, and the WikiText text it was trained and tuned on,
``<work>/data`` (``--work`` defaults to :mod:`bench.real_model`'s work dir; ``--model``/``--wiki-data``
override). Second domain: the Python standard library's own source files (``sysconfig``'s ``stdlib`` path;
real text on every machine with a Python, and far from Wikipedia prose). Files, not lines, are split (seeded)
into a datastore part (``train.txt``), a valid part and a held-out test part; each file is preceded by a
WikiText-style heading line `` = relative/path.py = ``, so that with ``--documents heading`` a document is a
file. The Wikipedia datastore is the real-model run's datastore text (``<work>/data/train.txt``).

Memory settings, the same for every row: tuned once with ``trime-eval --tune`` on the WikiText valid text with
the Wikipedia datastore (the real-model run's protocol: the model and its settings are fixed, then the
datastore is swapped), or taken from a tuned results file (``--settings-from``, e.g. the real-model run's
``eval/trimelm-ext-trimelm-ext.json``; its metric is then the datastores' metric). Datastores use an exact
(``Flat``) index by default, so that rows differ only by the keys searched.

Rows: perplexity on the Python test part with no memory, with local + long memory only (no datastore),
with the Wikipedia datastore, with the Python datastore swapped in, and with both (the Wikipedia datastore
copied, then the Python source added with ``trime-build-datastore --add``); WikiText test perplexity with
no memory, Wikipedia and both. Deletion: one file F of the datastore part (seeded) is evaluated as held-out
text (its heading and text again) with the Python datastore, then after ``--remove-docs`` (F's title) and
after ``--compact`` (which must give the same perplexity), with the sources of its top neighbours from
``trime-eval --dump-neighbors`` (after the removal none may come from F).

``--tiny`` runs every step on a tiny random GPT-2 built from a config (tokenizer trained on the shipped
WikiText-2 sample) and tiny slices, to check each command line in seconds. Results:
``bench/results/domain.{md,json}`` (``--tiny``: ``<work>/domain/domain-tiny.{md,json}``).
Usage: ``python -m bench.domain [--tiny] [--work DIR]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import random
import shutil
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from bench.common import machine_info, today
from bench.real_model import RealModelRun, article_prefix
from trime.adapters.base import heading_title
from trime.cli import POSITIVE_INT, Parser
from trime.errors import fail
from trime.io_utils import atomic_path, read_json, sha256_file, write_json_atomic
from trime.pipeline import BIN, read_marker

REPO = Path(__file__).resolve().parents[1]
REAL_MODEL_WORK = REPO / "real-model-work"  # bench.real_model's default --work
TINY_WORK = Path("/tmp/trime-bench-domain-tiny")
WIKI, PYTHON = "wikitext", "python"  # the datastores' source names
# stdlib folders left out: tests, the IDE, generated codec tables, bundled wheels and data
STDLIB_SKIP = frozenset({"test", "tests", "idlelib", "lib2to3", "turtledemo", "encodings", "ensurepip", "pydoc_data",
                         "site-packages", "dist-packages", "__pycache__", "__phello__", "tkinter"})
TUNED_KNOBS = ("softmax_temp", "external_temp", "lmbda", "interp_temp")


@dataclass(frozen=True)
class DomainBudget:
    """Sizes, windows and memory settings of a run (every row shares them)."""

    python_train_tokens: int  # the Python datastore part (at least, whole files)
    python_valid_tokens: int
    python_test_tokens: int
    wiki_test_words: int  # whole articles from the start of the real-model run's WikiText test text
    wiki_tune_tokens: int  # trime-eval --tune-tokens on the WikiText valid text
    min_file_tokens: int  # stdlib files of this many tokens (by the model's tokenizer) are used
    max_file_tokens: int
    tokens_per_sample: int
    context_window: int
    max_tokens: int
    mem_size: int
    k: int
    nprobe: int
    index_factory: str
    dump_top: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    # SmolLM2 extracts ~400 tokens/s on 2 idle cores: three extractions (76k + 60k + 60k tokens) ~8 min, the tuning and
    # evaluations (~35k tokens, forward passes shared through --cache-dir) and 15 model loads ~6 min. Measured: 32 min
    # with the cores shared with another job (load average ~3.5, 155 tokens/s). Windows as the real-model run.
    "real": DomainBudget(
        python_train_tokens=60_000, python_valid_tokens=4_000, python_test_tokens=8_000, wiki_test_words=3_000,
        wiki_tune_tokens=4_000, min_file_tokens=200, max_file_tokens=3_000, tokens_per_sample=512, context_window=64,
        max_tokens=2048, mem_size=2048, k=256, nprobe=32, index_factory="Flat", dump_top=16,
    ),
    "tiny": DomainBudget(
        python_train_tokens=3_000, python_valid_tokens=400, python_test_tokens=600, wiki_test_words=400,
        wiki_tune_tokens=300, min_file_tokens=100, max_file_tokens=1_500, tokens_per_sample=64, context_window=16,
        max_tokens=512, mem_size=128, k=16, nprobe=4, index_factory="Flat", dump_top=8,
    ),
}  # fmt: skip


# ----------------------------------------------------------------------------- data


def write_if_changed(path: Path, text: str) -> None:
    """``text`` into ``path`` atomically, unless it already holds it (a rewrite would change nothing but mtimes)."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stdlib_files(root: Path) -> List[str]:
    """Relative paths (sorted) of the stdlib's ``*.py`` files outside STDLIB_SKIP, readable as UTF-8, without a line
    that would read as a WikiText article heading (only the file's own heading line may start a document)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in STDLIB_SKIP for part in rel.parts[:-1]) or rel.name.startswith("_sysconfigdata"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if any(heading_title(line.split()) is not None for line in text.splitlines()):
            continue
        found.append(rel.as_posix())
    return found


def document(root: Path, rel: str) -> str:
    """One file as a document: its heading line, then its text (ending with a newline)."""
    text = (root / rel).read_text(encoding="utf-8")
    return f" = {rel} = \n" + text + ("" if text.endswith("\n") else "\n")


def python_corpus(root: Path, tokenizer, budget: DomainBudget, seed: int, out: Path) -> dict:
    """``out/{train,valid,test}.txt``: whole stdlib files, shuffled with ``seed``, test first, then valid, then train,
    each part until it holds its tokens; the deletion file F (seeded, from train). Returns the corpus record."""
    files = stdlib_files(root)
    rng = random.Random(seed)
    rng.shuffle(files)
    wanted = {"test": budget.python_test_tokens, "valid": budget.python_valid_tokens,
              "train": budget.python_train_tokens}
    parts: Dict[str, List[str]] = {split: [] for split in wanted}
    tokens: Dict[str, Dict[str, int]] = {split: {} for split in wanted}
    order = iter(wanted)
    split = next(order)
    for rel in files:
        text = document(root, rel)
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not budget.min_file_tokens <= n <= budget.max_file_tokens:
            continue
        parts[split].append(rel)
        tokens[split][rel] = n
        if sum(tokens[split].values()) >= wanted[split]:
            split = next(order, None)
            if split is None:
                break
    if split is not None:
        fail(f"{root} has too few Python files of {budget.min_file_tokens}-{budget.max_file_tokens} tokens for the "
             f"{split} part ({sum(tokens[split].values()):,} of {wanted[split]:,} tokens); pass a smaller budget")
    record: dict = {"python": platform.python_version(), "python_build": sys.version, "stdlib": str(root),
                    "seed": seed, "candidate_files": len(files), "skipped_folders": sorted(STDLIB_SKIP), "splits": {}}
    for split, names in parts.items():
        text = "".join(document(root, rel) for rel in names)
        write_if_changed(out / f"{split}.txt", text)
        record["splits"][split] = {
            "files": names, "file_list_sha256": text_sha256("\n".join(names)), "text_sha256": text_sha256(text),
            "bytes": len(text.encode("utf-8")), "tokens_by_file_sum": sum(tokens[split].values()),
        }  # fmt: skip
    victim = random.Random(seed + 1).choice(parts["train"])
    record["deleted"] = {"file": victim, "title": victim, "tokens": tokens["train"][victim]}
    return record


def wiki_data(source: Path, out: Path, budget: DomainBudget) -> dict:
    """``out``: the WikiText text of the model's run: its datastore text (train), valid (tuning) and a test prefix of
    whole articles."""
    record = {"from": str(source)}
    for split in ("train", "valid", "test"):
        path = source / f"{split}.txt"
        if not path.is_file():
            fail(f"--wiki-data {source} has no {split}.txt; run `make real-model` or pass the folder of its data/")
        text = path.read_text(encoding="utf-8")
        if split == "test":
            text = article_prefix(text, budget.wiki_test_words)
        write_if_changed(out / f"{split}.txt", text)
        record[split] = {"bytes": len(text.encode("utf-8")), "words": len(text.split()), "sha256": text_sha256(text)}
    return record


def build_tiny_model(work: Path) -> None:
    """``work``: a tiny random GPT-2 (tokenizer trained on the shipped WikiText-2 sample) as models/trimelm_ext and
    slices of the sample as data/ (the layout of the real-model run's work dir)."""
    model = work / "models" / "trimelm_ext"
    sample = REPO / "samples" / "wikitext-2"
    for split, words in (("train", 3_000), ("valid", 1_500), ("test", 1_500)):
        text = (sample / f"wiki.{split}.tokens").read_text(encoding="utf-8")
        write_if_changed(work / "data" / f"{split}.txt", article_prefix(text, words))
    if (model / "config.json").is_file():
        return
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from trime.hf.text import train_bpe_tokenizer

    staging = work / "models" / "trimelm_ext.partial"
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = train_bpe_tokenizer([sample / "wiki.train.tokens"], 512, staging)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(staging)
    os.replace(staging, model)


# ----------------------------------------------------------------------------- the run


class DomainRun(RealModelRun):
    """The run's steps under ``<work>/domain``: :class:`bench.real_model.RealModelRun`'s logging of each step's
    time, peak RSS and load."""

    def configure(self, args: argparse.Namespace, budget: DomainBudget, model: Path, wiki_source: Path) -> None:
        self.args, self.budget_d, self.model, self.wiki_source = args, budget, model, wiki_source
        self.root = self.work
        self.ran_now: List[str] = []
        self.wiki_dir, self.python_dir, self.repeat_dir = self.root / "wiki", self.root / "python", self.root / "repeat"
        self.eval_dir, self.dump_dir = self.root / "eval", self.root / "dumps"
        for folder in (self.eval_dir, self.dump_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def run_tool(self, cmd: Sequence, log_name: str, threads: Optional[int] = None) -> str:
        self.ran_now.append(log_name)
        return super().run_tool(cmd, log_name, threads)

    def step_order(self) -> List[str]:
        """The recorded steps in the order they last ran (their logs' times)."""
        return sorted(self.step_seconds(), key=lambda name: (self.logs / f"{name}.log").stat().st_mtime
                      if (self.logs / f"{name}.log").exists() else 0.0)

    def window_flags(self) -> List[str]:
        b = self.budget_d
        return ["--context-window", str(b.context_window), "--tokens-per-sample", str(b.tokens_per_sample),
                "--max-tokens", str(b.max_tokens), "--cpu", "--no-progress-bar"]

    # ------------------------------------------------------------------ data

    def data(self) -> dict:
        from transformers import AutoTokenizer

        b = self.budget_d
        tokenizer = AutoTokenizer.from_pretrained(self.model)
        corpus = python_corpus(self.args.stdlib, tokenizer, b, self.args.seed, self.python_dir)
        corpus["wiki"] = wiki_data(self.wiki_source, self.wiki_dir, b)
        deleted = corpus["deleted"]["file"]
        write_if_changed(self.repeat_dir / "test.txt", document(self.args.stdlib, deleted))
        corpus["repeat"] = {"text_sha256": text_sha256(document(self.args.stdlib, deleted))}
        write_json_atomic(self.root / "corpus.json", corpus)
        return corpus

    # ------------------------------------------------------------------ datastores

    def data_stamp(self, data: Path) -> str:
        return sha256_file(data / "train.txt")

    def fresh(self, name: str, stamp: dict) -> bool:
        """Whether step ``name`` finished with inputs ``stamp`` (its marker ``<name>.DONE`` records them)."""
        done = read_marker(self.root / f"{name}.DONE")
        return done is not None and done.get("stamp") == stamp

    def mark(self, name: str, stamp: dict, started: float) -> None:
        write_json_atomic(self.root / f"{name}.DONE", {"stamp": stamp, "seconds": round(time.time() - started, 1)})

    def unmark(self, *names: str) -> None:
        for name in names:
            (self.root / f"{name}.DONE").unlink(missing_ok=True)

    def build(self, name: str, data: Path, source: str, rule: str, metric: str) -> Path:
        """A first build of ``data``'s train split as source ``source`` (documents by ``rule``)."""
        out = self.root / f"ds-{name}"
        stamp = {"data": self.data_stamp(data), "model": str(self.model), "metric": metric,
                 "budget": self.budget_d.as_dict()}
        if self.fresh(f"ds-{name}", stamp):
            return out
        self.unmark(f"ds-{name}")
        shutil.rmtree(out, ignore_errors=True)
        self.reporter.datastore(f"{source} ({data / 'train.txt'})")
        started = time.time()
        self.run_tool([BIN / "trime-build-datastore", data, "--path", self.model, "--output", out, "--source", source,
                       "--documents", rule, "--index-factory", self.budget_d.index_factory, "--metric", metric,
                       *self.window_flags()], f"datastore-{name}")
        self.mark(f"ds-{name}", stamp, started)
        return out

    def combined(self, wiki: Path, metric: str) -> Path:
        """The Wikipedia datastore copied, then the Python datastore text added with ``--add``."""
        out = self.root / "ds-both"
        stamp = {"wiki": sha256_file(wiki / "meta.json"), "python": self.data_stamp(self.python_dir)}
        if self.fresh("ds-both", stamp):
            return out
        self.unmark("ds-both")
        shutil.rmtree(out, ignore_errors=True)
        self.reporter.datastore(f"{WIKI} + {PYTHON} (--add)")
        started = time.time()
        shutil.copytree(wiki, out)
        self.run_tool([BIN / "trime-build-datastore", "--add", self.python_dir, "--path", self.model, "--output", out,
                       "--source", PYTHON, "--documents", "heading", *self.window_flags()], "datastore-both-add")
        self.mark("ds-both", stamp, started)
        return out

    def indexed_addition(self, wiki: Path) -> tuple:
        """IVF-PQ: the Wikipedia datastore indexed with ``--index-factory auto`` (quantizers trained on its keys
        only), then the Python source added into that index with ``--add``; and a copy whose index
        ``--build-index`` retrained on both sources with the same factory (what a rebuild gives)."""
        added, retrained = self.root / "ds-both-ivf", self.root / "ds-both-ivf-retrained"
        stamp = {"wiki": sha256_file(wiki / "meta.json"), "python": self.data_stamp(self.python_dir)}
        if not self.fresh("ds-both-ivf", stamp):
            self.unmark("ds-both-ivf", "ds-both-ivf-retrained")
            shutil.rmtree(added, ignore_errors=True)
            self.reporter.datastore(f"{WIKI} (IVF-PQ) + {PYTHON} (--add into the trained index)")
            started = time.time()
            shutil.copytree(wiki, added)
            self.run_tool([BIN / "trime-build-datastore", "--output", added, "--build-index", "--index-factory",
                           "auto", "--no-progress-bar"], "index-wiki-ivf")
            self.run_tool([BIN / "trime-build-datastore", "--add", self.python_dir, "--path", self.model, "--output",
                           added, "--source", PYTHON, "--documents", "heading", *self.window_flags()],
                          "datastore-both-ivf-add")
            self.mark("ds-both-ivf", stamp, started)
        factory = read_json(added / "meta.json")["index"]["factory"]
        stamp = {"added": sha256_file(added / "meta.json")}
        if not self.fresh("ds-both-ivf-retrained", stamp):
            shutil.rmtree(retrained, ignore_errors=True)
            started = time.time()
            shutil.copytree(added, retrained)
            self.run_tool([BIN / "trime-build-datastore", "--output", retrained, "--build-index", "--index-factory",
                           factory, "--no-progress-bar"], "index-both-ivf-retrain")
            self.mark("ds-both-ivf-retrained", stamp, started)
        return added, retrained

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, tag: str, data: Path, memory: str, knobs: dict, store: Optional[Path] = None,
                 dump: bool = False) -> dict:
        """``trime-eval`` of ``data``'s test split with ``memory`` and the run's knobs; reused while its datastore's
        meta.json is the one it searched."""
        b = self.budget_d
        result = self.eval_dir / f"{tag}.json"
        dump_file = self.dump_dir / f"{tag}.jsonl"
        stale = not result.is_file() or (dump and not dump_file.is_file())
        if not stale and store is not None:
            stale = read_json(result).get("datastore", {}).get("meta_sha256") != sha256_file(store / "meta.json")
        if stale:
            self.reporter.evaluating(tag)
            argv = [BIN / "trime-eval", data, "--path", self.model, "--gen-subset", "test", "--memory", memory,
                    *self.window_flags(), "--results-json", result, "--cache-dir", self.root / "eval-cache"]
            if memory in ("long", "external"):
                argv += ["--mem-size", b.mem_size, "--softmax-temp", knobs["softmax_temp"]]
            if memory == "external":
                argv += ["--datastore", store, "--k", b.k, "--nprobe", b.nprobe, "--metric", knobs["metric"],
                         "--external-temp", knobs["external_temp"], "--lmbda", knobs["lmbda"],
                         "--interp-temp", knobs["interp_temp"]]
            if dump:
                argv += ["--dump-neighbors", dump_file, "--dump-top", b.dump_top]
            self.run_tool(argv, f"eval-{tag}")
        record = read_json(result)
        test = next(r for r in record["results"] if r.get("subset") == "test")
        row = {"tag": tag, "memory": memory, "datastore": store.name if store else None, "ppl": test["ppl"],
               "tokens": test["tokens"], "seconds": test.get("seconds"), "cached_seconds": test.get("cached_seconds"),
               "datastore_keys": (record.get("datastore") or {}).get("count"),
               "datastore_deleted": (record.get("datastore") or {}).get("deleted")}
        if dump:
            row["neighbours"] = neighbour_sources(dump_file, self.corpus["deleted"]["title"])
        return row

    def knobs(self, wiki_store_for_tuning) -> dict:
        """The memory knobs of every row: ``--settings-from``'s, else tuned once on the WikiText valid text."""
        if self.args.settings_from is not None:
            record = read_json(self.args.settings_from, what="--settings-from results file")
            chosen = (record.get("tuning") or {}).get("chosen")
            if not chosen:
                fail(f"--settings-from {self.args.settings_from} holds no tuned settings; pass a trime-eval --tune "
                     "results file")
            settings = record.get("settings") or {}
            knobs = {k: chosen.get(k) if chosen.get(k) is not None else settings.get(k) for k in TUNED_KNOBS}
            knobs["metric"] = settings.get("metric") or "l2"
            return {**fill_knobs(knobs), "origin": f"--settings-from {self.args.settings_from}"}
        store = wiki_store_for_tuning()
        result = self.eval_dir / "tune-wiki-valid.json"
        stamp = {"store": sha256_file(store / "meta.json"), "valid": sha256_file(self.wiki_dir / "valid.txt")}
        if not self.fresh("tune", stamp):
            self.reporter.evaluating("tuning on the WikiText valid text, Wikipedia datastore")
            b = self.budget_d
            started = time.time()
            self.run_tool([BIN / "trime-eval", self.wiki_dir, "--path", self.model, "--memory", "external",
                           "--mem-size", b.mem_size, "--datastore", store, "--k", b.k, "--nprobe", b.nprobe,
                           "--tune", "--tune-tokens", b.wiki_tune_tokens, "--gen-subset", "test", *self.window_flags(),
                           "--results-json", result, "--cache-dir", self.root / "eval-cache"], "tune")
            self.mark("tune", stamp, started)
        record = read_json(result)
        chosen = record["tuning"]["chosen"]
        knobs = fill_knobs({k: chosen.get(k) for k in TUNED_KNOBS})
        knobs["metric"] = record["settings"]["metric"]
        tuned_on = next(r for r in record["results"] if r.get("subset") == "valid")
        return {**knobs, "origin": f"tuned on the first {record['tuning']['tokens']:,} tokens of the WikiText valid "
                f"text with the Wikipedia datastore (ppl there {tuned_on['ppl']:.2f}; {result.name})",
                "tuning_verdict": record["tuning"].get("verdict")}

    # ------------------------------------------------------------------ deletion

    def deletion(self, python_store: Path, knobs: dict) -> dict:
        """F evaluated with the Python datastore, after ``--remove-docs`` F (a copy of it) and after ``--compact`` (a
        copy of that): each state keeps its own directory, so that each row's datastore stays as it searched it."""
        title = self.corpus["deleted"]["title"]
        removed, compacted = self.root / "ds-python-removed", self.root / "ds-python-compacted"
        rows = {"none": self.evaluate("repeat-none", self.repeat_dir, "none", knobs),
                "present": self.evaluate("repeat-present", self.repeat_dir, "external", knobs, python_store, dump=True)}
        stamp = {"python": sha256_file(python_store / "meta.json"), "title": title}
        if not self.fresh("removed", stamp):
            self.unmark("removed")
            shutil.rmtree(removed, ignore_errors=True)
            started = time.time()
            shutil.copytree(python_store, removed)
            listing = self.root / "remove-docs.txt"
            write_if_changed(listing, title + "\n")
            self.reporter.phase(f"  removing {title} (--remove-docs)")
            self.run_tool([BIN / "trime-build-datastore", "--output", removed, "--remove-docs", listing, "--source",
                           PYTHON, "--no-progress-bar"], "datastore-remove-docs")
            self.mark("removed", stamp, started)
        rows["removed"] = self.evaluate("repeat-removed", self.repeat_dir, "external", knobs, removed, dump=True)
        stamp = {"removed": sha256_file(removed / "meta.json")}
        if not self.fresh("compacted", stamp):
            self.unmark("compacted")
            shutil.rmtree(compacted, ignore_errors=True)
            started = time.time()
            shutil.copytree(removed, compacted)
            self.reporter.phase("  compacting (--compact)")
            self.run_tool([BIN / "trime-build-datastore", "--output", compacted, "--compact", "--no-progress-bar"],
                          "datastore-compact")
            self.mark("compacted", stamp, started)
        rows["compacted"] = self.evaluate("repeat-compacted", self.repeat_dir, "external", knobs, compacted, dump=True)
        ppl_removed, ppl_compacted = rows["removed"]["ppl"], rows["compacted"]["ppl"]
        checks = {
            "compact_equals_removed": abs(ppl_removed - ppl_compacted) <= 1e-6 * ppl_removed,
            "no_neighbour_from_F_after_removal": rows["removed"]["neighbours"]["from_f"] == 0
            and rows["compacted"]["neighbours"]["from_f"] == 0,
            "neighbours_from_F_before_removal": rows["present"]["neighbours"]["from_f"] > 0,
        }
        return {"file": self.corpus["deleted"]["file"], "title": title, "rows": rows, "checks": checks,
                "stores": {"removed": store_info(removed), "compacted": store_info(compacted)}}

    # ------------------------------------------------------------------ all

    def run_all(self) -> dict:
        self._phase_started = time.time()
        self.reporter.phase("data")
        self.corpus = self.data()
        self.phase_done("data")
        metric_hint = None
        if self.args.settings_from is not None:
            metric_hint = (read_json(self.args.settings_from).get("settings") or {}).get("metric")
        metric = metric_hint or "l2"
        self.reporter.phase("datastores and settings")
        stores: Dict[str, Path] = {}

        def wiki_store() -> Path:
            if WIKI not in stores:
                stores[WIKI] = self.build(WIKI, self.wiki_dir, WIKI, "auto", metric)
            return stores[WIKI]

        knobs = self.knobs(wiki_store)
        wiki_store()
        stores[PYTHON] = self.build(PYTHON, self.python_dir, PYTHON, "heading", knobs["metric"])
        stores["both"] = self.combined(stores[WIKI], knobs["metric"])
        self.phase_done("datastores")
        self.reporter.phase("evaluation")
        python_rows = [
            ("no memory (--memory none)", self.evaluate("python-none", self.python_dir, "none", knobs)),
            ("local + long memory, no datastore", self.evaluate("python-long", self.python_dir, "long", knobs)),
            ("Wikipedia datastore", self.evaluate("python-wiki", self.python_dir, "external", knobs, stores[WIKI])),
            ("Python datastore (swapped in)",
             self.evaluate("python-python", self.python_dir, "external", knobs, stores[PYTHON])),
            ("Wikipedia + Python (--add)", self.evaluate("python-both", self.python_dir, "external", knobs, stores["both"])),
        ]
        wiki_rows = [
            ("no memory (--memory none)", self.evaluate("wiki-none", self.wiki_dir, "none", knobs)),
            ("Wikipedia datastore", self.evaluate("wiki-wiki", self.wiki_dir, "external", knobs, stores[WIKI])),
            ("Wikipedia + Python (--add)", self.evaluate("wiki-both", self.wiki_dir, "external", knobs, stores["both"])),
        ]
        added, retrained = self.indexed_addition(stores[WIKI])
        drift = next(h for h in read_json(added / "meta.json")["history"] if h["op"] == "add").get("drift")
        ivf_rows = [
            (label, text, self.evaluate(f"{tag}-{name}", data, "external", knobs, store))
            for name, label, store in (("both-ivf", "--add into the Wikipedia-trained index", added),
                                       ("both-ivf-retrained", "retrained on both (--build-index)", retrained))
            for tag, text, data in (("python", "Python", self.python_dir), ("wiki", "WikiText", self.wiki_dir))
        ]
        self.phase_done("evaluation")
        self.reporter.phase("deletion")
        deletion = self.deletion(stores[PYTHON], knobs)
        self.phase_done("deletion")
        return {"knobs": knobs, "python_rows": [{"label": label, **row} for label, row in python_rows],
                "wiki_rows": [{"label": label, **row} for label, row in wiki_rows], "deletion": deletion,
                "ivf_rows": [{"label": label, "text": text, **row} for label, text, row in ivf_rows], "drift": drift,
                "stores": {**{name: store_info(path) for name, path in stores.items()},
                           "both, IVF-PQ (--add)": store_info(added), "both, IVF-PQ retrained": store_info(retrained)}}


def fill_knobs(knobs: dict) -> dict:
    """Tuned knobs with trime-eval's defaults where one is missing: external-temp = softmax-temp, no kNN-LM."""
    out = dict(knobs)
    out["softmax_temp"] = out.get("softmax_temp") or 1.0
    out["external_temp"] = out.get("external_temp") or out["softmax_temp"]
    out["lmbda"] = out.get("lmbda") or 0.0
    out["interp_temp"] = out.get("interp_temp") or 1.0
    return out


def neighbour_sources(dump: Path, title: str) -> dict:
    """Of the datastore neighbours in a ``--dump-neighbors`` file: how many there are, how many come from the document
    ``title``, and for how many tokens the top datastore neighbour comes from it."""
    tokens = external = from_f = top_from_f = 0
    with open(dump, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            tokens += 1
            hits = [n for n in record.get("neighbors", []) if n.get("level") == "external"]
            external += len(hits)
            from_f += sum(n.get("document") == title for n in hits)
            top_from_f += bool(hits) and hits[0].get("document") == title
    return {"tokens": tokens, "external": external, "from_f": from_f, "top_from_f": top_from_f}


def store_info(path: Path) -> dict:
    """Keys, deleted keys, sources (keys and documents) and bytes on disk of a datastore."""
    meta = read_json(path / "meta.json")
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())  # the files of every segment included
    sources = [{k: s.get(k) for k in ("name", "file", "tokens", "documents", "document_rule")}
               for s in meta.get("sources") or []]
    deleted = sum(hi - lo for lo, hi in meta.get("deleted") or [])  # tombstoned [lo, hi) row ranges
    return {"keys": meta["count"], "deleted": deleted,
            "dim": meta["dim"], "metric": meta.get("metric"), "index": (meta.get("index") or {}).get("factory"),
            "sources": sources, "history": len(meta.get("history") or []), "bytes": size}


# ----------------------------------------------------------------------------- report


def findings(r: dict) -> List[str]:
    """The report's reading of the rows, from their numbers."""
    py = {row["tag"]: row["ppl"] for row in r["python_rows"]}
    wk = {row["tag"]: row["ppl"] for row in r["wiki_rows"]}
    d = r["deletion"]["rows"]
    knobs = r["knobs"]

    def rel(a: float, b: float) -> str:
        return f"{100 * (a / b - 1):+.1f}%"

    muted = abs(py["python-long"] / py["python-none"] - 1) < 0.005
    lines = [
        f"- Swap: on Python text the Wikipedia datastore changes perplexity {rel(py['python-wiki'], py['python-none'])} "
        f"against no memory; the Python datastore swapped in, without retraining or retuning, "
        f"{rel(py['python-python'], py['python-none'])}. (TRIME's Table 5: TrimeLM_ext on BooksCorpus 37.70 with its "
        "Wikipedia datastore, 27.84 with a BooksCorpus one.)",
        f"- Both sources in one datastore (`--add`): Python text {py['python-both']:.4f} (Python datastore alone "
        f"{py['python-python']:.4f}), WikiText text {wk['wiki-both']:.4f} (Wikipedia alone {wk['wiki-wiki']:.4f}, "
        f"no memory {wk['wiki-none']:.4f}): adding a domain leaves the other domain's perplexity "
        f"{'within 0.1%' if abs(wk['wiki-both'] / wk['wiki-wiki'] - 1) < 1e-3 else rel(wk['wiki-both'], wk['wiki-wiki'])}"
        f"; a query's nearest keys ({knobs['metric']}) come from its own domain.",
        f"- Deletion: with F in the datastore its repeat scores {d['present']['ppl']:.3f} "
        f"({rel(d['present']['ppl'], d['none']['ppl'])} against no memory; F's own keys are the top datastore "
        f"neighbour of {d['present']['neighbours']['top_from_f']} of {d['present']['neighbours']['tokens']} tokens). "
        f"After `--remove-docs` no neighbour comes from F and it scores {d['removed']['ppl']:.3f} "
        f"({rel(d['removed']['ppl'], d['none']['ppl'])}: what the rest of the Python datastore gives); after "
        f"`--compact` {d['compacted']['ppl']:.6f} (relative difference "
        f"{abs(d['compacted']['ppl'] / d['removed']['ppl'] - 1):.1e}: the same keys, summed in another order).",
    ]
    if muted:
        lines.append(
            f"- How memory acts here: the tuned temperatures (softmax-temp {knobs['softmax_temp']:.3g}, external-temp "
            f"{knobs['external_temp']:.3g}) all but switch off the joint softmax's memory (local + long memory equals no "
            f"memory), so the datastore acts through kNN-LM's interpolation (lmbda {knobs['lmbda']:.3g}), as the "
            "real-model report found for this model.")
    return lines


def write_report(payload: dict, out: Path) -> None:
    """``out``.md and .json, atomically."""
    b, r, m, c = payload["budget"], payload["result"], payload["machine"], payload["corpus"]
    knobs = r["knobs"]
    splits = c["splits"]

    def table(rows: List[dict], base: float) -> List[str]:
        lines = ["| memory | datastore keys | ppl | vs no memory | tokens |", "|---|---:|---:|---:|---:|"]
        for row in rows:
            keys = f"{row['datastore_keys']:,}" if row.get("datastore_keys") else "–"
            lines.append(f"| {row['label']} | {keys} | {row['ppl']:.3f} | {100 * (row['ppl'] / base - 1):+.1f}% | "
                         f"{row['tokens']:,} |")
        return lines

    py, wk, d = r["python_rows"], r["wiki_rows"], r["deletion"]
    lines = [
        "# Domain swap and deletion: a WikiText TrimeLM_ext on Python source (`python -m bench.domain`)",
        "",
        "TRIME's Table 5 swaps the Wikipedia datastore of a WikiText-103 model for a BooksCorpus one, without "
        "retraining. Here: the same question on the model of `make real-model` and a second domain that every machine "
        "has, the Python standard library's own source files.",
        "",
        f"- Date: {payload['date']}; machine: {m.get('cpu_model')} x {m.get('cpu_count')} cores, "
        f"{m.get('gpu', 'no GPU')}, load average when this report was written {payload['loadavg_at_end']} (each step's: "
        "see Steps); "
        f"{payload['threads']} threads per step",
        f"- Model: `{payload['model']}` ({payload['model_note']})",
        f"- Python domain: the stdlib of Python {c['python']} (`{c['stdlib']}`), `*.py` files outside "
        f"{', '.join(c['skipped_folders'])}, of {b['min_file_tokens']:,}-{b['max_file_tokens']:,} tokens, shuffled "
        f"with seed {c['seed']} and cut by file: datastore part {len(splits['train']['files'])} files "
        f"({splits['train']['bytes']:,} bytes), valid {len(splits['valid']['files'])}, test "
        f"{len(splits['test']['files'])} ({splits['test']['bytes']:,} bytes); each file after a heading line "
        "` = path.py = `, so a document is a file (`--documents heading`). File lists' sha256: train "
        f"`{splits['train']['file_list_sha256'][:16]}`, valid `{splits['valid']['file_list_sha256'][:16]}`, test "
        f"`{splits['test']['file_list_sha256'][:16]}` (full lists in the json).",
        f"- Wikipedia: the real-model run's WikiText-2 datastore text ({c['wiki']['train']['words']:,} words), and "
        f"a test prefix of whole articles ({c['wiki']['test']['words']:,} words).",
        f"- Windows of {b['tokens_per_sample']} tokens after {b['context_window']} of context; memory settings of "
        f"every row: softmax-temp {knobs['softmax_temp']:.3g}, external-temp {knobs['external_temp']:.3g}, lmbda "
        f"{knobs['lmbda']:.3g}, interp-temp {knobs['interp_temp']:.3g}, mem-size {b['mem_size']:,}, k {b['k']}, metric "
        f"{knobs['metric']}, index `{b['index_factory']}` (exact search): {knobs['origin']}.",
        "",
        "## Python test text",
        "",
        *table(py, py[0]["ppl"]),
        "",
        "## WikiText test text: does adding a domain hurt the original one?",
        "",
        *table(wk, wk[0]["ppl"]),
        "",
        "## Deleting a document",
        "",
        f"F = `{d['file']}` ({c['deleted']['tokens']:,} tokens), a file of the Python datastore part, chosen with seed "
        f"{c['seed'] + 1}. Held-out text: F again (its heading and text). `trime-build-datastore --remove-docs` "
        "with F's title tombstones its keys; `--compact` rewrites the datastore without them. Neighbours: the "
        f"datastore entries among the top {b['dump_top']} memory entries of each token (`--dump-neighbors`).",
        "",
        "| Python datastore | keys (deleted) | ppl | vs no memory | datastore neighbours from F | tokens whose top "
        "datastore neighbour is from F |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base = d["rows"]["none"]["ppl"]
    for name, label in (("none", "no memory"), ("present", "F present"), ("removed", "F removed (--remove-docs)"),
                        ("compacted", "F removed, compacted")):
        row = d["rows"][name]
        keys = f"{row['datastore_keys']:,} ({row.get('datastore_deleted') or 0:,})" if row.get("datastore_keys") else "–"
        n = row.get("neighbours")
        shown = f"{n['from_f']:,} of {n['external']:,}" if n else "–"
        top = f"{n['top_from_f']:,} of {n['tokens']:,}" if n else "–"
        lines.append(f"| {label} | {keys} | {row['ppl']:.3f} | {100 * (row['ppl'] / base - 1):+.1f}% | {shown} | {top} |")
    checks = d["checks"]
    lines += [
        "",
        "Checks: compacted perplexity equals the removed one: **" + ("yes" if checks["compact_equals_removed"] else "NO")
        + "**; no datastore neighbour from F after the removal (before and after compaction): **"
        + ("yes" if checks["no_neighbour_from_F_after_removal"] else "NO") + "**; neighbours from F before it (the "
        "check can fail): **" + ("yes" if checks["neighbours_from_F_before_removal"] else "NO") + "**.",
        "",
        "## Datastores",
        "",
        "| datastore | keys | deleted | sources (tokens, documents, rule) | index | MiB |",
        "|---|---:|---:|---|---|---:|",
    ]
    stores = {**r["stores"], "python, F removed": d["stores"]["removed"], "python, F removed, compacted":
              d["stores"]["compacted"]}
    for name, s in stores.items():
        sources = "; ".join(f"{x['name']} ({x['tokens']:,} tokens, {x['documents']:,} documents, {x['document_rule']})"
                            for x in s["sources"])
        lines.append(f"| {name} | {s['keys']:,} | {s.get('deleted') or 0:,} | {sources} | {s['index']} ({s['metric']}) | "
                     f"{s['bytes'] / 2**20:,.1f} |")
    lines += ["", "## Adding into a trained index, against retraining it", "",
              "The same two sources with an IVF-PQ index (`--index-factory auto`, nprobe "
              f"{b['nprobe']}) instead of exact search: the Wikipedia datastore's index is trained on its keys only, "
              "then `--add` encodes the Python keys with those quantizers; a copy then retrains them on both sources "
              "(`--build-index` with the same factory), which is what a rebuild gives.", "",
              "| index | text | ppl | exact search (Flat) |", "|---|---|---:|---:|"]
    exact = {"Python": next(x["ppl"] for x in py if x["tag"] == "python-both"),
             "WikiText": next(x["ppl"] for x in wk if x["tag"] == "wiki-both")}
    for row in r["ivf_rows"]:
        lines.append(f"| {row['label']} | {row['text']} | {row['ppl']:.3f} | {exact[row['text']]:.3f} |")
    drift = r.get("drift")
    if drift:
        lines += ["", f"The addition's drift report: the Python keys' relative quantization error is "
                  f"{drift['new_keys_error']:.3f} against {drift['indexed_keys_error']:.3f} for the indexed Wikipedia "
                  f"keys ({drift['ratio']:.2f}x; retraining advised above 1.5x: "
                  f"{'yes' if drift['retrain_advised'] else 'no'})."]
    lines += ["", "## What it shows", "", *findings(r), ""]
    secs, rss, load = payload["step_seconds"], payload["peak_rss_bytes"], payload["step_load"]
    ran = payload["steps_run_now"]
    lines += ["## Steps", "",
              f"Each step is one process; {len(ran)} of the {len(secs)} steps ran in the invocation that wrote this "
              "report" + ("" if len(ran) == len(secs) else " (the others were reused from an earlier invocation, "
                          "with the time, peak RSS and load recorded when they ran)") + ". The cores may be shared "
              "with other jobs: see the load column (2 cores).", "",
              "| step | seconds | peak RSS | load average at its end |", "|---|---:|---:|---:|"]
    for name in payload["step_order"]:
        seconds = secs[name]
        peak = rss.get(name)
        lines.append(f"| {name} | {seconds:,.0f} | " + (f"{peak / 2**30:.2f} GiB" if peak else "–")
                     + f" | {load.get(name, '–')} |")
    lines += ["", f"Wall time {sum(payload['phase_seconds'].values()) / 60:.1f} min (resumed runs included): "
              + ", ".join(f"{k} {v:.0f} s" for k, v in payload["phase_seconds"].items()) + ".", ""]
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    write_json_atomic(out.with_suffix(".json"), json.loads(json.dumps(payload, default=str)))
    print(f"wrote {out.with_suffix('.md')} and .json", flush=True)


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m bench.domain", description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true",
                   help="every step on a tiny random GPT-2 and tiny slices (seconds): checks the command lines")
    p.add_argument("--work", type=Path, default=None,
                   help="the real-model run's work dir (models/trimelm_ext, data/); this run writes under WORK/domain "
                        f"(default {REAL_MODEL_WORK}; --tiny: {TINY_WORK}, built here)")
    p.add_argument("--model", type=Path, default=None, help="the model dir (default WORK/models/trimelm_ext)")
    p.add_argument("--wiki-data", type=Path, default=None,
                   help="folder of the model's WikiText train.txt (datastore text), valid.txt and test.txt "
                        "(default WORK/data)")
    p.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                   help="the Python standard library's folder (default: this Python's)")
    p.add_argument("--settings-from", type=Path, default=None,
                   help="a trime-eval --tune results file whose tuned settings (and metric) every row uses, e.g. "
                        "WORK/eval/trimelm-ext-trimelm-ext.json (default: tune once on WikiText valid)")
    p.add_argument("--seed", type=POSITIVE_INT, default=1, help="seed of the file split and of the deleted file")
    p.add_argument("--threads", type=POSITIVE_INT, default=None,
                   help="CPU threads of every step (OMP_NUM_THREADS; default: the environment's, else 2)")
    p.add_argument("--out", type=Path, default=None,
                   help="output prefix (default bench/results/domain; --tiny: WORK/domain/domain-tiny)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = (args.work or (TINY_WORK if args.tiny else REAL_MODEL_WORK)).expanduser().resolve()
    if args.tiny:
        build_tiny_model(work)
    model = (args.model or work / "models" / "trimelm_ext").resolve()
    wiki_source = (args.wiki_data or work / "data").resolve()
    if not (model / "config.json").is_file():
        fail(f"--model {model} is not a model dir (no config.json); run `make real-model` first (its work dir holds "
             "models/trimelm_ext), or pass --work/--model")
    if not (wiki_source / "train.txt").is_file():
        fail(f"--wiki-data {wiki_source} has no train.txt; run `make real-model` first (its work dir holds data/), "
             "or pass --work/--wiki-data")
    if not args.stdlib.is_dir():
        fail(f"--stdlib {args.stdlib} is not a folder; pass the Python standard library's folder")
    os.environ["OMP_NUM_THREADS"] = str(args.threads or os.environ.get("OMP_NUM_THREADS") or 2)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    budget = PRESETS["tiny" if args.tiny else "real"]
    out = args.out or (work / "domain" / "domain-tiny" if args.tiny else REPO / "bench" / "results" / "domain")
    machine = machine_info()
    run = DomainRun(budget, work / "domain", {}, [])  # type: ignore[arg-type]
    run.configure(args, budget, model, wiki_source)
    started = time.time()
    result = run.run_all()
    payload = {
        "date": today(), "machine": machine, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "threads": os.environ["OMP_NUM_THREADS"], "tiny": args.tiny, "work": str(work), "model": str(model),
        "model_note": "a tiny random GPT-2 (--tiny)" if args.tiny else
        "SmolLM2-135M, LoRA fine-tuned with TRIME's external-memory loss on WikiText-2 by `make real-model`",
        "budget": budget.as_dict(), "corpus": run.corpus, "result": result, "step_seconds": run.step_seconds(),
        "peak_rss_bytes": run.peak_rss(), "step_load": run.step_load(), "phase_seconds": run.phase_seconds(),
        "step_order": run.step_order(), "steps_run_now": run.ran_now,
    }  # fmt: skip
    write_report(payload, Path(out))
    print(f"total {time.time() - started:.0f} s this run", flush=True)
    failed = [name for name, ok in result["deletion"]["checks"].items() if not ok]
    if failed:
        fail(f"deletion checks failed: {', '.join(failed)}; see {Path(out).with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
