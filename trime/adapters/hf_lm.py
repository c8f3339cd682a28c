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

Documents (:meth:`HFLM.documents`): the text file is scanned line by line for where documents start
(WikiText article heading lines, or the first line of each blank-line-separated block) and each start's
byte offset is mapped to the token that covers it, from the bytes each token id stands for (byte-level
BPE such as GPT-2's, or SentencePiece's ``▁`` and ``<0xNN>`` pieces). The mapping is used only when the
tokens' bytes add up to the file's (read as UTF-8 with universal newlines, as it was tokenized);
otherwise ``auto`` falls back to one document and an explicit rule is a one-line error.

Generation (:class:`HFDecoder`) runs the base model with its KV cache (``past_key_values``) and
applies the output embeddings to the last position, as :meth:`HFLM.forward` scores a target; a
prompt is tokenized without special tokens, as the splits are, and generation ends at the
generation config's ``eos_token_id`` (what ``model.generate`` stops at).
"""

import inspect
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from trime.adapters.base import (
    DecoderStep,
    Documents,
    IncrementalDecoder,
    ModelAdapter,
    SplitWindows,
    WindowBatch,
    WindowSettings,
    block_title,
    check_document_rule,
    check_window_settings,
    default_window_settings,
    heading_title,
    no_headings,
    pick_device,
    token_terms_in_blocks,
)
from trime.errors import fail
from trime.heads import full_softmax_terms
from trime.hooks import KeyCapture, hf_key_module

# the split files looked for in DATA, first match wins
SPLIT_FILES = ("{split}.txt", "wiki.{split}.tokens")
# tokens whose byte offsets are summed at once when documents are located
OFFSET_CHUNK_TOKENS = 1 << 22
SENTENCEPIECE_SPACE = "\u2581"  # SentencePiece's "▁"


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

    def data_files(self, split: str) -> list[Path]:
        """The split's text file."""
        return [split_file(Path(self.data_dir), split)]

    def decode(self, ids: "np.ndarray | list[int]") -> str:
        """The tokenizer's text of ``ids`` (special tokens kept, spaces as tokenized)."""
        return self.tokenizer.decode([int(i) for i in ids], clean_up_tokenization_spaces=False)

    def documents(self, split: str, rule: str = "auto") -> Documents:
        """The split's documents by ``rule`` (:meth:`ModelAdapter.documents`), located in the token stream by
        byte offsets (see the module docstring)."""
        check_document_rule(rule)
        path = split_file(Path(self.data_dir), split)
        whole = Documents(starts=[0], titles=[path.name], by="file")
        if rule == "file":
            return whole
        found, text_bytes = _document_offsets(path, "blocks" if rule == "blocks" else "heading")
        if not found:
            if rule == "heading":
                no_headings(path)
            return Documents(starts=[0], titles=[path.name], by="file" if rule == "auto" else rule)
        stream = self.stream(split)
        for lengths, shift in _token_byte_lengths(self.tokenizer):
            if _stream_bytes(stream, lengths) == text_bytes + shift:
                # offset 0 is the start of the text, with whatever the tokenizer adds in front of it
                starts = _tokens_at(stream, lengths, [offset + shift if offset else 0 for offset, _ in found])
                return _documents_at(starts, [title for _, title in found], path.name, "heading" if rule == "auto" else rule)
        if rule == "auto":
            return whole
        fail(
            f"--documents {rule}: the tokens of --path {self.path}'s tokenizer do not spell the bytes of {path} "
            "(it rewrites or adds text), so documents cannot be located in its token stream; use --documents file"
        )

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

    # ---- generation (trime.eval.generation)

    def encode(self, text: str) -> list[int]:
        """The prompt's ids without special tokens, as the split files are tokenized."""
        from trime.hf.text import tokenize_text

        return tokenize_text(text, self.tokenizer).tolist()

    def encode_file(self, path: Path, option: str) -> np.ndarray:
        """The file tokenized as one string without special tokens (the token cache's memory map, as a split)."""
        from trime.hf.text import tokenize_text_file

        return tokenize_text_file(path, self.tokenizer, option=option)

    def stream_windows(self, stream: np.ndarray, settings: WindowSettings) -> "TextWindows":
        return TextWindows(stream, settings)

    def window_head(self, before: np.ndarray, settings: WindowSettings) -> list[int]:
        """The last ``--context-window`` tokens of ``before`` (at least one, :meth:`TextWindows.span`); the last
        predicts the next token. Nothing when ``before`` is empty: a stream's first token is not predicted."""
        start = len(before)
        if start == 0:
            return []
        lo = start - max(1, min(settings.context_window, start))
        return [int(t) for t in np.asarray(before[lo:start])]

    def start_decoding(self) -> "HFDecoder":
        return HFDecoder(self)

    def stop_tokens(self) -> list[int]:
        """The generation config's ``eos_token_id`` (what ``model.generate`` stops at), else the tokenizer's."""
        config = getattr(self.model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return []
        return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]

    def max_input_tokens(self) -> int | None:
        return self.max_positions


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

    def target_positions(self, first_window: int, end_window: int) -> np.ndarray:
        """Window b scores stream tokens [first, hi) of :meth:`span`: consecutive windows, one run."""
        if end_window <= first_window:
            return np.zeros(0, dtype=np.int64)
        return np.arange(self.span(first_window)[1], self.span(end_window - 1)[2], dtype=np.int64)

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


