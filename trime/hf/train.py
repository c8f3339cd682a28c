"""``trime-hf-train``: continued pre-training of a Hugging Face causal LM on plain text with the TRIME loss.

Built on ``transformers.Trainer`` (a thin subclass, :class:`TrimeTrainer`, overrides
``compute_loss``), so HF's logging, checkpointing, ``--resume-from-checkpoint``, mixed
precision (``--bf16``/``--fp16``) and DDP (``torchrun --nproc-per-node N trime-hf-train ...``)
all work as usual. The output dir is a standard HF model dir with the tokenizer beside it.

Memories (``--memory``), as the fairseq criteria and the ``trime_lm`` task do:

- ``none``: plain cross-entropy (HF's own loss), shuffled blocks;
- ``local``: earlier tokens of the same block, shuffled blocks;
- ``long``: every earlier token of consecutive blocks, in file order within a batch and
  across ranks at every step (rank r's keys include ranks 0..r of the step);
- ``external``: all tokens of the other blocks of the global batch (every rank) plus the
  earlier tokens of the own block, in BM25-plan order (``--bm25-plan`` from
  ``trime-bm25-batches TRAIN --model M --tokens-per-sample L``). In training the own-block
  memory is switched off with probability ``--cross-sent-ratio`` per forward, drawn as a
  pure function of (seed, rank, step, micro-batch) (:func:`trime.memories.local_off`, the
  fairseq ``trime_ext_loss`` coin), so a resumed run draws the same.

Logged, in nats per predicted token: ``loss`` (what is optimised: the plain cross-entropy
during ``--ce-warmup-steps``, the TRIME loss after), ``ori_loss`` (cross-entropy of the
token head), ``norm_loss`` (the TRIME loss, when computed) and, for ``external``,
``local_off`` (fraction of forwards without own-block memory). Validation always
reports the TRIME loss (``eval_loss``) with ``eval_ori_loss``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from trime.batch_plans import TEXT_PLAN_KIND, PlanTarget, load_plan_for
from trime.cli import Parser
from trime.errors import fail
from trime.hf.model import RECORD
from trime.io_utils import write_json_atomic
from trime.loss import DEFAULT_BLOCK_SIZE
from trime.memories import MEMORIES, local_off

PROG = "trime-hf-train"


def build_parser() -> Parser:
    """The ``trime-hf-train`` command-line parser."""
    p = Parser(
        prog=PROG,
        description="Continued pre-training of a Hugging Face causal LM on plain text with the TRIME loss "
        "(transformers.Trainer: logging, checkpoints, resume, mixed precision, DDP via torchrun).",
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, help="a save_pretrained dir (with its tokenizer) or a hub name when online")
    g.add_argument("--train-file", required=True, help="plain text, tokenized as one string without special tokens")
    g.add_argument("--validation-file", help="plain text for eval_loss (TRIME loss) and eval_ori_loss")
    g.add_argument("--block-size", type=int, help="tokens per block (default: min(1024, the model's positions))")
    g.add_argument("--output-dir", required=True, help="checkpoints, then the final HF model dir with its tokenizer")
    g.add_argument("--overwrite-output-dir", action="store_true", help="allow a non-empty --output-dir (no resume)")
    g.add_argument("--dtype", default="float32", help="dtype the model is loaded in (float32, bf16, fp16, auto)")
    g.add_argument("--key-module", help="module whose input are the TRIME keys (default: the last layer's MLP)")

    g = p.add_argument_group("TRIME")
    g.add_argument("--memory", choices=MEMORIES, default="local", help="training memory (default local)")
    g.add_argument("--bm25-plan", help="batch plan for --memory external (trime-bm25-batches TRAIN --model M ...)")
    g.add_argument("--cross-sent-ratio", type=float, default=0.9,
                   help="external: probability per training forward of switching off the own-block memory (0.9)")
    g.add_argument("--ce-warmup-steps", type=int, default=0, help="optimise plain cross-entropy for the first N steps")
    g.add_argument("--memory-block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help="query rows per block of the memory computation (extra memory O(block x keys))")

    g = p.add_argument_group("optimisation (transformers.TrainingArguments)")
    g.add_argument("--learning-rate", type=float, default=5e-5, help="peak learning rate (default 5e-5)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1 (default 0.9)")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="Adam beta2 (default 0.999)")
    g.add_argument("--optim", default="adamw_torch", help="transformers optimizer name (default adamw_torch)")
    g.add_argument("--lr-scheduler-type", default="linear", help="transformers LR schedule (default linear)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear LR warm-up steps (default 0)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (default 1.0)")
    g.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (overrides --num-train-epochs)")
    g.add_argument("--num-train-epochs", type=float, default=1.0, help="epochs over --train-file (default 1)")
    g.add_argument("--per-device-train-batch-size", type=int, default=8, help="blocks per device and step")
    g.add_argument("--per-device-eval-batch-size", type=int, help="default: the train batch size")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1,
                   help="micro-batches per optimizer step (default 1)")
    g.add_argument("--seed", type=int, default=1, help="seed of the data order, the weights' init and the coins (default 1)")
    g.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    g.add_argument("--fp16", action="store_true", help="fp16 mixed precision (GPU)")
    g.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--logging-steps", type=int, default=10, help="log every N steps (default 10)")
    g.add_argument("--eval-steps", type=int, help="evaluate every N steps (default: once, at the end)")
    g.add_argument("--save-steps", type=int, default=500, help="save a checkpoint every N steps (default 500)")
    g.add_argument("--save-total-limit", type=int, help="keep at most N checkpoints (default: all)")
    g.add_argument("--resume-from-checkpoint", nargs="?", const="last", metavar="CKPT",
                   help="continue from CKPT, or without a value from the last checkpoint in --output-dir")
    g.add_argument("--dataloader-num-workers", type=int, default=0, help="data loader worker processes (default 0)")
    g.add_argument("--report-to", default="none", help="HF integrations (tensorboard, wandb, ...); default none")
    g.add_argument("--no-progress-bar", action="store_true", help="log lines instead of a progress bar")
    return p


# ----------------------------------------------------------------------------- checks before heavy work


def check_args(args: argparse.Namespace) -> None:
    """One-line errors for flags and files, before any model is loaded."""
    for option, path in (("--train-file", args.train_file), ("--validation-file", args.validation_file)):
        if path is not None and not os.path.isfile(path):
            fail(f"{option} {path}: no such file")
    if args.memory == "external" and not args.bm25_plan:
        fail(
            f"--memory external trains on BM25-similar blocks: pass --bm25-plan PLAN, built with "
            f"trime-bm25-batches {args.train_file} --model {args.model} --tokens-per-sample L --output PLAN"
        )
    if args.bm25_plan and args.memory != "external":
        fail(f"--bm25-plan orders batches for --memory external only, got --memory {args.memory}")
    if args.bm25_plan and not os.path.isfile(args.bm25_plan):
        fail(f"--bm25-plan {args.bm25_plan}: no such file; build one with trime-bm25-batches")
    if not 0.0 <= args.cross_sent_ratio <= 1.0:
        fail(f"--cross-sent-ratio must be in [0, 1], got {args.cross_sent_ratio}")
    if args.ce_warmup_steps < 0:
        fail(f"--ce-warmup-steps must be >= 0, got {args.ce_warmup_steps}")
    if args.per_device_train_batch_size < 1:
        fail(f"--per-device-train-batch-size must be >= 1, got {args.per_device_train_batch_size}")
    if args.bf16 and args.fp16:
        fail("--bf16 and --fp16 exclude each other")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        fail(f"--output-dir {out} is a file")
    if args.resume_from_checkpoint:
        if args.resume_from_checkpoint != "last" and not os.path.isdir(args.resume_from_checkpoint):
            fail(f"--resume-from-checkpoint {args.resume_from_checkpoint}: no such checkpoint directory")
    elif out.is_dir() and any(out.iterdir()) and not args.overwrite_output_dir:
        fail(
            f"--output-dir {out} is not empty; continue it with --resume-from-checkpoint, "
            "or pass --overwrite-output-dir to train from scratch into it"
        )


def model_positions(config) -> Optional[int]:
    """The model's maximum number of positions, if its config says (None: unbounded, e.g. rotary)."""
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def pick_block_size(requested: Optional[int], config) -> int:
    positions = model_positions(config)
    if requested is None:
        return min(1024, positions or 1024)
    if positions is not None and requested > positions:
        fail(f"--block-size {requested} exceeds the model's {positions} positions (config.json); use <= {positions}")
    return requested


