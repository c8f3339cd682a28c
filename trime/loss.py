"""TRIME's joint vocabulary + memory negative log-likelihood, in pure torch.

For query token i with target y_i, memory keys h_j carrying labels y_j (the token
that followed position j) and the set V(i) of keys visible to i, the loss is

    -log [ (Z_t p_tok(y_i) + sum_{j in V(i), y_j = y_i} exp(s_ij))
           / (Z_t           + sum_{j in V(i)}             exp(s_ij)) ]

with s_ij = h_i . h_j * scale (scale = 1/sqrt(d), divided further by a temperature at
evaluation). Z_t is the token head's partition function: the full vocabulary for a
plain softmax, the head cluster for an adaptive softmax (as the original code does),
and Z_t p_tok(y) is the head's unnormalised score of y.

The memory sums are computed over tiles of query rows by a custom autograd function
that recomputes the scores in backward, so no N x M matrix is held: extra memory is
O(tile rows x M). Empty sets give exactly -inf (no -10000 constants), so a query with
no visible memory gets exactly the plain cross-entropy. Accumulation is always fp32,
whatever the input dtype.

Cost (N in-batch tokens): the long memory computes only the scores of earlier keys,
in tiles of at most 256 rows (unused scores: rows/N of the work); the in-batch
external memory computes each pair of segments once and uses the tile for both sides,
rows and columns, in forward and backward (s_ij = s_ji when the queries are the
keys). The exp/mask/scale passes of a tile are one function each (``_rows_lse``,
``_rows_grad_``, ...) that ``torch.compile`` fuses into single loops reading the
scores once or twice, with an eager fallback (:func:`set_compile`). Score tiles live
in one reused workspace per call, so no pass allocates (and page-faults) a new tile.

A loss that is a plain sum (or mean) over rows of one memory's nll should call
:func:`memory_joint_nll`: where a tile holds all the keys of its rows (local and long
memories, and every call off the in-batch external path), its forward turns each score
tile into its gradient while it is resident (3 matrix products a tile in all instead of
4, one fused elementwise kernel instead of two), and its backward only scales the
result; a non-uniform upstream gradient takes the recomputing backward.

This module never imports fairseq; ``adaptive_softmax_terms`` only duck-types
fairseq's ``AdaptiveSoftmax`` (``forward(input, target) -> (outputs, new_targets)``).
"""

import enum
import importlib.util
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "Rule",
    "Visibility",
    "memory_logsumexp",
    "memory_joint_nll",
    "MemoryInputs",
    "scored_memory_logsumexp",
    "joint_nll",
    "full_softmax_terms",
    "adaptive_softmax_terms",
    "DEFAULT_BLOCK_SIZE",
    "set_compile",
    "compile_mode",
]

DEFAULT_BLOCK_SIZE = 1024
_NEG_INF = float("-inf")


class Rule(str, enum.Enum):
    """Which memory keys a query may see.

    - ``LOCAL``: strictly earlier tokens of the same segment.
    - ``LONG``: every strictly earlier token (by stream position) of the same group.
    - ``EXTERNAL``: every token of the other segments of the same group, plus
      (if ``external_local``) strictly earlier tokens of the query's own segment.
    """

    LOCAL = "local"
    LONG = "long"
    EXTERNAL = "external"


