"""Memory at evaluation time: local, long-term (FIFO cache) and external (kNN), plus kNN-LM mixing.

For a scored token i with target y the joint probability is (reference section 3.3-3.5)

    P(y) = (Z_t p_tok(y) + sum_{j in M(i), y_j = y} e^{s_ij}) / (Z_t + sum_{j in M(i)} e^{s_ij})

with s_ij = h_i . h_j / sqrt(d) / T for local and long-term keys, and FAISS score / sqrt(d) / T_ext
for external neighbours (T = ``--softmax-temp``, T_ext = ``--external-temp``, by default T; token
logits are never scaled). The sums
come from :mod:`trime.loss` and memories are combined with ``torch.logaddexp``.

Levels are cumulative:

- ``local``: the window's context tokens (labelled with their true next tokens) and the
  strictly earlier new tokens of the same window.
- ``long``: plus a FIFO of the last ``--mem-size`` *scored* tokens of earlier windows,
  carried across windows and reset when window ids are not consecutive. A context token
  that is also in the FIFO is taken from the FIFO only (its cached key was computed with
  its full context); the original counted such tokens twice.
- ``external``: plus the top-k FAISS neighbours of every scored token, searched and
  scored a chunk of rows at a time (peak memory O(chunk x k), :mod:`trime.knn`).

With ``lmbda > 0`` the result is mixed kNN-LM style,
log P = logaddexp(log(1-lmbda) + log P_joint, log lmbda + log p_knn), where
p_knn(y) = sum_{j: v_j = y} softmax_j(score_j / interp_temp) reuses the same search.

``cache="interp"`` (``--cache interp``) takes the local + long-term memory out of the joint
softmax and interpolates it instead: the continuous cache of Grave et al. (2017),

    p_cache(y) = sum_{j in M(i), y_j = y} softmax_j(h_i . h_j / cache_temp)

over the same entries M(i) (window context and earlier window tokens, and the FIFO), with the
raw dot product divided by ``cache_temp`` = 1/theta, as ``interp_temp`` divides kNN scores. An
empty cache (a stream's first token) predicts as the model. With kNN-LM, both are
interpolated with the model, as in the kNN-LM paper's "kNN-LM + continuous cache" row:

    P = (1 - lmbda - cache_lmbda) P_model + lmbda p_knn + cache_lmbda p_cache.

One function, :func:`memory_log_probs`, turns the token head's terms and the memories'
:class:`LabelTerms` into log P, either at given targets (evaluation: (N,) terms, the memory
sums from :mod:`trime.loss`'s blockwise kernels) or for every token of the vocabulary
(generation: (N, V) terms from :func:`label_logsumexp`, a scatter-logsumexp of each memory's
scores by label, O(N x entries + N x V)). :func:`next_token_log_probs` is that function over
the vocabulary for raw memory entries and neighbours, which is what :mod:`trime.eval.generation`
calls at every step.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from trime.adapters.base import WindowBatch
from trime.errors import fail
from trime.knn import KnnResults, knn_chunk_rows
from trime.loss import (
    Rule,
    Visibility,
    in_batch_memory,
    memory_logsumexp_at_scales,
    memory_scale,
    scored_memory_logsumexp,
)
from trime.memories import MEMORIES

# external-memory hits of a batch: all of them, or a search of rows (start, stop)
KnnSource = KnnResults | Callable[[int, int], KnnResults]
_NEG_INF = float("-inf")
# how the local + long-term memory counts: inside the joint softmax (TRIME), or interpolated (continuous cache)
CACHE_MODES = ("joint", "interp")


@dataclass(frozen=True)
class MemorySettings:
    """What the joint softmax sees and how the result is mixed with kNN-LM."""

    level: str = "none"
    softmax_temp: float = 1.0
    mem_size: int = 0
    knn_in_joint: bool = False  # external neighbours inside the joint softmax (TrimeLM_ext)
    lmbda: float = 0.0  # kNN-LM interpolation weight (0 = off)
    interp_temp: float = 1.0
    k: int | None = None  # use only the first k neighbours of the search results
    external_temp: float | None = None  # temperature of external neighbours in the joint softmax (None: softmax_temp)
    cache: str = "joint"  # one of CACHE_MODES
    cache_lmbda: float = 0.0  # cache "interp": weight of p_cache (0 = off)
    cache_temp: float = 1.0  # cache "interp": p_cache = softmax_j(h . h_j / cache_temp)

    def __post_init__(self) -> None:
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {self.cache!r}")

    @property
    def ext_temp(self) -> float:
        return self.softmax_temp if self.external_temp is None else self.external_temp

    @property
    def interp_cache(self) -> bool:
        """The local + long-term memory is interpolated (continuous cache), not in the joint softmax."""
        return self.cache == "interp"

    @property
    def context_temp(self) -> float:
        """The temperature of the local + long-term memory: ``cache_temp`` when interpolated, else ``softmax_temp``."""
        return self.cache_temp if self.interp_cache else self.softmax_temp

    def with_context_temp(self, temp: float) -> "MemorySettings":
        """These settings with :attr:`context_temp` set to ``temp``."""
        return self.with_(cache_temp=temp) if self.interp_cache else self.with_(softmax_temp=temp)

    def context_scale(self, dim: int) -> float:
        """The factor of the local + long-term memory's dot products: 1/cache_temp, or 1/(sqrt(d) softmax_temp)."""
        return 1.0 / self.cache_temp if self.interp_cache else memory_scale(dim, self.softmax_temp)

    @property
    def uses_context_terms(self) -> bool:
        """Whether scoring needs the local + long-term memory terms (an interpolated cache of weight 0 does not)."""
        return self.uses_local and not (self.interp_cache and self.cache_lmbda <= 0)

    @property
    def uses_local(self) -> bool:
        return self.level in MEMORIES[MEMORIES.index("local") :]  # levels are cumulative

    @property
    def uses_long(self) -> bool:
        return self.level in MEMORIES[MEMORIES.index("long") :] and self.mem_size > 0

    def context_key(self) -> tuple:
        """What the local and long-term memory terms depend on (not the external memory's settings)."""
        return (self.uses_local, self.mem_size if self.uses_long else 0, self.cache,
                self.context_temp if self.uses_local else 0)

    def with_(self, **changes) -> "MemorySettings":
        return replace(self, **changes)


