"""The command line of ``trime-hf-train``: trime's own options plus the whole of ``transformers.TrainingArguments``.

One parser, ``transformers.HfArgumentParser`` over two dataclasses: :class:`TrimeArguments`
(model, data, TRIME memory, LoRA) and ``TrainingArguments``, so every flag of HF's training
scripts works (``--gradient-checkpointing``, ``--eval-strategy``, ``--lr-scheduler-kwargs``,
``--torch-compile``, ``--deepspeed``, ``--fsdp``, ...). It is also a :class:`trime.cli.Parser`:
a usage error is one ``trime: error:`` line naming the flag, exit status 2. Rules on top of
HfArgumentParser's:

- flags are spelled with dashes (``--learning-rate``) in help and messages; HF's underscore
  spellings (``--learning_rate``) parse too; ``--cpu`` is ``--use-cpu`` and ``--no-progress-bar``
  is ``--disable-tqdm``; a boolean flag alone means true (``--gradient-checkpointing``);
- every numeric flag goes through a :class:`trime.cli.Number` rule (:data:`RULES`, else any
  finite number), so NaN, inf and out-of-range values are usage errors;
- JSON-valued flags (``--lr-scheduler-kwargs '{"min_lr": 1e-5}'``) are checked at parse time;
- trime's defaults where they differ from TrainingArguments' (:data:`TRIME_DEFAULTS`).

Flags that trime cannot honour are refused with one line by :func:`check_training_flags`.
transformers is imported inside the functions, as everywhere in :mod:`trime.hf`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, NoReturn, Optional

from trime.cli import (
    FINITE_FLOAT,
    NONNEGATIVE_FLOAT,
    NONNEGATIVE_INT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    UNIT_FLOAT,
    Number,
    Parser,
)
from trime.errors import fail
from trime.loss import DEFAULT_BLOCK_SIZE
from trime.memories import MEMORIES

PROG = "trime-hf-train"

# --resume-from-checkpoint without a value (or with one of RESUME_LAST_WORDS): the last complete checkpoint
LAST = "last"
RESUME_LAST_WORDS = ("last", "latest", "true")

# numeric rules of flags that the common ones do not cover
BLOCK_SIZE = Number(int, ge=2)  # a block predicts block_size - 1 tokens
ADAM_BETA = Number(float, ge=0, lt=1)
SEED = Number(int, ge=0, lt=2**32)
MAX_STEPS = Number(int, ge=-1)  # -1: train --num-train-epochs; 0 is refused in check_args
STEPS_OR_FRACTION = Number(float, gt=0)  # N steps, or below 1 a fraction of the run (TrainingArguments' rule)
WARMUP = Number(float, ge=0)  # as STEPS_OR_FRACTION, 0 for none
DROPOUT = Number(float, ge=0, lt=1)
INTEGER = Number(int)

# TRIME's LoRA scale alpha / r when --lora-alpha is not given
LORA_ALPHA_PER_R = 2.0


@dataclass
class TrimeArguments:
    """trime-hf-train's own options; everything else on its command line is ``transformers.TrainingArguments``."""

    _argument_group_name = "model, data, TRIME memory and LoRA"  # HfArgumentParser's group title (not a field)

    model: str = field(metadata={"help": "a save_pretrained dir (with its tokenizer), a hub name when online, or a "
                                         "dir with --gguf-file"})
    train_file: str = field(metadata={"help": "plain text, tokenized as one string without special tokens"})
    validation_file: Optional[str] = field(
        default=None, metadata={"help": "plain text for eval_loss (TRIME loss) and eval_ori_loss"})
    block_size: Optional[int] = field(
        default=None, metadata={"help": "tokens per block (default: min(1024, the model's positions))"})
    gguf_file: Optional[str] = field(
        default=None, metadata={"help": "the .gguf file inside --model to load (weights dequantized to --dtype)"})
    dtype: str = field(default="float32", metadata={"help": "dtype the model is loaded in (float32, bf16, fp16, auto)"})
    key_module: Optional[str] = field(
        default=None, metadata={"help": "module whose input are the TRIME keys (default: the last layer's MLP)"})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "allow a non-empty --output-dir (no resume)"})
    memory: str = field(default="local", metadata={"help": "training memory", "choices": MEMORIES})
    bm25_plan: Optional[str] = field(
        default=None, metadata={"help": "batch plan for --memory external (trime-bm25-batches TRAIN --model M ...)"})
    cross_sent_ratio: float = field(
        default=0.9, metadata={"help": "external: probability per training forward of switching off the own-block "
                                       "memory"})
    ce_warmup_steps: int = field(default=0, metadata={"help": "optimise plain cross-entropy for the first N steps"})
    memory_block_size: int = field(
        default=DEFAULT_BLOCK_SIZE,
        metadata={"help": "query rows per block of the memory computation (extra memory O(block x keys))"})
    lora_r: Optional[int] = field(
        default=None, metadata={"help": "train LoRA adapters of rank R (peft) instead of all weights; the output "
                                        "dir is the merged model, the adapter goes to OUTPUT/adapter"})
    lora_alpha: Optional[float] = field(
        default=None, metadata={"help": f"LoRA scale numerator: updates are scaled by alpha / r (default: "
                                        f"{LORA_ALPHA_PER_R:g} x --lora-r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch's input"})
    lora_target_modules: Optional[str] = field(
        default=None, metadata={"help": "comma-separated module names to adapt (default: every linear projection "
                                        "inside the decoder layers, e.g. q_proj,...,down_proj for Llama; "
                                        "all-linear: every linear layer but the output head)"})


