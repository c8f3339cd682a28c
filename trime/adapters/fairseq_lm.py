"""The fairseq adapter: a fairseq LM checkpoint scored over a data-bin split.

Windowing follows ``fairseq-eval-lm --context-window C`` (reference section 3.1): the split
is cut into blocks of ``tokens_per_sample - C`` new tokens (break mode ``none``) and
fairseq's ``LMContextWindowDataset`` prepends up to ``C`` previous tokens to each block.
Only the new tokens are scored; the context tokens are memory keys whose labels are
their true next tokens. fairseq is imported only when a checkpoint is loaded.

The split's token stream (:meth:`FairseqLM.stream`) is its binarized lines in order, each
ending with ``<eos>``: the ``.bin`` file itself, memory-mapped. Window w's targets are the
stream tokens of block w. Documents are found from the dictionary's tokens: WikiText articles start
at a line ``= Title =`` (one ``=`` token on each side) after an ``<eos>`` or at the start; blocks at
the first line with text after a blank line (a line without a token other than ``<eos>`` and, in
byte-level data, ASCII whitespace bytes: an ``<eos>`` right after an ``<eos>`` in word-level data).
Decoding writes each word after a space and each ``<eos>`` as a newline (WikiText's own
spelling), or, for byte-level data, the bytes themselves.

Generation (:class:`FairseqDecoder`) runs the decoder with its ``incremental_state`` one position per
call, as fairseq's SequenceGenerator does; a prompt is its words (or bytes) without ``<eos>``, read
after ``<eos>`` like the start of a split, and generation ends at ``<eos>`` (the end of a line).

Loading reads a checkpoint with fairseq's ``load_checkpoint_to_cpu``, whose ``torch.load`` unpickles only
weights (torch's default since 2.6). A checkpoint that holds other Python objects is refused in one line
unless ``trust_checkpoint`` (``--trust-checkpoint``), because unpickling it can run code. The original TRIME
code's released checkpoints are such files: fairseq 0.9 pickles its ``args`` as an ``argparse.Namespace`` and
writes no ``cfg``. A trusted checkpoint is unpickled in full; args of that kind are rewritten by
:data:`ORIGINAL_ARGS` into names fairseq 0.12 and trime know, then fairseq upgrades the checkpoint itself
(``_upgrade_state_dict``, which converts the args with ``convert_namespace_to_omegaconf``).
"""