@dataclass
class Visibility:
    """Per-token metadata from which the visibility of key j to query i is derived.

    ``*_segment`` are segment ids, ``*_position`` stream positions (increasing inside a
    segment; for ``LONG`` also across segments, in stream order), ``*_group`` optional
    group ids (a query never sees another group). ``query_valid``/``key_valid`` mark
    non-padding tokens: padding is never a query's memory, and pad queries see nothing.

    :meth:`for_batch` describes the common in-batch case (keys are the queries of a
    row-major (batch, seq_len) batch); the local memory then scores per segment and the
    external memory reuses each score for both of its tokens. No mask is ever built:
    tiles derive visibility from these vectors.
    """

    rule: Rule
    query_segment: Tensor
    query_position: Tensor
    key_segment: Tensor
    key_position: Tensor
    query_valid: Optional[Tensor] = None
    key_valid: Optional[Tensor] = None
    query_group: Optional[Tensor] = None
    key_group: Optional[Tensor] = None
    external_local: bool = True
    _keys_sorted: bool = field(init=False, default=False, repr=False)
    _batch_shape: Optional[Tuple[int, int]] = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.rule = Rule(self.rule)
        if (self.query_group is None) != (self.key_group is None):
            raise ValueError("query_group and key_group must be given together")
        kp = self.key_position
        self._keys_sorted = bool(kp.numel() < 2 or bool((kp[1:] >= kp[:-1]).all()))

    @classmethod
    def for_batch(
        cls,
        rule: Rule,
        batch_size: int,
        seq_len: int,
        valid: Optional[Tensor] = None,
        external_local: bool = True,
        device: Optional[torch.device] = None,
    ) -> "Visibility":
        """Visibility for an in-batch memory whose keys are the queries themselves.

        Tokens are the row-major flattening of a (batch_size, seq_len) batch; row b is
        segment b and, for ``LONG``, rows are consecutive segments of one stream.
        ``valid`` is an optional (batch_size, seq_len) non-padding mask.
        """
        if valid is not None:
            device = valid.device
        flat = torch.arange(batch_size * seq_len, device=device)
        segment = flat // seq_len
        flat_valid = None if valid is None else valid.reshape(-1)
        vis = cls(
            rule=rule,
            query_segment=segment,
            query_position=flat,
            key_segment=segment,
            key_position=flat,
            query_valid=flat_valid,
            key_valid=flat_valid,
            external_local=external_local,
        )
        vis._batch_shape = (batch_size, seq_len)
        return vis

    @property
    def num_queries(self) -> int:
        return self.query_segment.numel()

    @property
    def num_keys(self) -> int:
        return self.key_segment.numel()

    def key_range(self, start: int, end: int) -> Tuple[int, int]:
        """A column range [lo, hi) that contains every key visible to queries [start, end)."""
        if self.rule is Rule.EXTERNAL or not self._keys_sorted or self.num_keys == 0:
            return 0, self.num_keys
        qpos = self.query_position[start:end]
        hi = int(torch.searchsorted(self.key_position, qpos.max(), right=False))
        lo = 0
        if self.rule is Rule.LOCAL:
            # keys of the earliest segment touched by this block start no earlier than
            # that segment's first key; segments are contiguous in sorted position order
            first_seg = self.query_segment[start:end][torch.argmin(qpos)]
            same = (self.key_segment[:hi] == first_seg).nonzero()
            lo = int(same[0]) if same.numel() else hi
        return lo, max(lo, hi)

    def block_mask(self, start: int, end: int, lo: int, hi: int) -> Tensor:
        """Boolean (end-start, hi-lo) mask: True where key lo+c is visible to query start+r."""
        q_seg = self.query_segment[start:end, None]
        q_pos = self.query_position[start:end, None]
        k_seg = self.key_segment[None, lo:hi]
        k_pos = self.key_position[None, lo:hi]
        earlier = k_pos < q_pos
        if self.rule is Rule.LOCAL:
            mask = (k_seg == q_seg) & earlier
        elif self.rule is Rule.LONG:
            mask = earlier
        else:
            other = k_seg != q_seg
            mask = other | ((k_seg == q_seg) & earlier) if self.external_local else other
        if self.query_group is not None:
            mask &= self.key_group[None, lo:hi] == self.query_group[start:end, None]
        if self.key_valid is not None:
            mask &= self.key_valid[None, lo:hi]
        if self.query_valid is not None:
            mask &= self.query_valid[start:end, None]
        return mask

    def row_blocks(self, block_size: int) -> Iterator[Tuple[int, int]]:
        """Query row ranges; whole segments per block on the in-batch local/external path."""
        step = max(1, block_size)
        if self._batch_shape is not None and self.rule is not Rule.LONG:
            seq_len = self._batch_shape[1]
            step = max(1, block_size // seq_len) * seq_len
        for start in range(0, self.num_queries, step):
            yield start, min(start + step, self.num_queries)


# ---- fused tile kernels ---------------------------------------------------------
#
# Every score tile S (rows = queries, cols = keys) is reduced or turned into its
# gradient by one elementwise "kernel" below. They are plain torch functions; with
# torch.compile (inductor: C++ on CPU, Triton on GPU) each becomes one fused loop
# that never writes an intermediate tile to memory, and eagerly they run as ordinary
# torch ops with the same results up to fp32 round-off.
#
# Visibility inside a tile comes from per-row and per-column vectors, never from a
# materialised mask: ``col_bias`` is 0 for a usable key and -inf for padding; the
# structure of the rule is a (2, 2) table ``rule[same_segment, earlier]`` of 0 / -inf
# indexed by two compares of segment and position ids (ranks, exact in fp32).

_RULE_TABLES = {
    # (same segment & earlier, same & not earlier, other & earlier, other & not earlier)
    "long": (0.0, _NEG_INF, 0.0, _NEG_INF),
    "local": (0.0, _NEG_INF, _NEG_INF, _NEG_INF),
    "external": (0.0, _NEG_INF, 0.0, 0.0),
    "external_no_local": (_NEG_INF, _NEG_INF, 0.0, 0.0),
    "all": (0.0, 0.0, 0.0, 0.0),
}


def _structure_bias(row_seg: Tensor, row_pos: Tensor, col_seg: Tensor, col_pos: Tensor, rule: Tensor) -> Tensor:
    """0 where the rule lets the key be seen, -inf elsewhere (broadcast over the tile)."""
    same = row_seg == col_seg
    earlier = col_pos < row_pos
    return torch.where(same, torch.where(earlier, rule[0], rule[1]), torch.where(earlier, rule[2], rule[3]))


def _lse_pair(x: Tensor, positive: Tensor, dim: int, keepdim: bool = False) -> Tuple[Tensor, Tensor]:
    """(logsumexp of x, logsumexp of x where positive) along ``dim``; -inf for empty sets.

    Each log-sum-exp has its own maximum, so no positive can underflow.
    """
    x_pos = torch.where(positive, x, _NEG_INF)
    top = x.amax(dim, keepdim=True)
    top_pos = x_pos.amax(dim, keepdim=True)
    top = torch.where(top > _NEG_INF, top, 0.0)
    top_pos = torch.where(top_pos > _NEG_INF, top_pos, 0.0)
    lse_all = (x - top).exp().sum(dim, keepdim=True).log() + top
    lse_pos = torch.where(positive, (x - top_pos).exp(), 0.0).sum(dim, keepdim=True).log() + top_pos
    if keepdim:
        return lse_all, lse_pos
    return lse_all.squeeze(dim), lse_pos.squeeze(dim)


def _rows_lse(scores, row_label, col_label, col_bias, row_seg, row_pos, col_seg, col_pos, rule):
    """Per query row: (lse over visible keys, lse over visible positive keys) of one tile."""
    x = scores + col_bias + _structure_bias(row_seg, row_pos, col_seg, col_pos, rule)
    return _lse_pair(x, row_label == col_label, dim=-1)


def _rows_lse_scaled(scores, factors, row_label, col_label, col_bias, row_seg, row_pos, col_seg, col_pos, rule):
    """:func:`_rows_lse` of the tile multiplied by each of ``factors`` (S, 1, 1): (S, rows) results."""
    return _rows_lse(scores * factors, row_label, col_label, col_bias, row_seg, row_pos, col_seg, col_pos, rule)


def _cols_lse(scores, row_label, col_label, row_bias):
    """The same per column, with the tile's rows as the keys (symmetric in-batch scores)."""
    return _lse_pair(scores + row_bias, row_label == col_label, dim=-2)


def _grad_terms(x, positive, lse_all, lse_pos, grad_all, grad_pos):
    """d(g_all lse_all + g_pos lse_pos)/dx; ``lse`` = +inf for empty sets (gives 0)."""
    return (x - lse_all).exp() * grad_all + torch.where(positive, (x - lse_pos).exp() * grad_pos, 0.0)


def _rows_grad_(scores, row_label, col_label, col_bias, row_seg, row_pos, col_seg, col_pos, rule, row_stats):
    """Overwrite a tile's scores with the gradient of its rows' terms (row_stats: lse_all, lse_pos, g_all, g_pos)."""
    x = scores + col_bias + _structure_bias(row_seg, row_pos, col_seg, col_pos, rule)
    scores.copy_(_grad_terms(x, row_label == col_label, *row_stats))


def _symmetric_grad_(scores, row_label, col_label, col_bias, row_bias, row_seg, row_pos, col_seg, col_pos, rule,
                     row_stats, col_stats):
    """Overwrite a symmetric tile's scores with the gradient of its rows' and its columns' terms."""
    positive = row_label == col_label
    x_rows = scores + col_bias + _structure_bias(row_seg, row_pos, col_seg, col_pos, rule)
    grad = _grad_terms(x_rows, positive, *row_stats) + _grad_terms(scores + row_bias, positive, *col_stats)
    scores.copy_(grad)


def _joint_terms(lse_all, lse_pos, score, log_partition, keep):
    """Per row: (nll, d nll/d lse_all, d nll/d lse_pos, d nll/d score, d nll/d log_partition).

    nll = logaddexp(log_partition, lse_all) - logaddexp(score, lse_pos), 0 where not ``keep``;
    each derivative is a softmax weight, exactly 0 for a -inf input (empty memory set).
    """
    num = torch.logaddexp(score, lse_pos)
    den = torch.logaddexp(log_partition, lse_all)
    nll = torch.where(keep, den - num, 0.0)
    w_all = torch.where(keep & (lse_all > _NEG_INF), (lse_all - den).exp(), 0.0)
    w_pos = torch.where(keep & (lse_pos > _NEG_INF), -(lse_pos - num).exp(), 0.0)
    d_score = torch.where(keep & (score > _NEG_INF), -(score - num).exp(), 0.0)
    d_log_partition = torch.where(keep & (log_partition > _NEG_INF), (log_partition - den).exp(), 0.0)
    return nll, w_all, w_pos, d_score, d_log_partition


def _rows_nll_grad_(scores, row_label, col_label, col_bias, row_seg, row_pos, col_seg, col_pos, rule, row_terms):
    """One pass over a tile holding every visible key of its rows: returns the rows' (lse_all, lse_pos)
    (keepdim) and overwrites the scores with d(sum of the rows' joint nll)/d(scores).

    row_terms: (query bias 0/-inf, token score, token log-partition, keep) of the rows, keepdim.
    """
    q_bias, score, log_partition, keep = row_terms
    x = scores + col_bias + _structure_bias(row_seg, row_pos, col_seg, col_pos, rule)
    positive = row_label == col_label
    lse_all, lse_pos = _lse_pair(x, positive, dim=-1, keepdim=True)
    lse_all, lse_pos = lse_all + q_bias, lse_pos + q_bias
    _, w_all, w_pos, _, _ = _joint_terms(lse_all, lse_pos, score, log_partition, keep)
    scores.copy_(_grad_terms(x, positive, _safe(lse_all), _safe(lse_pos), w_all, w_pos))
    return lse_all, lse_pos


# ---- compilation ----------------------------------------------------------------

_log = logging.getLogger(__name__)
_COMPILE_ENV = "TRIME_COMPILE"
# "auto": compile when a call scores at least this many (query, key) pairs: below it
# the compile time cannot pay off, and eager runs are fast anyway ...
_AUTO_MIN_PAIRS = 1 << 22
# ... or once the process's smaller calls have scored this many pairs eagerly: many small
# calls (evaluation scores one window at a time) repay the compile (~10 s) in the work ahead
_AUTO_MIN_TOTAL_PAIRS = 1 << 29
_eager_pairs = 0  # pairs scored eagerly by calls that "auto" left uncompiled
_compile_mode: Optional[str] = None  # None: read $TRIME_COMPILE on first use
_compile_broken: Optional[str] = None  # why compiling failed (then eager for the process)
_compiled: dict = {}


def set_compile(mode: str) -> None:
    """Choose how the memory kernels run: ``"auto"`` (default), ``"always"`` or ``"never"``.

    ``auto`` compiles them with ``torch.compile`` (dynamic shapes, so no recompiles as N
    varies) for calls that score at least 4M (query, key) pairs, and for every call once
    the smaller ones have scored 512M pairs in all (evaluation), when a compiler is
    available (a C++ compiler on CPU, Triton on GPU). Without one, or if compiling
    fails, the eager kernels run and one warning is logged. ``$TRIME_COMPILE`` sets the
    initial mode (``auto``/``always``/``never``, also ``1``/``0``).
    """
    global _compile_mode
    aliases = {"1": "always", "true": "always", "on": "always", "0": "never", "false": "never", "off": "never"}
    mode = aliases.get(str(mode).strip().lower(), str(mode).strip().lower())
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"compile mode must be auto, always or never, got {mode!r} (from ${_COMPILE_ENV}?)")
    _compile_mode = mode


