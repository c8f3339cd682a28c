"""``make reproduce``: the paper's WikiText-103 comparison, at small scale, in one run.

Trains four models with one small architecture and the same budget on WikiText-2
(``../shared/data/wikitext-2`` by default, or ``--data-bin``): a cross-entropy
Transformer, TrimeLM, TrimeLM_long and TrimeLM_ext (BM25 batches). Then it
evaluates every model at every memory level that applies, plus the continuous
cache and kNN-LM baselines built from the Transformer, tuning the memory temperature
(and lambda / interpolation temperature) on valid and reporting test, all with
``trime-eval``. Results: ``bench/results/reproduce.{json,md,png}``.

``--dataset enwik8-prefix`` runs the paper's enwik8 comparison (Transformer, TrimeLM,
TrimeLM_long; byte level, bits per character) on the 1 MB enwik8 prefix in
``../shared/data/enwik8``; results ``bench/results/reproduce-enwik8.*``. For the full
enwik8, prepare it with ``trime-prepare enwik8`` and pass ``--data-bin``.

Everything is driven through the public command-line tools, exactly as a user runs
them; finished steps are reused on re-runs (``--work``), so an interrupted run resumes.
The evaluations call ``trime-eval``'s entry point with its command line inside this
process (the same code as the command), so torch, fairseq and the compiled memory
kernels load once instead of once per row. The four trainings and the two datastore
builds are independent: ``--jobs N`` (default 2) runs N of them at a time with
cores / N threads each; on 2 cores two one-thread trainings finish 14% sooner than one
after the other at two threads (small matrices scale poorly across threads).
``--quick`` runs the same pipeline on the shipped sample in a few minutes (tests).
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "bench"))
from common import machine_info, today  # noqa: E402

from trime.databin import read_data_meta  # noqa: E402
from trime.io_utils import atomic_path, write_json_atomic  # noqa: E402

# The poster's 247M WikiText-103 test perplexities (reference section 5.2).
PAPER_TEST_PPL = {
    "Transformer": 18.65,
    "Transformer + continuous cache": 18.27,
    "kNN-LM": 16.37,
    "kNN-LM + continuous cache": 16.23,
    "TrimeLM": 17.76,
    "TrimeLM_long": 17.64,
    "TrimeLM_ext": 15.41,
}


SHARED_DATA = REPO.parent / "shared" / "data"
RAW_FOLDER = {"wikitext-2": "wikitext-2", "enwik8-prefix": "enwik8"}  # under ../shared/data

# enwik8 (bpc), reference section 5.1: the released 38M checkpoints on the standard test split.
PAPER_TEST_BPC = {"TrimeLM": 1.12, "TrimeLM_long": 1.05}


class Budget:
    """Model size, segment length and training budget shared by every model."""

    def __init__(self, quick: bool, max_update: Optional[int], byte_level: bool = False) -> None:
        self.byte_level = byte_level
        self.tokens_per_sample = 64 if quick else 512 if byte_level else 256
        self.segments_per_batch = 8 if quick or byte_level else 16
        self.max_update = max_update or (12 if quick else 300)
        self.context_window = 32 if quick else 256 if byte_level else 64
        self.mem_size = 512 if quick else 4096
        self.k = 64 if quick else 256
        # tuning uses a fixed prefix of valid (whole batches, >= this many tokens; WikiText-2 valid: 217k)
        self.tune_tokens = 4096 if quick else 50000
        self.layers, self.dim, self.ffn, self.heads = (2, 32, 64, 2) if quick else (3, 256, 1024, 4)
        # word level: adaptive softmax; byte level: a full softmax tied to the input embeddings
        self.cutoff = None if byte_level else "1000,4000" if quick else "4000,12000"

    def head_args(self) -> List[str]:
        if self.cutoff is None:
            return ["--share-decoder-input-output-embed"]
        return ["--adaptive-softmax-cutoff", self.cutoff, "--adaptive-softmax-dropout", "0"]

    def describe(self) -> str:
        head = "tied full softmax" if self.cutoff is None else f"adaptive softmax {self.cutoff}"
        return f"{self.layers} layers x {self.dim} (FFN {self.ffn}, {self.heads} heads, pre-norm, {head})"

    def model_args(self) -> List[str]:
        return [
            "--arch", "transformer_lm", "--decoder-normalize-before",
            "--decoder-layers", str(self.layers), "--decoder-embed-dim", str(self.dim),
            # fairseq's transformer_lm defaults both to 512, which adds projections around a narrower model
            "--decoder-input-dim", str(self.dim), "--decoder-output-dim", str(self.dim),
            "--decoder-ffn-embed-dim", str(self.ffn), "--decoder-attention-heads", str(self.heads),
            *self.head_args(), "--dropout", "0.1", "--tokens-per-sample", str(self.tokens_per_sample),
            "--max-tokens", str(self.tokens_per_sample * self.segments_per_batch),
            "--required-batch-size-multiple", "1", "--sample-break-mode", "none",
            "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--weight-decay", "0.01", "--clip-norm", "1.0",
            "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(max(self.max_update // 10, 2)),
            "--warmup-init-lr", "1e-7", "--max-update", str(self.max_update), "--max-epoch", "50",
            "--cpu", "--num-workers", "0", "--seed", "1", "--no-epoch-checkpoints", "--no-progress-bar",
            "--log-interval", "50", "--disable-validation", "--ddp-backend", "legacy_ddp",
        ]


_STEP_RECORD_LOCK = threading.Lock()  # steps of one phase may finish at the same time (--jobs)


def run(cmd: Sequence, log: Path, threads: Optional[int] = None) -> str:
    """Run one tool, logging to ``log`` (with ``threads`` CPU threads if given); stop with the log's tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env)
    return _finish_step(Path(str(cmd[0])).name, log, proc.returncode == 0, started)


