"""One pipeline for ``make demo`` and ``make reproduce``: prepare -> train -> evaluate -> table.

Every step is a public trime tool, run as a user runs it: ``trime-train``,
``trime-bm25-batches`` and ``trime-build-datastore`` as commands in their own processes
(so that ``jobs`` of them can run at once), data preparation and ``trime-eval`` in this
process (torch, fairseq and the memory kernels load once instead of once per row).
Each step logs to ``<work>/logs``; a failed step stops the run with one line that names
its log and quotes the log's tail. Finished steps are reused: a training leaves a
``DONE`` marker with its update count, an evaluation its results json (newer than the
model's marker).

A :class:`Budget` is the model and training budget that every model of a run shares;
:func:`demo_budget` (``make demo``: a few minutes on 2 cores) and
:func:`reproduce_budget` (``make reproduce`` and its ``--quick`` variant) are the two
presets. :class:`Pipeline` runs the phases and returns the table's rows; each front-end
prints or writes its own table, and says its own progress through a :class:`Reporter`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

from trime.errors import fail
from trime.io_utils import write_json_atomic
from trime.memories import CROSS_SEGMENT_MEMORIES

BIN = Path(sys.executable).parent
PHASES = ("data", "plan", "training", "datastores", "evaluation")


@dataclass(frozen=True)
class Budget:
    """Model size, segment length, training budget and evaluation settings shared by every model of a run."""

    layers: int
    dim: int
    ffn: int
    heads: int
    tokens_per_sample: int
    segments_per_batch: int
    max_update: int
    warmup_updates: int
    # adaptive-softmax cutoffs; None: a full softmax tied to the input embeddings
    cutoff: Optional[str]
    context_window: int
    mem_size: int
    k: int
    # tuning reads this many tokens of valid (whole batches); None: all of valid
    tune_tokens: Optional[int]
    log_interval: int
    byte_level: bool = False
    # training flags of this preset beyond the shared ones
    extra_train_args: tuple = ()

    def head_args(self) -> List[str]:
        if self.cutoff is None:
            return ["--share-decoder-input-output-embed"]
        return ["--adaptive-softmax-cutoff", self.cutoff, "--adaptive-softmax-dropout", "0"]

    def describe(self) -> str:
        head = "tied full softmax" if self.cutoff is None else f"adaptive softmax {self.cutoff}"
        return f"{self.layers} layers x {self.dim} (FFN {self.ffn}, {self.heads} heads, pre-norm, {head})"

    def model_args(self) -> List[str]:
        """``trime-train`` flags of the model, optimiser and budget (the criterion and task come per model)."""
        return [
            "--arch", "transformer_lm", "--decoder-normalize-before", "--decoder-layers", str(self.layers),
            "--decoder-embed-dim", str(self.dim), "--decoder-ffn-embed-dim", str(self.ffn),
            "--decoder-attention-heads", str(self.heads), *self.head_args(), "--dropout", "0.1",
            "--tokens-per-sample", str(self.tokens_per_sample),
            "--max-tokens", str(self.tokens_per_sample * self.segments_per_batch), "--required-batch-size-multiple", "1",
            "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--clip-norm", "1.0", "--lr", "2e-3",
            "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(self.warmup_updates),
            "--max-update", str(self.max_update), "--cpu", "--num-workers", "0", "--seed", "1",
            "--no-epoch-checkpoints", "--no-progress-bar", "--log-interval", str(self.log_interval),
            "--ddp-backend", "legacy_ddp", *map(str, self.extra_train_args),
        ]  # fmt: skip

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def demo_budget(max_update: int = 150) -> Budget:
    """``make demo``: 2 layers x 64, 16 segments of 64 tokens per update, on the shipped sample."""
    return Budget(
        layers=2, dim=64, ffn=256, heads=2, tokens_per_sample=64, segments_per_batch=16, max_update=max_update,
        warmup_updates=40, cutoff="1000,4000", context_window=32, mem_size=1024, k=64, tune_tokens=None,
        log_interval=25, extra_train_args=("--max-valid-steps", "0"),
    )  # fmt: skip


def reproduce_budget(quick: bool, max_update: Optional[int] = None, byte_level: bool = False) -> Budget:
    """``make reproduce`` (3 layers x 256, 300 updates), or with ``quick`` a tiny run for tests.

    Word level: an adaptive softmax; byte level (enwik8): a full softmax tied to the input embeddings.
    """
    layers, dim, ffn, heads = (2, 32, 64, 2) if quick else (3, 256, 1024, 4)
    updates = max_update or (12 if quick else 300)
    return Budget(
        layers=layers, dim=dim, ffn=ffn, heads=heads,
        tokens_per_sample=64 if quick else 512 if byte_level else 256,
        segments_per_batch=8 if quick or byte_level else 16,
        max_update=updates, warmup_updates=max(updates // 10, 2),
        cutoff=None if byte_level else "1000,4000" if quick else "4000,12000",
        context_window=32 if quick else 256 if byte_level else 64,
        mem_size=512 if quick else 4096, k=64 if quick else 256,
        tune_tokens=4096 if quick else 50000, log_interval=50, byte_level=byte_level,
        # fairseq's transformer_lm defaults both dims to 512, which adds projections around a narrower model
        extra_train_args=("--decoder-input-dim", dim, "--decoder-output-dim", dim, "--sample-break-mode", "none",
                          "--weight-decay", "0.01", "--warmup-init-lr", "1e-7", "--max-epoch", "50",
                          "--disable-validation"),
    )  # fmt: skip


def model_flags(byte_level: bool = False) -> Dict[str, List[str]]:
    """Training flags per model (name -> task and criterion); enwik8 has no TrimeLM_ext in the paper."""
    models = {
        "transformer": ["--task", "language_modeling", "--criterion", "cross_entropy" if byte_level else "adaptive_loss"],
        "trimelm": ["--task", "language_modeling", "--criterion", "trime_loss"],
        "trimelm_long": ["--task", "trime_lm", "--keep-order", "--criterion", "trime_long_loss_same_device"],
        "trimelm_ext": ["--task", "trime_lm", "--criterion", "trime_ext_loss", "--cross-sent-ratio", "0.9"],
    }
    if byte_level:
        del models["trimelm_ext"]
    return models


def needs_plan(flags: Sequence[str]) -> bool:
    """A model trained on BM25 batches (``--predefined-batches``)."""
    return "trime_ext_loss" in flags


class EvalSpec(NamedTuple):
    """One row of the table: ``model`` evaluated with ``memory``, optionally a datastore and kNN-LM interpolation."""

    label: str
    model: str
    memory: str
    datastore: Optional[str] = None  # the model whose training-set datastore is searched
    knnlm: bool = False


class Reporter:
    """The progress lines of a run; these are ``make reproduce``'s, a front-end overrides what it says differently."""

    def phase(self, title: str) -> None:
        print(title, flush=True)

    def training(self, name: str) -> None:
        print(f"  training {name}", flush=True)

    def trained(self, name: str, checkpoint: Path, seconds: Optional[float], updates: int) -> None:
        """A model is ready: trained now in ``seconds``, or reused (``seconds`` None)."""

    def datastore(self, name: str) -> None:
        print(f"  datastore from {name}", flush=True)

    def evaluating(self, label: str) -> None:
        print(f"  {label}", flush=True)

    def step_done(self, tool: str, seconds: float, log: Path) -> None:
        print(f"    {tool} done in {seconds:.0f} s ({log.name})", flush=True)


