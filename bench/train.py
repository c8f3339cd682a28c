#!/usr/bin/env python
"""Benchmark: ``fairseq-train`` words/s of every TRIME criterion against its plain baseline.

All criteria train the same model (same architecture, same initial weights) on the
same batches, in one process: one fairseq ``Trainer`` per criterion; a step is
``Trainer.train_step`` (forward, backward, Adam update). Two data presets:

- ``--data enwik8`` (default): byte level, the enwik8 recipes' batch shape (24
  consecutive segments of 512 bytes, 12,288 tokens per step), tied full-softmax
  embeddings; baseline ``cross_entropy``. Data: the shipped enwik8 sample.
- ``--data wikitext-2``: word level, the batch shape and adaptive softmax of
  ``make reproduce`` (16 segments of 256 tokens); baseline ``adaptive_loss``.
  Data: the shipped WikiText-2 sample, or the real data-bin with ``--data-bin``.

Every criterion runs under ``--task trime_lm --keep-order`` (consecutive segments, as
TrimeLM_long trains). TrimeLM_ext trains on BM25-grouped batches instead; its cost does
not depend on which segments share a batch, so the same batches time it fairly. Its
coin (``--cross-sent-ratio``, default 0.9 as in the recipes) switches the local memory
off per step, exactly as in training.

Timing: each criterion first runs ``--warmup`` untimed steps; then ``--rounds`` rounds
follow, and in every round each criterion runs ``--settle`` untimed and ``--steps`` timed
steps, in an order rotated from round to round, so other processes on the machine slow
all criteria alike. (The first step after switching trainers re-faults the memory the
others freed, up to +60% on a 1 s step; a real run never switches, so it is not timed.)
Reported: median words/s per criterion and the ratio of medians to the baseline (plus
the per-round ratios, which pair neighbouring measurements).

The memory cost of the long and external rules (~N^2/2 key scores for N tokens per
step) does not depend on the model's depth, while the model's cost does: the ratio
depends on the model, and approaches 1 only for recipe-sized models.

Usage::

    python -m bench.train [--data enwik8|wikitext-2] [--data-bin DIR] [--layers 4 --dim 256 --ffn 1024 --heads 4]
                   [--rounds 3 --steps 2 --warmup 1] [--criteria a,b,...] [--tag NAME] [--out bench/results/train]

writes ``<out>.json`` (raw step times, settings, machine) and ``<out>.md``; a configuration
replaces its entry (same ``--tag``) in existing result files.
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

from bench.common import machine_info, today, write_json

_REPO = Path(__file__).resolve().parent.parent

TRIME_CRITERIA = ("trime_loss", "trime_long_loss_same_device", "trime_ext_loss")
PRESETS: dict[str, dict[str, Any]] = {
    "enwik8": {
        "sample": ("enwik8-sample", _REPO / "samples" / "enwik8"),
        "segments": 24,
        "tokens_per_sample": 512,
        "baseline": "cross_entropy",
        "head": ["--share-decoder-input-output-embed"],
        "describe": "byte level, 24 consecutive segments x 512 bytes = 12,288 tokens per step, tied full softmax",
    },
    "wikitext-2": {
        "sample": ("wikitext-2-sample", _REPO / "samples" / "wikitext-2"),
        "segments": 16,
        "tokens_per_sample": 256,
        "baseline": "adaptive_loss",
        "head": ["--adaptive-softmax-cutoff", "4000,12000", "--adaptive-softmax-dropout", "0"],
        "describe": "word level, 16 consecutive segments x 256 tokens = 4,096 tokens per step, adaptive softmax "
        "(cutoffs 4000, 12000)",
    },
}


def sample_bin(preset: dict[str, Any], work_dir: Path) -> Path:
    """Data-bin of the preset's shipped sample (built once into ``work_dir``)."""
    from trime.data_prep.prepare import prepare_dataset

    name, raw = preset["sample"]
    return prepare_dataset(name, raw, work_dir / f"{name}-bin")