def compile_mode() -> str:
    """The current mode of :func:`set_compile`."""
    if _compile_mode is None:
        set_compile(os.environ.get(_COMPILE_ENV, "auto"))
    return _compile_mode


def _compiler_missing(device: torch.device) -> Optional[str]:
    """Why torch.compile cannot build kernels for ``device`` here, or None (looked up once per device type)."""
    if device.type not in _missing_cache:
        _missing_cache[device.type] = _find_compiler_problem(device)
    return _missing_cache[device.type]


_missing_cache: dict = {}


def _find_compiler_problem(device: torch.device) -> Optional[str]:
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") is not None else "Triton is not installed"
    if device.type != "cpu":
        return f"no compiled kernels for device {device.type}"
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None and shutil.which("c++") is None and shutil.which("clang++") is None:
        return f"no C++ compiler found ({cxx})"
    return None


def _use_compiled(device: torch.device, pairs: int) -> bool:
    global _eager_pairs
    mode = compile_mode()
    if mode == "never" or _compile_broken is not None:
        return False
    if mode == "auto" and pairs < _AUTO_MIN_PAIRS and _eager_pairs < _AUTO_MIN_TOTAL_PAIRS:
        _eager_pairs += pairs
        return False
    missing = _compiler_missing(device)
    if missing is not None:
        _disable_compile(missing)
        return False
    return True


def _disable_compile(why: str) -> None:
    global _compile_broken
    if _compile_broken is None:
        _compile_broken = why
        _log.warning("trime.loss: memory kernels run eagerly (not compiled): %s", why)


class _Kernels:
    """The tile kernels of one :class:`_MemoryLogSumExp` call: compiled or eager."""

    def __init__(self, compiled: bool) -> None:
        self.compiled = compiled

    def __getattr__(self, name: str):
        fn = globals()[name]
        if not self.compiled:
            return fn
        compiled = _compiled.get(name)
        if compiled is None:
            compiled = _compiled[name] = torch.compile(fn, dynamic=True)

        def call(*args):
            if _compile_broken is None:
                try:
                    return compiled(*args)
                except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
                    _disable_compile(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}")
            return fn(*args)

        return call


# ---- blockwise memory log-sum-exp -------------------------------------------------


