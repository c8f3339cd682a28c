"""``make reproduce``: the paper's WikiText-103 comparison, at small scale, in one run.

Trains four models with one small architecture and the same budget on WikiText-2
(``../shared/data/wikitext-2`` by default, or ``--data-bin``): a cross-entropy
Transformer, TrimeLM, TrimeLM_long and TrimeLM_ext (BM25 batches). Then it
evaluates every model at every memory level that applies, plus the continuous
cache and kNN-LM baselines built from the Transformer, tuning the memory temperature
(and lambda / interpolation temperature) on valid and reporting test, all with
``trime-eval``. Results: ``bench/results/reproduce.{json,md,png}``.

Everything is driven through the public command-line tools, exactly as a user runs
them; finished steps are reused on re-runs (``--work``), so an interrupted run resumes.
``--quick`` runs the same pipeline on the shipped sample in a few minutes (tests).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "bench"))
from common import machine_info, today  # noqa: E402

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


class Budget:
    """Model size, segment length and training budget shared by every model."""

    def __init__(self, quick: bool, max_update: Optional[int]) -> None:
        self.tokens_per_sample = 64 if quick else 256
        self.segments_per_batch = 8 if quick else 16
        self.max_update = max_update or (12 if quick else 400)
        self.context_window = 32 if quick else 128
        self.mem_size = 512 if quick else 4096
        self.k = 64 if quick else 256
        self.layers, self.dim, self.ffn, self.heads = (2, 32, 64, 2) if quick else (3, 256, 1024, 4)
        self.cutoff = "1000,4000" if quick else "4000,12000"

    def model_args(self) -> List[str]:
        return [
            "--arch", "transformer_lm", "--decoder-normalize-before",
            "--decoder-layers", str(self.layers), "--decoder-embed-dim", str(self.dim),
            "--decoder-ffn-embed-dim", str(self.ffn), "--decoder-attention-heads", str(self.heads),
            "--adaptive-softmax-cutoff", self.cutoff, "--adaptive-softmax-dropout", "0",
            "--dropout", "0.1", "--tokens-per-sample", str(self.tokens_per_sample),
            "--max-tokens", str(self.tokens_per_sample * self.segments_per_batch),
            "--required-batch-size-multiple", "1", "--sample-break-mode", "none",
            "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--weight-decay", "0.01", "--clip-norm", "1.0",
            "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(max(self.max_update // 10, 2)),
            "--warmup-init-lr", "1e-7", "--max-update", str(self.max_update), "--max-epoch", "50",
            "--cpu", "--num-workers", "0", "--seed", "1", "--no-epoch-checkpoints", "--no-progress-bar",
            "--log-interval", "50", "--disable-validation", "--ddp-backend", "legacy_ddp",
        ]


def run(cmd: Sequence, log: Path) -> str:
    """Run one tool, logging to ``log``; stop with the log's tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text()
    if proc.returncode != 0:
        tail = "\n".join(text.strip().splitlines()[-15:])
        raise SystemExit(f"reproduce: {Path(str(cmd[0])).name} failed (log {log}):\n{tail}")
    print(f"    {Path(str(cmd[0])).name} done in {time.time() - started:.0f} s ({log.name})", flush=True)
    return text


def done_marker(path: Path) -> bool:
    return path.exists()


def prepare_data(args, work: Path) -> Path:
    if args.data_bin:
        return Path(args.data_bin)
    if args.quick:
        name, raw = "wikitext-2-sample", None
    else:
        name, raw = "wikitext-2", args.raw_dir
    dest = work / "data-bin"
    cmd = [BIN / "trime-prepare", name, "--dest", dest, "--workers", "2"]
    if raw:
        cmd += ["--raw-dir", raw]
    run(cmd, work / "logs" / "prepare.log")
    return dest


MODELS = {
    # name: training flags
    "transformer": ["--task", "language_modeling", "--criterion", "adaptive_loss"],
    "trimelm": ["--task", "language_modeling", "--criterion", "trime_loss"],
    "trimelm_long": ["--task", "trime_lm", "--keep-order", "--criterion", "trime_long_loss_same_device"],
    "trimelm_ext": ["--task", "trime_lm", "--criterion", "trime_ext_loss", "--cross-sent-ratio", "0.9"],
}