def build_trainer(data_dir: Path, criterion: str, args: argparse.Namespace):
    """(task, Trainer) for ``criterion`` on the benchmark model; weights depend only on ``--seed``."""
    preset = PRESETS[args.data]
    argv = [
        str(data_dir), "--task", "trime_lm", "--keep-order", "--sample-break-mode", "none",
        "--tokens-per-sample", str(preset["tokens_per_sample"]),
        "--max-tokens", str(preset["segments"] * preset["tokens_per_sample"]),
        "--arch", "transformer_lm", "--decoder-normalize-before",
        "--decoder-layers", str(args.layers), "--decoder-embed-dim", str(args.dim),
        "--decoder-input-dim", str(args.dim), "--decoder-output-dim", str(args.dim),  # fairseq defaults: 512
        "--decoder-ffn-embed-dim", str(args.ffn), "--decoder-attention-heads", str(args.heads),
        *preset["head"], "--dropout", "0.1", "--criterion", criterion,
        "--optimizer", "adam", "--lr", "0.0001", "--cpu", "--seed", str(args.seed), "--num-workers", "0",
        "--ddp-backend", "legacy_ddp",  # adaptive_loss refuses the default c10d backend
    ]
    if criterion == "trime_ext_loss":
        argv += ["--cross-sent-ratio", str(args.cross_sent_ratio)]
    return trainer_from_argv(argv, args.seed)


def trainer_from_argv(argv: list[str], seed: int):
    """(task, Trainer) from ``fairseq-train`` arguments; the weights depend only on ``seed``."""
    import torch
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    torch.manual_seed(seed)
    model = task.build_model(cfg.model)
    return task, Trainer(cfg, task, model, task.build_criterion(cfg.criterion))


def first_batches(task, count: int, segments: int, tokens_per_sample: int) -> list:
    """The first ``count`` full keep-order batches (``segments`` consecutive segments each)."""
    itr = task.get_batch_iterator(
        task.dataset("train"), max_tokens=segments * tokens_per_sample, seed=1, disable_iterator_cache=True
    ).next_epoch_itr(shuffle=False)
    batches = []
    for sample in itr:
        if sample["net_input"]["src_tokens"].shape == (segments, tokens_per_sample):
            batches.append(sample)
        if len(batches) == count:
            return batches
    raise SystemExit(f"the data-bin has only {len(batches)} full batches of {segments}x{tokens_per_sample}")


def interleaved_train_steps(
    trainers: dict, batches: list, warmup: int, rounds: int, steps: int, sync=None, deadline: float | None = None,
    settle: int = 0,
) -> tuple[dict[str, list[float]], list[dict]]:
    """Step times of every trainer: ``warmup`` untimed steps each, then ``rounds`` rounds of ``steps``
    timed steps per trainer in an order rotated every round, each turn led by ``settle`` untimed steps.
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before and after each timed step; no new round starts
    after ``deadline`` (``time.perf_counter``). Needs ``warmup + rounds * (settle + steps)`` batches.
    Returns (times per trainer, per-round {order, median_s})."""
    names = list(trainers)
    sync = sync or (lambda: None)

    def step(name: str, index: int) -> float:
        sync()
        start = time.perf_counter()
        trainers[name].train_step([batches[index]])
        sync()
        return time.perf_counter() - start

    for name in names:  # warm-up (untimed)
        for i in range(warmup):
            step(name, i)
    times: dict[str, list[float]] = {name: [] for name in names}
    per_rounds = []
    for r in range(rounds):
        if deadline is not None and r > 0 and time.perf_counter() > deadline:
            break
        order = names[r % len(names) :] + names[: r % len(names)]
        per_round = {}
        for name in order:
            first = warmup + r * (settle + steps)
            for i in range(settle):
                step(name, first + i)
            first += settle
            ts = [step(name, first + i) for i in range(steps)]
            times[name].extend(ts)
            per_round[name] = statistics.median(ts)
            print(f"round {r + 1}/{rounds} {name}: {[round(t, 3) for t in ts]} s/step", flush=True)
        per_rounds.append({"order": order, "median_s": per_round})
    return times, per_rounds


