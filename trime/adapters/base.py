"""The model-adapter interface that datastore building, evaluation memories and tuning talk to.

An adapter is a causal LM loaded for scoring (:class:`ModelAdapter`). It cuts a split
into scoring windows (:class:`SplitWindows`) and runs the forward pass of one batch of
windows, returning a :class:`WindowBatch`: the token head's terms of every scored
position (log Z_t p(y) and log Z_t, in fp32) and the TRIME keys (the last layer's FFN
input) of every position. Everything above the adapter (memories, FAISS, tuning, the
CLIs) sees only these types, so one code path serves fairseq and Hugging Face models.

Windows: ``tokens_per_sample`` tokens per window of which up to ``context_window`` are
earlier tokens (context); only the new tokens are scored. Context positions are memory
keys labelled with their true next tokens. Batches are fixed runs of ``batch_size``
consecutive windows, so a window's numbers do not depend on where a run or a datastore
shard starts (``first_batch``/``end_batch``). Defaults (:func:`default_window_settings`): the
window the model was trained with, else its positions up to DEFAULT_WINDOW (a CPU-sane 1,024),
and half of it as context, so that windows overlap as in the papers' evaluations (their
WikiText-103 runs keep 2,560 of 3,072 tokens as context; half costs two forward passes per
scored token instead of six).
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from trime.errors import fail

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Largest (rows x vocabulary) block of fp32 token logits held at once.
TOKEN_LOGIT_BUDGET = 1 << 26
DEFAULT_MAX_TOKENS = 8192
# the default window of a model whose training window is unknown: its positions, at most this many tokens
DEFAULT_WINDOW = 1024


@dataclass
class WindowSettings:
    """``tokens_per_sample`` = context + new tokens of a full window (as in fairseq-eval-lm)."""

    tokens_per_sample: int
    context_window: int

    @property
    def new_tokens(self) -> int:
        return self.tokens_per_sample - self.context_window

    def as_dict(self) -> dict:
        return {
            "tokens_per_sample": self.tokens_per_sample,
            "context_window": self.context_window,
            "new_tokens_per_window": self.new_tokens,
        }

    def describe(self) -> str:
        """``windows of T tokens, C of them context (N new)``."""
        return (f"windows of {self.tokens_per_sample:,} tokens, {self.context_window:,} of them context "
                f"({self.new_tokens:,} new)")


@dataclass
class WindowBatch:
    """One forward pass over a batch of windows (everything detached).

    Positions are (B, T); *scored* positions are the new tokens (from ``starts[b]`` on,
    with a target), flattened row-major into N query rows.
    """

    ids: list[int]  # window ids (consecutive ids = consecutive windows of the split)
    reps: Tensor  # (B, T, d) last-FFN inputs of every position, model dtype
    key_labels: Tensor  # (B, T) next-token label of every position (any value where none)
    key_valid: Tensor  # (B, T) position has a real token and a label
    scored: Tensor  # (B, T) position is scored
    starts: list[int]  # first scored position of each window
    targets: Tensor  # (N,) targets of the scored positions
    token_score: Tensor  # (N,) fp32 log(Z_t p_tok(y))
    token_logz: Tensor  # (N,) fp32 log Z_t

    @property
    def queries(self) -> Tensor:
        return self.reps[self.scored]

    @property
    def num_scored(self) -> int:
        return int(self.targets.numel())

    def scored_per_window(self) -> list[int]:
        return self.scored.sum(dim=1).tolist()

    def to(self, device: torch.device) -> "WindowBatch":
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return WindowBatch(**moved)


class SplitWindows(ABC):
    """A split cut into scoring windows; batches are runs of consecutive windows."""

    settings: WindowSettings

    @abstractmethod
    def __len__(self) -> int:
        """Number of windows."""

    @abstractmethod
    def scored_counts(self) -> np.ndarray:
        """(windows,) int64: tokens scored by each window (datastore rows per window)."""

    @abstractmethod
    def batches(self, batch_size: int, first_batch: int = 0, end_batch: int | None = None) -> Iterator[object]:
        """Model inputs of batches ``first_batch .. end_batch-1``, in order, for :meth:`ModelAdapter.forward`.

        Starting mid-split gives exactly the batches of a run from the start.
        """

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)


class ModelAdapter(ABC):
    """A causal LM ready for scoring, plus what identifies it for mismatch checks.

    Attributes set by every implementation:
        frontend: ``"fairseq"`` or ``"hf"``.
        path: the checkpoint file or model directory; data_dir: the data it scores.
        device, dtype: where and in which precision the weights live.
        dim: size of the TRIME keys.
        identity: file identity of the weights (:func:`trime.io_utils.file_identity` style;
            :func:`trime.io_utils.identity_key` compares two).
        vocab: ``{"sha256", "size"}`` of the vocabulary (fairseq ``dict.txt`` or HF tokenizer);
            a datastore's values are ids in it.
        architecture: model type/arch name; key_source: the module whose input are the keys.
            A datastore from another architecture or key source is refused.
    """

    frontend: str
    path: Path
    data_dir: Path
    device: torch.device
    dtype: torch.dtype
    dim: int
    identity: dict
    vocab: dict
    architecture: str
    key_source: str

    @property
    def dict_sha256(self) -> str:
        """sha256 of the vocabulary (what a datastore's ``dictionary.sha256`` must equal)."""
        return self.vocab["sha256"]

    @abstractmethod
    def window_settings(self, context_window: int | None, tokens_per_sample: int | None) -> WindowSettings:
        """Resolve ``--context-window``/``--tokens-per-sample`` (None: :func:`default_window_settings`) and check them."""

    @abstractmethod
    def windows(self, split: str, settings: WindowSettings) -> SplitWindows:
        """The split ``split`` of :attr:`data_dir` as scoring windows."""

    @abstractmethod
    def forward(self, batch: object, need_token_terms: bool = True) -> WindowBatch:
        """Run the model on one batch from :meth:`SplitWindows.batches` (no gradients)."""


def pick_device(cpu: bool) -> torch.device:
    """cuda:0 when a GPU is present and ``--cpu`` is not given, else the CPU."""
    if not cpu and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def default_window_settings(
    context_window: int | None, tokens_per_sample: int | None, trained_window: int | None, max_positions: int | None
) -> tuple[int, int]:
    """(context_window, tokens_per_sample) with each None replaced by its default.

    ``tokens_per_sample``: the window the model was trained with (``trained_window``), else its
    positions (``max_positions``) up to DEFAULT_WINDOW. ``context_window``: half the window.
    """
    tps = tokens_per_sample
    if tps is None:
        tps = trained_window if trained_window is not None else min(max_positions or DEFAULT_WINDOW, DEFAULT_WINDOW)
    return (tps // 2 if context_window is None else context_window), int(tps)


def window_defaults_note(settings: WindowSettings, context_window: int | None, tokens_per_sample: int | None) -> str | None:
    """The windows and the flags they took defaults for (None when ``--context-window`` and
    ``--tokens-per-sample`` were both given): what the tools print."""
    defaults = [flag for flag, value in (("--tokens-per-sample", tokens_per_sample),
                                         ("--context-window", context_window)) if value is None]
    return f"{settings.describe()} (default {' and '.join(defaults)})" if defaults else None


def check_window_settings(
    context_window: int, tokens_per_sample: int, max_positions: int | None, longest_window: int | None = None
) -> WindowSettings:
    """One-line errors for windows that cannot work; ``longest_window`` defaults to ``tokens_per_sample``."""
    tps = tokens_per_sample
    if context_window < 0:
        fail(f"--context-window must be >= 0, got {context_window}")
    if tps - context_window < 1:
        fail(
            f"--context-window {context_window} leaves no new tokens in a window of {tps} "
            f"(--tokens-per-sample); use a context window below {tps}"
        )
    longest = tps if longest_window is None else longest_window
    if max_positions is not None and longest > max_positions:
        fail(f"--tokens-per-sample {tps} exceeds the model's {max_positions} positions; use at most {max_positions}")
    return WindowSettings(tokens_per_sample=tps, context_window=context_window)


def batch_size_for(settings: WindowSettings, batch_size: int | None, max_tokens: int | None) -> int:
    """Windows per batch: ``--batch-size``, else ``--max-tokens`` // window length (at least 1)."""
    if batch_size is not None:
        if batch_size < 1:
            fail(f"--batch-size must be >= 1, got {batch_size}")
        return batch_size
    if max_tokens is not None and max_tokens < 1:
        fail(f"--max-tokens must be >= 1, got {max_tokens}")
    return max(1, (max_tokens or DEFAULT_MAX_TOKENS) // settings.tokens_per_sample)


def token_terms_in_blocks(head, features: Tensor, targets: Tensor, vocab_size: int) -> tuple[Tensor, Tensor]:
    """(log Z_t p(y), log Z_t) in fp32 for feature rows, in blocks that bound the logits' memory.

    ``head(features, targets)`` returns the two terms of one block.
    """
    rows = max(1, TOKEN_LOGIT_BUDGET // max(1, vocab_size))
    scores, logzs = [], []
    for lo in range(0, features.shape[0], rows):
        score, logz = head(features[lo : lo + rows], targets[lo : lo + rows])
        scores.append(score.float())
        logzs.append(logz.float())
    if not scores:
        empty = features.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(scores), torch.cat(logzs)