import argparse
import math
import os
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from trime.adapters.base import (
    BLOCK_TITLE_CHARS,
    PRECISIONS,
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
from trime.databin import check_data_bin, is_byte_level, split_parts
from trime.errors import fail
from trime.heads import token_head_terms
from trime.hooks import KeyCapture, fairseq_key_module
from trime.io_utils import file_identity, sha256_file

# the first bytes of fairseq's memory-mapped .idx files (fairseq-preprocess --dataset-impl mmap, the default)
MMAP_INDEX_MAGIC = b"MMIDIDX\x00\x00"
# What torch.load / unpickling raise for a file that is not a readable checkpoint.
CHECKPOINT_READ_ERRORS = (OSError, EOFError, RuntimeError, ValueError, KeyError, AttributeError, pickle.UnpicklingError)
# torch >= 2.6 unpickles only weights unless told otherwise; before, fairseq's torch.load unpickles everything
WEIGHTS_ONLY_BY_DEFAULT = torch.__version__ >= "2.6"
# ArgRule.new that deletes the arg
DROP = object()
# ArgRule.when value of an arg the args do not have
ABSENT = object()


@dataclass(frozen=True)
class ArgRule:
    """One rule of :data:`ORIGINAL_ARGS`: each arg of ``names`` becomes ``new`` (:data:`DROP` deletes it), where it
    holds one of the values ``when`` (:data:`ABSENT`: where it is missing), or any value if ``when`` is empty;
    ``why`` says why."""

    names: tuple[str, ...]
    why: str
    new: Any = DROP
    when: tuple = ()


# How the args of a fairseq < 0.10 checkpoint of the original TRIME code (its fairseq 0.9 fork with knnlm's
# task flags) are rewritten before fairseq 0.12 converts them. The original's trime_* criteria have trime's
# names, and the task (language_modeling) and the archs transformer_lm_wiki103, transformer_lm_wiki103_150M and
# transformer_lm_enwik8 are fairseq's or trime's; a criterion fairseq does not register is dropped
# (:func:`map_original_args`), since evaluation never builds one.
ORIGINAL_ARGS: tuple[ArgRule, ...] = (
    ArgRule(("tpu", "use_plasma_view", "update_epoch_batch_itr"), new=False, when=(ABSENT,),
            why="fairseq 0.12 flags that fairseq 0.9 lacks: their defaults are interpolations such as "
                "'${common.tpu}', which the conversion turns into True (a non-empty string as a bool)"),
    ArgRule(("arch",), new="transformer_lm", when=("transformer_lm_wiki103_small", "transformer_lm_wiki103_small_sm"),
            why="the original's 8-layer archs, registered by neither fairseq 0.12 nor trime; the args hold every "
                "size, so the base arch builds the same model"),
    ArgRule(("cross_sent_ratio",), new=0.0, when=(None,),
            why="trime_ext_loss: the original's None (the local memory never switched off) is trime's 0.0; fairseq "
                "0.12 refuses None for a float"),
    ArgRule(("knn_keytype", "knn_type", "learn_mem_weight", "dist", "temp"),
            why="the original's key and similarity settings: trime's keys are the last FFN's input (checked first) "
                "and its memory logits scaled dot products; the original's criteria never read --dist or --temp"),
    ArgRule(("keep_order", "predefined_batches", "num_comb_shards", "train_mem_size", "mem_size",
             "output_segments_to_file"),
            why="the original's batch order and memory size, set on language_modeling (trime_lm's --keep-order, "
                "--predefined-batches and --train-mem-size in trime); evaluation does not batch by them"),
    ArgRule(("k", "probe", "lmbda", "dstore_size", "dstore_filename", "indexfile", "knn_sim_func",
             "faiss_metric_type", "no_load_keys", "dstore_fp16", "move_dstore_to_mem", "use_faiss_cpu"),
            why="knnlm's datastore and search flags on the task: trime-build-datastore and trime-eval take their own"),
)


class FairseqLM(ModelAdapter):
    """A fairseq checkpoint ready for scoring, with the task that owns its dictionary."""

    frontend = "fairseq"

    def __init__(self, model, task, cfg, path: Path, data_dir: Path, device, dtype, dict_sha256: str, identity: dict):
        self.model, self.task, self.cfg = model, task, cfg
        self.path, self.data_dir = path, data_dir
        self.device, self.dtype = device, dtype
        self.key_source, key_module = fairseq_key_module(model)
        self.dim = key_module.in_features
        self.ckpt_tokens_per_sample = int(cfg.task.tokens_per_sample)
        self.identity = identity  # file_identity of the checkpoint, taken when it was loaded
        self.vocab = {"sha256": dict_sha256, "size": len(task.source_dictionary)}
        self.architecture = str(getattr(cfg.model, "arch", None) or getattr(cfg.model, "_name", "") or "")
        self._streams: dict[str, np.ndarray] = {}

    @property
    def dictionary(self):
        return self.task.source_dictionary

    @classmethod
    def load(cls, path: os.PathLike, data_dir: os.PathLike, cpu: bool = False, precision: str = "fp32",
             trust_checkpoint: bool = False) -> "FairseqLM":
        """Load a fairseq LM checkpoint for evaluation on the data-bin ``data_dir``.

        ``precision`` is ``fp32``, ``fp16`` or ``bf16`` (the model weights); all
        log-probabilities are computed in fp32 regardless. ``trust_checkpoint`` allows a checkpoint that
        weights-only unpickling refuses, such as the original TRIME code's (see the module docstring).
        """
        from fairseq import checkpoint_utils
        from fairseq.dataclass.utils import overwrite_args_by_name
        from omegaconf import open_dict

        path, data_dir = Path(path), Path(data_dir)
        if not path.is_file():
            fail(f"--path {path} does not exist; pass a checkpoint written by fairseq-train/trime-train")
        if not (data_dir / "dict.txt").is_file():
            fail(f"{data_dir} is not a fairseq data-bin (no dict.txt); pass the directory written by trime-prepare")
        dict_sha = sha256_file(data_dir / "dict.txt")
        identity = file_identity(path)
        state = read_checkpoint(path, trust_checkpoint)
        cfg = state.get("cfg")
        if cfg is None:
            fail(f"--path {path} has no 'cfg' (a fairseq < 0.10 checkpoint?); re-save it with fairseq 0.12")
        _check_training_dictionary(cfg, data_dir, dict_sha)
        overwrite_args_by_name(cfg, {"data": str(data_dir)})
        with open_dict(cfg.task):
            cfg.task.data = str(data_dir)
        if getattr(cfg.task, "add_bos_token", False):
            fail(f"--path {path} was trained with --add-bos-token, which trime-eval does not support")
        try:
            models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], state=state)
        except RuntimeError as e:
            if "size mismatch" in str(e):
                fail(
                    f"{data_dir / 'dict.txt'} ({len(_read_dict_lines(data_dir))} types) does not match the "
                    f"vocabulary of --path {path}; evaluate on the data-bin the checkpoint was trained with"
                )
            raise
        model = models[0]
        fairseq_key_module(model)  # a clear error for models without TRIME keys
        device = pick_device(cpu)
        dtype = PRECISIONS[precision]
        if dtype is not torch.float32:
            model = model.to(dtype)
        model = model.to(device)
        model.prepare_for_inference_(cfg)
        model.eval()
        return cls(model, task, cfg, path, data_dir, device, dtype, dict_sha, identity)

    def window_settings(self, context_window: int | None, tokens_per_sample: int | None) -> WindowSettings:
        """Default window: the checkpoint's --tokens-per-sample (as fairseq-eval-lm), half of it as context."""
        max_positions = self.model.max_positions()
        if isinstance(max_positions, tuple):
            max_positions = max_positions[0]
        context_window, tps = default_window_settings(
            context_window, tokens_per_sample, self.ckpt_tokens_per_sample, max_positions
        )
        return check_window_settings(context_window, tps, max_positions)

    def windows(self, split: str, settings: WindowSettings) -> "FairseqWindows":
        """The split as evaluation windows (``LMContextWindowDataset`` when there is a context)."""
        from fairseq.data import LMContextWindowDataset
        from omegaconf import open_dict

        task = self.task
        with open_dict(task.args):
            task.args.tokens_per_sample = settings.new_tokens
            task.args.sample_break_mode = "none"
            task.args.shorten_data_split_list = ""
            task.args.pad_to_fixed_length = False
            task.args.pad_to_fixed_bsz = False
        if split_parts(self.data_dir, split):  # present: refuse an empty one before fairseq mmaps it
            check_data_bin(self.data_dir, [split])
        try:
            task.load_dataset(split)
        except FileNotFoundError:
            fail(
                f"{self.data_dir} has no split '{split}' ({split}.bin/.idx); "
                "pick another --gen-subset or re-run trime-prepare"
            )
        dataset = task.dataset(split)
        if settings.context_window > 0:
            dataset = LMContextWindowDataset(
                dataset=dataset,
                tokens_per_sample=settings.new_tokens,
                context_window=settings.context_window,
                pad_idx=self.dictionary.pad(),
            )
        return FairseqWindows(dataset, settings)

    def data_files(self, split: str) -> list[Path]:
        """SPLIT.bin and SPLIT.idx (then those of SPLIT1, SPLIT2 ... when fairseq combines them) and dict.txt."""
        parts = split_parts(self.data_dir, split)[1:]
        return [self.data_dir / f"{name}.{ext}" for name in [split, *parts] for ext in ("bin", "idx")] + [
            self.data_dir / "dict.txt"
        ]

    def stream(self, split: str) -> np.ndarray:
        """The split's tokens in order (every line ends with <eos>): its .bin files, memory-mapped."""
        if split not in self._streams:
            parts = split_parts(self.data_dir, split)
            if not parts:
                fail(
                    f"{self.data_dir} has no split '{split}' ({split}.bin/.idx); "
                    "pick another --gen-subset or re-run trime-prepare"
                )
            check_data_bin(self.data_dir, [split])
            arrays = [self._part_tokens(self.data_dir / name) for name in parts]
            self._streams[split] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        return self._streams[split]

    def _part_tokens(self, prefix: Path) -> np.ndarray:
        """The tokens of one binarized file: a memory map of an mmap-format .bin, else its lines joined."""
        with open(f"{prefix}.idx", "rb") as f:
            is_mmap = f.read(len(MMAP_INDEX_MAGIC)) == MMAP_INDEX_MAGIC
        if is_mmap:
            from fairseq.data.indexed_dataset import MMapIndexedDataset

            index = MMapIndexedDataset.Index(f"{prefix}.idx")
            tokens = np.memmap(f"{prefix}.bin", dtype=index.dtype, mode="r")
            if len(index) and (int(index[0][0]) != 0 or int(index.sizes.sum()) != len(tokens)):
                fail(f"{prefix}.bin does not hold exactly the lines its .idx lists; re-run trime-prepare")
            return tokens
        from fairseq.data import data_utils

        lines = data_utils.load_indexed_dataset(str(prefix), self.dictionary)
        return np.concatenate([lines[i].numpy() for i in range(len(lines))]) if len(lines) else np.zeros(0, np.int64)

    def documents(self, split: str, rule: str = "auto") -> Documents:
        """The split's documents by ``rule`` (:meth:`ModelAdapter.documents`) from the dictionary's tokens (see the
        module docstring)."""
        check_document_rule(rule)
        stream = self.stream(split)
        name = self.data_files(split)[0].name
        whole = Documents(starts=[0], titles=[name], by="file")
        if rule == "file":
            return whole
        if rule == "blocks":
            return self._blocks(np.asarray(stream), name)
        found = self._headings(np.asarray(stream), name)
        if found is None and rule == "heading":
            no_headings(self.data_files(split)[0])
        return whole if found is None else found

    def _headings(self, tokens: np.ndarray, name: str) -> Documents | None:
        """WikiText articles (text before the first heading that is not only blank lines: a document ``name``),
        None where there is no heading line."""
        equals = self.dictionary.indices.get("=")
        if equals is None:
            return None
        eos = self.dictionary.eos()
        line_ends = np.flatnonzero(tokens == eos)
        candidates = np.flatnonzero(tokens == equals)
        at_line_start = (candidates == 0) | (tokens[np.maximum(candidates - 1, 0)] == eos)
        starts, titles = [], []
        for p in candidates[at_line_start].tolist():
            after = int(np.searchsorted(line_ends, p))
            end = int(line_ends[after]) if after < len(line_ends) else len(tokens)
            title = heading_title([self.dictionary[int(t)] for t in tokens[p:end]])
            if title is not None:
                starts.append(p)
                titles.append(title)
        if not starts:
            return None
        if starts[0] != 0:
            if np.all(tokens[: starts[0]] == eos):  # blank lines before the first heading
                starts[0] = 0
            else:
                starts.insert(0, 0)
                titles.insert(0, name)
        return Documents(starts=starts, titles=titles, by="heading")

    def _blocks(self, tokens: np.ndarray, name: str) -> Documents:
        """Blank-line-separated blocks: each starts at the first token of a line with text after a blank line; the
        first starts at 0. Titles: the block's first line, decoded from its first text token on."""
        eos = self.dictionary.eos()
        blank_symbol = np.zeros(len(self.dictionary), dtype=bool)
        blank_symbol[eos] = True
        if is_byte_level(self.data_dir):  # a byte's symbol is its decimal value
            for i, symbol in enumerate(self.dictionary.symbols):
                blank_symbol[i] |= symbol.isdigit() and int(symbol) < 128 and chr(int(symbol)).isspace()
        text = np.flatnonzero(~blank_symbol[tokens])  # positions of tokens that are text
        if not len(text):
            return Documents(starts=[0], titles=[name], by="blocks")
        line_ends = np.flatnonzero(tokens == eos)
        if len(line_ends) == 0 or line_ends[-1] != len(tokens) - 1:
            line_ends = np.append(line_ends, len(tokens) - 1)  # a last line without <eos>
        line_starts = np.concatenate([[0], line_ends[:-1] + 1])
        first_text = np.searchsorted(text, line_starts)  # index into text of each line's first text token
        has_text = (first_text < len(text)) & (text[np.minimum(first_text, len(text) - 1)] <= line_ends)
        opens = has_text & np.concatenate([[True], ~has_text[:-1]])
        starts, titles = [], []
        for line in np.flatnonzero(opens).tolist():
            first = int(text[first_text[line]])
            # the title needs at most BLOCK_TITLE_CHARS characters: as many tokens (words) or 4 times as many bytes
            shown = tokens[first : min(int(line_ends[line]) + 1, first + 4 * BLOCK_TITLE_CHARS)]
            starts.append(int(line_starts[line]) if starts else 0)
            titles.append(block_title(self.decode(shown[shown != eos])))
        return Documents(starts=starts, titles=titles, by="blocks")

    def decode(self, ids: "np.ndarray | list[int]") -> str:
        """Each word after a space and <eos> as a newline; byte-level data: the bytes, as UTF-8."""
        symbols = self.dictionary.symbols
        eos = self.dictionary.eos()
        if is_byte_level(self.data_dir):  # a byte's symbol is its value; other symbols are spelled out
            raw = b"".join(b"\n" if int(t) == eos else bytes([int(symbols[int(t)])]) if symbols[int(t)].isdigit()
                           else symbols[int(t)].encode("utf-8") for t in ids)
            return raw.decode("utf-8", errors="replace")
        return "".join("\n" if int(t) == eos else " " + symbols[int(t)] for t in ids)

    @torch.no_grad()
    def forward(self, sample: dict, need_token_terms: bool = True) -> WindowBatch:
        """Run the model on one collated batch; capture keys and the token-head terms of scored rows."""
        pad = self.dictionary.pad()
        src = sample["net_input"]["src_tokens"]
        target = sample["target"]
        bsz, length = src.shape
        starts = list(sample.get("start_indices", [0] * bsz))
        # without the head terms, the forward ends at the key (the last FFN and the head are skipped)
        with KeyCapture.fairseq(self.model, stop=not need_token_terms) as capture:
            features, _ = self.model(
                src.to(self.device), src_lengths=sample["net_input"]["src_lengths"].to(self.device), features_only=True
            )
        reps = capture.keys((bsz, length)).detach()  # (B, T, d)
        positions = torch.arange(length)[None, :]
        is_context = positions < torch.tensor(starts)[:, None]
        scored = (~is_context) & target.ne(pad)
        # context labels are the true next tokens (the next source token); scored ones are the targets
        key_labels = torch.where(is_context, src.roll(-1, dims=1), target)
        key_valid = src.ne(pad) & key_labels.ne(pad)
        scored_dev = scored.to(self.device)
        targets = target[scored].to(self.device)
        if need_token_terms:
            token_score, token_logz = self._token_terms(features[scored_dev], targets)
        else:
            token_score = token_logz = torch.zeros(0)
        return WindowBatch(
            ids=[int(i) for i in sample["id"]],
            reps=reps,
            key_labels=key_labels.to(self.device),
            key_valid=key_valid.to(self.device),
            scored=scored_dev,
            starts=starts,
            targets=targets,
            token_score=token_score,
            token_logz=token_logz,
        )

    def _token_terms(self, features, targets):
        """(log Z_t p(y), log Z_t) of the decoder's head (adaptive or full softmax) for feature rows."""
        decoder = self.model.decoder
        adaptive = getattr(decoder, "adaptive_softmax", None)

        def head(feats, tgt):
            head_input = feats if adaptive is not None else decoder.output_layer(feats)
            return token_head_terms(self.model, (head_input,), tgt)

        return token_terms_in_blocks(head, features, targets, len(decoder.dictionary))

    # ---- generation (trime.eval.generation)

    def encode(self, text: str) -> list[int]:
        """The prompt's ids in the dictionary (words split on whitespace, or bytes), without <eos>; a word the
        dictionary lacks is <unk>, as fairseq-preprocess makes it."""
        if is_byte_level(self.data_dir):
            return self._byte_ids(text.encode("utf-8"))
        return [int(t) for t in self.dictionary.encode_line(text, add_if_not_exist=False, append_eos=False)]

    def encode_file(self, path: Path, option: str) -> np.ndarray:
        """Every line of the file followed by <eos>, as fairseq-preprocess binarizes a split (bytes for
        byte-level data: a newline byte is <eos>)."""
        ids: list[int] = []
        eos = self.dictionary.eos()
        if is_byte_level(self.data_dir):
            lines = Path(path).read_bytes().split(b"\n")
            if not lines[-1]:
                lines.pop()  # the file ends with a newline
            for line in lines:
                ids += self._byte_ids(line) + [eos]
        else:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    ids += [int(t) for t in self.dictionary.encode_line(line, add_if_not_exist=False, append_eos=True)]
        return np.asarray(ids, dtype=np.int64)

    def _byte_ids(self, data: bytes) -> list[int]:
        """Byte-level ids of ``data``: each byte is the word of its decimal value, a newline byte is <eos>."""
        eos = self.dictionary.eos()
        return [eos if b == 10 else self.dictionary.index(str(b)) for b in data]

    def stream_windows(self, stream: np.ndarray, settings: WindowSettings) -> "FairseqWindows":
        """The datasets :meth:`windows` builds over a split (``TokenBlockDataset`` in break mode ``none``,
        ``MonolingualDataset``, ``LMContextWindowDataset``), over ``stream`` held in memory."""
        from fairseq.data import LMContextWindowDataset, MonolingualDataset, TokenBlockDataset
        from fairseq.data.list_dataset import ListDataset

        tokens = torch.from_numpy(np.asarray(stream, dtype=np.int64))
        lines = ListDataset([tokens], np.asarray([len(tokens)], dtype=np.int64))
        pad, eos = self.dictionary.pad(), self.dictionary.eos()
        blocks = TokenBlockDataset(lines, lines.sizes, settings.new_tokens, pad=pad, eos=eos, break_mode="none",
                                   include_targets=True)
        dataset = MonolingualDataset(blocks, blocks.sizes, self.dictionary, self.task.output_dictionary,
                                     add_eos_for_other_targets=False, shuffle=False, targets=self.task.targets,
                                     add_bos_token=False)
        if settings.context_window > 0:
            dataset = LMContextWindowDataset(dataset=dataset, tokens_per_sample=settings.new_tokens,
                                             context_window=settings.context_window, pad_idx=pad)
        return FairseqWindows(dataset, settings)

    def window_head(self, before: np.ndarray, settings: WindowSettings) -> list[int]:
        """The source tokens of ``LMContextWindowDataset``: the stream read after an <eos>, so source position p
        holds token p - 1 and predicts token p; the window's ``--context-window`` rows, then the last token of
        ``before`` (or <eos> at the start), which predicts the next."""
        start = len(before)
        lo = max(0, start - settings.context_window)
        source = np.asarray(before[max(0, lo - 1) : start], dtype=np.int64).tolist()
        return ([self.dictionary.eos()] if lo == 0 else []) + source

    def start_decoding(self) -> "FairseqDecoder":
        return FairseqDecoder(self)

    def stop_tokens(self) -> list[int]:
        """<eos>: the end of a line, where fairseq's own LM generation stops."""
        return [self.dictionary.eos()]

    def never_generated(self) -> list[int]:
        """<pad>, which fairseq's SequenceGenerator never picks either."""
        return [self.dictionary.pad()]

    def max_input_tokens(self) -> int | None:
        positions = self.model.max_positions()
        return positions[0] if isinstance(positions, tuple) else positions

    def vocab_terms(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log Z_t p_tok(w) for every word w (B, V), log Z_t (B,)) in fp32 of feature rows (B, d): the logits of a
        plain softmax; for an adaptive softmax the head's logit of a head word and, for a word of tail cluster c,
        head[c] + log_softmax(tail_c)[w], with Z_t the head's partition (as :func:`trime.heads.token_head_terms`)."""
        decoder = self.model.decoder
        adaptive = getattr(decoder, "adaptive_softmax", None)
        if adaptive is None:
            logits = decoder.output_layer(features).float()
            return logits, torch.logsumexp(logits, dim=-1)
        head = adaptive.head(features).float()
        first_tail = adaptive.cutoff[0]
        parts = [head[:, :first_tail]]
        for cluster, tail in enumerate(adaptive.tail):
            parts.append(head[:, first_tail + cluster, None] + torch.log_softmax(tail(features).float(), dim=-1))
        return torch.cat(parts, dim=1), torch.logsumexp(head, dim=-1)


