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

Faults, each one ``trime: error:`` line:

- a diverging run (a non-finite training loss, checked at every forward from the sums that are
  logged anyway; non-finite weights or a non-finite loss of one probe block, checked before every
  save) stops, naming the step and the likely cause; no model and no checkpoint of it is written;
- a resume is checked first: every checkpoint records its settings (:data:`CHECKPOINT_RECORD`:
  TRIME settings, data order, data and tokenizer identities); a resume with other ones, onto
  another model shape, or from a checkpoint without its optimizer or schedule state is refused;
  without a value it skips checkpoints whose save was interrupted (a kill, a full disk), saying so;
- a failed save (a full disk) removes what it had written: a partial checkpoint, or the staging
  folder of the final model; the training record (:data:`trime.hf.model.RECORD`) is written last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, Optional

import torch

from trime.batch_plans import TEXT_PLAN_KIND, PlanTarget, load_plan_for
from trime.cli import (
    NONNEGATIVE_FLOAT,
    NONNEGATIVE_INT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    UNIT_FLOAT,
    Number,
    Parser,
    logger,
    silent,
)
from trime.errors import TrimeError, fail, file_faults_as_errors
from trime.hf.model import CHECKPOINT_RECORD, RECORD
from trime.io_utils import read_json, sha256_file, write_json_atomic
from trime.loss import DEFAULT_BLOCK_SIZE
from trime.memories import MEMORIES, local_off

PROG = "trime-hf-train"
log = logger(PROG, stderr=True)

# numeric rules of flags that the common ones do not cover
BLOCK_SIZE = Number(int, ge=2)  # a block predicts block_size - 1 tokens
ADAM_BETA = Number(float, ge=0, lt=1)
SEED = Number(int, ge=0, lt=2**32)
MAX_STEPS = Number(int, ge=-1)  # -1: train --num-train-epochs; 0 is refused in check_args

# --resume-from-checkpoint without a value (or with one of RESUME_LAST_WORDS): the last complete checkpoint
LAST = "last"
RESUME_LAST_WORDS = ("last", "latest", "true")

