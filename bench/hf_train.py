"""HF Trainer step time with the TRIME loss vs the plain Hugging Face loss, on the same model and batches.

One process, one random-initialised GPT-2 (real 50,257-token vocabulary), one fixed list of
batches of consecutive text blocks. Variants:

- ``hf``: ``transformers.Trainer``'s own ``compute_loss`` (``model(..., labels=...).loss``);
- ``trime-<memory>``: ``trime-hf-train``'s ``TrimeTrainer`` (``trime.hf.causal_lm_loss``) with
  memory none, local, long or external (external draws its --cross-sent-ratio coin per step).

A step is ``Trainer.training_step`` (forward, backward, under the Trainer's autocast
context) plus the optimizer step (AdamW) and ``zero_grad``. After warm-up, variants run
interleaved round by round in rotated order, so load from other processes hits all alike;
the ratio is ``hf`` time / variant time (tokens/s relative to plain HF). Target:
local >= 0.95x.

    python -m bench.hf_train                      # CPU preset (4 x 256 GPT-2, 4 x 256 tokens)
    python -m bench.hf_train --preset gpt2-small --bf16   # GPT-2 small, 8 x 1024 tokens (GPU)

Results go to bench/results/hf_train.{json,md} (one section per --tag) with the machine and date.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import machine_info, today, write_json

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TEXT = REPO / "samples" / "wikitext-2" / "wiki.train.tokens"
PRESETS = {
    "cpu-small": {"layers": 4, "dim": 256, "heads": 4, "block": 256, "batch": 4},
    "gpt2-small": {"layers": 12, "dim": 768, "heads": 12, "block": 1024, "batch": 8},
}
VARIANTS = ("hf", "trime-none", "trime-local", "trime-long", "trime-external")


def build_model(preset: dict, device: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=preset["block"], n_embd=preset["dim"], n_layer=preset["layers"],
                        n_head=preset["heads"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).to(device)


def make_batches(preset: dict, count: int, device: str) -> list:
    """``count`` batches of consecutive blocks of the shipped sample under a byte-level stand-in of GPT-2's ids."""
    data = torch.frombuffer(bytearray(TEXT.read_bytes()), dtype=torch.uint8).long()
    ids = (data * 197 + 11) % 50257  # deterministic ids over the whole vocabulary (the tokenizer is not timed)
    per_batch = preset["batch"] * preset["block"]
    batches = []
    for i in range(count):
        chunk = ids[i * per_batch : (i + 1) * per_batch].view(preset["batch"], preset["block"]).to(device)
        batches.append({"input_ids": chunk, "labels": chunk})
    return batches


def make_trainers(model, args, memories) -> dict:
    from transformers import Trainer, default_data_collator

    from trime.hf.train import make_trainer_class

    trime_trainer = make_trainer_class()
    trainers = {"hf": Trainer(model=model, args=args, data_collator=default_data_collator)}
    for memory in memories:
        trainers[f"trime-{memory}"] = trime_trainer(model=model, args=args, data_collator=default_data_collator,
                                                    memory=memory, ordered=True, cross_sent_ratio=0.9)
    for trainer in trainers.values():
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1
    return trainers