@dataclass
class LongMemory:
    """FIFO of the last ``capacity`` scored tokens: detached keys, labels, stream positions.

    Entries are kept oldest first. :meth:`check_id` empties the cache when a window id
    does not follow the previous one (the stream is broken, so the cache is stale).
    """

    capacity: int
    keys: Tensor | None = None
    labels: Tensor | None = None
    positions: Tensor | None = None
    last_id: int | None = None
    resets: int = field(default=0)

    def __len__(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[0])

    def clear(self) -> None:
        self.keys = self.labels = self.positions = None

    def check_id(self, window_id: int) -> bool:
        """Record the next window id; reset (and return True) if it is not last_id + 1."""
        broken = self.last_id is not None and window_id != self.last_id + 1
        if broken:
            self.clear()
            self.resets += 1
        self.last_id = window_id
        return broken

    def keep(self, keys: Tensor, labels: Tensor, positions: Tensor, start: int = 0) -> None:
        """Become the last ``capacity`` entries of ``keys[start:]`` (oldest first, detached)."""
        lo = max(start, keys.shape[0] - self.capacity)
        if lo >= keys.shape[0]:
            self.clear()
            return
        self.keys, self.labels, self.positions = keys[lo:].detach(), labels[lo:], positions[lo:]


@dataclass
class ScoreState:
    """State carried between batches: the FIFO and the stream position counter."""

    long: LongMemory | None = None
    next_position: int = 0

    @classmethod
    def fresh(cls, settings: MemorySettings) -> "ScoreState":
        return cls(long=LongMemory(settings.mem_size) if settings.uses_long else None)