# CHECKPOINT_RECORD: what trime-hf-train writes into every checkpoint-N before transformers' own files: the
# settings that a resume must repeat (TRIME, data order, data and tokenizer identities) and the resumes so far
TRAINER_STATE = "trainer_state.json"  # transformers writes it last: a checkpoint without it was cut short
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
FINAL_STAGING = ".trime-final.tmp"  # the final model is saved here, then moved into --output-dir file by file
LOW_FREE_BYTES = 1 << 20  # a failed save with less free space than this was a full disk


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
    g.add_argument("--block-size", type=BLOCK_SIZE, help="tokens per block (default: min(1024, the model's positions))")
    g.add_argument("--output-dir", required=True, help="checkpoints, then the final HF model dir with its tokenizer")
    g.add_argument("--overwrite-output-dir", action="store_true", help="allow a non-empty --output-dir (no resume)")
    g.add_argument("--dtype", default="float32", help="dtype the model is loaded in (float32, bf16, fp16, auto)")
    g.add_argument("--key-module", help="module whose input are the TRIME keys (default: the last layer's MLP)")

    g = p.add_argument_group("TRIME")
    g.add_argument("--memory", choices=MEMORIES, default="local", help="training memory (default local)")
    g.add_argument("--bm25-plan", help="batch plan for --memory external (trime-bm25-batches TRAIN --model M ...)")
    g.add_argument("--cross-sent-ratio", type=UNIT_FLOAT, default=0.9,
                   help="external: probability per training forward of switching off the own-block memory (0.9)")
    g.add_argument("--ce-warmup-steps", type=NONNEGATIVE_INT, default=0,
                   help="optimise plain cross-entropy for the first N steps")
    g.add_argument("--memory-block-size", type=POSITIVE_INT, default=DEFAULT_BLOCK_SIZE,
                   help="query rows per block of the memory computation (extra memory O(block x keys))")

    g = p.add_argument_group("optimisation (transformers.TrainingArguments)")
    g.add_argument("--learning-rate", type=POSITIVE_FLOAT, default=5e-5, help="peak learning rate (default 5e-5)")
    g.add_argument("--weight-decay", type=NONNEGATIVE_FLOAT, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--adam-beta1", type=ADAM_BETA, default=0.9, help="Adam beta1 (default 0.9)")
    g.add_argument("--adam-beta2", type=ADAM_BETA, default=0.999, help="Adam beta2 (default 0.999)")
    g.add_argument("--optim", default="adamw_torch", help="transformers optimizer name (default adamw_torch)")
    g.add_argument("--lr-scheduler-type", default="linear", help="transformers LR schedule (default linear)")
    g.add_argument("--warmup-steps", type=NONNEGATIVE_INT, default=0, help="linear LR warm-up steps (default 0)")
    g.add_argument("--max-grad-norm", type=NONNEGATIVE_FLOAT, default=1.0,
                   help="gradient clipping norm, 0 for none (default 1.0)")
    g.add_argument("--max-steps", type=MAX_STEPS, default=-1,
                   help="optimizer steps (overrides --num-train-epochs; -1: use the epochs)")
    g.add_argument("--num-train-epochs", type=POSITIVE_FLOAT, default=1.0, help="epochs over --train-file (default 1)")
    g.add_argument("--per-device-train-batch-size", type=POSITIVE_INT, default=8, help="blocks per device and step")
    g.add_argument("--per-device-eval-batch-size", type=POSITIVE_INT, help="default: the train batch size")
    g.add_argument("--gradient-accumulation-steps", type=POSITIVE_INT, default=1,
                   help="micro-batches per optimizer step (default 1)")
    g.add_argument("--seed", type=SEED, default=1, help="seed of the data order, the weights' init and the coins (default 1)")
    g.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    g.add_argument("--fp16", action="store_true", help="fp16 mixed precision (GPU)")
    g.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--logging-steps", type=POSITIVE_INT, default=10, help="log every N steps (default 10)")
    g.add_argument("--eval-steps", type=POSITIVE_INT, help="evaluate every N steps (default: once, at the end)")
    g.add_argument("--save-steps", type=POSITIVE_INT, default=500, help="save a checkpoint every N steps (default 500)")
    g.add_argument("--save-total-limit", type=POSITIVE_INT, help="keep at most N checkpoints (default: all)")
    g.add_argument("--resume-from-checkpoint", nargs="?", const=LAST, metavar="CKPT",
                   help="continue from CKPT, or without a value from the last complete checkpoint in --output-dir")
    g.add_argument("--dataloader-num-workers", type=NONNEGATIVE_INT, default=0,
                   help="data loader worker processes (default 0)")
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
    if args.max_steps == 0:
        fail("--max-steps must be >= 1, or -1 to train --num-train-epochs, got 0")
    if args.bf16 and args.fp16:
        fail("--bf16 and --fp16 exclude each other")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        fail(f"--output-dir {out} is a file")
    if args.resume_from_checkpoint:
        if not os.path.isdir(args.resume_from_checkpoint) and args.resume_from_checkpoint.lower() in RESUME_LAST_WORDS:
            args.resume_from_checkpoint = LAST
        if args.resume_from_checkpoint != LAST and not os.path.isdir(args.resume_from_checkpoint):
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


# ----------------------------------------------------------------------------- divergence


def divergence_cause(learning_rate: float, weight_dtype: torch.dtype, fp16: bool, before_any_update: bool) -> str:
    """The likely cause of a non-finite loss or weights, and the fix, for the one-line error."""
    if weight_dtype == torch.float16 and not fp16:
        return ("--dtype fp16 keeps the weights in fp16, where the optimizer's updates overflow; use --dtype float32 "
                "(with --bf16, or --fp16 on a GPU, for mixed precision)")
    if before_any_update:
        return f"the model gives a non-finite loss before any update (in {weight_dtype}); use --dtype float32"
    if fp16:
        return f"fp16 mixed precision overflowed; use --bf16, or lower --learning-rate {learning_rate:g}"
    return f"--learning-rate {learning_rate:g} is likely too high; lower it (or add --warmup-steps)"


def non_finite_weights(model: torch.nn.Module) -> list[str]:
    """Names of the parameters holding NaN or inf (one device sync in all)."""
    named = list(model.named_parameters())
    if not named:
        return []
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named]).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


