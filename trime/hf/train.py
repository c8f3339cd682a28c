"""``trime-hf-train``: continued pre-training of a Hugging Face causal LM on plain text with the TRIME loss.

Built on ``transformers.Trainer`` (a thin subclass, :class:`trime.hf.trainer.TrimeTrainer`,
overrides ``compute_loss``), so HF's logging, checkpointing, ``--resume-from-checkpoint``, mixed
precision (``--bf16``/``--fp16``), DDP (``torchrun --nproc-per-node N trime-hf-train ...``),
DeepSpeed and FSDP all work as usual; the command line is trime's options plus every
``transformers.TrainingArguments`` flag (:mod:`trime.hf.train_args`). The output dir is a standard
HF model dir with the tokenizer beside it. With ``--lora-r R`` only LoRA adapters train
(:mod:`trime.hf.lora`, through peft); the output dir is then the merged model, with the adapter
in peft's format in ``OUTPUT/adapter``.

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

Faults, each one ``trime: error:`` line:

- a diverging run (a non-finite training loss, checked at every forward from the sums that are
  logged anyway; non-finite weights or a non-finite loss of one probe block, checked before every
  save) stops, naming the step and the likely cause; no model and no checkpoint of it is written;
- a resume is checked first (:mod:`trime.hf.resume`): every checkpoint records its settings
  (:data:`trime.hf.model.CHECKPOINT_RECORD`: TRIME and LoRA settings, data order, data and tokenizer
  identities); a resume with other ones, onto another model shape, or from a checkpoint without
  its optimizer or schedule state is refused; without a value it skips checkpoints whose save was
  interrupted (a kill, a full disk), saying so;
- a failed save (a full disk) removes what it had written: a partial checkpoint, or the staging
  folder of the final model; the training record (:data:`trime.hf.model.RECORD`) is written last.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from trime.batch_plans import TEXT_PLAN_KIND, PlanTarget, load_plan_for
from trime.cli import logger, silent
from trime.errors import fail, file_faults_as_errors
from trime.hf.lora import ADAPTER_DIR, LoraSettings, add_lora
from trime.hf.model import RECORD
from trime.hf.resume import TRAINER_STATE, check_resume, resolve_resume, run_settings
from trime.hf.train_args import (
    LAST,
    PROG,
    RESUME_LAST_WORDS,
    TrimeArguments,
    build_parser,
    check_training_flags,
    parse,
    training_arguments,
    transformers_refuses,
)
from trime.hf.trainer import describe_names, make_trainer_class, non_finite_weights, save_final_model
from trime.io_utils import write_json_atomic

__all__ = ["build_parser", "main", "make_trainer_class", "train"]

log = logger(PROG, stderr=True)


# ----------------------------------------------------------------------------- checks before heavy work


def check_args(args: TrimeArguments, hf: dict) -> None:
    """One-line errors for flags and files, before any model is loaded; resolves ``--resume-from-checkpoint``."""
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
    check_training_flags(args, hf)
    out = Path(hf["output_dir"])
    if out.exists() and not out.is_dir():
        fail(f"--output-dir {out} is a file")
    resume = hf["resume_from_checkpoint"]
    if resume:
        if not os.path.isdir(resume) and resume.lower() in RESUME_LAST_WORDS:
            hf["resume_from_checkpoint"] = resume = LAST
        if resume != LAST and not os.path.isdir(resume):
            fail(f"--resume-from-checkpoint {resume}: no such checkpoint directory")
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


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trime-hf-train``; returns 0 (bad input raises :class:`trime.errors.TrimeError`)."""
    args, hf = parse(None if argv is None else list(argv))
    check_args(args, hf)
    with file_faults_as_errors(hf["output_dir"]):
        return train(args, hf)


def load(args: TrimeArguments) -> tuple[Any, Any]:
    """(model, tokenizer) of ``--model`` (``--gguf-file``), checked healthy."""
    from transformers.utils import logging as hf_logging

    from trime.hf.model import load_model_and_tokenizer

    hf_logging.disable_progress_bar()  # weight-loading bars; the training bar is --no-progress-bar's
    extra = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, key_module=args.key_module, **extra)
    bad = non_finite_weights(model)
    if bad:
        fail(f"--model {args.model} has NaN or inf in {describe_names(bad, sum(1 for _ in model.parameters()))}; "
             "train from a healthy model")
    return model, tokenizer


