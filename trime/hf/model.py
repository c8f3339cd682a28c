"""Hugging Face causal LMs as TRIME models: loading, and the training record.

:func:`load_model_and_tokenizer` loads a ``save_pretrained`` directory (or a hub name
when online) with one-line errors for the usual mistakes, and checks that the model
offers TRIME keys (:func:`trime.hooks.hf_key_module`: the input of the last decoder
layer's MLP, or the module named by ``key_module``). ``trime-hf-train`` writes
:data:`RECORD` into its output dir; evaluation reads the training block size from it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import torch
from torch import nn

from trime.errors import fail
from trime.hooks import hf_key_module

# the training record that trime-hf-train writes beside the model (arguments, data identities, block size)
RECORD = "trime_hf_train.json"
# files of which a saved tokenizer has at least one
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "merges.txt")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
}


# ----------------------------------------------------------------------------- loading


def resolve_dtype(dtype: Union[None, str, torch.dtype]) -> Union[None, str, torch.dtype]:
    """torch dtype from a name (``float32``/``bf16``/``fp16``/...); ``auto``/None pass through."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        fail(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_model_dir(name_or_path: Union[str, os.PathLike], option: str = "--model") -> str:
    """Fail with one line unless ``name_or_path`` is a model dir with config.json (or looks like a hub name)."""
    path = str(name_or_path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            fail(f"{option} {path} has no config.json; it is not a Hugging Face model dir (save one with save_pretrained)")
        return path
    if os.path.exists(path):
        fail(f"{option} {path} is a file; pass a Hugging Face model dir (with config.json) or a hub name")
    if path.startswith((".", "/", "~")) or path.count("/") > 1:  # a path, not a hub name
        fail(f"{option} {path}: no such directory; pass a save_pretrained dir or a hub name")
    return path


def load_tokenizer(name_or_path: Union[str, os.PathLike], option: str = "--model"):
    """The tokenizer saved with the model; one-line error when the dir has none."""
    from transformers import AutoTokenizer

    path = check_model_dir(name_or_path, option)
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        fail(
            f"{option} {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ...); save it beside the "
            f"model with tokenizer.save_pretrained({path!r})"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as err:
        if os.path.isdir(path):
            fail(
                f"{option} {path} has no usable tokenizer ({type(err).__name__}); save it beside the model with "
                f"tokenizer.save_pretrained({path!r})"
            )
        fail(f"{option} {path}: cannot load its tokenizer ({_first_line(err)}); offline? pass a local model dir")
    if tokenizer is None or isinstance(tokenizer, bool):
        fail(f"{option} {path} has no tokenizer; save it beside the model with tokenizer.save_pretrained({path!r})")
    return tokenizer


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def load_model(
    name_or_path: Union[str, os.PathLike],
    dtype: Union[None, str, torch.dtype] = None,
    device: Union[None, str, torch.device] = None,
    key_module: Optional[str] = None,
    option: str = "--model",
    **kwargs: Any,
) -> nn.Module:
    """``AutoModelForCausalLM`` from a local dir or hub name, checked to offer TRIME keys.

    ``dtype``: None (transformers' default: in v5 the dtype saved in config.json, as
    ``auto``) or a name/torch dtype (``float32`` for training with mixed precision). ``kwargs`` go to
    ``from_pretrained`` (e.g. ``attn_implementation``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = check_model_dir(name_or_path, option)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        fail(f"{option} {path}: cannot read its config ({_first_line(err)})")
    try:
        AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        fail(
            f"{option} {path} is a {config.model_type!r} model, not a causal LM that AutoModelForCausalLM loads; "
            "use a decoder-only model (GPT-2, Llama, GPT-NeoX, OPT, ...)"
        )
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        fail(f"{option} {path}: cannot load the model weights ({_first_line(err)})")
    hf_key_module(model, key_module)  # unsupported architectures fail here, before any work
    if device is not None:
        model = model.to(device)
    return model


def load_model_and_tokenizer(
    name_or_path: Union[str, os.PathLike],
    dtype: Union[None, str, torch.dtype] = None,
    device: Union[None, str, torch.device] = None,
    key_module: Optional[str] = None,
    option: str = "--model",
    **kwargs: Any,
) -> Tuple[nn.Module, Any]:
    """(model, tokenizer) of a ``save_pretrained`` dir or hub name; the tokenizer is checked first."""
    tokenizer = load_tokenizer(name_or_path, option)
    model = load_model(name_or_path, dtype=dtype, device=device, key_module=key_module, option=option, **kwargs)
    return model, tokenizer


def is_hf_model_dir(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is a Hugging Face model dir (a directory with ``config.json``)."""
    return (Path(path) / "config.json").is_file()