def describe_names(names: list[str], total: int) -> str:
    """``N of M weight tensors (first, second, ...)`` for a message."""
    shown = ", ".join(names[:2]) + (", ..." if len(names) > 2 else "")
    return f"{len(names)} of {total} weight tensors ({shown})"


# ----------------------------------------------------------------------------- checkpoints and resume


def run_settings(args: argparse.Namespace, block_size: int, tokenizer: Any, world_size: int) -> dict:
    """What a resumed run must repeat, with how each value is shown in messages.

    ``settings`` are compared on resume: the TRIME settings, the data order (batch, accumulation,
    processes, seed) and the identities of the training text, the tokenizer and the batch plan.
    ``shown`` names the files and the model behind the identities.
    """
    from trime.hf.text import text_file_identity, tokenizer_identity

    settings = {
        "memory": args.memory,
        "block_size": block_size,
        "train_data": text_file_identity(args.train_file),
        "tokenizer": tokenizer_identity(tokenizer),
        "bm25_plan": sha256_file(args.bm25_plan) if args.bm25_plan else None,
        "cross_sent_ratio": args.cross_sent_ratio if args.memory == "external" else None,
        "ce_warmup_steps": args.ce_warmup_steps,
        "key_module": args.key_module,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "world_size": world_size,
        "seed": args.seed,
    }
    shown = {"train_data": args.train_file, "tokenizer": args.model, "bm25_plan": args.bm25_plan}
    return {"created_by": PROG, "model": args.model, "settings": settings, "shown": shown}


# setting -> how a message names it; identities (files, tokenizer) are compared by content
SETTING_NAMES = {
    "memory": "--memory",
    "block_size": "--block-size",
    "train_data": "--train-file",
    "tokenizer": "the tokenizer of --model",
    "bm25_plan": "--bm25-plan",
    "cross_sent_ratio": "--cross-sent-ratio",
    "ce_warmup_steps": "--ce-warmup-steps",
    "key_module": "--key-module",
    "per_device_train_batch_size": "--per-device-train-batch-size",
    "gradient_accumulation_steps": "--gradient-accumulation-steps",
    "world_size": "torchrun --nproc-per-node",
    "seed": "--seed",
}
IDENTITY_SETTINGS = ("train_data", "tokenizer", "bm25_plan")


def setting_differences(saved: dict, current: dict) -> list[str]:
    """One phrase per setting that differs between a checkpoint's record and this run."""
    differences = []
    for key, name in SETTING_NAMES.items():
        if key not in saved["settings"]:
            continue
        then, now = saved["settings"][key], current["settings"][key]
        if then == now:
            continue
        if key in IDENTITY_SETTINGS:
            then_shown = saved.get("shown", {}).get(key) or "none"
            now_shown = current["shown"].get(key) or "none"
            differences.append(f"{name} {then_shown} (now {now_shown}: other content)")
        else:
            differences.append(f"{name} {then} (now {now})")
    return differences


def safetensors_shapes(path: Path) -> dict[str, tuple]:
    """{tensor: shape} from a safetensors file's header; ValueError when the file is cut short or not safetensors."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("cut short")
        length = int.from_bytes(head, "little")
        if length > size - 8:
            raise ValueError("cut short")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError("not a safetensors file") from None
    tensors = {name: meta for name, meta in header.items() if name != "__metadata__"}
    end = max((int(meta["data_offsets"][1]) for meta in tensors.values()), default=0)
    if 8 + length + end > size:
        raise ValueError("cut short")
    return {name: tuple(meta["shape"]) for name, meta in tensors.items()}


def checkpoint_weight_files(checkpoint: Path) -> list[Path]:
    """The safetensors files holding a checkpoint's weights (one file, or the shards of an index)."""
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise ValueError(f"{index.name} is damaged") from None
        return [checkpoint / name for name in sorted(set(weight_map.values()))]
    return [checkpoint / "model.safetensors"]


