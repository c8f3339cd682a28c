"""The Hugging Face adapter: an ``AutoModelForCausalLM`` dir scored over raw text splits.

``DATA`` is a folder of text splits (``{split}.txt`` or ``wiki.{split}.tokens``).
Windowing: the whole split file is tokenized as one string without special
tokens (:func:`trime.hf.text.tokenize_text_file`); with S = tokens-per-sample -
context-window, window b scores the new tokens [b*S, (b+1)*S) of the stream after up to
context-window earlier tokens (at least one, so that its first new token is predicted);
the stream's first token is not scored.

A window's model input ends one token before its last new token (that token predicts
nothing inside the window), so row position t holds the stream token ``lo + t`` and
predicts ``lo + t + 1``; like fairseq's windows, every position is labelled with its
next token and the context positions are memory keys. Keys are the input of the last
decoder layer's MLP (:meth:`trime.hooks.KeyCapture.hf`); token-head terms come from the
output embeddings applied to the base model's last hidden state, for scored rows only.
transformers is imported only when a model is loaded.
"""

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from trime.adapters.base import (
    ModelAdapter,
    SplitWindows,
    WindowBatch,
    WindowSettings,
    check_window_settings,
    default_window_settings,
    pick_device,
    token_terms_in_blocks,
)
from trime.errors import fail
from trime.heads import full_softmax_terms
from trime.hooks import KeyCapture, hf_key_module

# the split files looked for in DATA, first match wins
SPLIT_FILES = ("{split}.txt", "wiki.{split}.tokens")


def split_file(data_dir: Path, split: str) -> Path:
    """The text file of ``split`` in ``data_dir``; one-line error naming what was looked for."""
    if not data_dir.is_dir():
        fail(f"DATA {data_dir} is not a directory; pass a folder of text splits (train.txt, valid.txt, test.txt)")
    names = [pattern.format(split=split) for pattern in SPLIT_FILES]
    for name in names:
        if (data_dir / name).is_file():
            return data_dir / name
    fail(
        f"{data_dir} has no split '{split}' (looked for {' and '.join(names)}); "
        "add the text file or pick another --gen-subset"
    )


class HFLM(ModelAdapter):
    """A Hugging Face causal LM and its tokenizer, ready for scoring text splits."""

    frontend = "hf"

    def __init__(self, model, tokenizer, path: Path, data_dir: Path, device, dtype, key_module: str | None = None,
                 trained_block_size: int | None = None, gguf_file: str | None = None):
        from trime.hf.model import model_identity
        from trime.hf.text import tokenizer_identity

        self.model, self.tokenizer = model, tokenizer
        self.path, self.data_dir = path, data_dir
        self.device, self.dtype = device, dtype
        self.key_module = key_module
        self.key_source, _ = hf_key_module(model, key_module)
        if model.base_model is model:
            fail(f"--path {path}: {type(model).__name__} has no base model under its LM head; use a decoder-only LM")
        config = model.config
        self.dim = self._key_dim()
        self.architecture = str(config.model_type)
        self.identity = model_identity(path, gguf_file)  # a GGUF file: its sha256
        self.vocab = {"sha256": tokenizer_identity(tokenizer), "size": len(tokenizer)}
        self.max_positions = getattr(config, "max_position_embeddings", None)
        self.trained_block_size = trained_block_size  # trime-hf-train's --block-size, from its record
        self._streams: dict[str, np.ndarray] = {}

    @torch.no_grad()
    def _key_dim(self) -> int:
        """Size of the keys, from a one-token forward (a ``--key-module`` may differ from the hidden size)."""
        with KeyCapture.hf(self.model, self.key_module, stop=True) as capture:
            self.model.base_model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device), use_cache=False)
        return int(capture.keys((1, 1)).shape[-1])

    @classmethod
    def load(
        cls,
        path: os.PathLike,
        data_dir: os.PathLike,
        cpu: bool = False,
        precision: str = "fp32",
        key_module: str | None = None,
        gguf_file: str | None = None,
    ) -> "HFLM":
        """Load a ``save_pretrained`` dir (model + tokenizer), hub name or GGUF file (``x.gguf``, or a dir with
        ``gguf_file``) for scoring the text splits in ``data_dir``.

        Keys come from the module the model was trained with (:func:`trime.hf.model.training_record`)
        unless ``key_module`` is given; a ``key_module`` that resolves to another module than the
        record's is refused, since the memories would hold keys the model was not trained with.
        """
        from trime.hf.model import is_gguf, load_model_and_tokenizer, training_record

        path, data_dir = Path(path), Path(data_dir)
        if not data_dir.is_dir():
            fail(f"DATA {data_dir} is not a directory; pass a folder of text splits (train.txt, valid.txt, test.txt)")
        device = pick_device(cpu)
        record = None if is_gguf(path, gguf_file) else training_record(path)  # trime-hf-train writes model dirs
        trained_key_module = record.key_module if record is not None else None
        record_origin = f"the key_module of training record {record.file}" if record is not None else ""
        chosen = key_module or trained_key_module
        model, tokenizer = load_model_and_tokenizer(
            path, dtype=precision, device=device, key_module=chosen, option="--path",
            key_origin="--key-module" if key_module else record_origin, gguf_file=gguf_file,
        )  # fmt: skip
        if key_module and record is not None and record.knows_key_module:
            given = hf_key_module(model, key_module)[0]
            trained = hf_key_module(model, trained_key_module, origin=record_origin)[0]
            if given != trained:
                fail(
                    f"--key-module {key_module} disagrees with training record {record.file}: the model was trained "
                    f"with keys from {trained}; drop --key-module to use them"
                )
        model.eval()
        dtype = next(model.parameters()).dtype
        block_size = record.block_size if record is not None else None
        return cls(model, tokenizer, path, data_dir, device, dtype, chosen, trained_block_size=block_size,
                   gguf_file=gguf_file)

    def window_settings(self, context_window: int | None, tokens_per_sample: int | None) -> WindowSettings:
        """Default window: the training block size (trime-hf-train), else the model's positions up to
        DEFAULT_WINDOW (1,024: SmolLM2's 8,192 would crawl on a CPU); half of it as context."""
        context_window, tps = default_window_settings(
            context_window, tokens_per_sample, self.trained_block_size, self.max_positions
        )
        return check_window_settings(context_window, tps, self.max_positions)

    def stream(self, split: str) -> np.ndarray:
        """The split's token ids: the token cache's read-only memmap (tokenized once per file and tokenizer)."""
        if split not in self._streams:
            from trime.hf.text import tokenize_text_file

            path = split_file(self.data_dir, split)
            ids = tokenize_text_file(path, self.tokenizer, option="DATA")
            if len(ids) < 2:
                fail(f"DATA {path} has {len(ids)} token(s); at least 2 are needed to score one")
            vocab = int(self.model.get_output_embeddings().weight.shape[0])
            if int(ids.max()) >= vocab:
                fail(
                    f"the tokenizer of --path {self.path} gives id {int(ids.max())} on {path}, beyond the model's "
                    f"{vocab} output embeddings; save the tokenizer the model was trained with beside it"
                )
            self._streams[split] = ids
        return self._streams[split]

    def windows(self, split: str, settings: WindowSettings) -> "TextWindows":
        return TextWindows(self.stream(split), settings)

    @torch.no_grad()
    def forward(self, batch: dict, need_token_terms: bool = True) -> WindowBatch:
        """Run the model on one batch of :class:`TextWindows`; keys of every position, head terms of scored ones."""
        input_ids = batch["input_ids"].to(self.device)
        attention_mask = batch["attention_mask"].to(self.device)
        # without the head terms, the forward ends at the key (the last MLP, the final norm and the head are skipped)
        with KeyCapture.hf(self.model, self.key_module, stop=not need_token_terms) as capture:
            hidden = self.model.base_model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
        reps = capture.keys(tuple(input_ids.shape)).detach()
        key_labels = batch["labels"].to(self.device)
        key_valid = batch["label_valid"].to(self.device)
        positions = torch.arange(input_ids.shape[1], device=self.device)
        scored = key_valid & (positions[None, :] >= torch.tensor(batch["starts"], device=self.device)[:, None])
        targets = key_labels[scored]
        if need_token_terms:
            head = self.model.get_output_embeddings()

            def terms(feats, tgt):
                return full_softmax_terms(head(feats), tgt)

            token_score, token_logz = token_terms_in_blocks(terms, hidden[scored], targets, int(head.weight.shape[0]))
        else:
            token_score = token_logz = torch.zeros(0)
        return WindowBatch(
            ids=list(batch["ids"]),
            reps=reps,
            key_labels=key_labels,
            key_valid=key_valid,
            scored=scored,
            starts=list(batch["starts"]),
            targets=targets,
            token_score=token_score,
            token_logz=token_logz,
        )


