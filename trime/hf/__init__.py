"""trime for Hugging Face causal LMs (GPT-2, Llama/Mistral/Qwen2, GPT-NeoX/Pythia, OPT, ...).

The HF front-end over the model-agnostic core in :mod:`trime.loss`:

- :func:`causal_lm_loss` — the TRIME loss (local, long or external memory) of an
  ``AutoModelForCausalLM`` batch, with HF's shift/padding conventions;
- :class:`KeyCapture` (``KeyCapture.hf(model)``), :func:`hf_key_module` — the keys: the
  input of the last decoder layer's MLP, after its norm (defined in :mod:`trime.hooks`,
  shared with the fairseq front-end);
- :func:`load_model_and_tokenizer`, :func:`load_model`, :func:`load_tokenizer` — local
  ``save_pretrained`` dirs, hub names or GGUF files (``x.gguf``, or a dir with ``gguf_file``),
  with one-line errors; :func:`model_identity` — what plans, datastores and results record of a
  model (a GGUF file's sha256);
- :func:`tokenize_text_file`, :func:`tokenizer_identity` — a text file as one token stream,
  and the hash that plans and datastores record; :func:`train_bpe_tokenizer` for models
  trained from scratch.

``trime-hf-train`` (:mod:`trime.hf.train`) is continued pre-training on plain text built on
``transformers.Trainer``. Nothing in the fairseq path imports this package, and this
package imports transformers only inside the functions that need it.
"""

from trime.hf.loss import CausalLMLossOutput, causal_lm_loss, shifted_targets
from trime.hf.model import (
    RECORD,
    ModelSource,
    check_model_dir,
    is_gguf,
    is_hf_model_dir,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    model_identity,
    model_source,
    resolve_dtype,
)
from trime.hf.text import (
    read_text_file,
    special_token_ids,
    text_file_identity,
    tokenize_text,
    tokenize_text_file,
    tokenizer_identity,
    train_bpe_tokenizer,
)
from trime.hooks import KeyCapture, hf_key_module, unwrap_model
from trime.memories import MEMORIES

__all__ = [
    "MEMORIES",
    "RECORD",
    "CausalLMLossOutput",
    "KeyCapture",
    "ModelSource",
    "causal_lm_loss",
    "check_model_dir",
    "hf_key_module",
    "is_gguf",
    "is_hf_model_dir",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "model_identity",
    "model_source",
    "read_text_file",
    "resolve_dtype",
    "shifted_targets",
    "special_token_ids",
    "text_file_identity",
    "tokenize_text",
    "tokenize_text_file",
    "tokenizer_identity",
    "train_bpe_tokenizer",
    "unwrap_model",
]