def checkpoint_shapes(checkpoint: Path) -> dict[str, tuple]:
    """{tensor: shape} of a checkpoint's weights; ValueError naming a missing or damaged file."""
    shapes: dict[str, tuple] = {}
    for path in checkpoint_weight_files(checkpoint):
        if not path.is_file():
            raise ValueError(f"no {path.name}")
        try:
            shapes.update(safetensors_shapes(path))
        except ValueError as err:
            raise ValueError(f"{path.name} is damaged ({err})") from None
    return shapes


def torch_file_problem(path: Path) -> Optional[str]:
    """Why a ``torch.save`` file cannot be read (missing, cut short), or None; reads only its zip directory."""
    if not path.is_file():
        return "missing"
    try:
        with zipfile.ZipFile(path):
            return None
    except (zipfile.BadZipFile, OSError):
        return "damaged (cut short)"


def checkpoint_problem(checkpoint: Path) -> Optional[tuple[bool, str]]:
    """Why ``checkpoint`` cannot be resumed, or None: (interrupted, reason).

    ``interrupted``: its save was cut short (a kill, a full disk): transformers writes
    ``trainer_state.json`` last, and any file may be cut short. Otherwise a file was removed or
    the dir was not written by ``trime-hf-train``.
    """
    state = checkpoint / TRAINER_STATE
    if not state.is_file():
        return True, f"it has no {TRAINER_STATE}: its save was interrupted"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return True, f"its {TRAINER_STATE} is cut short: its save was interrupted"
    try:
        checkpoint_shapes(checkpoint)
    except ValueError as err:
        return "damaged" in str(err), f"its weights are unusable ({err})"
    for name, what in (("optimizer.pt", "the optimizer state"), ("scheduler.pt", "the learning-rate schedule")):
        problem = torch_file_problem(checkpoint / name)
        if problem == "missing":
            return False, f"it has no {name} ({what}): a resume would restart it from scratch"
        if problem:
            return True, f"its {name} is {problem}"
    if not any(checkpoint.glob("rng_state*.pth")):
        return False, "it has no rng_state.pth (the random states): a resume would not continue the same run"
    if not (checkpoint / CHECKPOINT_RECORD).is_file():
        return False, f"it has no {CHECKPOINT_RECORD}: it was not written by {PROG}, so its settings cannot be checked"
    return None


def checkpoints_newest_first(folder: Path) -> list[Path]:
    """The ``checkpoint-N`` dirs of ``folder``, highest N first."""
    found = [(int(m.group(1)), path) for path in folder.iterdir()
             if path.is_dir() and (m := CHECKPOINT_DIR.match(path.name))] if folder.is_dir() else []
    return [path for _, path in sorted(found, reverse=True)]


def last_complete_checkpoint(folder: Path) -> tuple[Optional[Path], list[tuple[Path, str]]]:
    """(the newest checkpoint whose save completed, [(newer interrupted checkpoint, reason)])."""
    skipped = []
    for checkpoint in checkpoints_newest_first(folder):
        problem = checkpoint_problem(checkpoint)
        if problem is not None and problem[0]:
            skipped.append((checkpoint, problem[1]))
            continue
        return checkpoint, skipped
    return None, skipped


def resolve_resume(requested: str, output_dir: str, say: Any = log) -> Path:
    """The checkpoint to resume from: checked complete; ``LAST`` skips interrupted saves, saying so."""
    if requested == LAST:
        checkpoint, skipped = last_complete_checkpoint(Path(output_dir))
        if checkpoint is None:
            if skipped:
                fail(f"--resume-from-checkpoint: no complete checkpoint in --output-dir {output_dir} "
                     f"({skipped[0][0]}: {skipped[0][1]}); train anew with --overwrite-output-dir")
            fail(f"--resume-from-checkpoint: no checkpoint-* directory in --output-dir {output_dir}")
        for path, reason in skipped:
            say(f"skipping {path}: {reason}; resuming from {checkpoint}, the last complete checkpoint")
    else:
        checkpoint = Path(requested)
        if not (checkpoint / TRAINER_STATE).exists() and checkpoints_newest_first(checkpoint):
            fail(f"--resume-from-checkpoint {requested} is an output dir, not a checkpoint; pass one of its "
                 f"checkpoint-N dirs, or --resume-from-checkpoint without a value and --output-dir {requested}")
    problem = checkpoint_problem(checkpoint)
    if problem is not None:
        interrupted, reason = problem
        fix = "resume from another checkpoint, or start a new run from its weights with --model " + str(checkpoint)
        if interrupted:
            fallback, _ = last_complete_checkpoint(checkpoint.parent)
            fix = (f"resume from {fallback}, the last complete checkpoint there" if fallback is not None
                   else "resume from an earlier, complete checkpoint")
        fail(f"--resume-from-checkpoint {checkpoint} cannot be resumed: {reason}; {fix}")
    return checkpoint