def _dense_ids(*tensors: Tensor) -> List[Tensor]:
    """Order-preserving ranks of the values of ``tensors`` (jointly), as fp32 (fp64 above 2^24)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    _, ranks = torch.unique(flat, return_inverse=True)
    dtype = torch.float32 if flat.numel() < (1 << 24) else torch.float64
    return list(ranks.to(dtype).split([t.numel() for t in tensors]))


def _bias(valid: Optional[Tensor], n: int, device: torch.device) -> Tensor:
    """0 for usable tokens, -inf for padding."""
    if valid is None:
        return torch.zeros(n, device=device)
    return torch.where(valid, 0.0, _NEG_INF).to(device=device, dtype=torch.float32)


def _safe(lse: Tensor) -> Tensor:
    """+inf for empty sets, so that exp(x - lse) is 0 there."""
    return torch.where(lse > _NEG_INF, lse, float("inf"))


def _schedule(v: Visibility, same_tensor: bool) -> str:
    """How a call walks its tiles: ``local_batched``, ``symmetric`` (in-batch external) or ``general``."""
    if v._batch_shape is not None and v.query_group is None:
        if v.rule is Rule.LOCAL:
            return "local_batched"
        if v.rule is Rule.EXTERNAL and same_tensor:
            return "symmetric"
    return "general"


def _same_tensor(queries: Tensor, keys: Tensor, key_labels: Tensor, query_targets: Tensor) -> bool:
    """In-batch memory: the keys are the queries and the key labels the query targets."""
    return queries is keys and (key_labels is query_targets or torch.equal(key_labels, query_targets))


@dataclass
class _Problem:
    """Everything one memory_logsumexp call needs, in the form the tiles use (fp32)."""

    visibility: Visibility
    queries: Tensor  # fp32
    keys: Tensor  # fp32
    scale: float
    block_size: int
    same_tensor: bool  # in-batch: keys are the queries and key labels the query targets
    q_label: Tensor
    k_label: Tensor
    q_seg: Tensor
    k_seg: Tensor
    q_pos: Tensor
    k_pos: Tensor
    k_bias: Tensor
    q_bias: Tensor
    rule: Tensor  # (4,) table of _RULE_TABLES

    @classmethod
    def build(cls, queries, keys, key_labels, query_targets, visibility, scale, block_size, same_tensor):
        device = queries.device
        v = visibility
        q_label, k_label = _dense_ids(query_targets, key_labels)
        q_seg, k_seg = _dense_ids(v.query_segment.to(device), v.key_segment.to(device))
        q_pos, k_pos = _dense_ids(v.query_position.to(device), v.key_position.to(device))
        name = v.rule.value
        if v.rule is Rule.EXTERNAL and not v.external_local:
            name = "external_no_local"
        rule = torch.tensor(_RULE_TABLES[name], device=device)
        return cls(v, queries.float(), keys.float(), scale, block_size, same_tensor, q_label, k_label, q_seg, k_seg,
                   q_pos, k_pos, _bias(v.key_valid, v.num_keys, device), _bias(v.query_valid, v.num_queries, device),
                   rule)

    def schedule(self) -> str:
        return _schedule(self.visibility, self.same_tensor)

    # -- tiles ------------------------------------------------------------------------

    def general_tiles(self) -> Iterator[Tuple[int, int, int, int]]:
        """(row start, row end, key lo, key hi) tiles holding at least one possibly visible key."""
        v, n = self.visibility, self.visibility.num_queries
        rows = max(1, self.block_size)
        if v.rule is not Rule.EXTERNAL and v._keys_sorted:
            # ordered keys: a tile's keys end at its last query, so fewer rows per tile
            # leave fewer unused scores in the (triangular) diagonal part
            rows = max(1, min(rows, _LONG_TILE_ROWS))
        for start in range(0, n, rows):
            end = min(start + rows, n)
            if v.query_valid is not None and not bool(v.query_valid[start:end].any()):
                continue
            lo, hi = v.key_range(start, end)
            if hi > lo:
                yield start, end, lo, hi

    def local_tiles(self) -> Iterator[Tuple[int, int]]:
        yield from self.visibility.row_blocks(self.block_size)

    def symmetric_tiles(self) -> Iterator[Tuple[int, int, int]]:
        """(start, end, key start): rows [start, end) against keys [key start, N), whole segments.

        The tile's keys after ``end`` are used twice: for the rows (as keys of the
        queries) and for the columns (as queries, with the rows as their keys).
        """
        seq_len = self.visibility._batch_shape[1]
        segments = max(1, min(self.block_size, _SYMMETRIC_TILE_ROWS) // seq_len)
        own = self.visibility.external_local or segments > 1
        n = self.visibility.num_queries
        for start in range(0, n, segments * seq_len):
            end = min(start + segments * seq_len, n)
            yield start, end, start if own else end

    def pairs(self) -> int:
        """About how many (query, key) scores this call computes (for the compile decision)."""
        n, m = self.visibility.num_queries, self.visibility.num_keys
        schedule = self.schedule()
        if schedule == "local_batched":
            return 0  # always eager (see _local_vectors)
        if schedule == "symmetric" or self.visibility.rule is not Rule.EXTERNAL:
            return n * m // 2
        return n * m

    # Tile vectors are copies (own storage, offset 0): views at varying offsets would
    # make torch.compile guard on, and recompile for, their storage offsets.

    def rows(self, start: int, end: int) -> Tuple[Tensor, ...]:
        """Row vectors (label, segment, position) as (R, 1)."""
        return tuple(x[start:end, None].clone() for x in (self.q_label, self.q_seg, self.q_pos))

    def cols(self, lo: int, hi: int) -> Tuple[Tensor, ...]:
        """Column vectors (label, bias, segment, position) as (1, C)."""
        return tuple(x[None, lo:hi].clone() for x in (self.k_label, self.k_bias, self.k_seg, self.k_pos))


# query rows per tile where keys are ordered (long memory): the unused part of the
# diagonal tiles is rows^2/2 scores per tile, i.e. rows/N of the work
_LONG_TILE_ROWS = 256
# query rows per tile of the symmetric (in-batch external) schedule
_SYMMETRIC_TILE_ROWS = 512


def _workspace(problem: _Problem, largest: int) -> Tensor:
    return torch.empty(max(1, largest), dtype=torch.float32, device=problem.queries.device)


def _tile(workspace: Tensor, shape: Tuple[int, ...]) -> Tensor:
    return workspace[: math.prod(shape)].view(shape)


def _local_batched_tiles(p: "_Problem") -> Iterator[Tuple[int, int, int, int, Tensor, Tensor, Tensor]]:
    """(start, end, g, seq_len, scaled queries, keys, scores) of every local in-batch tile of g segments.

    Forward and backward (which recomputes the scores) walk the same tiles; scores live in one reused workspace.
    """
    seq_len = p.visibility._batch_shape[1]
    blocks = list(p.local_tiles())
    ws = _workspace(p, max(((e - s) * seq_len for s, e in blocks), default=0))
    for start, end in blocks:
        g = (end - start) // seq_len
        q = (p.queries[start:end] * p.scale).view(g, seq_len, -1)
        k = p.keys[start:end].view(g, seq_len, -1)
        yield start, end, g, seq_len, q, k, torch.bmm(q, k.transpose(1, 2), out=_tile(ws, (g, seq_len, seq_len)))


def _group_mask_(scores: Tensor, v: Visibility, start: int, end: int, lo: int, hi: int) -> None:
    if v.query_group is not None:
        scores.masked_fill_(v.key_group[None, lo:hi] != v.query_group[start:end, None], _NEG_INF)


def _at_factors(scores: Tensor, factors: Sequence[float]) -> Iterator[Tuple[int, Tensor]]:
    """(index, tile) of ``scores`` multiplied by each factor (the tile itself for a factor of 1)."""
    for i, factor in enumerate(factors):
        yield i, scores if factor == 1.0 else scores * factor


def _factor_tensor(factors: Sequence[float], device: torch.device, dims: int) -> Optional[Tensor]:
    """``factors`` as an (S, 1, ..., 1) tensor to scale a ``dims``-d tile S ways at once, or None for one factor of 1."""
    if len(factors) == 1 and factors[0] == 1.0:
        return None
    return torch.tensor(list(factors), dtype=torch.float32, device=device).view(-1, *([1] * dims))


def _forward(p: _Problem, kernels: _Kernels, factors: Sequence[float] = (1.0,)) -> Tuple[Tensor, Tensor]:
    """(lse_all, lse_pos) as (len(factors), N): the scores of every tile are computed once (at ``p.scale``)
    and reduced at ``p.scale`` x each factor."""
    n = p.visibility.num_queries
    device = p.queries.device
    lse_all = torch.full((len(factors), n), _NEG_INF, dtype=torch.float32, device=device)
    lse_pos = torch.full_like(lse_all, _NEG_INF)
    schedule = p.schedule()
    if schedule == "general":
        tiles = list(p.general_tiles())
        ws = _workspace(p, max(((e - s) * (hi - lo) for s, e, lo, hi in tiles), default=0))
        scaled = _factor_tensor(factors, device, 2)
        for start, end, lo, hi in tiles:
            scores = torch.mm(p.queries[start:end] * p.scale, p.keys[lo:hi].T, out=_tile(ws, (end - start, hi - lo)))
            _group_mask_(scores, p.visibility, start, end, lo, hi)
            label, seg, pos = p.rows(start, end)
            c_label, c_bias, c_seg, c_pos = p.cols(lo, hi)
            if scaled is None:
                a, b = kernels._rows_lse(scores, label, c_label, c_bias, seg, pos, c_seg, c_pos, p.rule)
            else:  # every factor in one fused call: (S, rows)
                a, b = kernels._rows_lse_scaled(scores, scaled, label, c_label, c_bias, seg, pos, c_seg, c_pos, p.rule)
            # a query's keys may span several tiles (external memory over many ranks)
            lse_all[:, start:end] = torch.logaddexp(lse_all[:, start:end], a)
            lse_pos[:, start:end] = torch.logaddexp(lse_pos[:, start:end], b)
    elif schedule == "local_batched":
        scaled = _factor_tensor(factors, device, 3)
        for start, end, g, seq_len, _, _, scores in _local_batched_tiles(p):
            vectors = _local_vectors(p, start, end, g, seq_len)
            a, b = _rows_lse(scores if scaled is None else scores * scaled, *vectors)  # eager: see _local_vectors
            lse_all[:, start:end], lse_pos[:, start:end] = a.reshape(len(factors), -1), b.reshape(len(factors), -1)
    else:
        tiles = list(p.symmetric_tiles())
        ws = _workspace(p, max(((e - s) * (n - k0) for s, e, k0 in tiles), default=0))
        h = p.queries
        for start, end, k0 in tiles:
            if k0 == n:
                continue
            scores = torch.mm(h[start:end] * p.scale, h[k0:].T, out=_tile(ws, (end - start, n - k0)))
            label, seg, pos = p.rows(start, end)
            c_label, c_bias, c_seg, c_pos = p.cols(k0, n)
            off = end - k0  # columns from here on are later segments: use the tile for them as well
            for i, x in _at_factors(scores, factors):
                a, b = kernels._rows_lse(x, label, c_label, c_bias, seg, pos, c_seg, c_pos, p.rule)
                lse_all[i, start:end] = torch.logaddexp(lse_all[i, start:end], a)
                lse_pos[i, start:end] = torch.logaddexp(lse_pos[i, start:end], b)
                if off < n - k0:
                    a, b = kernels._cols_lse(x[:, off:], label, c_label[:, off:].clone(),
                                             p.q_bias[start:end, None].clone())
                    lse_all[i, end:] = torch.logaddexp(lse_all[i, end:], a)
                    lse_pos[i, end:] = torch.logaddexp(lse_pos[i, end:], b)
    if p.visibility.query_valid is not None:  # pad queries see nothing
        invalid = ~p.visibility.query_valid.to(device)[None, :]
        lse_all.masked_fill_(invalid, _NEG_INF)
        lse_pos.masked_fill_(invalid, _NEG_INF)
    return lse_all, lse_pos


def _local_vectors(p: _Problem, start: int, end: int, g: int, seq_len: int) -> Tuple[Tensor, ...]:
    """Row/column vectors of a batched (g, L, L) local tile: label, label, bias, seg, pos, seg, pos, rule.

    The local memory's tiles run the eager kernels: they hold N x L scores in all (not
    N^2), so fusing them saves little, and compiling their 3-d variants costs more.
    """
    pos = p.q_pos[start : start + seq_len] - p.q_pos[start]  # positions inside a segment
    zero = p.q_seg[:1].view(1, 1, 1)
    vectors = (
        p.q_label[start:end].view(g, seq_len, 1),
        p.k_label[start:end].view(g, 1, seq_len),
        p.k_bias[start:end].view(g, 1, seq_len),
        zero,
        pos.view(1, seq_len, 1),
        zero,
        pos.view(1, 1, seq_len),
    )
    return tuple(x.clone() for x in vectors) + (p.rule,)


def _backward(p: _Problem, kernels: _Kernels, lse_all, lse_pos, grad_all, grad_pos, need_q: bool, need_k: bool):
    """(grad of queries, grad of keys) in fp32; in-batch symmetric: the total in the first."""
    device = p.queries.device
    n = p.visibility.num_queries
    grad_q = torch.zeros(p.queries.shape, dtype=torch.float32, device=device) if need_q or p.same_tensor else None
    grad_k = grad_q if p.same_tensor else (torch.zeros(p.keys.shape, dtype=torch.float32, device=device)
                                           if need_k else None)
    safe_all, safe_pos = _safe(lse_all), _safe(lse_pos)
    grad_all, grad_pos = grad_all.float(), grad_pos.float()

    def row_stats(start, end, shape=None):
        stats = (safe_all[start:end], safe_pos[start:end], grad_all[start:end], grad_pos[start:end])
        shape = shape or (end - start, 1)
        return tuple(x.reshape(shape).clone() for x in stats)

    schedule = p.schedule()
    if schedule == "general":
        tiles = list(p.general_tiles())
        ws = _workspace(p, max(((e - s) * (hi - lo) for s, e, lo, hi in tiles), default=0))
        for start, end, lo, hi in tiles:
            q = p.queries[start:end] * p.scale
            scores = torch.mm(q, p.keys[lo:hi].T, out=_tile(ws, (end - start, hi - lo)))
            _group_mask_(scores, p.visibility, start, end, lo, hi)
            label, seg, pos = p.rows(start, end)
            c_label, c_bias, c_seg, c_pos = p.cols(lo, hi)
            kernels._rows_grad_(scores, label, c_label, c_bias, seg, pos, c_seg, c_pos, p.rule, row_stats(start, end))
            if grad_q is not None:
                grad_q[start:end].addmm_(scores, p.keys[lo:hi], alpha=p.scale)
            if grad_k is not None:
                grad_k[lo:hi].addmm_(scores.T, q)
    elif schedule == "local_batched":
        for start, end, g, seq_len, q, k, scores in _local_batched_tiles(p):
            vectors = _local_vectors(p, start, end, g, seq_len)
            _rows_grad_(scores, *vectors, row_stats(start, end, (g, seq_len, 1)))
            if grad_q is not None:
                grad_q[start:end].view(g, seq_len, -1).baddbmm_(scores, k, alpha=p.scale)
            if grad_k is not None:
                grad_k[start:end].view(g, seq_len, -1).baddbmm_(scores.transpose(1, 2), q)
    else:
        tiles = list(p.symmetric_tiles())
        ws = _workspace(p, max(((e - s) * (n - k0) for s, e, k0 in tiles), default=0))
        h = p.queries
        inf = torch.full((1, 1), float("inf"), device=device)
        for start, end, k0 in tiles:
            if k0 == n:
                continue
            q = h[start:end] * p.scale
            scores = torch.mm(q, h[k0:].T, out=_tile(ws, (end - start, n - k0)))
            label, seg, pos = p.rows(start, end)
            c_label, c_bias, c_seg, c_pos = p.cols(k0, n)
            # the columns' own terms, for the later segments only (the own block is in the rows' terms)
            col_stats = tuple(
                torch.cat([inf.expand(1, end - k0) if i < 2 else inf.new_zeros(1, end - k0), x[None, end:]], dim=1)
                for i, x in enumerate((safe_all, safe_pos, grad_all, grad_pos))
            )
            kernels._symmetric_grad_(scores, label, c_label, c_bias, p.q_bias[start:end, None].clone(), seg, pos, c_seg,
                                     c_pos, p.rule, row_stats(start, end), col_stats)
            grad_q[start:end].addmm_(scores, h[k0:], alpha=p.scale)
            grad_q[k0:].addmm_(scores.T, q)
    return grad_q, (None if p.same_tensor else grad_k)


class _MemoryLogSumExp(torch.autograd.Function):
    """Blockwise (lse over visible keys, lse over visible positive keys), recomputed in backward."""

    @staticmethod
    def forward(ctx, queries, keys, key_labels, query_targets, visibility, scale, block_size):
        same = _same_tensor(queries, keys, key_labels, query_targets)
        with torch.no_grad():
            problem = _Problem.build(queries, keys, key_labels, query_targets, visibility, scale, block_size, same)
            kernels = _Kernels(_use_compiled(queries.device, problem.pairs()))
            lse_all, lse_pos = (x[0] for x in _forward(problem, kernels))
        ctx.save_for_backward(queries, keys, key_labels, query_targets, lse_all, lse_pos)
        ctx.visibility, ctx.scale, ctx.block_size, ctx.same = visibility, scale, block_size, same
        return lse_all, lse_pos

    @staticmethod
    def backward(ctx, grad_all, grad_pos):
        queries, keys, key_labels, query_targets, lse_all, lse_pos = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.no_grad():
            problem = _Problem.build(queries, keys, key_labels, query_targets, ctx.visibility, ctx.scale,
                                     ctx.block_size, ctx.same)
            kernels = _Kernels(_use_compiled(queries.device, problem.pairs()))
            grad_q, grad_k = _backward(problem, kernels, lse_all, lse_pos, grad_all, grad_pos, need_q, need_k)
        return (
            None if grad_q is None or not (need_q or need_k) else grad_q.to(queries.dtype),
            None if grad_k is None else grad_k.to(keys.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def _one_pass(p: _Problem, kernels: _Kernels, score: Tensor, log_partition: Tensor, keep: Tensor, need_q: bool,
              need_k: bool) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """(lse_all, lse_pos, grad of queries, grad of keys) of sum(joint nll), in one walk over the tiles.

    Only for the general and local schedules, where a tile holds every visible key of its
    rows: the rows' lse are final while their scores are still in the tile, so the tile
    becomes its gradient at once (no recomputation in backward). Grads as in ``_backward``.
    """
    device = p.queries.device
    n = p.visibility.num_queries
    lse_all = torch.full((n,), _NEG_INF, dtype=torch.float32, device=device)
    lse_pos = torch.full_like(lse_all, _NEG_INF)
    grad_q = torch.zeros(p.queries.shape, dtype=torch.float32, device=device) if need_q or p.same_tensor else None
    grad_k = grad_q if p.same_tensor else (torch.zeros(p.keys.shape, dtype=torch.float32, device=device)
                                           if need_k else None)

    def row_terms(start, end, shape=None):
        terms = (p.q_bias[start:end], score[start:end], log_partition[start:end], keep[start:end])
        shape = shape or (end - start, 1)
        return tuple(x.reshape(shape).clone() for x in terms)

    if p.schedule() == "general":
        tiles = list(p.general_tiles())  # one tile per row range, with all of its rows' keys
        ws = _workspace(p, max(((e - s) * (hi - lo) for s, e, lo, hi in tiles), default=0))
        for start, end, lo, hi in tiles:
            q = p.queries[start:end] * p.scale
            scores = torch.mm(q, p.keys[lo:hi].T, out=_tile(ws, (end - start, hi - lo)))
            _group_mask_(scores, p.visibility, start, end, lo, hi)
            label, seg, pos = p.rows(start, end)
            c_label, c_bias, c_seg, c_pos = p.cols(lo, hi)
            a, b = kernels._rows_nll_grad_(scores, label, c_label, c_bias, seg, pos, c_seg, c_pos, p.rule,
                                           row_terms(start, end))
            lse_all[start:end], lse_pos[start:end] = a.reshape(-1), b.reshape(-1)
            if grad_q is not None:
                grad_q[start:end].addmm_(scores, p.keys[lo:hi], alpha=p.scale)
            if grad_k is not None:
                grad_k[lo:hi].addmm_(scores.T, q)
    else:  # local_batched, eager as in _forward
        for start, end, g, seq_len, q, k, scores in _local_batched_tiles(p):
            vectors = _local_vectors(p, start, end, g, seq_len)
            a, b = _rows_nll_grad_(scores, *vectors, row_terms(start, end, (g, seq_len, 1)))
            lse_all[start:end], lse_pos[start:end] = a.reshape(-1), b.reshape(-1)
            if grad_q is not None:
                grad_q[start:end].view(g, seq_len, -1).baddbmm_(scores, k, alpha=p.scale)
            if grad_k is not None:
                grad_k[start:end].view(g, seq_len, -1).baddbmm_(scores.transpose(1, 2), q)
    if p.visibility.query_valid is not None:  # pad queries see nothing
        valid = p.visibility.query_valid.to(device)
        lse_all.masked_fill_(~valid, _NEG_INF)
        lse_pos.masked_fill_(~valid, _NEG_INF)
    return lse_all, lse_pos, grad_q, (None if p.same_tensor else grad_k)


def _uniform(grad: Tensor) -> bool:
    """Whether every entry of a 1-d gradient is the same value (as ``.sum()`` and ``.mean()`` give)."""
    if grad.numel() <= 1 or grad.stride(0) == 0:
        return True
    return bool((grad == grad[:1]).all())


class _MemoryJointNLL(torch.autograd.Function):
    """Per-row joint nll of one memory; for non-symmetric schedules the gradient comes from forward.

    With ``one_pass`` the forward also forms d(sum nll)/d(queries, keys); backward scales it
    when the upstream gradient is uniform over the rows, else recomputes (``_backward``).
    """

    @staticmethod
    def forward(ctx, queries, keys, token_score, token_log_partition, key_labels, query_targets, keep, visibility,
                scale, block_size, one_pass, same):
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.no_grad():
            problem = _Problem.build(queries, keys, key_labels, query_targets, visibility, scale, block_size, same)
            kernels = _Kernels(_use_compiled(queries.device, problem.pairs()))
            score, log_partition = token_score.detach().float(), token_log_partition.detach().float()
            ctx.grads = None
            if one_pass and (need_q or need_k):
                lse_all, lse_pos, grad_q, grad_k = _one_pass(problem, kernels, score, log_partition, keep, need_q,
                                                             need_k)
                ctx.grads = (grad_q, grad_k)
            else:
                lse_all, lse_pos = (x[0] for x in _forward(problem, kernels))
            nll, w_all, w_pos, d_score, d_log_partition = _joint_terms(lse_all, lse_pos, score, log_partition, keep)
        ctx.save_for_backward(queries, keys, key_labels, query_targets, lse_all, lse_pos)
        ctx.weights = (w_all, w_pos, d_score, d_log_partition)
        ctx.visibility, ctx.scale, ctx.block_size, ctx.same = visibility, scale, block_size, same
        ctx.token_dtypes = (token_score.dtype, token_log_partition.dtype)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        queries, keys, key_labels, query_targets, lse_all, lse_pos = ctx.saved_tensors
        need_q, need_k, need_score, need_partition = ctx.needs_input_grad[:4]
        w_all, w_pos, d_score, d_log_partition = ctx.weights
        grad_nll = grad_nll.float()
        grad_score = (grad_nll * d_score).to(ctx.token_dtypes[0]) if need_score else None
        grad_partition = (grad_nll * d_log_partition).to(ctx.token_dtypes[1]) if need_partition else None
        grad_q = grad_k = None
        if need_q or need_k:
            if ctx.grads is not None and _uniform(grad_nll):
                grad_q, grad_k = ctx.grads
                u = grad_nll[:1]
                if not bool(u == 1):
                    grad_q = None if grad_q is None else grad_q * u
                    grad_k = None if grad_k is None else grad_k * u
            else:
                with torch.no_grad():
                    problem = _Problem.build(queries, keys, key_labels, query_targets, ctx.visibility, ctx.scale,
                                             ctx.block_size, ctx.same)
                    kernels = _Kernels(_use_compiled(queries.device, problem.pairs()))
                    grad_q, grad_k = _backward(problem, kernels, lse_all, lse_pos, grad_nll * w_all,
                                               grad_nll * w_pos, need_q, need_k)
        ctx.grads = None
        return (
            None if grad_q is None or not (need_q or need_k) else grad_q.to(queries.dtype),
            None if grad_k is None or not need_k else grad_k.to(keys.dtype),
            grad_score,
            grad_partition,
        ) + (None,) * 8


def _masked_logsumexp(scores: Tensor, mask: Tensor) -> Tensor:
    """Row-wise logsumexp over ``mask``; exactly -inf for rows with no True entry."""
    masked = scores.masked_fill(~mask, _NEG_INF)
    return _logsumexp_or_neginf(masked)


def _logsumexp_or_neginf(scores: Tensor) -> Tensor:
    """logsumexp over the last dim, -inf (not nan) for all -inf rows."""
    row_max = scores.amax(dim=-1)
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    return (scores - shift[..., None]).exp().sum(dim=-1).log() + shift


def memory_logsumexp(
    queries: Tensor,
    keys: Tensor,
    key_labels: Tensor,
    query_targets: Tensor,
    visibility: Visibility,
    scale: Optional[float] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Tuple[Tensor, Tensor]:
    """Log-sum-exp of the memory logits over visible keys and over visible positives.

    Args:
        queries: (N, d) query representations.
        keys: (M, d) memory keys (pass the same tensor as ``queries`` for in-batch
            memory; gradients then flow through both roles). Detach keys that must
            receive no gradient (e.g. those gathered from other ranks).
        key_labels: (M,) the token that followed each key.
        query_targets: (N,) each query's target token.
        visibility: which keys each query sees.
        scale: logit scale, default 1/sqrt(d); divide it by a temperature at eval.
        block_size: query rows per block; extra memory is O(block_size * M).

    Returns:
        (lse_all, lse_pos): fp32 (N,) tensors, -inf where the set is empty.
    """
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must be (N, d) and (M, d)")
    if visibility.num_queries != queries.shape[0] or visibility.num_keys != keys.shape[0]:
        raise ValueError("visibility metadata does not match the number of queries/keys")
    if scale is None:
        scale = 1.0 / math.sqrt(queries.shape[1])
    return _MemoryLogSumExp.apply(queries, keys, key_labels, query_targets, visibility, float(scale), int(block_size))


def memory_logsumexp_at_scales(
    queries: Tensor,
    keys: Tensor,
    key_labels: Tensor,
    query_targets: Tensor,
    visibility: Visibility,
    scales: Sequence[float],
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Tuple[Tensor, Tensor]:
    """:func:`memory_logsumexp` at several logit scales in one pass, without gradient: (S, N) tensors.

    Each score tile is computed once and reduced at every scale, so S temperatures (the
    candidates of evaluation-time tuning) cost one set of matrix products instead of S.
    """
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must be (N, d) and (M, d)")
    if visibility.num_queries != queries.shape[0] or visibility.num_keys != keys.shape[0]:
        raise ValueError("visibility metadata does not match the number of queries/keys")
    scales = [float(x) for x in scales]
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be a non-empty list of positive numbers, got {scales}")
    same = _same_tensor(queries, keys, key_labels, query_targets)
    with torch.no_grad():
        problem = _Problem.build(queries, keys, key_labels, query_targets, visibility, scales[0], int(block_size), same)
        kernels = _Kernels(_use_compiled(queries.device, problem.pairs() * len(scales)))
        return _forward(problem, kernels, [x / scales[0] for x in scales])


def memory_joint_nll(
    queries: Tensor,
    keys: Tensor,
    key_labels: Tensor,
    query_targets: Tensor,
    visibility: Visibility,
    token_target_score: Tensor,
    token_log_partition: Tensor,
    valid: Optional[Tensor] = None,
    scale: Optional[float] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Tensor:
    """Per-token joint nll with one memory: ``joint_nll`` of :func:`memory_logsumexp`'s terms.

    Same arguments and value (fp32 (N,), exactly 0 where ``valid`` is False), but cheaper
    to train: for the local and long memories, and any call off the in-batch external
    path, the forward pass also forms the gradient of ``nll.sum()`` while each score tile
    is in memory (three matrix products per tile in all, no recomputation). A backward
    with a uniform upstream gradient (``.sum()``, ``.mean()``) only scales it; any other
    falls back to the recomputing backward, exactly. The in-batch external memory (each
    score used for both of its tokens) keeps the two-pass :func:`memory_logsumexp`.
    Combine several memories with :func:`memory_logsumexp` and :func:`joint_nll` instead.
    """
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must be (N, d) and (M, d)")
    if visibility.num_queries != queries.shape[0] or visibility.num_keys != keys.shape[0]:
        raise ValueError("visibility metadata does not match the number of queries/keys")
    if scale is None:
        scale = 1.0 / math.sqrt(queries.shape[1])
    if valid is not None:
        valid = valid.reshape(-1).to(device=queries.device, dtype=torch.bool)
    same = _same_tensor(queries, keys, key_labels, query_targets)
    if _schedule(visibility, same) == "symmetric":
        lse_all, lse_pos = memory_logsumexp(queries, keys, key_labels, query_targets, visibility, scale, block_size)
        return joint_nll(token_target_score.reshape(-1), token_log_partition.reshape(-1), lse_all, lse_pos,
                         valid=valid)
    keep = torch.ones(queries.shape[0], dtype=torch.bool, device=queries.device) if valid is None else valid
    one_pass = torch.is_grad_enabled() and (queries.requires_grad or keys.requires_grad)
    return _MemoryJointNLL.apply(queries, keys, token_target_score.reshape(-1), token_log_partition.reshape(-1),
                                 key_labels, query_targets, keep, visibility, float(scale), int(block_size), one_pass,
                                 same)


@dataclass
class MemoryInputs:
    """The arguments of one memory's :func:`memory_logsumexp` call, for callers that may want either
    its (lse_all, lse_pos) or, for a loss that is a plain sum over rows, :func:`memory_joint_nll`."""

    queries: Tensor
    keys: Tensor
    key_labels: Tensor
    query_targets: Tensor
    visibility: Visibility
    scale: Optional[float] = None
    block_size: int = DEFAULT_BLOCK_SIZE

    def logsumexp(self) -> Tuple[Tensor, Tensor]:
        """(lse_all, lse_pos) of :func:`memory_logsumexp`."""
        return memory_logsumexp(self.queries, self.keys, self.key_labels, self.query_targets, self.visibility,
                                scale=self.scale, block_size=self.block_size)

    def joint_nll(self, token_target_score: Tensor, token_log_partition: Tensor,
                  valid: Optional[Tensor] = None) -> Tensor:
        """Per-token nll of :func:`memory_joint_nll` with this memory alone."""
        return memory_joint_nll(self.queries, self.keys, self.key_labels, self.query_targets, self.visibility,
                                token_target_score, token_log_partition, valid=valid, scale=self.scale,
                                block_size=self.block_size)


def scored_memory_logsumexp(
    scores: Tensor, labels: Tensor, query_targets: Tensor, valid: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """(lse_all, lse_pos) for memories that come with precomputed scores, e.g. kNN hits.

    ``scores`` and ``labels`` are (N, k), already scaled; ``valid`` marks real hits
    (FAISS pads missing neighbours with id -1).
    """
    scores = scores.float()
    mask = torch.ones_like(labels, dtype=torch.bool) if valid is None else valid
    positive = mask & (labels == query_targets[:, None])
    return _masked_logsumexp(scores, mask), _masked_logsumexp(scores, positive)


def joint_nll(
    token_target_score: Tensor,
    token_log_partition: Tensor,
    memory_lse_all: Tensor,
    memory_lse_pos: Tensor,
    valid: Optional[Tensor] = None,
) -> Tensor:
    """Per-token negative log-likelihood of the joint vocabulary + memory distribution.

    ``token_target_score`` is log(Z_t p_tok(y)), ``token_log_partition`` is log Z_t, and
    the memory terms come from :func:`memory_logsumexp` (combine several memories with
    ``torch.logaddexp``). Invalid (padding) positions get exactly 0.
    """
    numerator = torch.logaddexp(token_target_score.float(), memory_lse_pos)
    denominator = torch.logaddexp(token_log_partition.float(), memory_lse_all)
    nll = denominator - numerator
    if valid is not None:
        nll = torch.where(valid, nll, torch.zeros_like(nll))
    return nll


class _SoftmaxHeadTerms(torch.autograd.Function):
    """(target logit, logsumexp) of logit rows with one fused backward, like cross-entropy's."""

    @staticmethod
    def forward(ctx, logits, targets):
        log_partition = torch.logsumexp(logits.float(), dim=1)  # no copy for fp32 logits
        target_logit = logits.gather(1, targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, targets, log_partition)
        return target_logit, log_partition

    @staticmethod
    def backward(ctx, grad_target, grad_partition):
        logits, targets, log_partition = ctx.saved_tensors
        grad = (logits.float() - log_partition[:, None]).exp_().mul_(grad_partition[:, None])
        grad[torch.arange(grad.shape[0], device=grad.device), targets] += grad_target
        return grad.to(logits.dtype), None


