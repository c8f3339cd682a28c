"""Model adapters: one interface (:mod:`trime.adapters.base`) over fairseq and Hugging Face LMs.

:func:`load_adapter` picks the front-end from ``--path``: a directory, or a name that is
neither a file nor a ``.pt`` path (a hub name), is a Hugging Face model
(:mod:`trime.adapters.hf_lm`, scoring raw text splits); a file is a fairseq checkpoint
(:mod:`trime.adapters.fairseq_lm`, scoring a data-bin). Neither framework is imported until a
model is loaded.
"""

import os

from trime.adapters.base import (
    ModelAdapter,
    SplitWindows,
    WindowBatch,
    WindowSettings,
    batch_size_for,
)
from trime.errors import fail
from trime.hf.model import check_model_dir, is_hf_model_dir

__all__ = ["ModelAdapter", "SplitWindows", "WindowBatch", "WindowSettings", "batch_size_for", "load_adapter"]


def load_adapter(
    path: os.PathLike, data_dir: os.PathLike, cpu: bool = False, precision: str = "fp32", key_module: str | None = None
) -> ModelAdapter:
    """Load ``--path`` for scoring the splits in ``data_dir``; ``precision`` is fp32, fp16 or bf16.

    ``key_module`` (HF models only) names the module whose input are the keys (default:
    the last decoder layer's MLP).
    """
    text = str(path)
    if text.endswith(".gguf"):
        fail(f"--path {text} is a GGUF file; load it with transformers (from_pretrained(dir, gguf_file=NAME)) "
             "and save an ordinary model dir to pass as --path")
    # a folder (config.json or not), or a name that is neither a file nor a .pt path, is a Hugging Face model
    hf_candidate = os.path.isdir(text) or (not os.path.exists(text) and not text.endswith(".pt"))
    if is_hf_model_dir(path) or hf_candidate:
        from trime.adapters.hf_lm import HFLM

        check_model_dir(text, "--path")
        return HFLM.load(path, data_dir, cpu=cpu, precision=precision, key_module=key_module)
    if key_module:
        fail(f"--key-module is for Hugging Face models; --path {path} is a fairseq checkpoint (keys: the last fc1 input)")
    from trime.adapters.fairseq_lm import FairseqLM

    return FairseqLM.load(path, data_dir, cpu=cpu, precision=precision)