def _document_offsets(path: Path, rule: str) -> tuple[list[tuple[int, str]], int]:
    """([(byte offset, title)] where the file's documents start by ``rule`` (``heading`` or ``blocks``), the file's
    byte count), read as it is tokenized (UTF-8, universal newlines).

    ``heading``: article heading lines; whitespace before the first heading joins that article. ``blocks``: the
    first line of each run of non-blank lines after a blank one; the first block starts at offset 0."""
    found: list[tuple[int, str]] = []
    offset, seen_text, after_blank = 0, False, True
    with open(path, encoding="utf-8", newline=None) as f:
        for line in f:
            blank = not line.strip()
            if rule == "blocks":
                title = block_title(line) if after_blank and not blank else None
            else:
                title = heading_title(line.split())
            if title is not None:
                found.append((0 if not found and not seen_text else offset, title))
            seen_text = seen_text or not blank
            after_blank = blank
            offset += len(line.encode("utf-8"))
    return found, offset


def _token_byte_lengths(tokenizer) -> list[tuple[np.ndarray, int]]:
    """Candidate (bytes of each token id, bytes the tokenizer adds in front of the text) readings.

    Byte-level BPE spells each byte as one character; SentencePiece spells a space ``▁`` and a byte
    ``<0xNN>``; either may add one space in front. The caller keeps the reading whose bytes add up to the text's.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    added = {int(i): str(t.content) for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
    alphabet = set(ByteLevel.alphabet())
    byte_level = np.zeros(size, dtype=np.int64)
    spm = np.zeros(size, dtype=np.int64)
    is_byte_level = True
    for i, piece in enumerate(pieces):
        if i in added:
            byte_level[i] = spm[i] = len(added[i].encode("utf-8"))
            continue
        if piece is None:
            continue
        if is_byte_level and not set(piece) <= alphabet:
            is_byte_level = False
        byte_level[i] = len(piece)
        is_byte = len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")
        spm[i] = 1 if is_byte else len(piece.replace(SENTENCEPIECE_SPACE, " ").encode("utf-8"))
    readings = [(byte_level, 0), (byte_level, 1)] if is_byte_level else []  # 1: a prefix space added
    return readings + [(spm, 0), (spm, 1)]


def _stream_bytes(stream: np.ndarray, lengths: np.ndarray) -> int:
    """Bytes the stream's tokens stand for, under ``lengths`` (-1 when a token has no length there)."""
    total = 0
    for lo in range(0, len(stream), OFFSET_CHUNK_TOKENS):
        chunk = np.asarray(stream[lo : lo + OFFSET_CHUNK_TOKENS])
        if int(chunk.max()) >= len(lengths):
            return -1
        total += int(lengths[chunk].sum())
    return total


def _tokens_at(stream: np.ndarray, lengths: np.ndarray, offsets: list[int]) -> list[int]:
    """For each byte offset (increasing), the position of the first token that ends after it."""
    out: list[int] = []
    done = 0  # bytes of the tokens before this chunk
    for lo in range(0, len(stream), OFFSET_CHUNK_TOKENS):
        ends = done + np.cumsum(lengths[np.asarray(stream[lo : lo + OFFSET_CHUNK_TOKENS])])
        while len(out) < len(offsets) and offsets[len(out)] < ends[-1]:
            out.append(lo + int(np.searchsorted(ends, offsets[len(out)], side="right")))
        done = int(ends[-1])
    return out


def _documents_at(starts: list[int], titles: list[str], file_name: str, by: str) -> Documents:
    """Documents found by rule ``by`` from their first tokens' positions; a start inside the previous one's token
    keeps the later title. Text before the first start (not only whitespace) is a document titled ``file_name``."""
    kept_starts: list[int] = []
    kept_titles: list[str] = []
    for start, title in zip(starts, titles):
        if kept_starts and start <= kept_starts[-1]:
            kept_titles[-1] = title
            continue
        kept_starts.append(start)
        kept_titles.append(title)
    if kept_starts[0] != 0:
        kept_starts.insert(0, 0)
        kept_titles.insert(0, file_name)
    return Documents(starts=kept_starts, titles=kept_titles, by=by)


class HFDecoder(IncrementalDecoder):
    """Incremental decoding of an HF causal LM: the base model with ``past_key_values``, keys by
    :meth:`KeyCapture.hf`, the output embeddings applied to the last position's hidden state (as
    :meth:`HFLM.forward` scores a target)."""

    def __init__(self, lm: HFLM) -> None:
        self.lm = lm
        self.cache = None

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor) -> DecoderStep:
        model = self.lm.model
        tokens = tokens.to(self.lm.device)
        with KeyCapture.hf(model, self.lm.key_module) as capture:
            out = model.base_model(input_ids=tokens, use_cache=True, **{self._cache_argument(): self.cache})
        cache = out.get("cache", None)
        self.cache = cache if cache is not None else out.get("past_key_values")
        reps = capture.keys(tuple(tokens.shape)).detach()
        logits = model.get_output_embeddings()(out.last_hidden_state[:, -1]).float()
        return DecoderStep(reps=reps, token_scores=logits, token_logz=torch.logsumexp(logits, dim=-1))

    def reorder(self, rows: torch.Tensor) -> None:
        self.cache.reorder_cache(rows.to(self.lm.device))

    def _cache_argument(self) -> str:
        """The base model's name for the KV cache: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
        parameters = inspect.signature(self.lm.model.base_model.forward).parameters
        return "cache" if "cache" in parameters else "past_key_values"