class FairseqWindows(SplitWindows):
    """A fairseq (context-window) dataset of one split."""

    def __init__(self, dataset, settings: WindowSettings) -> None:
        self.dataset, self.settings = dataset, settings
        self._offsets: np.ndarray | None = None  # first stream position of each window's block

    def __len__(self) -> int:
        return len(self.dataset)

    def scored_counts(self) -> np.ndarray:
        # every token of a block has a target: a window scores its block's tokens
        return np.asarray(getattr(self.dataset, "dataset", self.dataset).sizes, dtype=np.int64)

    def target_positions(self, first_window: int, end_window: int) -> np.ndarray:
        """Blocks tile the stream in order (break mode ``none``): window w scores block w's tokens."""
        if self._offsets is None:
            self._offsets = np.concatenate([[0], np.cumsum(self.scored_counts())]).astype(np.int64)
        return np.arange(self._offsets[first_window], self._offsets[max(first_window, end_window)], dtype=np.int64)

    def batches(self, batch_size: int, first_batch: int = 0, end_batch: int | None = None) -> Iterator[dict]:
        """Collated batches ``first_batch .. end_batch-1`` of consecutive windows, in order.

        ``LMContextWindowDataset`` builds each window's context from the windows collated
        before it, so when starting mid-split the preceding windows are collated first
        (cheap, no model) to reproduce exactly the context of a run from the start.
        """
        dataset = self.dataset
        n = len(dataset)
        end_batch = self.num_batches(batch_size) if end_batch is None else end_batch
        start = first_batch * batch_size
        context_window = getattr(dataset, "context_window", 0)
        if context_window:
            dataset.prev_tokens = np.empty([0])
            new_tokens = max(1, dataset.tokens_per_sample)
            warm_from = max(0, start - math.ceil(context_window / new_tokens) - 1)
            if warm_from < start:
                dataset.collater([dataset[i] for i in range(warm_from, start)])
        for b in range(first_batch, end_batch):
            lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
            if lo >= hi:
                break
            yield dataset.collater([dataset[i] for i in range(lo, hi)])


