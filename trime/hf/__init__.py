"""trime for Hugging Face causal LMs (GPT-2, Llama/Mistral/Qwen2, GPT-NeoX/Pythia, OPT, ...).

The HF front-end over the model-agnostic core in :mod:`trime.loss`:

- :func:`causal_lm_loss` — the TRIME loss (local, long or external memory) of an
  ``AutoModelForCausalLM`` batch, with HF's shift/padding conventions;
- :func:`find_key_module`, :class:`KeyCapture` — the keys: the input of the last decoder
  layer's MLP, after its norm;
- :func:`load_model_and_tokenizer`, :func:`load_model`, :func:`load_tokenizer` — local
  ``save_pretrained`` dirs or hub names, with one-line errors;
- :func:`tokenize_text_file`, :func:`tokenizer_identity` — a text file as one token stream,
  and the hash that plans and datastores record; :func:`train_bpe_tokenizer` for models
  trained from scratch.

``trime-hf-train`` (:mod:`trime.hf.train`) is continued pre-training on plain text built on
``transformers.Trainer``. Nothing in the fairseq path imports this package, and this
package imports transformers only inside the functions that need it.
"""

from trime.hf.loss import MEMORIES, CausalLMLossOutput, causal_lm_loss, shifted_targets
from trime.hf.model import (
    KeyCapture,
    check_model_dir,
    find_key_module,
    is_hf_model_dir,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_dtype,
    unwrap_model,
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

__all__ = [
    "MEMORIES",
    "CausalLMLossOutput",
    "KeyCapture",
    "causal_lm_loss",
    "check_model_dir",
    "find_key_module",
    "is_hf_model_dir",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
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