def summarize_steps(times: dict[str, list[float]], rounds: list[dict], ntokens: int, base: str) -> dict[str, Any]:
    """Median words/s per trainer and the ratio of medians (and per-round ratios) to ``base``."""
    summary = {}
    for name, ts in times.items():
        median_s = statistics.median(ts)
        summary[name] = {
            "median_step_s": round(median_s, 4),
            "min_step_s": round(min(ts), 4),
            "words_per_s": round(ntokens / median_s, 1),
            "ratio_vs_" + base: round(statistics.median(times[base]) / median_s, 3),
            "per_round_ratio_vs_" + base: [round(rd["median_s"][base] / rd["median_s"][name], 3) for rd in rounds],
            "step_times_s": [round(t, 4) for t in ts],
        }
    return summary


def warm_memory_kernels(dim: int, seq_len: int) -> None:
    """Build trime.loss's compiled kernels for every rule and both ext coin outcomes before timing.

    The warm-up steps alone would leave the variant of whichever ``--cross-sent-ratio``
    outcome they did not draw to be compiled inside a timed step. The kernels are built for
    dynamic shapes, so a small batch of the model's width serves the real ones.
    """
    import torch

    import trime.loss as loss
    from trime.loss_compile import compile_mode, set_compile

    mode = compile_mode()
    if mode == "never":
        return
    set_compile("always")
    try:
        for rule, local in ((loss.Rule.LONG, True), (loss.Rule.EXTERNAL, True), (loss.Rule.EXTERNAL, False)):
            h = torch.randn(3 * seq_len, dim, requires_grad=True)
            targets = torch.randint(0, 8, (3 * seq_len,))
            vis = loss.Visibility.for_batch(rule, 3, seq_len, external_local=local)
            lse_all, lse_pos = loss.memory_logsumexp(h, h, targets, targets, vis)
            (torch.where(torch.isfinite(lse_all), lse_all, 0) + torch.where(torch.isfinite(lse_pos), lse_pos, 0)).sum().backward()
    finally:
        set_compile(mode)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from trime import loss_compile

    torch.set_num_threads(args.threads)
    loss_compile.set_compile(args.compile)
    preset = PRESETS[args.data]
    if args.data_bin:
        data_dir = Path(args.data_bin)
    else:
        data_dir = sample_bin(preset, Path(args.work_dir or tempfile.mkdtemp(prefix="trime-bench-")))
    criteria = args.criteria.split(",") if args.criteria else [preset["baseline"], *TRIME_CRITERIA]
    trainers = {}
    for name in criteria:
        task, trainers[name] = build_trainer(data_dir, name, args)
    params = sum(p.numel() for p in trainers[criteria[0]].model.parameters())
    count = args.warmup + args.rounds * (args.settle + args.steps)
    batches = first_batches(task, count, preset["segments"], preset["tokens_per_sample"])
    ntokens = int(batches[0]["ntokens"])

    warm_memory_kernels(args.dim, preset["tokens_per_sample"])
    load_before = os.getloadavg()
    times, rounds = interleaved_train_steps(trainers, batches, args.warmup, args.rounds, args.steps,
                                            settle=args.settle)
    load_after = os.getloadavg()

    base = preset["baseline"] if preset["baseline"] in criteria else criteria[0]
    summary = summarize_steps(times, rounds, ntokens, base)
    return {
        "tag": args.tag,
        "data": args.data,
        "data_bin": str(data_dir) if args.data_bin else f"shipped sample ({preset['sample'][0]})",
        "setting": preset["describe"],
        "date": today(),
        "machine": machine_info(),
        "command": " ".join(["python -m bench.train", *sys.argv[1:]]),
        "model": {
            "arch": "transformer_lm (pre-norm), " + " ".join(preset["head"]),
            "layers": args.layers,
            "dim": args.dim,
            "ffn": args.ffn,
            "heads": args.heads,
            "params": params,
        },
        "batch": {"segments": preset["segments"], "tokens_per_sample": preset["tokens_per_sample"], "tokens": ntokens},
        "cross_sent_ratio": args.cross_sent_ratio,
        # how the memory kernels ran (torch.compile'd, or eager and why)
        "compile": {"mode": loss_compile.compile_mode(), "eager_because": loss_compile.STATE.broken},
        "timing": {
            "warmup_steps": args.warmup,
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "settle_steps_per_round": args.settle,
            "threads": args.threads,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in load_after],
        },
        "baseline": base,
        "results": summary,
    }