def full_softmax_terms(logits: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor]:
    """(log Z_t p_tok(y), log Z_t) for a plain softmax head: (target logit, logsumexp).

    One fused backward (softmax * g + one-hot * g), as cheap as plain cross-entropy's.
    """
    return _SoftmaxHeadTerms.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def adaptive_softmax_terms(adaptive_softmax, features: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor]:
    """(log Z_head p_tok(y), log Z_head) for an adaptive-softmax head.

    Z_head sums over the head cluster (frequent words plus one entry per tail
    cluster), as in the original TRIME code. A tail word y in cluster c scores
    head[c] + log_softmax(tail_c)[y]. ``adaptive_softmax`` is fairseq's module (it
    applies its own dropout in training).
    """
    features = features.reshape(-1, features.shape[-1])
    targets = targets.reshape(-1)
    outputs, new_targets = adaptive_softmax(features, targets)
    # the fused (target logit, logsumexp) of full_softmax_terms, per cluster: as cheap as cross-entropy
    score, log_partition = _SoftmaxHeadTerms.apply(outputs[0], new_targets[0])
    cutoff = adaptive_softmax.cutoff
    for cluster, (tail_logits, tail_targets) in enumerate(zip(outputs[1:], new_targets[1:])):
        if tail_logits is None:
            continue
        in_cluster = (targets >= cutoff[cluster]) & (targets < cutoff[cluster + 1])
        rows = in_cluster.nonzero().squeeze(1)
        tail_score, tail_log_partition = _SoftmaxHeadTerms.apply(tail_logits, tail_targets)
        score = score.index_add(0, rows, tail_score - tail_log_partition)
    return score, log_partition