# numeric rules by field name; other int / float fields only have to be integers / finite numbers
RULES: dict[str, Number] = {
    "block_size": BLOCK_SIZE,
    "cross_sent_ratio": UNIT_FLOAT,
    "ce_warmup_steps": NONNEGATIVE_INT,
    "memory_block_size": POSITIVE_INT,
    "lora_r": POSITIVE_INT,
    "lora_alpha": POSITIVE_FLOAT,
    "lora_dropout": DROPOUT,
    "learning_rate": POSITIVE_FLOAT,
    "weight_decay": NONNEGATIVE_FLOAT,
    "adam_beta1": ADAM_BETA,
    "adam_beta2": ADAM_BETA,
    "adam_epsilon": POSITIVE_FLOAT,
    "warmup_steps": WARMUP,
    "max_grad_norm": NONNEGATIVE_FLOAT,
    "max_steps": MAX_STEPS,
    "num_train_epochs": POSITIVE_FLOAT,
    "per_device_train_batch_size": POSITIVE_INT,
    "per_device_eval_batch_size": POSITIVE_INT,
    "gradient_accumulation_steps": POSITIVE_INT,
    "eval_accumulation_steps": POSITIVE_INT,
    "seed": SEED,
    "data_seed": SEED,
    "logging_steps": STEPS_OR_FRACTION,
    "save_steps": STEPS_OR_FRACTION,
    "eval_steps": STEPS_OR_FRACTION,
    "eval_delay": NONNEGATIVE_FLOAT,
    "save_total_limit": POSITIVE_INT,
    "dataloader_num_workers": NONNEGATIVE_INT,
    "dataloader_prefetch_factor": POSITIVE_INT,
    "label_smoothing_factor": UNIT_FLOAT,
    "neftune_noise_alpha": POSITIVE_FLOAT,
    "torch_empty_cache_steps": POSITIVE_INT,
    "ddp_timeout": POSITIVE_INT,
    "ddp_bucket_cap_mb": POSITIVE_INT,
    "local_rank": Number(int, ge=-1),
}

# trime's defaults where they differ from TrainingArguments' (or are resolved later: None)
TRIME_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 1.0,
    "optim": "adamw_torch",
    "learning_rate": 5e-5,
    "logging_steps": 10,
    "save_steps": 500,
    "seed": 1,
    "report_to": "none",
    "logging_first_step": True,
    "logging_nan_inf_filter": False,  # a non-finite loss stops the run (TrimeTrainer), it is never hidden
    "prediction_loss_only": True,  # validation reports losses only: no logits are gathered
    "remove_unused_columns": False,  # the blocks have input_ids only
    "per_device_eval_batch_size": None,  # None: the train batch size
    "eval_strategy": None,  # None: "steps" with --eval-steps and --validation-file, else "no" (one evaluation at the end)
    "dataloader_pin_memory": None,  # None: on a GPU only
}