class TextWindows(SplitWindows):
    """The pinned windows of one token stream (see the module docstring)."""

    def __init__(self, stream: np.ndarray, settings: WindowSettings) -> None:
        self.stream, self.settings = stream, settings
        self.new = settings.new_tokens

    def __len__(self) -> int:
        return math.ceil(len(self.stream) / self.new)

    def span(self, b: int) -> tuple[int, int, int]:
        """(lo, first, hi) of window b: input from stream token lo, scored tokens [first, hi)."""
        first, hi = b * self.new, min((b + 1) * self.new, len(self.stream))
        if b == 0:
            return 0, 1, hi  # the stream's first token is not scored
        return first - max(1, min(self.settings.context_window, first)), first, hi

    def scored_counts(self) -> np.ndarray:
        return np.asarray([hi - first for _, first, hi in map(self.span, range(len(self)))], dtype=np.int64)

    def batches(self, batch_size: int, first_batch: int = 0, end_batch: int | None = None) -> Iterator[dict]:
        """Padded (B, T) batches: ``input_ids``/``attention_mask``, next-token ``labels``/``label_valid``, ``starts``."""
        end_batch = self.num_batches(batch_size) if end_batch is None else end_batch
        for b in range(first_batch, end_batch):
            ids = list(range(b * batch_size, min(len(self), (b + 1) * batch_size)))
            if not ids:
                break
            spans = [self.span(w) for w in ids]
            # row = stream[lo : hi - 1] (at least one token); position t predicts stream[lo + t + 1]
            lengths = [max(hi - 1 - lo, 1) for lo, _, hi in spans]
            length = max(lengths)
            input_ids = torch.zeros(len(ids), length, dtype=torch.long)
            labels = torch.zeros(len(ids), length, dtype=torch.long)
            attention_mask = torch.zeros(len(ids), length, dtype=torch.long)
            label_valid = torch.zeros(len(ids), length, dtype=torch.bool)
            for row, ((lo, _, hi), n) in enumerate(zip(spans, lengths)):
                # the stream is the token cache's read-only memmap: read one window's slice as int64
                input_ids[row, :n] = torch.from_numpy(np.asarray(self.stream[lo : lo + n], dtype=np.int64))
                attention_mask[row, :n] = 1
                predicted = np.asarray(self.stream[lo + 1 : hi], dtype=np.int64)
                labels[row, : len(predicted)] = torch.from_numpy(predicted)
                label_valid[row, : len(predicted)] = True
            yield {
                "ids": ids,
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "labels": labels,
                "label_valid": label_valid,
                "starts": [first - 1 - lo for lo, first, _ in spans],
            }