def check_resume(checkpoint: Path, current: dict, model: torch.nn.Module, model_name: str) -> dict:
    """Refuse, in one line, a checkpoint of other settings or another model shape; returns its settings record."""
    saved = read_json(checkpoint / CHECKPOINT_RECORD, "checkpoint record")
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
        fail(f"checkpoint record {checkpoint / CHECKPOINT_RECORD} is damaged; resume from another checkpoint")
    differences = setting_differences(saved, current)
    if differences:
        fail(f"--resume-from-checkpoint {checkpoint} was trained with {'; '.join(differences)}; "
             "resume with the same settings, or train anew into another --output-dir")
    ours = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    theirs = checkpoint_shapes(checkpoint)
    mismatched = [name for name in theirs if name in ours and theirs[name] != ours[name]]
    if mismatched:
        name = mismatched[0]
        shape = lambda dims: "x".join(map(str, dims))  # noqa: E731
        fail(f"--resume-from-checkpoint {checkpoint} holds a model of another shape than --model {model_name} "
             f"({name} is {shape(theirs[name])} there, {shape(ours[name])} here; {len(mismatched)} tensors differ); "
             "resume with the --model it was trained from")
    return saved


def save_fault(err: BaseException, where: Path, what: str = "") -> BaseException:
    """The one-line error for a failed save into ``where``, or ``err`` itself when it is not about the disk.

    Call it before removing the partial save (it looks at the free space). torch and safetensors
    report a full disk in their own words (``RuntimeError``, ``SafetensorError``); OSErrors
    become one line in :func:`trime.errors.file_faults_as_errors`.
    """
    if isinstance(err, (TrimeError, OSError)):
        return err
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    text = str(err).strip().splitlines()
    first = text[0][:160] if text else type(err).__name__
    if shutil.disk_usage(probe).free < LOW_FREE_BYTES or "No space left" in first or "StorageFull" in first:
        return TrimeError(f"No space left on device writing {what}{where}: free space there or write elsewhere "
                          "(the partial save was removed)")
    if isinstance(err, RuntimeError) or type(err).__module__.startswith("safetensors"):
        return TrimeError(f"writing {what}{where} failed ({type(err).__name__}: {first}); check the disk there "
                          "(the partial save was removed)")
    return err


# ----------------------------------------------------------------------------- the Trainer