def plan_target(train_file: str, model: str, tokenizer: Any, block_size: int, num_blocks: int) -> PlanTarget:
    """What a --bm25-plan must match: this text file's blocks under this tokenizer."""
    from trime.hf.text import text_file_identity, tokenizer_identity

    return PlanTarget(
        description=f"{train_file} under the tokenizer of {model}",
        tokens_per_sample=block_size,
        num_segments=num_blocks,
        identity={"tokenizer": tokenizer_identity(tokenizer), "dataset": text_file_identity(train_file)},
        rebuild=f"trime-bm25-batches {train_file} --model {model} --tokens-per-sample {block_size}",
        kind=TEXT_PLAN_KIND,
        tokens_flag="--block-size",
    )


# ----------------------------------------------------------------------------- the Trainer


def make_trainer_class():
    """:class:`TrimeTrainer`, defined lazily so that importing this module does not import transformers."""
    from torch.utils.data import SequentialSampler
    from transformers import Trainer

    from trime.distributed import world_size_and_rank
    from trime.hf.loss import causal_lm_loss

    class TrimeTrainer(Trainer):
        """``Trainer`` whose loss is :func:`trime.hf.causal_lm_loss` (see the module doc)."""

        loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean

        def __init__(self, *args, memory: str = "local", ordered: bool = False, ce_warmup_steps: int = 0,
                     cross_sent_ratio: float = 0.9, key_module: Optional[str] = None,
                     memory_block_size: int = DEFAULT_BLOCK_SIZE, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.memory = memory
            self.ordered = ordered
            self.ce_warmup_steps = ce_warmup_steps
            self.cross_sent_ratio = cross_sent_ratio
            self.key_module = key_module
            self.memory_block_size = memory_block_size
            self._sums = {True: self._zero_sums(), False: self._zero_sums()}  # by model.training
            self._micro = (-1, 0)  # (global step, forwards in it), for the external coin

        @staticmethod
        def _zero_sums() -> dict:
            return {"ori": 0.0, "norm": 0.0, "tokens": 0, "norm_tokens": 0, "off": 0, "draws": 0}

        def _get_train_sampler(self, train_dataset=None):
            if self.ordered:  # long / external: the dataset is laid out in step order (trime.hf.data)
                return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)
            return super()._get_train_sampler(train_dataset)

        def _external_local(self, training: bool) -> bool:
            if self.memory != "external" or not training:
                return True
            step = self.state.global_step
            micro = self._micro[1] if self._micro[0] == step else 0
            self._micro = (step, micro + 1)
            off = local_off(self.args.seed, world_size_and_rank()[1], step, micro, self.cross_sent_ratio)
            sums = self._sums[True]
            sums["off"] += int(off)
            sums["draws"] += 1
            return not off

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            training = model.training
            warmup = training and self.state.global_step < self.ce_warmup_steps
            memory = "none" if warmup else self.memory
            out = causal_lm_loss(
                model,
                inputs["input_ids"],
                memory,
                attention_mask=inputs.get("attention_mask"),
                labels=inputs.get("labels"),
                external_local=self._external_local(training) if memory != "none" else True,
                key_module=self.key_module,
                block_size=self.memory_block_size,
            )
            sums = self._sums[training]
            sums["ori"] += float(out.ori_loss_sum.detach())
            sums["tokens"] += out.num_tokens
            if memory != "none":
                sums["norm"] += float(out.loss_sum.detach())
                sums["norm_tokens"] += out.num_tokens
            return (out.loss, {"logits": out.logits}) if return_outputs else out.loss

        def _flush(self, training: bool, prefix: str) -> dict:
            sums = self._sums[training]
            values = torch.tensor([sums[k] for k in ("ori", "tokens", "norm", "norm_tokens", "off", "draws")],
                                  dtype=torch.float64, device=self.args.device)
            if world_size_and_rank()[0] > 1:
                torch.distributed.all_reduce(values)
            ori, tokens, norm, norm_tokens, off, draws = values.tolist()
            self._sums[training] = self._zero_sums()
            logs = {}
            if tokens:
                logs[f"{prefix}ori_loss"] = ori / tokens
            if norm_tokens:
                logs[f"{prefix}norm_loss"] = norm / norm_tokens
            if draws:
                logs[f"{prefix}local_off"] = off / draws
            return logs

        def log(self, logs: dict, start_time: Optional[float] = None) -> None:
            if "loss" in logs:
                logs.update(self._flush(True, ""))
            elif "eval_loss" in logs:
                logs.update(self._flush(False, "eval_"))
                logs["eval_ppl"] = round(math.exp(min(logs["eval_loss"], 50.0)), 2)
            super().log(logs, start_time)

    return TrimeTrainer


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trime-hf-train``; returns 0 (bad input raises :class:`trime.errors.TrimeError`)."""
    args = build_parser().parse_args(argv)
    check_args(args)
    t0 = time.time()

    from transformers import TrainingArguments, default_data_collator
    from transformers.trainer_utils import get_last_checkpoint
    from transformers.utils import logging as hf_logging

    from trime.hf.data import BlockDataset, text_blocks, train_order
    from trime.hf.model import load_model, load_tokenizer
    from trime.hf.text import tokenizer_identity

    hf_logging.disable_progress_bar()  # weight-loading bars; the training bar is --no-progress-bar's
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=args.dtype, key_module=args.key_module)
    block_size = pick_block_size(args.block_size, model.config)
    train_blocks = text_blocks(args.train_file, tokenizer, block_size, "--train-file", args.model)
    eval_blocks = None
    if args.validation_file:
        eval_blocks = text_blocks(args.validation_file, tokenizer, block_size, "--validation-file", args.model)
    plan_ids = None
    if args.bm25_plan:
        target = plan_target(args.train_file, args.model, tokenizer, block_size, len(train_blocks))
        plan_ids = load_plan_for(args.bm25_plan, target)

    resume = args.resume_from_checkpoint
    if resume == "last":
        resume = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if resume is None:
            fail(f"--resume-from-checkpoint: no checkpoint-* directory in --output-dir {args.output_dir}")

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size or args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        optim=args.optim,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm,
        max_steps=args.max_steps,
        num_train_epochs=args.num_train_epochs,
        seed=args.seed,
        bf16=args.bf16,
        fp16=args.fp16,
        use_cpu=args.cpu,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if (args.eval_steps and eval_blocks is not None) else "no",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        prediction_loss_only=True,
        dataloader_num_workers=args.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available() and not args.cpu,
        report_to=args.report_to,
        disable_tqdm=args.no_progress_bar,
        remove_unused_columns=False,
    )
    world = training_args.world_size
    order = train_order(args.memory, len(train_blocks), plan_ids, args.per_device_train_batch_size, world)
    train_dataset = BlockDataset(train_blocks, order)
    eval_dataset = None if eval_blocks is None else BlockDataset(eval_blocks)
    trainer = make_trainer_class()(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,  # equal-length blocks: stack, never pad
        memory=args.memory,
        ordered=order is not None,
        ce_warmup_steps=args.ce_warmup_steps,
        cross_sent_ratio=args.cross_sent_ratio,
        key_module=args.key_module,
        memory_block_size=args.memory_block_size,
    )
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)  # config + weights + tokenizer: a standard HF model dir
    eval_metrics = trainer.evaluate() if eval_dataset is not None else {}
    if trainer.is_world_process_zero():
        record = {
            "created_by": PROG,
            "model": args.model,
            "train_file": args.train_file,
            "validation_file": args.validation_file,
            "block_size": block_size,
            "memory": args.memory,
            "bm25_plan": args.bm25_plan,
            "cross_sent_ratio": args.cross_sent_ratio if args.memory == "external" else None,
            "ce_warmup_steps": args.ce_warmup_steps,
            "key_module": args.key_module,
            "tokenizer_identity": tokenizer_identity(tokenizer),
            "world_size": world,
            "global_step": trainer.state.global_step,
            "train_loss": result.training_loss,
            "eval": {k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))},
        }
        write_json_atomic(Path(args.output_dir) / RECORD, record)
        valid = ""
        if eval_metrics:
            valid = (f"; valid loss {eval_metrics['eval_loss']:.4f} (ppl {eval_metrics['eval_ppl']:.2f}), "
                     f"ori_loss {eval_metrics.get('eval_ori_loss', float('nan')):.4f}")
        print(
            f"{PROG}: wrote {args.output_dir} (memory {args.memory}, {trainer.state.global_step} steps of "
            f"{world} x {args.per_device_train_batch_size} x {block_size} tokens, {time.time() - t0:.1f} s){valid}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