def run_parallel(tasks: Sequence, jobs: int) -> list:
    """Call every zero-argument ``tasks`` entry, ``jobs`` at a time; results in order (the first failure is raised)."""
    if jobs <= 1:
        return [task() for task in tasks]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return [f.result() for f in [pool.submit(task) for task in tasks]]


def threads_per_job(jobs: int) -> int:
    """CPU threads for each of ``jobs`` concurrent steps: this run's threads (OMP_NUM_THREADS or cores) / jobs."""
    return max(1, int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1) // max(1, jobs))


def run_in_process(name: str, entry, argv: Sequence, log: Path) -> str:
    """Call a tool's entry point (``entry(argv)``) here, its output going to ``log``; as :func:`run`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    ok = True
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            entry([str(a) for a in argv])
        except SystemExit as exc:  # the tools report bad input by exiting
            ok = exc.code in (None, 0)
            if not ok:
                print(exc.code if isinstance(exc.code, str) else f"exit status {exc.code}")
        except Exception:  # noqa: BLE001 - reported with the log's tail below
            import traceback

            traceback.print_exc()
            ok = False
    return _finish_step(name, log, ok, started)


def _finish_step(name: str, log: Path, ok: bool, started: float) -> str:
    text = log.read_text()
    if not ok:
        tail = "\n".join(text.strip().splitlines()[-15:])
        raise SystemExit(f"reproduce: {name} failed (log {log}):\n{tail}")
    seconds = time.time() - started
    print(f"    {name} done in {seconds:.0f} s ({log.name})", flush=True)
    record_seconds(log.parent / "step-seconds.json", log.stem, seconds)  # kept across resumed runs
    return text


def record_seconds(record: Path, name: str, seconds: float, add: bool = False) -> None:
    """Store (or with ``add``, accumulate) ``seconds`` under ``name`` in the json file ``record``."""
    with _STEP_RECORD_LOCK:
        steps = json.loads(record.read_text()) if record.exists() else {}
        steps[name] = round(seconds + (steps.get(name, 0.0) if add else 0.0), 1)
        write_json_atomic(record, steps)


def done_marker(path: Path) -> bool:
    return path.exists()


def prepare_data(args, work: Path) -> Path:
    if args.data_bin:
        data = Path(args.data_bin)
        if not (data / "dict.txt").is_file():
            raise SystemExit(f"reproduce: --data-bin {data} holds no dict.txt; make one with trime-prepare")
        level = read_data_meta(data).get("level")
        wanted = "byte" if args.dataset == "enwik8-prefix" else "word"
        if level is not None and level != wanted:
            raise SystemExit(f"reproduce: --data-bin {data} is {level} level but --dataset {args.dataset} needs "
                             f"{wanted} level data; pass the matching --dataset")
        return data
    if args.quick:
        name, raw = ("enwik8-sample" if args.dataset == "enwik8-prefix" else "wikitext-2-sample"), None
    else:
        name, raw = args.dataset, args.raw_dir or str(SHARED_DATA / RAW_FOLDER[args.dataset])
    dest = work / "data-bin"
    cmd = [BIN / "trime-prepare", name, "--dest", dest, "--workers", "2"]
    if raw:
        cmd += ["--raw-dir", raw]
    run(cmd, work / "logs" / "prepare.log")
    return dest


def model_flags(budget: Budget) -> Dict[str, List[str]]:
    """Training flags per model (name -> flags); enwik8 has no TrimeLM_ext in the paper."""
    baseline = "cross_entropy" if budget.byte_level else "adaptive_loss"
    models = {
        "transformer": ["--task", "language_modeling", "--criterion", baseline],
        "trimelm": ["--task", "language_modeling", "--criterion", "trime_loss"],
        "trimelm_long": ["--task", "trime_lm", "--keep-order", "--criterion", "trime_long_loss_same_device"],
        "trimelm_ext": ["--task", "trime_lm", "--criterion", "trime_ext_loss", "--cross-sent-ratio", "0.9"],
    }
    if budget.byte_level:
        del models["trimelm_ext"]
    return models


def train_model(name: str, data: Path, budget: Budget, work: Path, plan: Optional[Path],
                threads: Optional[int] = None) -> Path:
    """Train model ``name`` of :func:`model_flags` (once; a DONE marker records its time) -> its checkpoint."""
    save = work / "checkpoints" / name
    marker = save / "DONE"
    if not done_marker(marker):
        print(f"  training {name}", flush=True)
        extra = ["--predefined-batches", plan] if name == "trimelm_ext" else []
        started = time.time()
        log = run([BIN / "trime-train", data, *model_flags(budget)[name], *extra, *budget.model_args(),
                   "--save-dir", save], work / "logs" / f"train-{name}.log", threads)
        wps = [float(x.split("=")[1]) for x in log.replace(",", " ").split() if x.startswith("wps=")]
        write_json_atomic(marker, {"seconds": time.time() - started, "wps": wps})
    return save / "checkpoint_last.pt"


def train_all(data: Path, budget: Budget, work: Path, plan: Optional[Path], jobs: int = 1) -> Dict[str, Path]:
    """Train every model of :func:`model_flags`, ``jobs`` at a time (the slowest first)."""
    names = sorted(model_flags(budget), key=lambda n: n not in ("trimelm_long", "trimelm_ext"))
    threads = threads_per_job(jobs) if jobs > 1 else None
    paths = run_parallel([lambda n=n: train_model(n, data, budget, work, plan, threads) for n in names], jobs)
    return {name: dict(zip(names, paths))[name] for name in model_flags(budget)}


def build_datastore(data: Path, ckpt: Path, out: Path, budget: Budget, work: Path,
                    threads: Optional[int] = None) -> Path:
    if not (out / "meta.json").exists() or not (out / "index.faiss").exists():
        print(f"  datastore from {ckpt.parent.name}", flush=True)
        run([BIN / "trime-build-datastore", data, "--path", ckpt, "--output", out, "--cpu",
             "--context-window", budget.context_window, "--train-sample", "200000", "--no-progress-bar"],
            work / "logs" / f"datastore-{ckpt.parent.name}.log", threads)
    return out


def evaluate(label: str, ckpt: Path, data: Path, memory: str, budget: Budget, work: Path,
             datastore: Optional[Path] = None, knnlm: bool = False) -> dict:
    tag = f"{ckpt.parent.name}-{memory}{'-knnlm' if knnlm else ''}"
    result = work / "eval" / f"{tag}.json"
    if not result.exists():
        cmd = [data, "--path", ckpt, "--memory", memory, "--cpu", "--no-progress-bar",
               "--context-window", budget.context_window, "--results-json", result,
               "--cache-dir", work / "eval-cache"]  # each model's forward passes and kNN hits are computed once
        if memory in ("long", "external"):
            cmd += ["--mem-size", budget.mem_size]
        if memory != "none" or knnlm:
            cmd += ["--tune", "--tune-tokens", budget.tune_tokens]  # tune on a prefix of valid, report test
        else:
            cmd += ["--gen-subset", "test"]
        if datastore is not None:
            cmd += ["--datastore", datastore, "--k", budget.k, "--nprobe", "32"]
        if knnlm:
            cmd += ["--knnlm"]
        from trime.eval.evaluate import main as trime_eval  # the `trime-eval` command's entry point

        run_in_process("trime-eval", trime_eval, cmd, work / "logs" / f"eval-{tag}.log")
    record = json.loads(result.read_text())
    record["label"] = label
    return record


def test_ppl(record: dict) -> float:
    """The test-split metric from a trime-eval results record."""
    for row in record.get("results", []):
        if row.get("subset") == "test":
            return row["bpc"] if "bpc" in row else row["ppl"]
    raise KeyError(f"no test row in {record.get('label')}")


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


def paper_reference(byte_level: bool) -> Tuple[Dict[str, float], str, str]:
    """(paper test numbers, the row they are relative to, a caption) for the side-by-side."""
    if byte_level:
        return PAPER_TEST_BPC, "TrimeLM", "paper (38M, enwik8 bpc)"
    return PAPER_TEST_PPL, "Transformer", "paper (247M, WT103 ppl)"


def write_report(rows: List[dict], budget: Budget, args, data: Path, timings: dict, steps: dict,
                 phases: dict, out: Path) -> None:
    total_s = sum(phases.values())
    metric = "bpc" if budget.byte_level else "ppl"
    paper, paper_base_label, paper_caption = paper_reference(budget.byte_level)
    ours = {r["label"]: r["test"] for r in rows}
    base = ours["Transformer"]
    machine = machine_info()
    dataset = "enwik8 prefix (1 MB, 90/5/5 split)" if budget.byte_level else "WikiText-2"
    source = "--quick on the shipped sample" if args.quick else f"real {dataset}"
    lines = [
        f"# Small-scale reproduction of TRIME ({dataset})",
        "",
        f"Machine: {machine.get('cpu_model')} x {machine.get('cpu_count')} cores ({machine.get('gpu', 'no GPU')}); "
        f"date {today()}; {source}; data `{data}`; `bench/reproduce.py"
        + (" --dataset enwik8-prefix" if budget.byte_level else "") + (" --quick" if args.quick else "") + "`.",
        f"Model: {budget.describe()}; segments of {budget.tokens_per_sample} tokens, {budget.segments_per_batch} per "
        f"batch, {budget.max_update} updates for every model. Evaluation: context window {budget.context_window}, "
        f"memory size {budget.mem_size}" + ("" if budget.byte_level else f", k = {budget.k}")
        + f"; temperatures (and lambda) tuned on the first {budget.tune_tokens:,}+ tokens of valid, test reported.",
        "",
        f"| model | memory at eval | test {metric} | vs Transformer | {paper_caption} | paper vs {paper_base_label} "
        "| tuned on valid |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        value = paper.get(r["label"])
        paper_cols = (f"{value:.2f} | {100 * (value / paper[paper_base_label] - 1):+.1f}%"
                      if value is not None and paper_base_label in paper else "– | –")
        knobs = format_knobs(r["tuned"])
        shown = f"{r['test']:.3f}" if budget.byte_level else f"{r['test']:.2f}"
        lines.append(
            f"| {r['label']} | {r['memory']} | {shown} | {100 * (r['test'] / base - 1):+.1f}% | "
            f"{paper_cols} | {knobs or '–'} |"
        )
    lines += [
        "",
        f"Wall time {total_s / 60:.1f} min in all (phases finished in earlier, resumed runs included): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()) + f"; trainings and datastores {args.jobs} at a time. "
        "Training (s, each): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + ". "
        "Other steps (s): " + ", ".join(f"{k} {v:.0f}" for k, v in steps.items() if not k.startswith("train-")) + ".",
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    payload = {"machine": machine, "date": today(), "quick": args.quick, "dataset": args.dataset, "data": str(data),
               "metric": metric, "budget": vars(budget), "rows": rows, "training_seconds": timings,
               "step_seconds": steps, "phase_seconds": phases, "jobs": args.jobs,
               "total_seconds": round(total_s, 1), "paper_test": paper}
    write_json_atomic(out.with_suffix(".json"), json.loads(json.dumps(payload, default=str)))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.2))
    labels = [r["label"] for r in rows]
    ax.barh(labels, [r["test"] for r in rows], color=["#999" if "TrimeLM" not in lab else "#1f77b4" for lab in labels])
    ax.invert_yaxis()
    ax.set_xlabel(f"test {metric} (lower is better)")
    ax.set_xlim(min(r["test"] for r in rows) * 0.9, max(r["test"] for r in rows) * 1.02)
    ax.set_title(f"TRIME at small scale ({dataset})")
    fig.tight_layout()
    with atomic_path(out.with_suffix(".png")) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    print("\n".join(lines))
    print(f"wrote {out.with_suffix('.md')}, .json and .png")


def eval_specs(budget: Budget, base_store: Optional[Path], ext_store: Optional[Path]) -> List[tuple]:
    """(label, model, memory, datastore, kNN-LM?) for every row of the table."""
    specs = [
        ("Transformer", "transformer", "none", None, False),
        ("Transformer + continuous cache", "transformer", "long", None, False),
    ]
    if not budget.byte_level:
        specs += [
            ("kNN-LM", "transformer", "none", base_store, True),
            ("kNN-LM + continuous cache", "transformer", "long", base_store, True),
        ]
    specs += [
        ("TrimeLM (no memory)", "trimelm", "none", None, False),
        ("TrimeLM", "trimelm", "local", None, False),
        ("TrimeLM + long memory", "trimelm", "long", None, False),
        ("TrimeLM_long (no memory)", "trimelm_long", "none", None, False),
        ("TrimeLM_long (local only)", "trimelm_long", "local", None, False),
        ("TrimeLM_long", "trimelm_long", "long", None, False),
    ]
    if not budget.byte_level:
        specs += [
            ("TrimeLM_ext (no memory)", "trimelm_ext", "none", None, False),
            ("TrimeLM_ext (local + long)", "trimelm_ext", "long", None, False),
            ("TrimeLM_ext", "trimelm_ext", "external", ext_store, False),
            # the same datastore by kNN-LM interpolation only, as the kNN-LM rows use the Transformer's
            ("TrimeLM_ext (datastore by interpolation only)", "trimelm_ext", "long", ext_store, True),
        ]
    return specs


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="wikitext-2", choices=["wikitext-2", "enwik8-prefix"],
                        help="the word-level WikiText-2 comparison, or the byte-level enwik8 one (bpc)")
    parser.add_argument("--data-bin", help="use this fairseq data-bin (of --dataset's kind) instead of preparing one")
    parser.add_argument("--raw-dir", default=None,
                        help="raw files of --dataset (default ../shared/data/wikitext-2 or ../shared/data/enwik8)")
    parser.add_argument("--quick", action="store_true", help="tiny run on the shipped sample (minutes)")
    parser.add_argument("--max-update", type=int, default=None, help="training updates per model")
    parser.add_argument("--work", type=Path, default=None, help="working directory (reused to resume)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output prefix (default bench/results/reproduce[-enwik8][-quick])")
    parser.add_argument("--jobs", type=int, default=2,
                        help="trainings / datastore builds run at a time, each with cores / JOBS threads (default 2)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    byte_level = args.dataset == "enwik8-prefix"
    budget = Budget(args.quick, args.max_update, byte_level=byte_level)
    suffix = ("-enwik8" if byte_level else "") + ("-quick" if args.quick else "")
    work = args.work or REPO / f"reproduce{suffix}-work"
    out = args.out or REPO / "bench" / "results" / f"reproduce{suffix}"
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    phases_file = work / "logs" / "phase-seconds.json"  # wall time of each phase (its steps may overlap)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    phase_started = [time.time()]

    def phase_done(name: str) -> None:
        record_seconds(phases_file, name, time.time() - phase_started[0], add=True)
        phase_started[0] = time.time()

    print("1/5 data", flush=True)
    data = prepare_data(args, work)
    plan = None
    if not byte_level:
        print("2/5 BM25 batch plan for TrimeLM_ext", flush=True)
        plan = work / "bm25-plan.json"
        if not plan.exists():
            run([BIN / "trime-bm25-batches", data, "--tokens-per-sample", budget.tokens_per_sample, "--output", plan,
                 "--lucene", "--no-progress-bar"], work / "logs" / "bm25.log")
    phase_done("data")
    print(f"3/5 training ({args.jobs} at a time)", flush=True)
    ckpts = train_all(data, budget, work, plan, args.jobs)
    timings = {n: json.loads((c.parent / "DONE").read_text())["seconds"] for n, c in ckpts.items()}
    phase_done("training")
    base_store = ext_store = None
    if not byte_level:
        print("4/5 datastores", flush=True)
        threads = threads_per_job(args.jobs) if args.jobs > 1 else None
        base_store, ext_store = run_parallel(
            [lambda m=m: build_datastore(data, ckpts[m], work / f"datastore-{m}", budget, work, threads)
             for m in ("transformer", "trimelm_ext")], args.jobs)
        phase_done("datastores")
    print("5/5 evaluation (tune on valid, report test)", flush=True)
    rows = []
    for label, model, memory, store, knnlm in eval_specs(budget, base_store, ext_store):
        print(f"  {label}", flush=True)
        record = evaluate(label, ckpts[model], data, memory, budget, work, store, knnlm)
        rows.append({"label": label, "model": model, "memory": memory + (" + kNN" if knnlm else ""),
                     "test": test_ppl(record), "tuned": tuned(record)})
    phase_done("evaluation")
    steps_file = work / "logs" / "step-seconds.json"
    steps = json.loads(steps_file.read_text()) if steps_file.exists() else {}
    phases = json.loads(phases_file.read_text())
    write_report(rows, budget, args, data, timings, steps, phases, out)
    print(f"total {time.time() - started:.0f} s this run")


if __name__ == "__main__":
    main()
