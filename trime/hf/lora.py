"""LoRA for ``trime-hf-train``, through peft (``LoraConfig``, ``get_peft_model``).

- Targets (:func:`default_target_modules`): by default every linear projection inside the decoder
  layers (``nn.Linear`` and transformers' ``Conv1D``), named by their last component: Llama
  ``q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj``; GPT-2 ``c_attn,c_proj,c_fc``; OPT
  ``q_proj,k_proj,v_proj,out_proj,fc1,fc2``; GPT-NeoX ``query_key_value,dense,dense_h_to_4h,dense_4h_to_h``.
  The output head and the embeddings are never adapted (they are often tied).
- TRIME keys and queries stay the input of the last decoder layer's MLP: peft injects its LoRA
  layers into the wrapped model itself, and :class:`trime.hooks.KeyCapture` hooks that model
  (:func:`trime.hooks.unwrap_model` looks through peft), so ``--key-module`` names keep their meaning
  and the keys' gradients reach the LoRA weights of the layers before the key module.
- Saving (:func:`merged_model`): the adapter in peft's format (``OUTPUT/adapter``), and the merged
  model (``merge_and_unload``) as a plain HF model dir that ``trime-eval`` and transformers load.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Optional, Union

from torch import nn

from trime.errors import fail
from trime.hooks import HF_LAYER_LISTS, hf_decoder_layers

# the adapter's folder inside trime-hf-train's --output-dir
ADAPTER_DIR = "adapter"


@dataclass(frozen=True)
class LoraSettings:
    """What ``--lora-r/--lora-alpha/--lora-dropout/--lora-target-modules`` asked for (None targets: the default)."""

    r: int
    alpha: float
    dropout: float = 0.0
    target_modules: Optional[str] = None  # comma-separated names, or "all-linear"


def _linear_types() -> tuple:
    from transformers.pytorch_utils import Conv1D

    return nn.Linear, Conv1D


def default_target_modules(model: nn.Module) -> Union[list[str], str]:
    """The linear projections inside the decoder layers: their last name components, in model order.

    When such a name also names a linear layer outside the decoder layers, a regular expression over
    the full module names (peft's other form of ``target_modules``) keeps the adaptation inside them.
    """
    prefix = hf_decoder_layers(model)[0]
    if prefix is None:
        fail(f"--lora-r: found no decoder layer list ({', '.join(HF_LAYER_LISTS)}) in {type(model).__name__} to "
             "adapt; name the modules with --lora-target-modules")
    linear = _linear_types()
    inside: list[str] = []
    outside: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if name.startswith(prefix + "."):
            if leaf not in inside:
                inside.append(leaf)
        else:
            outside.add(leaf)
    if not inside:
        fail(f"--lora-r: {type(model).__name__} has no linear layers inside {prefix}; name the modules with "
             "--lora-target-modules")
    if outside & set(inside):
        return rf"{re.escape(prefix)}\.\d+\.(.*\.)?({'|'.join(map(re.escape, inside))})"
    return inside


def target_modules(model: nn.Module, requested: Optional[str]) -> Union[list[str], str]:
    """peft's ``target_modules`` for ``--lora-target-modules`` (None: :func:`default_target_modules`)."""
    if requested is None:
        return default_target_modules(model)
    if requested.strip() == "all-linear":
        return "all-linear"
    names = [name.strip() for name in requested.split(",") if name.strip()]
    if not names:
        fail(f"--lora-target-modules {requested!r} names no module; pass comma-separated names such as q_proj,v_proj")
    return names


def add_lora(model: nn.Module, settings: LoraSettings, seed: Optional[int] = None) -> nn.Module:
    """``model`` wrapped by peft with LoRA adapters (only they train); one line when a target does not exist.

    ``seed`` seeds the adapters' random initialisation (peft draws it from torch's global generator).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    targets = target_modules(model, settings.target_modules)
    conv1d = _linear_types()[1]
    fan_in_fan_out = any(isinstance(m, conv1d) for m in model.modules())  # GPT-2's Conv1D stores W transposed
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, fan_in_fan_out=fan_in_fan_out, bias="none", task_type="CAUSAL_LM")
    if seed is not None:
        set_seed(seed)
    try:
        with warnings.catch_warnings():  # peft asks transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            return get_peft_model(model, config)
    except ValueError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        fail(f"--lora-target-modules {settings.target_modules or ','.join(targets)}: peft refuses it ({first}); "
             "name modules of model.named_modules()")


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a peft model (a LoRA run)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def merged_model(peft_model: nn.Module) -> nn.Module:
    """The plain model with the LoRA updates merged into its weights (``peft_model`` is used up)."""
    return peft_model.merge_and_unload()