def read_checkpoint(path: Path, trust: bool = False) -> dict:
    """The state of the checkpoint ``path``, upgraded by fairseq; one line if it cannot be read.

    fairseq's ``load_checkpoint_to_cpu`` reads it with weights-only unpickling. A checkpoint that holds other
    objects is refused unless ``trust``; then it is unpickled in full, its fairseq < 0.10 args are rewritten
    by :func:`map_original_args`, and fairseq's ``_upgrade_state_dict`` converts them into its ``cfg``.
    """
    from fairseq import checkpoint_utils

    try:
        if not WEIGHTS_ONLY_BY_DEFAULT:  # the same refusal on an older torch: a weights-only read first
            torch.load(path, map_location="cpu", weights_only=True)
        return checkpoint_utils.load_checkpoint_to_cpu(str(path))
    except pickle.UnpicklingError as e:
        refused = _refused_globals(path, e)
        if not refused:
            _unreadable(path, e)
        if not trust:
            namespace = " (a fairseq < 0.10 checkpoint's args, as in the original TRIME's)" if (
                "argparse.Namespace" in refused) else ""
            fail(
                f"--path {path} is a pickle that can run code when loaded: weights-only loading refuses the "
                f"{', '.join(refused)} it holds{namespace}; pass --trust-checkpoint if you trust the file's source"
            )
    except CHECKPOINT_READ_ERRORS as e:
        _unreadable(path, e)
    return _read_trusted(path)


