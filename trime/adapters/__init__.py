"""Model adapters: one interface (:mod:`trime.adapters.base`) over fairseq and Hugging Face LMs.

:func:`load_adapter` picks the front-end from ``--path``: a directory, or a name that is
neither a file nor a ``.pt`` path (a hub name), or a ``.gguf`` file, is a Hugging Face model
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
from trime.hf.model import check_model_dir, is_gguf, is_hf_model_dir

__all__ = ["ModelAdapter", "SplitWindows", "WindowBatch", "WindowSettings", "batch_size_for", "load_adapter"]


def load_adapter(
    path: os.PathLike,
    data_dir: os.PathLike,
    cpu: bool = False,
    precision: str = "fp32",
    key_module: str | None = None,
    gguf_file: str | None = None,
    trust_checkpoint: bool = False,
) -> ModelAdapter:
    """Load ``--path`` for scoring the splits in ``data_dir``; ``precision`` is fp32, fp16 or bf16.

    ``key_module`` (HF models only) names the module whose input are the keys (default:
    the last decoder layer's MLP). A ``.gguf`` file, or ``gguf_file`` (``--gguf-file``) inside
    the dir ``path``, is a Hugging Face model dequantized from GGUF. ``trust_checkpoint``
    (``--trust-checkpoint``, fairseq checkpoints only) allows unpickling a checkpoint in full,
    e.g. a fairseq < 0.10 one of the original TRIME code.
    """
    text = str(path)
    # a folder (config.json or not), a GGUF file, or a name that is neither a file nor a .pt path is a Hugging Face model
    hf_candidate = os.path.isdir(text) or (not os.path.exists(text) and not text.endswith(".pt"))
    if is_hf_model_dir(path) or hf_candidate or is_gguf(text, gguf_file):
        from trime.adapters.hf_lm import HFLM

        check_model_dir(text, "--path", gguf_file=gguf_file)
        if trust_checkpoint:
            fail(f"--trust-checkpoint is for fairseq checkpoints; --path {path} is a Hugging Face model, whose "
                 "weights transformers loads itself")
        return HFLM.load(path, data_dir, cpu=cpu, precision=precision, key_module=key_module, gguf_file=gguf_file)
    if key_module:
        fail(f"--key-module is for Hugging Face models; --path {path} is a fairseq checkpoint (keys: the last fc1 input)")
    from trime.adapters.fairseq_lm import FairseqLM

    return FairseqLM.load(path, data_dir, cpu=cpu, precision=precision, trust_checkpoint=trust_checkpoint)