def make_trainer_class():
    """:class:`TrimeTrainer`, defined lazily so that importing this module does not import transformers."""
    from torch.utils.data import SequentialSampler
    from transformers import Trainer
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from trime.distributed import world_size_and_rank
    from trime.hf.loss import causal_lm_loss

    class TrimeTrainer(Trainer):
        """``Trainer`` whose loss is :func:`trime.hf.causal_lm_loss` (see the module doc).

        Training stops with one line at the first non-finite loss, and no checkpoint is saved from
        non-finite weights. Every checkpoint gets ``checkpoint_record`` (:data:`CHECKPOINT_RECORD`),
        written before transformers' files; a checkpoint whose save fails is removed.
        """

        loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean

        def __init__(self, *args, memory: str = "local", ordered: bool = False, ce_warmup_steps: int = 0,
                     cross_sent_ratio: float = 0.9, key_module: Optional[str] = None,
                     memory_block_size: int = DEFAULT_BLOCK_SIZE, checkpoint_record: Optional[dict] = None,
                     **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.checkpoint_record = checkpoint_record
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
            ori = float(out.ori_loss_sum.detach())  # the logged sums sync anyway: the finite check is free
            norm = ori if memory == "none" else float(out.loss_sum.detach())
            if training and not (math.isfinite(ori) and math.isfinite(norm)):
                self.diverged(f"the training loss is {norm if not math.isfinite(norm) else ori}")
            sums["ori"] += ori
            sums["tokens"] += out.num_tokens
            if memory != "none":
                sums["norm"] += norm
                sums["norm_tokens"] += out.num_tokens
            return (out.loss, {"logits": out.logits}) if return_outputs else out.loss

        def diverged(self, what: str, when: str = "") -> None:
            """Fail with one line: ``what`` at the current step (or ``when``), the likely cause, what was kept."""
            dtype = next(self.model.parameters()).dtype
            fresh = self.state.global_step == 0
            cause = divergence_cause(self.args.learning_rate, dtype, self.args.fp16, before_any_update=fresh)
            when = when or f"at step {self.state.global_step + 1}"
            fail(f"training diverged: {what} {when}; {cause}; {self.kept()}")

        def check_trained_loss(self) -> None:
            """Before a save: one forward on the first training block must give a finite loss.

            Weights can stay finite and still be ruined (a huge learning rate on the last step),
            and each step checks the loss before its update only.
            """
            model = self.model
            ids = self.train_dataset[0]["input_ids"][None].to(self.args.device)
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    out = causal_lm_loss(model, ids, "none" if self.memory == "none" else "local",
                                         key_module=self.key_module, block_size=self.memory_block_size,
                                         across_ranks=False)
            finally:
                model.train(was_training)
            value = float(out.loss.detach())
            if not math.isfinite(value):
                self.diverged(f"the loss of a training block is {value}", f"after step {self.state.global_step}")

        def kept(self) -> str:
            """What a failed run leaves: no model, and the checkpoints saved before."""
            saved = checkpoints_newest_first(Path(self.args.output_dir))
            return f"no model was written ({saved[0]} stays)" if saved else "no model was written"

        def check_weights(self) -> None:
            """Fail with one line (as :meth:`diverged`) when a weight is NaN or inf."""
            bad = non_finite_weights(self.model)
            if bad:
                total = sum(1 for _ in self.model.parameters())
                dtype = next(self.model.parameters()).dtype
                cause = divergence_cause(self.args.learning_rate, dtype, self.args.fp16, before_any_update=False)
                fail(f"training diverged: {describe_names(bad, total)} are not finite after step "
                     f"{self.state.global_step}; {cause}; {self.kept()}")

        def _save_checkpoint(self, model, trial) -> None:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            self.check_weights()
            self.check_trained_loss()
            try:
                if self.args.should_save and self.checkpoint_record is not None:
                    write_json_atomic(folder / CHECKPOINT_RECORD, self.checkpoint_record)
                super()._save_checkpoint(model, trial)
            except Exception as err:
                fault = save_fault(err, folder)
                if self.args.should_save:  # never leave a half-written checkpoint behind
                    shutil.rmtree(folder, ignore_errors=True)
                if fault is err:
                    raise
                raise fault from None

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


def save_final_model(trainer: Any, output_dir: str) -> None:
    """Config, weights and tokenizer into ``output_dir`` (a standard HF model dir), through a staging folder.

    A save that fails (a full disk) leaves the files already there untouched and no staging folder;
    the training record, written last, is removed first, so a dir with a record always holds its model.
    """
    out = Path(output_dir)
    staging = out / FINAL_STAGING
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        trainer.save_model(str(staging))
    except Exception as err:
        fault = save_fault(err, out, "the final model into ")
        if trainer.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        if fault is err:
            raise
        raise fault from None
    if trainer.args.should_save:
        (out / RECORD).unlink(missing_ok=True)
        for path in sorted(staging.iterdir()):
            if (out / path.name).is_dir():
                shutil.rmtree(out / path.name)
            os.replace(path, out / path.name)
        staging.rmdir()


def check_choices(args: argparse.Namespace) -> None:
    """One-line errors for transformers' named choices (optimizer, schedule)."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    for option, value, names in (("--optim", args.optim, [o.value for o in OptimizerNames]),
                                 ("--lr-scheduler-type", args.lr_scheduler_type, [t.value for t in SchedulerType])):
        if value not in names:
            fail(f"{option} {value}: not a transformers name; use one of {', '.join(names[:6])}, ...")


def transformers_refuses(err: ValueError) -> NoReturn:
    """Fail with the first line of a ValueError that transformers raised about the flags."""
    text = str(err).strip().splitlines()
    fail(f"transformers refuses these flags: {text[0] if text else type(err).__name__}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trime-hf-train``; returns 0 (bad input raises :class:`trime.errors.TrimeError`)."""
    args = build_parser().parse_args(argv)
    check_args(args)
    with file_faults_as_errors(args.output_dir):
        return train(args)


def train(args: argparse.Namespace) -> int:
    """Train as ``args`` say (checked by :func:`check_args`); see the module doc."""
    t0 = time.time()

    from transformers import TrainingArguments, default_data_collator
    from transformers.utils import logging as hf_logging

    from trime.hf.data import BlockDataset, text_blocks, train_order
    from trime.hf.model import load_model_and_tokenizer

    check_choices(args)
    hf_logging.disable_progress_bar()  # weight-loading bars; the training bar is --no-progress-bar's
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, key_module=args.key_module)
    bad = non_finite_weights(model)
    if bad:
        fail(f"--model {args.model} has NaN or inf in {describe_names(bad, sum(1 for _ in model.parameters()))}; "
             "train from a healthy model")
    block_size = pick_block_size(args.block_size, model.config)
    train_blocks = text_blocks(args.train_file, tokenizer, block_size, "--train-file", args.model)
    eval_blocks = None
    if args.validation_file:
        eval_blocks = text_blocks(args.validation_file, tokenizer, block_size, "--validation-file", args.model)
    plan_ids = None
    if args.bm25_plan:
        target = plan_target(args.train_file, args.model, tokenizer, block_size, len(train_blocks))
        plan_ids = load_plan_for(args.bm25_plan, target)

    try:
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
            logging_nan_inf_filter=False,  # a non-finite loss stops the run (TrimeTrainer), never hides
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
    except ValueError as err:  # transformers' own checks (a precision the device lacks)
        transformers_refuses(err)
    world = training_args.world_size
    record = run_settings(args, block_size, tokenizer, world)
    resume: Optional[Path] = None
    resumes: list = []
    if args.resume_from_checkpoint:
        resume = resolve_resume(args.resume_from_checkpoint, args.output_dir,
                                log if training_args.process_index == 0 else silent)
        saved = check_resume(resume, record, model, args.model)
        step = json.loads((resume / TRAINER_STATE).read_text(encoding="utf-8")).get("global_step")
        if isinstance(step, int) and 0 < args.max_steps <= step:
            fail(f"--max-steps {args.max_steps} ends at or before step {step} of --resume-from-checkpoint {resume}; "
                 "pass a larger --max-steps to train on")
        resumes = list(saved.get("resumes", [])) + [{"checkpoint": str(resume), "global_step": step}]
    record["resumes"] = resumes
    order = train_order(args.memory, len(train_blocks), plan_ids, args.per_device_train_batch_size, world)
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
    except ValueError as err:  # transformers' own checks (an unknown --report-to integration)
        transformers_refuses(err)
    result = trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    trainer.check_weights()
    trainer.check_trained_loss()
    save_final_model(trainer, args.output_dir)
    eval_metrics = trainer.evaluate() if eval_dataset is not None else {}
    if trainer.is_world_process_zero():
        first_step = resumes[-1]["global_step"] if resumes else 0
        final = {
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
        record_path = Path(args.output_dir) / RECORD
        try:
            write_json_atomic(record_path, final)
        except OSError as err:  # name the record, not its temporary file
            raise OSError(err.errno, err.strerror, str(record_path)) from None
        valid = ""
        if eval_metrics:
            valid = (f"; valid loss {eval_metrics['eval_loss']:.4f} (ppl {eval_metrics['eval_ppl']:.2f}), "
                     f"ori_loss {eval_metrics.get('eval_ori_loss', float('nan')):.4f}")
        resumed = f", resumed from {resume}" if resume is not None else ""
        print(
            f"{PROG}: wrote {args.output_dir} (memory {args.memory}, {trainer.state.global_step} steps of "
            f"{world} x {args.per_device_train_batch_size} x {block_size} tokens{resumed}, "
            f"{time.time() - t0:.1f} s){valid}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