def _read_trusted(path: Path) -> dict:
    """A checkpoint unpickled in full (``weights_only=False``), then upgraded as fairseq's loader does."""
    from fairseq import checkpoint_utils
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with open(path, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=False)
    except CHECKPOINT_READ_ERRORS as e:
        _unreadable(path, e)
    if not isinstance(state, dict) or "model" not in state:
        fail(f"--path {path} is not a fairseq checkpoint (no 'model' in it); pass one written by fairseq-train")
    old_args = state.get("args")
    if state.get("cfg") is not None:
        # as fairseq's load_checkpoint_to_cpu: a cfg that holds objects
        state["cfg"] = OmegaConf.create(state["cfg"], flags={"allow_objects": True})
    elif isinstance(old_args, argparse.Namespace):
        map_original_args(old_args, path)
        if "optimizer_history" not in state and "optimizer" not in state:
            # stripped to args and weights: the training state fairseq's upgrade reads, empty
            state["optimizer_history"] = [{"criterion_name": "", "optimizer_name": "", "lr_scheduler_state": {},
                                           "num_updates": 0}]
        state.setdefault("extra_state", {"train_iterator": None})
    try:
        state = checkpoint_utils._upgrade_state_dict(state)
    except (HydraException, OmegaConfBaseException, KeyError, ValueError, TypeError, AttributeError, SyntaxError) as e:
        cause = (str(e).strip().splitlines() or [""])[0]
        fail(
            f"--path {path}: fairseq 0.12 cannot convert its args ({type(e).__name__}: {cause}); the arg named there "
            "needs a rule in trime.adapters.fairseq_lm.ORIGINAL_ARGS"
        )
    if old_args is not None and state.get("cfg") is not None:
        # fairseq's model loader prefers args to cfg and would convert them again, without our data-bin
        state["args"] = None
    return state