_RECORD_LOCK = threading.Lock()  # steps of one phase may finish at the same time (jobs > 1)


def record_seconds(record: Path, name: str, seconds: float, add: bool = False) -> None:
    """Store (or with ``add``, accumulate) ``seconds`` under ``name`` in the json file ``record``."""
    with _RECORD_LOCK:
        steps = json.loads(record.read_text()) if record.exists() else {}
        steps[name] = round(seconds + (steps.get(name, 0.0) if add else 0.0), 1)
        write_json_atomic(record, steps)


def run_parallel(tasks: Sequence[Callable], jobs: int) -> list:
    """Call every zero-argument ``tasks`` entry, ``jobs`` at a time; results in order (the first failure is raised)."""
    if jobs <= 1:
        return [task() for task in tasks]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return [f.result() for f in [pool.submit(task) for task in tasks]]


def threads_per_job(jobs: int) -> int:
    """CPU threads for each of ``jobs`` concurrent steps: this run's threads (OMP_NUM_THREADS or cores) / jobs."""
    return max(1, int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1) // max(1, jobs))


def read_marker(marker: Path) -> Optional[dict]:
    """A finished training's ``DONE`` record ({"max_update", "seconds", "wps"}), or None."""
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def metric_of(record: dict, subset: str = "test") -> float:
    """The ``subset`` metric of a trime-eval results record: bits per byte at byte level, else perplexity."""
    for row in record.get("results", []):
        if row.get("subset") == subset:
            return row["bpc"] if "bpc" in row else row["ppl"]
    fail(f"trime-eval wrote no {subset} row for {record.get('label')}")