# how --help states the defaults that TRIME_DEFAULTS leaves to be resolved
DEFAULT_NOTES = {
    "per_device_eval_batch_size": "the train batch size",
    "eval_strategy": "steps with --eval-steps and --validation-file, else no: one evaluation at the end",
    "dataloader_pin_memory": "on a GPU only",
}
# the TrainingArguments flags whose names trime checks itself, with a short list of the names in its messages
NAMED_CHOICES = ("optim", "lr_scheduler_type")
# TrainingArguments' sampling strategies that the memories cannot use: every block has --block-size tokens
REFUSED_SAMPLING = ("group_by_length", "batch_rebalance")


def flag(name: str) -> str:
    """``--flag-name`` of a field name."""
    return "--" + name.replace("_", "-")


def _json_value(text: str) -> str:
    """A JSON-object flag's value: checked here when it is inline JSON (TrainingArguments parses it later)."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"not valid JSON ({err})") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError("must be a JSON object")
    return text


class _NamedChoice:
    """argparse type of a transformers name (optimizer, schedule): a short one-line message for a wrong one."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.__name__ = "transformers name"

    def __call__(self, text: str) -> str:
        if text not in self.names:
            raise argparse.ArgumentTypeError(
                f"{text} is not a transformers name; use one of {', '.join(self.names[:6])}, ...")
        return text


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None, the flag is required, or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.required or "(default" in text:
            return text
        return super()._get_help_string(action)


def _alias(parser: argparse.ArgumentParser, dest: str, spelling: str) -> None:
    """Let ``spelling`` set ``dest`` too (trime's older name of a TrainingArguments flag)."""
    action = next(a for a in parser._actions if a.dest == dest and a.nargs != 0)
    action.option_strings.append(spelling)
    parser._option_string_actions[spelling] = action


def build_parser() -> Parser:
    """The ``trime-hf-train`` parser: :class:`TrimeArguments` and ``transformers.TrainingArguments`` together."""
    from transformers import HfArgumentParser, TrainingArguments
    from transformers.hf_argparser import string_to_bool

    class TrainParser(HfArgumentParser, Parser):
        """HfArgumentParser with :class:`trime.cli.Parser`'s usage errors."""

    p = TrainParser(
        [TrimeArguments, TrainingArguments],
        prog=PROG,
        formatter_class=_HelpFormatter,
        allow_abbrev=False,  # ~150 flags, each with two spellings: a prefix is ambiguous or a surprise
        description="Continued pre-training of a Hugging Face causal LM on plain text with the TRIME loss "
        "(transformers.Trainer: logging, checkpoints, resume, mixed precision, DDP via torchrun, DeepSpeed, FSDP; "
        "every transformers.TrainingArguments flag, in --dash-case or HF's --snake_case).",
    )
    p._optionals.title = "transformers.TrainingArguments (trime's defaults where noted)"
    dict_fields = set(getattr(TrainingArguments, "_VALID_DICT_FIELDS", ()))
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        # show and name the dash spelling; the underscore one stays in p._option_string_actions, so it parses
        action.option_strings = [s for s in action.option_strings if "_" not in s] or action.option_strings
        if action.nargs == 0:  # --no-* switches
            continue
        if action.dest in RULES:
            action.type = RULES[action.dest]
        elif action.type is int:
            action.type = INTEGER
        elif action.type is float:
            action.type = FINITE_FLOAT
        elif action.type is string_to_bool and action.nargs is None:
            action.nargs, action.const = "?", True  # --flag alone means true, as for the other booleans
        if action.dest in dict_fields:
            action.type = _json_value
    for name in NAMED_CHOICES:
        action = next(a for a in p._actions if a.dest == name)
        action.type, action.choices = _NamedChoice([str(c) for c in action.choices]), None
    resume = next(a for a in p._actions if a.dest == "resume_from_checkpoint")
    resume.nargs, resume.const, resume.metavar = "?", LAST, "CKPT"
    resume.help = "continue from CKPT, or without a value from the last complete checkpoint in --output-dir"
    output = next(a for a in p._actions if a.dest == "output_dir")
    output.required = True
    output.help = "checkpoints, then the final HF model dir with its tokenizer"
    _alias(p, "use_cpu", "--cpu")
    _alias(p, "disable_tqdm", "--no-progress-bar")
    p.set_defaults(**TRIME_DEFAULTS)
    for action in p._actions:
        if action.dest in DEFAULT_NOTES and action.nargs != 0:
            action.help = f"{action.help} (default: {DEFAULT_NOTES[action.dest]})"
    return p