def map_original_args(args: argparse.Namespace, path: Path) -> None:
    """Rewrite a fairseq < 0.10 checkpoint's args in place by :data:`ORIGINAL_ARGS`.

    Keys other than the last FFN's input (``--knn-keytype``) are refused in one line; a criterion that fairseq
    0.12 does not register is dropped; an arch it does not register is refused in one line.
    """
    from fairseq.criterions import CRITERION_REGISTRY
    from fairseq.models import ARCH_MODEL_REGISTRY

    keytype = getattr(args, "knn_keytype", None)
    if keytype not in (None, "last_ffn_input"):
        fail(
            f"--path {path} was trained with --knn-keytype {keytype}; trime's keys of a fairseq model are the last "
            "FFN's input (last_ffn_input), so its memory would not be the one it was trained with"
        )
    for rule in ORIGINAL_ARGS:
        for name in rule.names:
            value = getattr(args, name, ABSENT)
            if (value not in rule.when) if rule.when else value is ABSENT:
                continue
            if rule.new is DROP:
                delattr(args, name)
            else:
                setattr(args, name, rule.new)
    if getattr(args, "criterion", None) not in CRITERION_REGISTRY:
        args.__dict__.pop("criterion", None)
    arch = getattr(args, "arch", None)
    if arch not in ARCH_MODEL_REGISTRY:
        fail(
            f"--path {path} is a model of arch {arch!r}, which neither fairseq 0.12 nor trime registers (is "
            "TRIME_NO_AUTOLOAD set?); add a rule for it to trime.adapters.fairseq_lm.ORIGINAL_ARGS"
        )


