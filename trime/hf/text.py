"""Plain text under a Hugging Face tokenizer: one token stream per file, and the tokenizer's identity.

Training (``trime-hf-train``), BM25 plans (``trime-bm25-batches --model``) and evaluation
all read a text file the same way: the whole file is tokenized as **one string**,
without special tokens (no BOS/EOS is added), so that a file's token stream does not
depend on how it is later cut into blocks or windows. :func:`tokenize_text_file` does so
once per (file, tokenizer), in chunks, into the token cache (:mod:`trime.hf.token_cache`),
and returns a read-only memory map, so a corpus larger than memory can be used.

:func:`tokenizer_identity` is a hash of what maps text to ids (the fast tokenizer's
serialised model, normaliser, pre-tokeniser and added tokens; the vocabulary for slow
tokenizers). Plans and datastores record it, so that files made under another
tokenizer are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from trime.errors import fail

# runtime settings of a fast tokenizer that do not change the ids of a plain encode
_RUNTIME_KEYS = ("truncation", "padding")


def read_text_file(path: Union[str, os.PathLike], option: str = "--train-file") -> str:
    """The file's text (UTF-8); one-line errors for a missing, empty or non-UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        fail(f"{option} {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        fail(f"{option} {path} is not UTF-8 text (byte {err.start}); convert it to UTF-8")
    if not text.strip():
        fail(f"{option} {path} is empty")
    return text


def tokenize_text(text: str, tokenizer: Any) -> np.ndarray:
    """Token ids (int64) of ``text`` as one string, without special tokens."""
    encoded = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return np.asarray(encoded["input_ids"], dtype=np.int64)


def tokenize_text_file(path: Union[str, os.PathLike], tokenizer: Any, option: str = "--train-file",
                       cache_dir: Union[str, os.PathLike, None] = None,
                       progress_bar: Optional[bool] = None) -> np.ndarray:
    """Token ids of the whole file tokenized as one string, without special tokens.

    A read-only memory map (``uint16``, or ``uint32`` for vocabularies over 65,536) from the token
    cache: the file is tokenized once per tokenizer, in chunks, with progress and resume
    (:func:`trime.hf.token_cache.cached_tokens`; ``cache_dir`` overrides ``$TRIME_TOKEN_CACHE``).
    Slice it and convert the slice (``np.asarray(ids[a:b], dtype=np.int64)``); do not copy it whole.
    """
    from trime.hf.token_cache import cached_tokens

    return cached_tokens(path, tokenizer, option, cache_dir=cache_dir, progress_bar=progress_bar)


# path -> (stat signature, identity): a file is hashed once per process while it is unchanged
_IDENTITIES: dict = {}


def text_file_identity(path: Union[str, os.PathLike]) -> dict:
    """Identity of a text file: its size and sha256 (hashed once per process while the file is unchanged)."""
    from trime.io_utils import sha256_file

    path = Path(path)
    stat = path.stat()
    signature = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    key = os.path.realpath(path)
    cached = _IDENTITIES.get(key)
    if cached is None or cached[0] != signature:
        cached = (signature, {"text_bytes": stat.st_size, "text_sha256": sha256_file(path)})
        _IDENTITIES[key] = cached
    return dict(cached[1])


def tokenizer_identity(tokenizer: Any) -> str:
    """Hex sha256 of what maps text to ids; equal for a tokenizer and its save_pretrained copy."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        for key in _RUNTIME_KEYS:
            spec.pop(key, None)
        body = {"kind": "fast", "spec": spec}
    else:  # slow (python) tokenizer: its vocabulary and special tokens
        body = {
            "kind": type(tokenizer).__name__,
            "vocab": sorted(tokenizer.get_vocab().items()),
            "special": sorted(map(str, getattr(tokenizer, "all_special_tokens", []))),
        }
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def special_token_ids(tokenizer: Any) -> list:
    """Ids of the tokenizer's special tokens (BOS/EOS/PAD/UNK and added specials)."""
    return sorted({int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None and int(i) >= 0})


def train_bpe_tokenizer(text_files: list, vocab_size: int, out_dir: Union[str, os.PathLike, None] = None,
                        special_token: str = "<|endoftext|>"):
    """A GPT-2-style byte-level BPE tokenizer trained on ``text_files`` (for models trained from scratch).

    Uses the ``tokenizers`` library; ``special_token`` is BOS and EOS. Saved with
    ``save_pretrained`` into ``out_dir`` when given. Returns the ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[special_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(path) for path in text_files], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special_token, eos_token=special_token)
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast
