"""Study: TrimeLM_ext trained with more segments per step, at the same number of updates.

The paper's in-training external memory is 4 x 3072 tokens gathered across GPUs; ``make reproduce``'s
is 16 x 256 = 4,096 tokens. This trains ``make reproduce``'s TrimeLM_ext (same model, flags, BM25 plan
and 300 updates) with ``--segments-per-batch`` segments per update (default 48: 12,288 tokens, a 3x
larger in-batch memory), builds its datastore and evaluates the four TrimeLM_ext rows of
``make reproduce`` with the same evaluation budget, through the same pipeline (:mod:`trime.pipeline`).

Each update also sees 3x the tokens, so the row to read is the datastore's gain over the model's
own local + long memory (``external`` vs ``long``), compared with the same gain of the 16-segment
model in ``bench/results/reproduce.json`` (``--baseline``).

Usage (after ``make reproduce``; reuses its data-bin and plan, about 35 min on 2 cores):
``.venv/bin/python -m bench.studies.ext_segments --data-bin reproduce-work/data-bin --plan reproduce-work/bm25-plan.json``
Writes ``bench/results/ext-segments.{json,md}``; finished steps are reused on re-runs (``--work``).
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Dict

from bench.common import machine_info, today
from bench.reproduce import eval_specs
from trime.io_utils import atomic_path, write_json_atomic
from trime.pipeline import Pipeline, format_knobs, model_flags, reproduce_budget

REPO = Path(__file__).resolve().parents[2]

MODEL = "trimelm_ext"


def baseline_rows(path: Path) -> Dict[str, float]:
    """label -> test ppl of the TrimeLM_ext rows of a ``make reproduce`` results json."""
    return {r["label"]: r["test"] for r in json.loads(path.read_text())["rows"] if r["model"] == MODEL}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-bin", type=Path, required=True, help="make reproduce's data-bin (trime-prepare wikitext-2)")
    parser.add_argument("--plan", type=Path, required=True, help="make reproduce's BM25 plan (trime-bm25-batches)")
    parser.add_argument("--segments-per-batch", type=int, default=48, help="segments of 256 tokens per update")
    parser.add_argument("--work", type=Path, default=REPO / "ext-segments-work", help="working directory (resumes)")
    parser.add_argument("--baseline", type=Path, default=REPO / "bench" / "results" / "reproduce.json",
                        help="make reproduce's results json (the 16-segment TrimeLM_ext rows)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ext-segments")
    args = parser.parse_args()
    if args.segments_per_batch < 1:
        parser.error(f"--segments-per-batch must be >= 1, got {args.segments_per_batch}")
    for flag, path in (("--data-bin", args.data_bin / "dict.txt"), ("--plan", args.plan), ("--baseline", args.baseline)):
        if not path.is_file():
            raise SystemExit(f"ext_segments: {flag}: {path} does not exist; run make reproduce first")
    budget = dataclasses.replace(reproduce_budget(quick=False), segments_per_batch=args.segments_per_batch)
    work = args.work / f"segments-{args.segments_per_batch}"
    specs = [spec for spec in eval_specs(byte_level=False) if spec.model == MODEL]
    pipeline = Pipeline(budget, work, {MODEL: model_flags()[MODEL]}, specs, eval_cache=True)
    started = time.time()
    ckpt = pipeline.train(MODEL, args.data_bin, args.plan)
    store = pipeline.build_datastore(MODEL, args.data_bin)
    rows = []
    for spec in specs:
        pipeline.reporter.evaluating(spec.label)
        record = pipeline.evaluate(spec.label, ckpt, args.data_bin, spec.memory, MODEL,
                                   store if spec.datastore else None, spec.knnlm)
        rows.append(pipeline.row(spec, record))
    steps = pipeline.step_seconds()
    base = baseline_rows(args.baseline)
    ours = {r["label"]: r["test"] for r in rows}
    local_long = "TrimeLM_ext (local + long)"

    def gain(table: Dict[str, float], label: str) -> str:
        if label not in table or local_long not in table:
            return "–"
        return f"{100 * (table[label] / table[local_long] - 1):+.1f}%"

    n = args.segments_per_batch
    lines = [
        f"# TrimeLM_ext with {n} segments per update",
        "",
        f"Machine: {machine_info().get('cpu_model')}; date {today()}; `python -m bench.studies.ext_segments --segments-per-batch {n}`. "
        f"Model and flags of `make reproduce`'s TrimeLM_ext ({budget.describe()}), its BM25 plan, "
        f"{budget.max_update} updates of {n} x {budget.tokens_per_sample} = {n * budget.tokens_per_sample:,} tokens "
        f"(`make reproduce`: 16 x 256 = 4,096). Evaluation as `make reproduce` (context {budget.context_window}, "
        f"memory {budget.mem_size}, k = {budget.k}, tuned on valid, test reported).",
        "",
        f"| row | test ppl, 16 per update (`reproduce.json`) | vs its local + long | test ppl, {n} per update "
        "| vs its local + long | tuned |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        old = base.get(r["label"])
        knobs = format_knobs(r["tuned"])
        lines.append(f"| {r['label']} | {f'{old:.2f}' if old else '–'} | {gain(base, r['label'])} | {r['test']:.2f} "
                     f"| {gain(ours, r['label'])} | {knobs or '–'} |")
    lines += ["", "Step seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in steps.items()) + ".", ""]
    with atomic_path(args.out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    write_json_atomic(args.out.with_suffix(".json"), {
        "machine": machine_info(), "date": today(), "segments_per_batch": n, "budget": budget.as_dict(),
        "rows": rows, "baseline_rows": base, "step_seconds": steps, "seconds_this_run": round(time.time() - started),
    })
    print("\n".join(lines))


if __name__ == "__main__":
    main()
