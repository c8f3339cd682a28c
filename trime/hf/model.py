"""Hugging Face causal LMs as TRIME models: where the keys come from, and loading.

TRIME's keys and queries are the input of the last decoder layer's feed-forward block,
after its norm. In transformers that is the input of the last layer's MLP module:

- GPT-2 (and GPT-J, Falcon, Bloom, ...): ``ln_2`` -> ``mlp``;
- Llama, Mistral, Qwen2 and friends: ``post_attention_layernorm`` -> ``mlp``;
- GPT-NeoX / Pythia: ``post_attention_layernorm`` -> ``mlp`` (with
  ``use_parallel_residual`` the MLP reads the norm of the layer *input*, still the norm's
  output);
- OPT: ``final_layer_norm`` -> ``fc1`` (there is no ``mlp`` module; OPT flattens the
  batch to (B*T, d) before it).

:func:`find_key_module` finds that module; :class:`KeyCapture` records its input during
one forward pass with the autograd graph kept, so gradients flow through queries and
keys. Another module can be named explicitly (``key_module="model.layers.3.mlp"``,
``--key-module`` on the command line).

:func:`load_model_and_tokenizer` loads a ``save_pretrained`` directory (or a hub name
when online) with one-line errors for the usual mistakes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from trime.errors import fail
from trime.hooks import KeysCaptured

# the module list of decoder layers, as the supported architectures name it (first match wins)
LAYER_LISTS = ("transformer.h", "model.layers", "gpt_neox.layers", "model.decoder.layers", "transformer.layers")
# the feed-forward block inside a decoder layer, in order of preference
FFN_NAMES = ("mlp", "fc1")
# files of which a saved tokenizer has at least one
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "merges.txt")
KEY_MODULE_FLAG = "key_module='NAME' (trime-hf-train / trime-eval --key-module NAME)"

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP/accelerate wrappers (``.module``), else ``model`` itself."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _decoder_layers(model: nn.Module) -> Tuple[Optional[str], Optional[nn.ModuleList]]:
    for name in LAYER_LISTS:
        try:
            layers = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return name, layers
    return None, None


def find_key_module(model: nn.Module, key_module: Optional[str] = None) -> Tuple[str, nn.Module]:
    """(dotted name, module) whose input are TRIME's keys: the last decoder layer's MLP by default.

    ``key_module`` names another submodule of the (unwrapped) model. Fails with one line
    naming what was looked for and the option to select another module.
    """
    model = unwrap_model(model)
    kind = type(model).__name__
    if key_module:
        try:
            return key_module, model.get_submodule(key_module)
        except AttributeError:
            fail(f"key_module {key_module!r} is not a submodule of {kind}; name one of model.named_modules()")
    layers_name, layers = _decoder_layers(model)
    if layers is None:
        fail(
            f"unsupported architecture {kind}: found no decoder layer list ({', '.join(LAYER_LISTS)}) to take "
            f"TRIME keys from; pass {KEY_MODULE_FLAG} naming the module whose input are the keys"
        )
    last = len(layers) - 1
    for ffn in FFN_NAMES:
        module = getattr(layers[last], ffn, None)
        if isinstance(module, nn.Module):
            return f"{layers_name}.{last}.{ffn}", module
    fail(
        f"unsupported architecture {kind}: its last decoder layer {layers_name}.{last} has no "
        f"{' or '.join(FFN_NAMES)} module to take TRIME keys from; pass {KEY_MODULE_FLAG}, "
        f"e.g. key_module='{layers_name}.{last}.<feed-forward module>'"
    )


class KeyCapture:
    """Context manager recording the key module's input during one forward pass.

    >>> with KeyCapture(model) as capture:
    ...     out = model(input_ids)
    >>> keys = capture.keys(input_ids.shape)  # (B, T, d), graph kept

    The hook is registered on entry and removed on exit, so nothing stays attached to
    the model. ``model`` may be wrapped (DDP); the hook goes on the inner module. With
    ``stop=True`` the forward pass ends once the key is recorded (datastores need nothing
    after it), and the ``with`` block swallows the :class:`~trime.hooks.KeysCaptured` that ends it.
    """

    def __init__(self, model: nn.Module, key_module: Optional[str] = None, stop: bool = False) -> None:
        self.name, self.module = find_key_module(model, key_module)
        self._captured: Optional[Tensor] = None
        self._handle = None
        self._stop = stop

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        tensor = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
        self._captured = tensor
        if self._stop:
            raise KeysCaptured

    def __enter__(self) -> "KeyCapture":
        self._captured = None
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return self._stop and exc_type is KeysCaptured

    def keys(self, batch_shape: Optional[Tuple[int, int]] = None) -> Tensor:
        """The captured input as (B, T, d); ``batch_shape`` (B, T) un-flattens OPT's (B*T, d)."""
        captured = self._captured
        if captured is None:
            fail(f"the key module {self.name} did not run during the forward pass; cannot take TRIME keys")
        if batch_shape is not None:
            batch, seq_len = int(batch_shape[0]), int(batch_shape[1])
            if captured.dim() == 2 and captured.shape[0] == batch * seq_len:
                captured = captured.view(batch, seq_len, -1)
            if captured.shape[:2] != (batch, seq_len):
                fail(
                    f"the input of key module {self.name} has shape {tuple(captured.shape)}, not (batch {batch}, "
                    f"time {seq_len}, dim); pass {KEY_MODULE_FLAG} naming a per-token module"
                )
        return captured


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
    find_key_module(model, key_module)  # unsupported architectures fail here, before any work
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