def train_all(data: Path, budget: Budget, work: Path, plan: Path) -> Dict[str, Path]:
    ckpts = {}
    for name, flags in MODELS.items():
        save = work / "checkpoints" / name
        ckpt = save / "checkpoint_last.pt"
        marker = save / "DONE"
        if not done_marker(marker):
            print(f"  training {name}", flush=True)
            extra = ["--predefined-batches", plan] if name == "trimelm_ext" else []
            started = time.time()
            log = run([BIN / "trime-train", data, *flags, *extra, *budget.model_args(), "--save-dir", save],
                      work / "logs" / f"train-{name}.log")
            wps = [float(x.split("=")[1]) for x in log.replace(",", " ").split() if x.startswith("wps=")]
            marker.write_text(json.dumps({"seconds": time.time() - started, "wps": wps}))
        ckpts[name] = ckpt
    return ckpts


def build_datastore(data: Path, ckpt: Path, out: Path, budget: Budget, work: Path) -> Path:
    if not (out / "meta.json").exists() or not (out / "index.faiss").exists():
        print(f"  datastore from {ckpt.parent.name}", flush=True)
        run([BIN / "trime-build-datastore", data, "--path", ckpt, "--output", out, "--cpu",
             "--context-window", budget.context_window, "--train-sample", "200000", "--no-progress-bar"],
            work / "logs" / f"datastore-{ckpt.parent.name}.log")
    return out


def evaluate(label: str, ckpt: Path, data: Path, memory: str, budget: Budget, work: Path,
             datastore: Optional[Path] = None, knnlm: bool = False) -> dict:
    tag = f"{ckpt.parent.name}-{memory}{'-knnlm' if knnlm else ''}"
    result = work / "eval" / f"{tag}.json"
    if not result.exists():
        cmd = [BIN / "trime-eval", data, "--path", ckpt, "--memory", memory, "--cpu", "--no-progress-bar",
               "--context-window", budget.context_window, "--results-json", result]
        if memory in ("long", "external"):
            cmd += ["--mem-size", budget.mem_size]
        if memory != "none" or knnlm:
            cmd += ["--tune"]  # tune on valid, report test
        else:
            cmd += ["--gen-subset", "test"]
        if datastore is not None:
            cmd += ["--datastore", datastore, "--k", budget.k, "--nprobe", "32"]
        if knnlm:
            cmd += ["--knnlm"]
        run(cmd, work / "logs" / f"eval-{tag}.log")
    record = json.loads(result.read_text())
    record["label"] = label
    return record


def test_ppl(record: dict) -> float:
    """The test-split metric from a trime-eval results record."""
    for row in record.get("results", []):
        if row.get("subset") == "test":
            return row.get("ppl", row.get("bpc"))
    raise KeyError(f"no test row in {record.get('label')}")


def tuned(record: dict) -> dict:
    """The memory knobs trime-eval --tune chose on valid (only those that matter)."""
    chosen = dict((record.get("tuning") or {}).get("chosen") or {})
    if not chosen.get("lmbda"):
        chosen.pop("lmbda", None)
        chosen.pop("interp_temp", None)
    return chosen


