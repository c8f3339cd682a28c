#!/usr/bin/env python
"""Benchmark: training words/s of ``trime_long_loss_same_device`` vs ``cross_entropy`` (and ``trime_loss``).

All criteria train the same model (same architecture, same initial weights) on the same
batches at the enwik8 TrimeLM_long recipe's batch shape: ``--task trime_lm --keep-order``,
24 consecutive segments of 512 bytes per batch (``--max-tokens 12288``), byte vocabulary
(the shipped ``samples/enwik8/enwik8.sample``, made into a data-bin with
``trime.data_prep.prepare``: one byte per token). One fairseq ``Trainer`` per criterion
lives in this process; a step is ``Trainer.train_step`` (forward, backward, Adam update).

Timing: each criterion first runs ``--warmup`` untimed steps; then ``--rounds`` rounds
follow, and in every round each criterion runs ``--steps`` timed steps, in an order
rotated from round to round. Other processes on the machine therefore slow all
criteria alike. Reported: the median words/s per criterion and the ratio of medians to
``cross_entropy`` (plus the per-round ratios, which pair neighbouring measurements).

The memory cost of ``trime_long_loss_same_device`` (every earlier token of the 12,288-token
batch: ~N^2/2 key scores per step) does not depend on the model's depth, while the
model's cost does; the ratio therefore depends on the model. ``--layers/--dim/--ffn/--heads``
pick it (default: a small 4 x 256 model; the recipe's model is 12 x 512, FFN 2048).

Usage::

    bench/train_long.py [--layers 4 --dim 256 --ffn 1024 --heads 4] [--rounds 3 --steps 2 --warmup 1]
                        [--criteria cross_entropy,trime_loss,trime_long_loss_same_device]
                        [--out bench/results/train_long] [--tag small]

writes ``<out>.json`` (raw step times, settings, machine) and ``<out>.md``; with ``--tag``
the configuration is added to (or replaces its entry in) existing result files.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from bench.common import machine_info, today, write_json  # noqa: E402

SEGMENTS, TOKENS_PER_SAMPLE = 24, 512
DEFAULT_CRITERIA = ("cross_entropy", "trime_loss", "trime_long_loss_same_device")


def enwik8_sample_bin(work_dir: Path) -> Path:
    """Byte-level data-bin of the shipped enwik8 sample (built once into ``work_dir``)."""
    from trime.data_prep.prepare import prepare_dataset

    return prepare_dataset("enwik8-sample", _REPO / "samples" / "enwik8", work_dir / "enwik8-sample-bin")


def build_trainer(data_dir: Path, criterion: str, args: argparse.Namespace):
    """(task, Trainer) for ``criterion`` on the benchmark model; weights depend only on ``--seed``."""
    import torch
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    argv = [
        str(data_dir),
        "--task",
        "trime_lm",
        "--keep-order",
        "--sample-break-mode",
        "none",
        "--tokens-per-sample",
        str(TOKENS_PER_SAMPLE),
        "--max-tokens",
        str(SEGMENTS * TOKENS_PER_SAMPLE),
        "--arch",
        "transformer_lm",
        "--decoder-layers",
        str(args.layers),
        "--decoder-embed-dim",
        str(args.dim),
        "--decoder-ffn-embed-dim",
        str(args.ffn),
        "--decoder-attention-heads",
        str(args.heads),
        "--decoder-normalize-before",
        "--share-decoder-input-output-embed",
        "--dropout",
        "0.1",
        "--criterion",
        criterion,
        "--optimizer",
        "adam",
        "--lr",
        "0.0001",
        "--cpu",
        "--seed",
        str(args.seed),
        "--num-workers",
        "0",
    ]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    torch.manual_seed(args.seed)
    model = task.build_model(cfg.model)
    return task, Trainer(cfg, task, model, task.build_criterion(cfg.criterion))


def first_batches(task, count: int) -> list:
    """The first ``count`` full keep-order batches (24 consecutive segments each)."""
    itr = task.get_batch_iterator(
        task.dataset("train"), max_tokens=SEGMENTS * TOKENS_PER_SAMPLE, seed=1, disable_iterator_cache=True
    ).next_epoch_itr(shuffle=False)
    batches = []
    for sample in itr:
        if sample["net_input"]["src_tokens"].shape == (SEGMENTS, TOKENS_PER_SAMPLE):
            batches.append(sample)
        if len(batches) == count:
            return batches
    raise SystemExit(f"the data-bin has only {len(batches)} full batches of {SEGMENTS}x{TOKENS_PER_SAMPLE}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="trime-bench-"))
    data_dir = enwik8_sample_bin(work_dir)
    criteria = args.criteria.split(",")
    trainers = {}
    for name in criteria:
        task, trainers[name] = build_trainer(data_dir, name, args)
    params = sum(p.numel() for p in trainers[criteria[0]].model.parameters())
    batches = first_batches(task, args.warmup + args.rounds * args.steps)
    ntokens = int(batches[0]["ntokens"])

    def step(name: str, index: int) -> float:
        start = time.perf_counter()
        trainers[name].train_step([batches[index]])
        return time.perf_counter() - start

    load_before = os.getloadavg()
    for name in criteria:  # warm-up (untimed)
        for i in range(args.warmup):
            step(name, i)
    times: dict[str, list[float]] = {name: [] for name in criteria}
    rounds = []
    for r in range(args.rounds):
        order = criteria[r % len(criteria) :] + criteria[: r % len(criteria)]
        per_round = {}
        for name in order:
            first = args.warmup + r * args.steps
            ts = [step(name, first + i) for i in range(args.steps)]
            times[name].extend(ts)
            per_round[name] = statistics.median(ts)
            print(f"round {r + 1}/{args.rounds} {name}: {[round(t, 2) for t in ts]} s/step", flush=True)
        rounds.append({"order": order, "median_s": per_round})
    load_after = os.getloadavg()

    base = "cross_entropy" if "cross_entropy" in criteria else criteria[0]
    summary = {}
    for name in criteria:
        median_s = statistics.median(times[name])
        summary[name] = {
            "median_step_s": round(median_s, 3),
            "min_step_s": round(min(times[name]), 3),
            "words_per_s": round(ntokens / median_s, 1),
            "ratio_vs_" + base: round(statistics.median(times[base]) / median_s, 3),
            "per_round_ratio_vs_" + base: [round(rd["median_s"][base] / rd["median_s"][name], 3) for rd in rounds],
            "step_times_s": [round(t, 3) for t in times[name]],
        }
    return {
        "tag": args.tag,
        "model": {
            "arch": "transformer_lm (pre-norm, tied embeddings)",
            "layers": args.layers,
            "dim": args.dim,
            "ffn": args.ffn,
            "heads": args.heads,
            "params": params,
        },
        "batch": {"segments": SEGMENTS, "tokens_per_sample": TOKENS_PER_SAMPLE, "tokens": ntokens},
        "timing": {
            "warmup_steps": args.warmup,
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "threads": args.threads,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in load_after],
        },
        "baseline": base,
        "results": summary,
    }


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    machine = report["machine"]
    lines = [
        "# Training throughput: `trime_long_loss_same_device` vs `cross_entropy` (CPU)",
        "",
        (
            f"Date: {report['date']}. Machine: {machine.get('cpu_model')}, {machine.get('cpu_count')} cores, "
            f"{machine.get('mem_total_gib')} GiB; torch {machine.get('torch')}. Produced by `bench/train_long.py`."
        ),
        "",
        (
            "Setting: enwik8 TrimeLM_long batch shape (24 consecutive segments x 512 bytes = 12,288 tokens per step, "
            "`--task trime_lm --keep-order`, byte vocabulary of the shipped enwik8 sample), "
            "fairseq `Trainer.train_step` (forward, backward, Adam), fp32, same initial weights and batches "
            "for every criterion. Warm-up steps "
            "excluded; criteria interleaved round by round in rotated order, so load from other processes (other "
            "helpers shared the 2 cores; load averages below) hits all of them alike."
        ),
        "",
    ]
    for config in report["configs"]:
        m, t = config["model"], config["timing"]
        lines += [
            (
                f"## {config['tag']}: {m['layers']} layers x {m['dim']} (FFN {m['ffn']}, {m['heads']} heads), "
                f"{m['params'] / 1e6:.2f}M parameters"
            ),
            "",
            (
                f"{t['warmup_steps']} warm-up step(s), then {t['rounds']} rounds x {t['steps_per_round']} "
                f"timed steps per criterion; load average before/after: {t['loadavg_before']} / {t['loadavg_after']}."
            ),
            "",
            f"| criterion | median s/step | words/s | ratio vs {config['baseline']} | per-round ratios |",
            "|---|---|---|---|---|",
        ]
        for name, r in config["results"].items():
            ratio = r["ratio_vs_" + config["baseline"]]
            rounds = ", ".join(str(x) for x in r["per_round_ratio_vs_" + config["baseline"]])
            lines.append(f"| `{name}` | {r['median_step_s']} | {r['words_per_s']} | {ratio} | {rounds} |")
        lines.append("")
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {note}" for note in report["notes"]] + [""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--criteria", default=",".join(DEFAULT_CRITERIA))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per criterion per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--work-dir", default=None, help="where the data-bin is built (default: a temp dir)")
    p.add_argument("--out", default=str(_REPO / "bench" / "results" / "train_long"))
    p.add_argument("--tag", default="small", help="name of this configuration in the result files")
    p.add_argument("--note", action="append", default=[], help="a line for the Notes section (repeatable)")
    p.add_argument("--render-only", action="store_true", help="only add --note lines and rewrite <out>.md")
    args = p.parse_args(argv)

    out = Path(args.out)
    json_path = out.with_suffix(".json")
    report = {"date": today(), "machine": machine_info(), "configs": [], "notes": []}
    if json_path.exists():
        report = json.loads(json_path.read_text())
    if not args.render_only:
        config = run(args)
        report["date"], report["machine"] = today(), machine_info()
        report["configs"] = [c for c in report["configs"] if c["tag"] != args.tag] + [config]
        print(json.dumps(config["results"], indent=1))
    report["notes"] = list(dict.fromkeys(report.get("notes", []) + args.note))
    write_json(str(json_path), report)
    write_markdown(out.with_suffix(".md"), report)


if __name__ == "__main__":
    main()