def _refused_globals(path: Path, error: pickle.UnpicklingError) -> list[str]:
    """The globals weights-only unpickling refuses in ``path``: torch's own list for a zip checkpoint, else the
    one ``error`` names."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except CHECKPOINT_READ_ERRORS:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        return [found.group(1)] if found else []


def _unreadable(path: Path, error: BaseException) -> NoReturn:
    """The one-line error of a file that is not a readable checkpoint, with the cause in one line."""
    text = str(error)
    if "WeightsUnpickler error:" in text:  # torch's weights-only unpickler: its own reason, after its advice
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    cause = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    fail(f"--path {path} could not be read as a fairseq checkpoint ({cause}); re-download or re-train it")


def _check_training_dictionary(cfg, data_dir: Path, dict_sha: str) -> None:
    """Fail if the checkpoint's training data-bin is present and has another dict.txt."""
    trained_on = str(getattr(cfg.task, "data", "") or "").split(os.pathsep)[0]
    if not trained_on:
        return
    trained_dict = Path(trained_on) / "dict.txt"
    same_file = trained_dict.is_file() and trained_dict.resolve() == (data_dir / "dict.txt").resolve()
    if trained_dict.is_file() and not same_file and sha256_file(trained_dict) != dict_sha:
        fail(
            f"{data_dir / 'dict.txt'} differs from the dictionary the checkpoint was trained with "
            f"({trained_dict}); binarize the data with that dictionary "
            f"(fairseq-preprocess --only-source --srcdict {trained_dict})"
        )