def train(args: TrimeArguments, hf: dict) -> int:
    """Train as ``args`` (trime's options) and ``hf`` (TrainingArguments values) say, checked by :func:`check_args`."""
    t0 = time.time()

    from transformers import default_data_collator

    from trime.hf.data import BlockDataset, text_blocks, train_order
    from trime.hf.model import model_identity

    resume_request = hf["resume_from_checkpoint"]
    hf["resume_from_checkpoint"] = None  # trime resolves and checks it; the Trainer gets the checkpoint below
    training_args = training_arguments(hf)  # transformers' own checks, before the model is loaded
    model, tokenizer = load(args)
    block_size = pick_block_size(args.block_size, model.config)
    progress_bar = False if hf.get("disable_tqdm") else None  # None: a bar on a terminal, lines otherwise
    train_blocks = text_blocks(args.train_file, tokenizer, block_size, "--train-file", args.model,
                               progress_bar=progress_bar)
    eval_blocks = None
    if args.validation_file:
        eval_blocks = text_blocks(args.validation_file, tokenizer, block_size, "--validation-file", args.model,
                                  progress_bar=progress_bar)
    plan_ids = None
    if args.bm25_plan:
        target = plan_target(args.train_file, args.model, tokenizer, block_size, len(train_blocks))
        plan_ids = load_plan_for(args.bm25_plan, target)
    lora = lora_record = None
    if args.lora_r is not None:
        lora = LoraSettings(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
        model = add_lora(model, lora, seed=training_args.seed)
        targets = model.peft_config["default"].target_modules  # a set of names, or a regular expression
        lora_record = {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "adapter": ADAPTER_DIR,
                       "target_modules": targets if isinstance(targets, str) else sorted(targets)}

    world = training_args.world_size
    batch = training_args.per_device_train_batch_size
    record = run_settings(args, hf, block_size, tokenizer, world)
    resume: Optional[Path] = None
    resumes: list = []
    if resume_request:
        resume = resolve_resume(resume_request, training_args.output_dir,
                                log if training_args.process_index == 0 else silent)
        saved = check_resume(resume, record, model, args.model)
        step = json.loads((resume / TRAINER_STATE).read_text(encoding="utf-8")).get("global_step")
        if isinstance(step, int) and 0 < training_args.max_steps <= step:
            fail(f"--max-steps {training_args.max_steps} ends at or before step {step} of --resume-from-checkpoint "
                 f"{resume}; pass a larger --max-steps to train on")
        resumes = list(saved.get("resumes", [])) + [{"checkpoint": str(resume), "global_step": step}]
    record["resumes"] = resumes
    order = train_order(args.memory, len(train_blocks), plan_ids, batch, world)
    train_dataset = BlockDataset(train_blocks, order)
    eval_dataset = None if eval_blocks is None else BlockDataset(eval_blocks)
    try:
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
            checkpoint_record=record,
        )
    except (ValueError, ImportError, RuntimeError) as err:  # transformers' own checks (a --report-to integration)
        transformers_refuses(err)
    result = trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    trainer.check_weights()
    trainer.check_trained_loss()
    eval_metrics = trainer.evaluate() if eval_dataset is not None else {}
    save_final_model(trainer, training_args.output_dir)  # a LoRA model is merged here
    if trainer.is_world_process_zero():
        first_step = resumes[-1]["global_step"] if resumes else 0
        final = {
            "created_by": PROG,
            "model": args.model,
            "gguf_file": args.gguf_file,
            "model_identity": model_identity(args.model, args.gguf_file),
            "train_file": args.train_file,
            "validation_file": args.validation_file,
            "block_size": block_size,
            "memory": args.memory,
            "bm25_plan": args.bm25_plan,
            "cross_sent_ratio": args.cross_sent_ratio if args.memory == "external" else None,
            "ce_warmup_steps": args.ce_warmup_steps,
            "key_module": args.key_module,
            "lora": lora_record,
            "tokenizer_identity": record["settings"]["tokenizer"],
            "train_identity": record["settings"]["train_data"],
            "settings": record["settings"],  # equal in every invocation: a resume with others is refused
            "resumes": resumes,
            "world_size": world,
            "global_step": trainer.state.global_step,
            "train_loss": result.training_loss,
            "train_loss_steps": [first_step + 1, trainer.state.global_step],  # the steps of this invocation
            "eval": {k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))},
        }
        record_path = Path(training_args.output_dir) / RECORD
        try:
            write_json_atomic(record_path, final)
        except OSError as err:  # name the record, not its temporary file
            raise OSError(err.errno, err.strerror, str(record_path)) from None
        valid = ""
        if eval_metrics:
            valid = (f"; valid loss {eval_metrics['eval_loss']:.4f} (ppl {eval_metrics['eval_ppl']:.2f}), "
                     f"ori_loss {eval_metrics.get('eval_ori_loss', float('nan')):.4f}")
        resumed = f", resumed from {resume}" if resume is not None else ""
        tuned = f", LoRA r {lora.r}" if lora is not None else ""
        print(
            f"{PROG}: wrote {training_args.output_dir} (memory {args.memory}{tuned}, {trainer.state.global_step} "
            f"steps of {world} x {batch} x {block_size} tokens{resumed}, {time.time() - t0:.1f} s){valid}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