def tuned(record: dict) -> dict:
    """The memory knobs trime-eval --tune chose on valid (only those that matter)."""
    chosen = dict((record.get("tuning") or {}).get("chosen") or {})
    if not chosen.get("lmbda"):
        chosen.pop("lmbda", None)
        chosen.pop("interp_temp", None)
    return chosen


def format_knobs(chosen: dict) -> str:
    """The tuned knobs of a row for a table cell ("softmax_temp 1.3, lmbda 0.12")."""
    return ", ".join(f"{k} {v:.3g}" for k, v in chosen.items() if isinstance(v, (int, float)))


@dataclass
class Pipeline:
    """The phases of one run under ``work``: data -> BM25 plan -> training -> datastores -> evaluation.

    ``models`` maps a model name to its task and criterion flags (:func:`model_flags`);
    ``specs`` are the table's rows. The plan is made only when a model trains on BM25
    batches, a datastore only for a model that a row searches.
    """

    budget: Budget
    work: Path
    models: Dict[str, List[str]]
    specs: List[EvalSpec]
    jobs: int = 1
    # trime-eval --cache-dir: each model's forward passes and kNN hits are computed once for all its rows
    eval_cache: bool = False
    reporter: Reporter = field(default_factory=Reporter)

    def __post_init__(self) -> None:
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._phase_started = time.time()

    # ------------------------------------------------------------------ steps

    def run_tool(self, cmd: Sequence, log_name: str, threads: Optional[int] = None) -> str:
        """Run one command with its output in ``logs/<log_name>.log`` (``threads`` CPU threads if given)."""
        log = self.logs / f"{log_name}.log"
        started = time.time()
        env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        with open(log, "w") as f:
            proc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env)
        return self._finish(Path(str(cmd[0])).name, log, proc.returncode == 0, started)

    def run_entry(self, tool: str, entry: Callable, argv: Sequence, log_name: str) -> str:
        """Call a tool's entry point (``entry(argv)``) here, its output in ``logs/<log_name>.log``; as :meth:`run_tool`."""
        log = self.logs / f"{log_name}.log"
        started = time.time()
        ok = True
        with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            try:
                status = entry([str(a) for a in argv])
                ok = status in (None, 0)
            except SystemExit as exc:  # the tools report bad input by exiting
                ok = exc.code in (None, 0)
                if not ok:
                    print(exc.code if isinstance(exc.code, str) else f"exit status {exc.code}")
            except Exception:  # noqa: BLE001 - reported with the log's tail below
                import traceback

                traceback.print_exc()
                ok = False
        return self._finish(tool, log, ok, started)

    def _finish(self, tool: str, log: Path, ok: bool, started: float) -> str:
        text = log.read_text()
        if not ok:
            tail = text.strip().splitlines()[-5:]
            fail(f"{tool} failed (see {log}): {' | '.join(tail)}")
        seconds = time.time() - started
        self.reporter.step_done(tool, seconds, log)
        record_seconds(self.logs / "step-seconds.json", log.stem, seconds)  # kept across resumed runs
        return text

    def phase_done(self, name: str) -> None:
        """Add the wall time since the last phase ended to ``name`` in ``logs/phase-seconds.json``."""
        record_seconds(self.logs / "phase-seconds.json", name, time.time() - self._phase_started, add=True)
        self._phase_started = time.time()

    def phase_seconds(self) -> dict:
        return json.loads((self.logs / "phase-seconds.json").read_text())

    def step_seconds(self) -> dict:
        path = self.logs / "step-seconds.json"
        return json.loads(path.read_text()) if path.exists() else {}

    # ------------------------------------------------------------------ phases

    def prepare(self, dataset: str, raw_dir: Optional[str] = None, data_bin: Optional[Path] = None,
                workers: int = 1) -> Path:
        """The data-bin: ``data_bin`` as given (checked), or ``dataset`` prepared into ``<work>/data-bin``."""
        from trime.data_prep.prepare import prepare_dataset
        from trime.databin import read_data_meta

        if data_bin is not None:
            if not (data_bin / "dict.txt").is_file():
                fail(f"--data-bin {data_bin} holds no dict.txt; make one with trime-prepare")
            level = read_data_meta(data_bin).get("level")
            wanted = "byte" if self.budget.byte_level else "word"
            if level is not None and level != wanted:
                fail(f"--data-bin {data_bin} is {level} level but this run needs {wanted} level data")
            return data_bin
        return prepare_dataset(dataset, raw_dir, self.work / "data-bin", workers=workers)

    def bm25_plan(self, data: Path) -> Path:
        """The BM25 batch plan of the training split (``trime-bm25-batches --lucene``)."""
        plan = self.work / "bm25-plan.json"
        if not plan.exists():
            self.run_tool([BIN / "trime-bm25-batches", data, "--tokens-per-sample", self.budget.tokens_per_sample,
                           "--output", plan, "--lucene", "--no-progress-bar"], "bm25")
        return plan

    def checkpoint(self, name: str) -> Path:
        return self.work / "checkpoints" / name / "checkpoint_last.pt"

    def train(self, name: str, data: Path, plan: Optional[Path], threads: Optional[int] = None) -> Path:
        """Train model ``name`` of :attr:`models` (reused when its marker records this budget's updates)."""
        ckpt = self.checkpoint(name)
        marker = ckpt.parent / "DONE"
        done = read_marker(marker)
        if done is not None and done.get("max_update") == self.budget.max_update and ckpt.is_file():
            self.reporter.trained(name, ckpt, None, self.budget.max_update)
            return ckpt
        self.reporter.training(name)
        flags = self.models[name]
        extra = ["--predefined-batches", plan] if needs_plan(flags) else []
        started = time.time()
        log = self.run_tool([BIN / "trime-train", data, *flags, *extra, *self.budget.model_args(),
                             "--save-dir", ckpt.parent], f"train-{name}", threads)
        seconds = time.time() - started
        wps = [float(x.split("=")[1]) for x in log.replace(",", " ").split() if x.startswith("wps=")]
        write_json_atomic(marker, {"max_update": self.budget.max_update, "seconds": seconds, "wps": wps})
        self.reporter.trained(name, ckpt, seconds, self.budget.max_update)
        return ckpt

    def train_all(self, data: Path, plan: Optional[Path]) -> Dict[str, Path]:
        """Train every model, ``jobs`` at a time (with several, the slowest, the memory-ordered ones, first)."""
        names = list(self.models)
        if self.jobs > 1:
            names.sort(key=lambda n: n not in ("trimelm_long", "trimelm_ext"))
        threads = threads_per_job(self.jobs) if self.jobs > 1 else None
        paths = run_parallel([lambda n=n: self.train(n, data, plan, threads) for n in names], self.jobs)
        ckpts = dict(zip(names, paths))
        return {name: ckpts[name] for name in self.models}

    def training_seconds(self) -> Dict[str, float]:
        """Each model's training time, from its marker."""
        return {name: (read_marker(self.checkpoint(name).parent / "DONE") or {}).get("seconds") for name in self.models}

    def build_datastore(self, name: str, data: Path, threads: Optional[int] = None) -> Path:
        """The datastore of model ``name`` over the training split (``trime-build-datastore``)."""
        out = self.work / f"datastore-{name}"
        if not (out / "meta.json").exists() or not (out / "index.faiss").exists():
            self.reporter.datastore(name)
            self.run_tool([BIN / "trime-build-datastore", data, "--path", self.checkpoint(name), "--output", out,
                           "--cpu", "--context-window", self.budget.context_window, "--train-sample", "200000",
                           "--no-progress-bar"], f"datastore-{name}", threads)
        return out

    def evaluate(self, label: str, path: Path, data: Path, memory: str, tag: str,
                 datastore: Optional[Path] = None, knnlm: bool = False) -> dict:
        """``trime-eval`` of the model at ``path`` with ``memory``: temperatures (and lambda) tuned on valid,
        test reported (without memory: test only). The results record, with ``label``, is reused while
        it is newer than the model's marker."""
        result = self.work / "eval" / f"{tag}-{memory}{'-knnlm' if knnlm else ''}.json"
        marker = (path if path.is_dir() else path.parent) / "DONE"
        fresh = result.exists() and (not marker.exists() or result.stat().st_mtime >= marker.stat().st_mtime)
        if not fresh:
            result.parent.mkdir(parents=True, exist_ok=True)
            argv = [data, "--path", path, "--memory", memory, "--cpu", "--no-progress-bar",
                    "--context-window", self.budget.context_window, "--results-json", result]
            if self.eval_cache:
                argv += ["--cache-dir", self.work / "eval-cache"]
            if memory in CROSS_SEGMENT_MEMORIES:
                argv += ["--mem-size", self.budget.mem_size]
            if memory != "none" or knnlm:
                argv += ["--tune"]
                if self.budget.tune_tokens is not None:
                    argv += ["--tune-tokens", self.budget.tune_tokens]
            else:
                argv += ["--gen-subset", "test"]
            if datastore is not None:
                argv += ["--datastore", datastore, "--k", self.budget.k, "--nprobe", "32"]
            if knnlm:
                argv += ["--knnlm"]
            from trime.eval.evaluate import main as trime_eval  # the `trime-eval` command's entry point

            self.run_entry("trime-eval", trime_eval, argv, f"eval-{result.stem}")
        record = json.loads(result.read_text())
        record["label"] = label
        return record

    def row(self, spec: EvalSpec, record: dict) -> dict:
        """A table row: label, model, memory (``+ kNN`` for interpolation), test metric, tuned knobs, tokens/s."""
        test = next(r for r in record["results"] if r.get("subset") == "test")
        return {"label": spec.label, "model": spec.model, "memory": spec.memory + (" + kNN" if spec.knnlm else ""),
                "test": metric_of(record), "tuned": tuned(record), "tokens_per_s": test.get("tokens_per_s")}

    def run(self, titles: Dict[str, str], dataset: str, raw_dir: Optional[str] = None,
            data_bin: Optional[Path] = None, workers: int = 1) -> List[dict]:
        """Every phase in order, each announced with its entry of ``titles`` (:data:`PHASES`); the table's rows."""
        self._phase_started = time.time()
        self.reporter.phase(titles["data"])
        data = self.prepare(dataset, raw_dir, data_bin, workers)
        plan = None
        if any(needs_plan(flags) for flags in self.models.values()):
            self.reporter.phase(titles["plan"])
            plan = self.bm25_plan(data)
        self.phase_done("data")
        self.reporter.phase(titles["training"])
        ckpts = self.train_all(data, plan)
        self.phase_done("training")
        stores: Dict[str, Path] = {}
        wanted = list(dict.fromkeys(spec.datastore for spec in self.specs if spec.datastore))
        if wanted:
            self.reporter.phase(titles["datastores"])
            threads = threads_per_job(self.jobs) if self.jobs > 1 else None
            built = run_parallel([lambda m=m: self.build_datastore(m, data, threads) for m in wanted], self.jobs)
            stores = dict(zip(wanted, built))
            self.phase_done("datastores")
        self.reporter.phase(titles["evaluation"])
        rows = []
        for spec in self.specs:
            self.reporter.evaluating(spec.label)
            record = self.evaluate(spec.label, ckpts[spec.model], data, spec.memory, spec.model,
                                   stores.get(spec.datastore) if spec.datastore else None, spec.knnlm)
            rows.append(self.row(spec, record))
        self.phase_done("evaluation")
        return rows
