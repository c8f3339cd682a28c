"""Checkpoints of ``trime-hf-train``: what a resume must repeat, which checkpoint is complete, and save faults.

Every checkpoint records its settings (:func:`run_settings`, written as
:data:`trime.hf.model.CHECKPOINT_RECORD` before transformers' own files): the TRIME and LoRA
settings, the data order, and the identities of the training text, the tokenizer and the batch
plan. A resume with other ones (:func:`check_resume`), onto another model shape, or from a
checkpoint without its optimizer or schedule state is refused with one line; without a value
(:data:`trime.hf.train_args.LAST`) it skips checkpoints whose save was interrupted (a kill, a full
disk), saying so (:func:`resolve_resume`). A LoRA checkpoint holds the adapter in peft's format
(``adapter_model.safetensors``) instead of the whole model.
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from trime.errors import TrimeError, fail
from trime.hf.model import CHECKPOINT_RECORD
from trime.io_utils import read_json, sha256_file

PROG = "trime-hf-train"
LAST = "last"  # = trime.hf.train_args.LAST: the last complete checkpoint of --output-dir
TRAINER_STATE = "trainer_state.json"  # transformers writes it last: a checkpoint without it was cut short
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file of a LoRA checkpoint
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
LOW_FREE_BYTES = 1 << 20  # a failed save with less free space than this was a full disk


def run_settings(args: Any, hf: dict, block_size: int, tokenizer: Any, world_size: int) -> dict:
    """What a resumed run must repeat, with how each value is shown in messages.

    ``args``: :class:`trime.hf.train_args.TrimeArguments`; ``hf``: the TrainingArguments values.
    ``settings`` are compared on resume: the TRIME and LoRA settings, the data order (batch,
    accumulation, processes, seeds, sampler) and the identities of the training text, the tokenizer
    and the batch plan. ``shown`` names the files and the model behind the identities.
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
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout if args.lora_r else None,
        "lora_target_modules": args.lora_target_modules,
        "per_device_train_batch_size": hf["per_device_train_batch_size"],
        "gradient_accumulation_steps": hf["gradient_accumulation_steps"],
        "world_size": world_size,
        "seed": hf["seed"],
        "data_seed": hf["data_seed"],
        "train_sampling_strategy": hf["train_sampling_strategy"],
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
    "lora_r": "--lora-r",
    "lora_alpha": "--lora-alpha",
    "lora_dropout": "--lora-dropout",
    "lora_target_modules": "--lora-target-modules",
    "per_device_train_batch_size": "--per-device-train-batch-size",
    "gradient_accumulation_steps": "--gradient-accumulation-steps",
    "world_size": "torchrun --nproc-per-node",
    "seed": "--seed",
    "data_seed": "--data-seed",
    "train_sampling_strategy": "--train-sampling-strategy",
}
IDENTITY_SETTINGS = ("train_data", "tokenizer", "bm25_plan")
# what a record written before a setting existed meant by its absence; other absent settings are not compared
ABSENT_SETTINGS = {"lora_r": None, "lora_alpha": None, "lora_dropout": None, "lora_target_modules": None,
                   "data_seed": None, "train_sampling_strategy": "random"}


def setting_differences(saved: dict, current: dict) -> list[str]:
    """One phrase per setting that differs between a checkpoint's record and this run."""
    differences = []
    for key, name in SETTING_NAMES.items():
        if key in saved["settings"]:
            then = saved["settings"][key]
        elif key in ABSENT_SETTINGS:
            then = ABSENT_SETTINGS[key]
        else:
            continue
        now = current["settings"][key]
        if then == now:
            continue
        if key in IDENTITY_SETTINGS:
            then_shown = saved.get("shown", {}).get(key) or "none"
            now_shown = current["shown"].get(key) or "none"
            differences.append(f"{name} {then_shown} (now {now_shown}: other content)")
        else:
            differences.append(f"{name} {'none' if then is None else then} (now {'none' if now is None else now})")
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
    """The safetensors files holding a checkpoint's weights (one file, the shards of an index, or a LoRA adapter)."""
    if (checkpoint / ADAPTER_WEIGHTS).is_file():
        return [checkpoint / ADAPTER_WEIGHTS]
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


def resolve_resume(requested: str, output_dir: str, say: Optional[Any] = None) -> Path:
    """The checkpoint to resume from: checked complete; ``LAST`` skips interrupted saves, saying so."""
    if requested == LAST:
        checkpoint, skipped = last_complete_checkpoint(Path(output_dir))
        if checkpoint is None:
            if skipped:
                fail(f"--resume-from-checkpoint: no complete checkpoint in --output-dir {output_dir} "
                     f"({skipped[0][0]}: {skipped[0][1]}); train anew with --overwrite-output-dir")
            fail(f"--resume-from-checkpoint: no checkpoint-* directory in --output-dir {output_dir}")
        for path, reason in skipped:
            if say is not None:
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
    ours = {name: tuple(tensor.shape) for name, tensor in trained_state_dict(model).items()}
    theirs = checkpoint_shapes(checkpoint)
    mismatched = [name for name in theirs if name in ours and theirs[name] != ours[name]]
    if mismatched:
        name = mismatched[0]
        shape = lambda dims: "x".join(map(str, dims))  # noqa: E731
        fail(f"--resume-from-checkpoint {checkpoint} holds a model of another shape than --model {model_name} "
             f"({name} is {shape(theirs[name])} there, {shape(ours[name])} here; {len(mismatched)} tensors differ); "
             "resume with the --model it was trained from")
    return saved


def trained_state_dict(model: torch.nn.Module) -> dict:
    """The tensors a checkpoint holds: the LoRA weights under peft's names for a peft model, else all."""
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    return model.state_dict()


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