@dataclass(frozen=True)
class LabelTerms:
    """One memory's log-sum-exp terms per query row: over all its entries, and over the entries of each label.

    ``lse_all`` is (N,); ``lse_label`` is (N,) at each row's target (evaluation) or (N, V) for every token
    of the vocabulary (generation). Both are fp32 and -inf where the set is empty.
    """

    lse_all: Tensor
    lse_label: Tensor

    def union(self, other: "LabelTerms") -> "LabelTerms":
        """The terms of both memories' entries together."""
        return LabelTerms(torch.logaddexp(self.lse_all, other.lse_all), torch.logaddexp(self.lse_label, other.lse_label))

    def log_share(self) -> Tensor:
        """log sum_{j: y_j = y} softmax_j(score_j): the memory's own distribution (p_knn, p_cache)."""
        return self.lse_label - _per_row(self.lse_all, self.lse_label)

    @staticmethod
    def cat(parts: Sequence["LabelTerms"]) -> "LabelTerms | None":
        """The rows of several chunks' terms, in order (None for no chunks)."""
        if not parts:
            return None
        return LabelTerms(torch.cat([t.lse_all for t in parts]), torch.cat([t.lse_label for t in parts]))


def _per_row(values: Tensor, like: Tensor) -> Tensor:
    """(N,) ``values`` broadcast against ``like``: as they are for (N,) terms, as a column for (N, V) ones."""
    return values[:, None] if like.dim() == 2 else values


def label_logsumexp(
    scores: Tensor, labels: Tensor, valid: Tensor | None = None, *, targets: Tensor | None = None,
    vocab_size: int | None = None,
) -> LabelTerms:
    """The :class:`LabelTerms` of (N, M) already-scaled memory scores with labels: at ``targets`` (N,), or,
    with ``vocab_size``, for every label (a scatter-logsumexp: per-label maxima, then sums of exponentials;
    memory O(N x M + N x V)). ``valid`` (N, M) marks real entries (e.g. FAISS's -1 padding is not)."""
    if (targets is None) == (vocab_size is None):
        raise ValueError("label_logsumexp needs exactly one of targets and vocab_size")
    if targets is not None:
        return LabelTerms(*scored_memory_logsumexp(scores, labels, targets, valid))
    scores = scores.float()
    masked = scores if valid is None else scores.masked_fill(~valid, _NEG_INF)
    index = labels if valid is None else labels.masked_fill(~valid, 0)
    lse_all = torch.logsumexp(masked, dim=-1) if masked.shape[-1] else masked.new_full(masked.shape[:1], _NEG_INF)
    empty = masked.new_full((masked.shape[0], vocab_size), _NEG_INF)
    label_max = empty.scatter_reduce(1, index, masked, reduce="amax", include_self=True)
    shift = torch.where(torch.isfinite(label_max), label_max, 0.0)
    sums = torch.zeros_like(shift).scatter_add_(1, index, (masked - shift.gather(1, index)).exp())
    return LabelTerms(lse_all, sums.log() + shift)