def write_report(rows: List[dict], budget: Budget, args, data: Path, timings: dict, out: Path) -> None:
    base = next(r for r in rows if r["label"] == "Transformer")["test"]
    machine = machine_info()
    paper_base = PAPER_TEST_PPL["Transformer"]
    lines = [
        "# Small-scale reproduction of TRIME (WikiText-2)",
        "",
        f"Machine: {machine.get('cpu_model')} x {machine.get('cpu_count')} cores ({machine.get('gpu', 'no GPU')}); "
        f"date {today()}; "
        f"{'--quick on the shipped sample' if args.quick else 'real WikiText-2'}; data `{data}`.",
        f"Model: {budget.layers} layers x {budget.dim} (FFN {budget.ffn}, {budget.heads} heads, pre-norm, adaptive "
        f"softmax {budget.cutoff}); segments of {budget.tokens_per_sample} tokens, {budget.segments_per_batch} per "
        f"batch, {budget.max_update} updates for every model. Evaluation: context window {budget.context_window}, "
        f"memory size {budget.mem_size}, k = {budget.k}; temperatures and lambda tuned on valid, test reported.",
        "",
        "| model | memory at eval | test ppl | vs Transformer | paper (247M, WT103) | paper vs Transformer | tuned |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        paper = PAPER_TEST_PPL.get(r["label"])
        paper_cols = f"{paper:.2f} | {100 * (paper / paper_base - 1):+.1f}%" if paper else "– | –"
        knobs = ", ".join(f"{k} {v:.3g}" for k, v in r["tuned"].items() if isinstance(v, (int, float)))
        lines.append(
            f"| {r['label']} | {r['memory']} | {r['test']:.2f} | {100 * (r['test'] / base - 1):+.1f}% | "
            f"{paper_cols} | {knobs or '–'} |"
        )
    lines += ["", "Training time per model (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    payload = {"machine": machine, "date": today(), "quick": args.quick, "data": str(data), "budget": vars(budget),
               "rows": rows, "training_seconds": timings, "paper_test_ppl": PAPER_TEST_PPL}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    labels = [r["label"] for r in rows]
    ax.barh(labels, [r["test"] for r in rows], color=["#999" if "TrimeLM" not in lab else "#1f77b4" for lab in labels])
    ax.invert_yaxis()
    ax.set_xlabel("test perplexity (lower is better)")
    ax.set_xlim(min(r["test"] for r in rows) * 0.9, max(r["test"] for r in rows) * 1.02)
    ax.set_title("TRIME at small scale (WikiText-2)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print("\n".join(lines))
    print(f"wrote {out.with_suffix('.md')}, .json and .png")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-bin", help="use this fairseq data-bin instead of preparing WikiText-2")
    parser.add_argument("--raw-dir", default=str(REPO.parent / "shared" / "data" / "wikitext-2"),
                        help="raw WikiText-2 files (.tokens or .tokens.xz)")
    parser.add_argument("--quick", action="store_true", help="tiny run on the shipped sample (minutes)")
    parser.add_argument("--max-update", type=int, default=None, help="training updates per model")
    parser.add_argument("--work", type=Path, default=None, help="working directory (reused to resume)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "reproduce")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    budget = Budget(args.quick, args.max_update)
    work = args.work or REPO / ("reproduce-quick-work" if args.quick else "reproduce-work")
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()

    print("1/5 data", flush=True)
    data = prepare_data(args, work)
    print("2/5 BM25 batch plan for TrimeLM_ext", flush=True)
    plan = work / "bm25-plan.json"
    if not plan.exists():
        run([BIN / "trime-bm25-batches", data, "--tokens-per-sample", budget.tokens_per_sample, "--output", plan,
             "--lucene", "--no-progress"], work / "logs" / "bm25.log")
    print("3/5 training", flush=True)
    ckpts = train_all(data, budget, work, plan)
    timings = {n: json.loads((c.parent / "DONE").read_text())["seconds"] for n, c in ckpts.items()}
    print("4/5 datastores", flush=True)
    base_store = build_datastore(data, ckpts["transformer"], work / "datastore-transformer", budget, work)
    ext_store = build_datastore(data, ckpts["trimelm_ext"], work / "datastore-trimelm_ext", budget, work)
    print("5/5 evaluation (tune on valid, report test)", flush=True)
    specs = [
        ("Transformer", "transformer", "none", None, False),
        ("Transformer + continuous cache", "transformer", "long", None, False),
        ("kNN-LM", "transformer", "none", base_store, True),
        ("kNN-LM + continuous cache", "transformer", "long", base_store, True),
        ("TrimeLM (no memory)", "trimelm", "none", None, False),
        ("TrimeLM", "trimelm", "local", None, False),
        ("TrimeLM + long memory", "trimelm", "long", None, False),
        ("TrimeLM_long (no memory)", "trimelm_long", "none", None, False),
        ("TrimeLM_long (local only)", "trimelm_long", "local", None, False),
        ("TrimeLM_long", "trimelm_long", "long", None, False),
        ("TrimeLM_ext (no memory)", "trimelm_ext", "none", None, False),
        ("TrimeLM_ext (local + long)", "trimelm_ext", "long", None, False),
        ("TrimeLM_ext", "trimelm_ext", "external", ext_store, False),
    ]
    rows = []
    for label, model, memory, store, knnlm in specs:
        print(f"  {label}", flush=True)
        record = evaluate(label, ckpts[model], data, memory, budget, work, store, knnlm)
        rows.append({"label": label, "model": model, "memory": memory + (" + kNN" if knnlm else ""),
                     "test": test_ppl(record), "tuned": tuned(record)})
    write_report(rows, budget, args, data, timings, args.out)
    print(f"total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