def training_argument_names() -> set[str]:
    """The fields of ``transformers.TrainingArguments`` that its constructor takes."""
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def parse(argv: Optional[list[str]] = None) -> tuple[TrimeArguments, dict]:
    """(trime's options, the TrainingArguments keyword arguments with trime's defaults resolved)."""
    namespace = vars(build_parser().parse_args(argv))
    names = training_argument_names()
    args = TrimeArguments(**{k: v for k, v in namespace.items() if k not in names})
    hf = {k: v for k, v in namespace.items() if k in names}
    if hf["per_device_eval_batch_size"] is None:
        hf["per_device_eval_batch_size"] = hf["per_device_train_batch_size"]
    if hf["eval_strategy"] is None:
        hf["eval_strategy"] = "steps" if hf["eval_steps"] and args.validation_file else "no"
    if hf["dataloader_pin_memory"] is None:
        import torch

        hf["dataloader_pin_memory"] = torch.cuda.is_available() and not hf["use_cpu"]
    for name in ("logging_steps", "save_steps", "eval_steps", "warmup_steps"):
        value = hf[name]
        if isinstance(value, float) and value >= 1 and value.is_integer():
            hf[name] = int(value)
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if hf[new] is None and hf[old] is not None:  # the deprecated spelling, without transformers' warning
            hf[new], hf[old] = hf[old], None
    if args.lora_r is not None and args.lora_alpha is None:
        args.lora_alpha = LORA_ALPHA_PER_R * args.lora_r
    return args, hf


def check_training_flags(args: TrimeArguments, hf: dict) -> None:
    """One-line errors for flags that trime cannot honour, or that need another flag."""
    if hf["max_steps"] == 0:
        fail("--max-steps must be >= 1, or -1 to train --num-train-epochs, got 0")
    if hf["bf16"] and hf["fp16"]:
        fail("--bf16 and --fp16 exclude each other")
    if str(hf["eval_strategy"]) != "no" and not args.validation_file:
        fail(f"--eval-strategy {hf['eval_strategy']} evaluates --validation-file: pass one, or drop --eval-strategy")
    if hf["train_sampling_strategy"] in REFUSED_SAMPLING:
        fail(f"--train-sampling-strategy {hf['train_sampling_strategy']}: every block has --block-size tokens, "
             "there is nothing to group; use random (the default) or sequential")
    if hf["label_smoothing_factor"]:
        fail(f"--label-smoothing-factor {hf['label_smoothing_factor']:g}: the TRIME loss has no label smoothing; "
             "drop the flag")
    if hf["auto_find_batch_size"]:
        fail("--auto-find-batch-size: the memories' batch layout and the resume check depend on "
             "--per-device-train-batch-size; set it (and --gradient-accumulation-steps) yourself")
    if args.lora_r is None:
        for name in ("lora_alpha", "lora_target_modules"):
            if getattr(args, name) is not None:
                fail(f"{flag(name)} configures LoRA: pass --lora-r R too")
        if args.lora_dropout:
            fail("--lora-dropout configures LoRA: pass --lora-r R too")


def transformers_refuses(err: BaseException) -> NoReturn:
    """Fail with the first line of an error that transformers raised about the flags."""
    text = str(err).strip().splitlines()
    fail(f"transformers refuses these flags: {text[0] if text else type(err).__name__}")


def training_arguments(hf: dict):
    """``transformers.TrainingArguments(**hf)``; its own refusals (a precision the device lacks, a missing
    DeepSpeed) are one line."""
    from transformers import TrainingArguments

    try:
        return TrainingArguments(**hf)
    except (ValueError, ImportError, TypeError) as err:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # a refused --deepspeed leaves its config behind, which later loads would read
        transformers_refuses(err)