def memory_log_probs(
    token_score: Tensor,
    token_logz: Tensor,
    joint: LabelTerms | None = None,
    knn: LabelTerms | None = None,
    cache: LabelTerms | None = None,
    lmbda: float = 0.0,
    cache_lmbda: float = 0.0,
    token_share: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The memory-augmented log P of every query row, at its target or over the vocabulary (fp32).

    ``token_score`` is log(Z_t p_tok(y)) at the targets (N,) or for every token (N, V), ``token_logz``
    log Z_t (N,); the memories' :class:`LabelTerms` have the same layout. ``joint``: every memory inside
    the joint softmax (local, long-term, the datastore's neighbours), P_joint = (Z_t p_tok + sum of the
    label's e^s) / (Z_t + sum of all e^s). ``knn`` (p_knn's terms, weight ``lmbda``) and ``cache`` (the
    continuous cache's, weight ``cache_lmbda``; an empty cache predicts P_joint) are interpolated:
    P = (1 - lmbda - cache_lmbda) P_joint + lmbda p_knn + cache_lmbda p_cache (:func:`mixture`).

    With ``token_share``, returns (log P, log of the part of P that the token head contributes): P minus
    that part is what came from memory.
    """
    score = token_score.float()
    logz = _per_row(token_logz.float(), score)
    if joint is None:
        numerator, denominator = score, logz
    else:
        numerator = torch.logaddexp(score, joint.lse_label)
        denominator = torch.logaddexp(logz, _per_row(joint.lse_all, score))
    log_joint = numerator - denominator
    parts = []
    if knn is not None and lmbda > 0:
        parts.append((knn.log_share(), lmbda))
    if cache is not None and cache_lmbda > 0:
        parts.append((cache_log_prob(cache.lse_all, cache.lse_label, log_joint), cache_lmbda))
    log_prob = mixture(log_joint, parts)
    if not token_share:
        return log_prob
    total = sum(w for _, w in parts)
    weight = torch.full_like(logz, max(0.0, 1.0 - total))  # the joint softmax's share of the mixture
    if cache is not None and cache_lmbda > 0:  # an empty cache's weight goes to P_joint
        weight = weight + cache_lmbda * (~torch.isfinite(_per_row(cache.lse_all, score))).float()
    return log_prob, weight.log() + score - denominator


@dataclass
class MemoryEntries:
    """The local + long-term memory of N query rows as raw scores: h . h_j (N, M) fp32, labels y_j (N, M) and
    which entries each row sees (N, M). Scaled by :meth:`MemorySettings.context_scale` when scored."""

    scores: Tensor
    labels: Tensor
    valid: Tensor


def next_token_log_probs(
    token_scores: Tensor,
    token_logz: Tensor,
    settings: MemorySettings,
    dim: int,
    context: MemoryEntries | None = None,
    knn: KnnResults | None = None,
) -> tuple[Tensor, Tensor]:
    """(log P, log of the token head's part of P), both (N, V), of the next token of N rows: the token head's
    scores (N, V) and log Z_t (N,), the rows' local + long-term memory entries and their datastore neighbours,
    combined under ``settings`` exactly as :func:`score_with_context_terms` scores a target
    (:func:`memory_log_probs` over the vocabulary)."""
    vocab = token_scores.shape[-1]
    context_terms = None
    if context is not None and settings.uses_context_terms:
        context_terms = label_logsumexp(context.scores * settings.context_scale(dim), context.labels, context.valid,
                                        vocab_size=vocab)
    joint = None if settings.interp_cache else context_terms
    knn_interp = None
    if knn is not None:
        hits = knn.top(settings.k)
        if settings.knn_in_joint:
            terms = label_logsumexp(hits.scores * memory_scale(dim, settings.ext_temp), hits.labels, hits.valid,
                                    vocab_size=vocab)
            joint = terms if joint is None else joint.union(terms)
        if settings.lmbda > 0:
            knn_interp = label_logsumexp(hits.scores / settings.interp_temp, hits.labels, hits.valid, vocab_size=vocab)
    return memory_log_probs(
        token_scores, token_logz, joint, knn=knn_interp, cache=context_terms if settings.interp_cache else None,
        lmbda=settings.lmbda, cache_lmbda=settings.cache_lmbda, token_share=True,
    )  # fmt: skip


def _window_visibility(rule: Rule, query_position: Tensor, key_position: Tensor, key_valid: Tensor | None) -> Visibility:
    """Visibility of one window's queries: a single segment, stream/window positions, optional key mask."""
    return Visibility(
        rule=rule,
        query_segment=torch.zeros_like(query_position),
        query_position=query_position,
        key_segment=torch.zeros_like(key_position),
        key_position=key_position,
        key_valid=key_valid,
    )


def local_memory_terms(batch: WindowBatch, key_valid: Tensor, scales: Sequence[float]) -> tuple[Tensor, Tensor]:
    """(lse_all, lse_pos) over the local memory of every scored row, as (len(scales), N) for each logit scale.

    ``Rule.LOCAL`` with each window as a segment: a scored position sees the strictly
    earlier valid positions of its own window (context and new tokens). Every position
    is a key and the scored ones are the queries (a scored position's label is its
    target), so :mod:`trime.loss`'s in-batch path scores whole windows per block.
    """
    memory = in_batch_memory(batch.reps, batch.key_labels, key_valid, Rule.LOCAL, query_valid=batch.scored)
    lse_all, lse_pos = memory.logsumexp_at_scales(scales)
    scored = batch.scored.reshape(-1)
    return lse_all[:, scored], lse_pos[:, scored]


def _window_offsets(batch: WindowBatch) -> list[int]:
    offsets = [0]
    for count in batch.scored_per_window():
        offsets.append(offsets[-1] + count)
    return offsets


def long_memory_terms(
    batch: WindowBatch, queries: Tensor, offsets: list[int], state: ScoreState, scales: Sequence[float],
    key_valid: Tensor,
) -> tuple[Tensor, Tensor]:
    """(lse_all, lse_pos) over the FIFO for every scored row, as (len(scales), N); updates the FIFO and
    ``key_valid``.

    The FIFO as window b sees it is a contiguous slice [lo_b, hi_b) of the buffer
    ``cache + this batch's scored tokens`` (the last ``capacity`` entries before the
    window, none from before a reset). Each window's rows see their slice by
    ``Rule.LONG`` on stream positions (every entry is earlier than the window). Buffer
    entries from the last reset on have consecutive stream positions, so entry i sits
    at position ``first - cached + i``; context positions of window b at or after its
    slice's first position are switched off in ``key_valid`` (they are counted once).
    """
    mem = state.long
    device = queries.device
    n = queries.shape[0]
    cached = len(mem)
    first = state.next_position  # stream position of this batch's first scored token
    if cached:
        buf_keys = torch.cat([mem.keys, queries.to(mem.keys.dtype)])
        buf_labels = torch.cat([mem.labels, batch.targets])
    else:
        buf_keys, buf_labels = queries, batch.targets
    buf_pos = torch.arange(first - cached, first + n, device=device)
    # per window: the visible slice of the buffer, and the first context position it holds
    floor = 0  # buffer entries before a reset are invisible
    slices, thresholds = [], []
    for b, window_id in enumerate(batch.ids):
        if mem.check_id(window_id):
            floor = cached + offsets[b]
        hi = cached + offsets[b]
        lo = max(floor, hi - mem.capacity)
        slices.append((lo, hi))
        thresholds.append(first - cached + lo if hi > lo else math.inf)
    length = batch.scored.shape[1]
    window_first = first + torch.tensor(offsets[:-1], device=device)
    starts = torch.tensor(batch.starts, device=device)
    positions = (window_first - starts)[:, None] + torch.arange(length, device=device)[None, :]
    limit = torch.tensor([float(t) for t in thresholds], device=device, dtype=torch.float64)
    in_fifo = (torch.arange(length, device=device)[None, :] < starts[:, None]) & (positions >= limit[:, None])
    key_valid &= ~in_fifo

    lse_all = torch.full((len(scales), n), _NEG_INF, device=device)
    lse_pos = torch.full((len(scales), n), _NEG_INF, device=device)
    for b, (lo, hi) in enumerate(slices):
        r0, r1 = offsets[b], offsets[b + 1]
        if hi <= lo or r1 <= r0:
            continue
        visibility = _window_visibility(Rule.LONG, buf_pos[cached + r0 : cached + r1], buf_pos[lo:hi], None)
        lse_all[:, r0:r1], lse_pos[:, r0:r1] = memory_logsumexp_at_scales(
            queries[r0:r1], buf_keys[lo:hi], buf_labels[lo:hi], batch.targets[r0:r1], visibility, scales
        )
    # the FIFO after this batch: the last `capacity` entries since the last reset
    mem.keep(buf_keys, buf_labels, buf_pos, start=floor)
    state.next_position = first + n
    return lse_all, lse_pos


def context_memory_terms(
    batch: WindowBatch, settings: MemorySettings, state: ScoreState, dim: int | None = None
) -> tuple[Tensor, Tensor]:
    """(lse_all, lse_pos) of every scored row over its local and long-term memory; updates ``state``.

    They depend only on :meth:`MemorySettings.context_key`, not on the external memory's settings.
    """
    lse_all, lse_pos = context_memory_terms_at_temps(batch, settings, [settings.context_temp], state, dim)
    return lse_all[0], lse_pos[0]


def context_memory_terms_at_temps(
    batch: WindowBatch, settings: MemorySettings, temps: Sequence[float], state: ScoreState, dim: int | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`context_memory_terms` at each temperature of ``temps`` (instead of ``settings``'
    :attr:`~MemorySettings.context_temp`: the softmax or the cache temperature), as (len(temps), N): the
    memory scores are computed once for all of them. Updates ``state`` once."""
    dim = dim or batch.reps.shape[-1]
    scales = [settings.with_context_temp(t).context_scale(dim) for t in temps]
    n = batch.num_scored
    device = batch.targets.device
    lse_all = torch.full((len(scales), n), _NEG_INF, device=device)
    lse_pos = torch.full((len(scales), n), _NEG_INF, device=device)
    key_valid = batch.key_valid.clone()
    if settings.uses_long:
        lse_all, lse_pos = long_memory_terms(batch, batch.queries, _window_offsets(batch), state, scales, key_valid)
    else:
        state.next_position += n
    if settings.uses_local and n > 0:
        a, p = local_memory_terms(batch, key_valid, scales)
        lse_all, lse_pos = torch.logaddexp(lse_all, a), torch.logaddexp(lse_pos, p)
    return lse_all, lse_pos


def score_with_context_terms(
    batch: WindowBatch,
    settings: MemorySettings,
    context_terms: tuple[Tensor, Tensor] | None,
    knn: "KnnSource | None" = None,
    dim: int | None = None,
) -> Tensor:
    """Per-token log P(target) of one batch from its :func:`context_memory_terms` (None: no local or long-term
    memory), the external memory, the continuous cache and the kNN-LM mixture (:func:`memory_log_probs`)."""
    dim = dim or batch.reps.shape[-1]
    context = LabelTerms(*context_terms) if context_terms is not None else None
    joint = None if settings.interp_cache else context  # interpolated: the cache is not in the joint softmax
    knn_joint = knn_interp = None
    if knn is not None and (settings.knn_in_joint or settings.lmbda > 0) and batch.num_scored > 0:
        knn_joint, knn_interp = knn_row_terms(knn, batch.targets, settings, memory_scale(dim, settings.ext_temp))
    if knn_joint is not None:
        joint = knn_joint if joint is None else joint.union(knn_joint)
    return memory_log_probs(
        batch.token_score, batch.token_logz, joint, knn=knn_interp,
        cache=context if settings.interp_cache else None, lmbda=settings.lmbda, cache_lmbda=settings.cache_lmbda,
    )  # fmt: skip


def score_batch(
    batch: WindowBatch,
    settings: MemorySettings,
    state: ScoreState,
    knn: "KnnSource | None" = None,
    dim: int | None = None,
) -> Tensor:
    """Per-token log P(target) (fp32, N scored rows) of one batch; updates ``state``.

    ``knn``: the batch's external-memory hits, or a function searching rows ``(start, stop)``
    (evaluated in chunks, see :func:`knn_row_terms`).
    """
    terms = context_memory_terms(batch, settings, state, dim) if settings.uses_context_terms else None
    return score_with_context_terms(batch, settings, terms, knn, dim)


def knn_row_terms(
    knn: "KnnSource", targets: Tensor, settings: MemorySettings, scale: float
) -> tuple["LabelTerms | None", "LabelTerms | None"]:
    """Per scored row: the :class:`LabelTerms` of its neighbours in the joint softmax (scores x ``scale``; None
    unless ``settings.knn_in_joint``) and of p_knn (scores / ``interp_temp``; None unless ``settings.lmbda > 0``).

    ``knn`` is the search results of all rows, or a function ``(start, stop) -> KnnResults``
    that searches rows ``start:stop``. Rows are taken :func:`trime.knn.knn_chunk_rows` at a
    time, so no more than about ``KNN_CHUNK_HITS`` hits are held at once.
    """
    n = targets.shape[0]
    if isinstance(knn, KnnResults):
        k = min(settings.k or knn.scores.shape[1], knn.scores.shape[1])
    elif settings.k is None:
        raise ValueError("searching the external memory in chunks needs settings.k")
    else:
        k = settings.k
    step = knn_chunk_rows(k)
    joint: list[LabelTerms] = []
    interp: list[LabelTerms] = []
    for start in range(0, n, step):
        stop = min(n, start + step)
        hits = (knn.rows(start, stop) if isinstance(knn, KnnResults) else knn(start, stop)).top(settings.k)
        rows_targets = targets[start:stop]
        if settings.knn_in_joint:
            joint.append(label_logsumexp(hits.scores * scale, hits.labels, hits.valid, targets=rows_targets))
        if settings.lmbda > 0:
            interp.append(label_logsumexp(hits.scores / settings.interp_temp, hits.labels, hits.valid,
                                          targets=rows_targets))
    return LabelTerms.cat(joint), LabelTerms.cat(interp)


def knn_log_prob(knn: KnnResults, targets: Tensor, interp_temp: float) -> Tensor:
    """log p_knn(target) = log sum_{j: v_j = y} softmax_j(score_j / interp_temp); -inf if no hit has y."""
    return label_logsumexp(knn.scores / interp_temp, knn.labels, knn.valid, targets=targets).log_share()


def require_finite(log_probs: Tensor, settings: MemorySettings) -> None:
    """Refuse NaN or inf log-probs (one reduction). Called on scores of finite model outputs and neighbours,
    so what overflowed is a memory score: a temperature too small for the keys' dot products."""
    if bool(torch.isfinite(log_probs).all()):
        return
    temps = [f"--cache-temp {settings.cache_temp:g}" if settings.interp_cache else f"--softmax-temp {settings.softmax_temp:g}"]
    if settings.knn_in_joint:
        temps.append(f"--external-temp {settings.ext_temp:g}")
    if settings.lmbda > 0:
        temps.append(f"--interp-temp {settings.interp_temp:g}")
    fail(f"the memory scores overflow to NaN or inf with {', '.join(temps)}; use a larger temperature")


def cache_log_prob(lse_all: Tensor, lse_pos: Tensor, log_p_model: Tensor) -> Tensor:
    """log p_cache from the cache's (lse_all (N,), lse_pos (N,) at the targets or (N, V) for every token);
    rows with an empty cache get ``log_p_model`` (the shape of ``lse_pos``)."""
    lse_all = _per_row(lse_all, lse_pos)
    has_cache = torch.isfinite(lse_all)
    return torch.where(has_cache, lse_pos - torch.where(has_cache, lse_all, 0.0), log_p_model)


def mixture(log_p_model: Tensor, parts: Sequence[tuple[Tensor, float]]) -> Tensor:
    """log((1 - sum w) P_model + sum_i w_i p_i) for ``parts`` = [(log p_i, w_i), ...], in fp32.

    Weights of 0 are left out; the model's share is dropped when the weights sum to 1 or more.
    """
    parts = [(log_p, float(w)) for log_p, w in parts if w > 0]
    if not parts:
        return log_p_model
    total = sum(w for _, w in parts)
    terms = [log_p_model + math.log1p(-total)] if total < 1 else []
    terms += [log_p + math.log(w) for log_p, w in parts]
    return terms[0] if len(terms) == 1 else torch.logsumexp(torch.stack(terms), dim=0)


def interpolate(log_p_model: Tensor, log_p_knn: Tensor, lmbda: float) -> Tensor:
    """log((1 - lmbda) P_model + lmbda p_knn), in fp32 (:func:`mixture` of one part)."""
    return mixture(log_p_model, [(log_p_knn, lmbda)])
