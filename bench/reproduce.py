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

The pipeline is :mod:`trime.pipeline`'s (``make demo`` runs it with a small preset):
every step is a public command-line tool, run as a user runs it; finished steps are
reused on re-runs (``--work``), so an interrupted run resumes. The four trainings and
the two datastore builds are independent: ``--jobs N`` (default 2) runs N of them at a
time with cores / N threads each; on 2 cores two one-thread trainings finish 14% sooner
than one after the other at two threads (small matrices scale poorly across threads).
``--quick`` runs the same pipeline on the shipped sample in a few minutes (tests).
Usage: ``python -m bench.reproduce [--dataset enwik8-prefix] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import machine_info, today
from trime.io_utils import atomic_path, write_json_atomic
from trime.pipeline import Budget, EvalSpec, Pipeline, format_knobs, model_flags, reproduce_budget

REPO = Path(__file__).resolve().parents[1]

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


def paper_reference(byte_level: bool) -> tuple[dict[str, float], str, str]:
    """(paper test numbers, the row they are relative to, a caption) for the side-by-side."""
    if byte_level:
        return PAPER_TEST_BPC, "TrimeLM", "paper (38M, enwik8 bpc)"
    return PAPER_TEST_PPL, "Transformer", "paper (247M, WT103 ppl)"


def write_report(rows: list[dict], budget: Budget, args: argparse.Namespace, data: str, timings: dict, steps: dict,
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
        f"date {today()}; {source}; data `{data}`; `python -m bench.reproduce"
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
               "metric": metric, "budget": budget.as_dict(), "rows": rows, "training_seconds": timings,
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


def eval_specs(byte_level: bool) -> list[EvalSpec]:
    """Every row of the table; the kNN-LM rows search the Transformer's datastore, TrimeLM_ext's its own."""
    specs = [
        EvalSpec("Transformer", "transformer", "none"),
        EvalSpec("Transformer + continuous cache", "transformer", "long"),
    ]
    if not byte_level:
        specs += [
            EvalSpec("kNN-LM", "transformer", "none", "transformer", True),
            EvalSpec("kNN-LM + continuous cache", "transformer", "long", "transformer", True),
        ]
    specs += [
        EvalSpec("TrimeLM (no memory)", "trimelm", "none"),
        EvalSpec("TrimeLM", "trimelm", "local"),
        EvalSpec("TrimeLM + long memory", "trimelm", "long"),
        EvalSpec("TrimeLM_long (no memory)", "trimelm_long", "none"),
        EvalSpec("TrimeLM_long (local only)", "trimelm_long", "local"),
        EvalSpec("TrimeLM_long", "trimelm_long", "long"),
    ]
    if not byte_level:
        specs += [
            EvalSpec("TrimeLM_ext (no memory)", "trimelm_ext", "none"),
            EvalSpec("TrimeLM_ext (local + long)", "trimelm_ext", "long"),
            EvalSpec("TrimeLM_ext", "trimelm_ext", "external", "trimelm_ext"),
            # the same datastore by kNN-LM interpolation only, as the kNN-LM rows use the Transformer's
            EvalSpec("TrimeLM_ext (datastore by interpolation only)", "trimelm_ext", "long", "trimelm_ext", True),
        ]
    return specs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="wikitext-2", choices=["wikitext-2", "enwik8-prefix"],
                        help="the word-level WikiText-2 comparison, or the byte-level enwik8 one (bpc)")
    parser.add_argument("--data-bin", type=Path, help="use this fairseq data-bin (of --dataset's kind) instead of preparing one")
    parser.add_argument("--raw-dir", default=None,
                        help="raw files of --dataset (default ../shared/data/wikitext-2 or ../shared/data/enwik8)")
    parser.add_argument("--quick", action="store_true", help="tiny run on the shipped sample (minutes)")
    parser.add_argument("--max-update", type=int, default=None, help="training updates per model")
    parser.add_argument("--work", type=Path, default=None, help="working directory (reused to resume)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output prefix (default bench/results/reproduce[-enwik8][-quick])")
    parser.add_argument("--jobs", type=int, default=2,
                        help="trainings / datastore builds run at a time, each with cores / JOBS threads (default 2)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    byte_level = args.dataset == "enwik8-prefix"
    budget = reproduce_budget(args.quick, args.max_update, byte_level=byte_level)
    suffix = ("-enwik8" if byte_level else "") + ("-quick" if args.quick else "")
    work = args.work or REPO / f"reproduce{suffix}-work"
    out = args.out or REPO / "bench" / "results" / f"reproduce{suffix}"
    started = time.time()
    if args.quick:
        dataset, raw = ("enwik8-sample" if byte_level else "wikitext-2-sample"), None
    else:
        dataset, raw = args.dataset, args.raw_dir or str(SHARED_DATA / RAW_FOLDER[args.dataset])
    pipeline = Pipeline(budget, work, model_flags(byte_level), eval_specs(byte_level), jobs=args.jobs, eval_cache=True)
    titles = {"data": "1/5 data", "plan": "2/5 BM25 batch plan for TrimeLM_ext",
              "training": f"3/5 training ({args.jobs} at a time)", "datastores": "4/5 datastores",
              "evaluation": "5/5 evaluation (tune on valid, report test)"}
    rows = pipeline.run(titles, dataset, raw, args.data_bin, workers=2)
    data = args.data_bin or work / "data-bin"
    write_report(rows, budget, args, str(data), pipeline.training_seconds(), pipeline.step_seconds(),
                 pipeline.phase_seconds(), out)
    print(f"total {time.time() - started:.0f} s this run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