def _read_dict_lines(data_dir: Path) -> list[str]:
    with open(data_dir / "dict.txt", encoding="utf-8", errors="replace") as f:
        return f.readlines()


class FairseqDecoder(IncrementalDecoder):
    """Incremental decoding of a fairseq LM with its ``incremental_state``, as fairseq's SequenceGenerator runs
    it: one position per decoder call (fairseq attends from the last input token only when it has a state)."""

    def __init__(self, lm: FairseqLM) -> None:
        self.lm = lm
        self.state: dict = {}
        self.tokens: torch.Tensor | None = None  # (B, t): fairseq takes the whole input, for the positions

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor) -> DecoderStep:
        model = self.lm.model
        tokens = tokens.to(self.lm.device)
        reps = []
        for column in tokens.split(1, dim=1):
            self.tokens = column if self.tokens is None else torch.cat([self.tokens, column], dim=1)
            with KeyCapture.fairseq(model) as capture:
                features, _ = model.decoder(self.tokens, incremental_state=self.state, features_only=True)
            reps.append(capture.keys((tokens.shape[0], 1)).detach())
        scores, logz = self.lm.vocab_terms(features[:, -1])
        return DecoderStep(reps=torch.cat(reps, dim=1), token_scores=scores, token_logz=logz)

    def reorder(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.lm.device)
        self.lm.model.decoder.reorder_incremental_state_scripting(self.state, rows)
        self.tokens = self.tokens.index_select(0, rows)