def _compile_text(config: dict[str, Any]) -> str:
    info = config.get("compile")
    if not info:
        return "eager (before torch.compile support)"
    if info.get("eager_because"):
        return f"eager ({info['eager_because']})"
    return {"never": "eager (--compile never)", "auto": "torch.compile (auto)", "always": "torch.compile"}[info["mode"]]


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    machine = report["machine"]
    lines = [
        "# Training throughput: TRIME criteria vs the plain loss, in `fairseq-train` words/s",
        "",
        (
            f"Produced by `python -m bench.train`; last run {report['date']}. Machine: {machine.get('cpu_model')}, "
            f"{machine.get('cpu_count')} cores, {machine.get('mem_total_gib')} GiB; torch {machine.get('torch')}."
        ),
        "",
        (
            "Each configuration: fairseq `Trainer.train_step` (forward, backward, Adam), fp32, the same model, initial "
            "weights and batches (`--task trime_lm --keep-order`) for every criterion, in one process. Warm-up steps "
            "excluded; criteria interleaved round by round in rotated order, so load from other processes hits all "
            "of them alike. `trime_ext_loss` draws its `--cross-sent-ratio` coin per step as in training. "
            "Targets: `trime_loss` >= 0.95x; long and ext >= 0.9x on the 38M enwik8 recipe model and "
            ">= 0.85x on the WikiText-2 reproduction model."
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
            f"Data: {config.get('data', 'enwik8')} ({config.get('data_bin', 'shipped sample')}); "
            f"{config.get('setting', PRESETS['enwik8']['describe'])}. Run {config.get('date', report['date'])}"
            + (f": `{config['command']}`." if config.get("command") else "."),
            "",
            (
                f"{t['warmup_steps']} warm-up step(s), then {t['rounds']} rounds x "
                + (f"({t['settle_steps_per_round']} untimed + {t['steps_per_round']} timed)"
                   if t.get("settle_steps_per_round") else f"{t['steps_per_round']} timed")
                + f" steps per criterion; load average before/after: {t['loadavg_before']} / {t['loadavg_after']}; "
                f"memory kernels: {_compile_text(config)}."
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
    p.add_argument("--data", default="enwik8", choices=sorted(PRESETS), help="batch shape, vocabulary and baseline")
    p.add_argument("--data-bin", default=None, help="a data-bin to read instead of the preset's shipped sample")
    p.add_argument("--criteria", default=None, help="comma-separated (default: the preset's baseline + all TRIME criteria)")
    p.add_argument("--cross-sent-ratio", type=float, default=0.9, help="trime_ext_loss: probability of local memory off")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per criterion per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--settle", type=int, default=1,
                   help="untimed steps that open each criterion's turn in a round: the first step after a switch "
                        "re-faults memory another trainer freed, which a real (one-criterion) run never does")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--compile", default="auto", choices=["auto", "always", "never"],
                   help="trime.loss_compile.set_compile: torch.compile the memory kernels (compiled during the warm-up)")
    p.add_argument("--work-dir", default=None, help="where the data-bin is built (default: a temp dir)")
    p.add_argument("--out", default=str(_REPO / "bench" / "results" / "train"))
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