def step(trainer, batch) -> None:
    trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def run(args) -> dict:
    from transformers import TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    preset = dict(PRESETS[args.preset])
    for key in ("block", "batch"):
        if getattr(args, key):
            preset[key] = getattr(args, key)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(preset, device)
    training_args = TrainingArguments(output_dir=str(Path(args.work_dir) / "hf_train"), bf16=args.bf16,
                                      use_cpu=device == "cpu", report_to="none", learning_rate=1e-4,
                                      per_device_train_batch_size=preset["batch"], seed=1)
    memories = [v.split("-", 1)[1] for v in args.variants if v.startswith("trime-")]
    trainers = make_trainers(model, training_args, memories)
    batches = make_batches(preset, args.batches, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for name in args.variants:  # warm-up (allocator, kernels)
        for batch in batches[: args.warmup]:
            step(trainers[name], batch)
    sync()
    times = {name: [] for name in args.variants}
    rounds = []
    load_before = os.getloadavg()
    for r in range(args.rounds):
        order = args.variants[r % len(args.variants):] + args.variants[: r % len(args.variants)]
        this_round = {}
        for name in order:
            sync()
            t0 = time.perf_counter()
            for i in range(args.steps):
                step(trainers[name], batches[(r * args.steps + i) % len(batches)])
            sync()
            this_round[name] = (time.perf_counter() - t0) / args.steps
            times[name].append(this_round[name])
        rounds.append(this_round)
    tokens = preset["batch"] * preset["block"]
    medians = {name: statistics.median(values) for name, values in times.items()}
    rows = []
    for name in args.variants:
        rows.append({
            "variant": name,
            "median_s_per_step": round(medians[name], 4),
            "tokens_per_s": round(tokens / medians[name], 1),
            "ratio_vs_hf": round(medians["hf"] / medians[name], 3),
            "per_round_ratio": [round(rd["hf"] / rd[name], 3) for rd in rounds],
        })
    params = sum(p.numel() for p in model.parameters())
    return {
        "tag": args.tag or f"{args.preset}-{device}{'-bf16' if args.bf16 else ''}",
        "date": today(),
        "machine": machine_info(),
        "device": device,
        "bf16": args.bf16,
        "preset": preset,
        "parameters": params,
        "tokens_per_step": tokens,
        "warmup_steps": args.warmup,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "command": "python -m bench.hf_train " + " ".join(sys.argv[1:]),
        "rows": rows,
    }


def markdown(results: dict) -> str:
    lines = [
        "# HF Trainer step: TRIME loss vs the plain Hugging Face loss",
        "",
        "Produced by `python -m bench.hf_train`. Each section: one random-initialised GPT-2 (50,257-token vocabulary), "
        "the same batches of consecutive blocks for every variant, `Trainer.training_step` (forward, backward) + "
        "AdamW step per step, variants interleaved round by round in rotated order after warm-up. `hf` is "
        "transformers' own `compute_loss`; `trime-*` is `trime-hf-train`'s `TrimeTrainer`. Ratio = hf time / "
        "variant time. Target: local >= 0.95x.",
    ]
    for run_result in results.values():
        m, p = run_result["machine"], run_result["preset"]
        gpu = f", GPU {m.get('gpu')}" if m.get("gpu") else ""
        lines += [
            "",
            f"## {run_result['tag']}: {p['layers']} layers x {p['dim']}, {run_result['parameters'] / 1e6:.2f}M parameters",
            "",
            f"Run {run_result['date']} on {m.get('cpu_model', 'unknown CPU')}, {m.get('cpu_count')} cores{gpu}; "
            f"torch {m.get('torch')}; device {run_result['device']}{', bf16 autocast' if run_result['bf16'] else ', fp32'}. "
            f"`{run_result['command']}`.",
            "",
            f"{p['batch']} blocks x {p['block']} tokens = {run_result['tokens_per_step']:,} tokens per step; "
            f"{run_result['warmup_steps']} warm-up step(s) per variant, then {run_result['rounds']} rounds x "
            f"{run_result['steps_per_round']} timed steps; load average before/after: "
            f"{[round(x, 2) for x in run_result['load_average_before_after'][0]]} / "
            f"{[round(x, 2) for x in run_result['load_average_before_after'][1]]}.",
            "",
            "| variant | median s/step | tokens/s | ratio vs hf | per-round ratios |",
            "|---|---|---|---|---|",
        ]
        for row in run_result["rows"]:
            lines.append(f"| `{row['variant']}` | {row['median_s_per_step']} | {row['tokens_per_s']} | "
                         f"{row['ratio_vs_hf']} | {', '.join(map(str, row['per_round_ratio']))} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    p.add_argument("--block", type=int, help="override the preset's tokens per block")
    p.add_argument("--batch", type=int, help="override the preset's blocks per step")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant and round")
    p.add_argument("--batches", type=int, default=8, help="distinct batches cycled through")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (Trainer mixed precision)")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--tag", help="section name in the results (default: preset-device)")
    p.add_argument("--work-dir", default="/tmp/trime-bench-hf")
    p.add_argument("--no-save", action="store_true", help="print only; do not update bench/results")
    args = p.parse_args(argv)
    if "hf" not in args.variants:
        args.variants = ["hf", *args.variants]
    result = run(args)
    print(json.dumps({"tag": result["tag"], "rows": result["rows"]}, indent=1))
    if not args.no_save:
        json_path = RESULTS / "hf_train.json"
        results = json.loads(json_path.read_text()) if json_path.is_file() else {}
        results[result["tag"]] = result
        write_json(str(json_path), results)
        (RESULTS / "hf_train.md").write_text(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
