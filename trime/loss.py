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
keys). Every pass (forward, recomputing backward, one-pass forward) walks the same
tiles (``_tiles``) and only says what it does with each. The exp/mask/scale passes of a
tile are one kernel each (``_rows_lse``, ``_rows_grad_``, ..., registered in
``_KERNELS``) that ``torch.compile`` fuses into single loops reading the scores once or
twice, with an eager fallback (:mod:`trime.loss_compile`). Score tiles live in one
reused workspace per call, so no pass allocates (and page-faults) a new tile.

A loss that is a plain sum (or mean) over rows of one memory's nll should call
:func:`memory_joint_nll`: where a tile holds all the keys of its rows (local and long
memories, and every call off the in-batch external path), its forward turns each score
tile into its gradient while it is resident (3 matrix products a tile in all instead of
4, one fused elementwise kernel instead of two), and its backward only scales the
result; a non-uniform upstream gradient takes the recomputing backward.

The token head's terms (Z_t p_tok(y) and Z_t) come from :mod:`trime.heads`. This module
imports neither fairseq nor transformers.
"""

import enum
import math
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from trime import loss_compile
from trime.errors import fail

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "MemoryInputs",
    "Rule",
    "Visibility",
    "in_batch_memory",
    "joint_nll",
    "memory_joint_nll",
    "memory_logsumexp",
    "memory_logsumexp_at_scales",
    "memory_scale",
    "scored_memory_logsumexp",
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
# torch ops with the same results up to fp32 round-off. Calls reach them through the
# ``_KERNELS`` registry (:mod:`trime.loss_compile` picks compiled or eager).
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


def _symmetric_grad_(scores, row_label, col_label, col_bias, row_seg, row_pos, col_seg, col_pos, rule, row_bias,
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


# the tile kernels by name, as the passes call them (``kernels.rows_lse(...)``)
_KERNELS = {
    "rows_lse": _rows_lse,
    "rows_lse_scaled": _rows_lse_scaled,
    "cols_lse": _cols_lse,
    "rows_grad_": _rows_grad_,
    "symmetric_grad_": _symmetric_grad_,
    "rows_nll_grad_": _rows_nll_grad_,
}
# the local memory's batched tiles always run these (see _local_vectors)
_EAGER = loss_compile.Kernels(_KERNELS, compiled=False)


# ---- tiles -----------------------------------------------------------------------


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


# query rows per tile where keys are ordered (long memory): the unused part of the
# diagonal tiles is rows^2/2 scores per tile, i.e. rows/N of the work
_LONG_TILE_ROWS = 256
# query rows per tile of the symmetric (in-batch external) schedule
_SYMMETRIC_TILE_ROWS = 512


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

    def pairs(self) -> int:
        """About how many (query, key) scores this call computes (for the compile decision)."""
        n, m = self.visibility.num_queries, self.visibility.num_keys
        schedule = self.schedule()
        if schedule == "local_batched":
            return 0  # always eager (see _local_vectors)
        if schedule == "symmetric" or self.visibility.rule is not Rule.EXTERNAL:
            return n * m // 2
        return n * m

    def kernels(self, passes: int = 1) -> loss_compile.Kernels:
        """The tile kernels of this call (compiled or eager, see :func:`trime.loss_compile.set_compile`)."""
        return loss_compile.kernels(_KERNELS, self.queries.device, self.pairs() * passes)

    # Tile vectors are copies (own storage, offset 0): views at varying offsets would
    # make torch.compile guard on, and recompile for, their storage offsets.

    def vectors(self, start: int, end: int, lo: int, hi: int) -> Tuple[Tensor, ...]:
        """The kernels' arguments after the scores of the tile rows [start, end) x keys [lo, hi):
        row label, column label, column bias, row segment, row position, column segment, column
        position (rows (R, 1), columns (1, C)) and the rule table."""
        label, seg, pos = (x[start:end, None].clone() for x in (self.q_label, self.q_seg, self.q_pos))
        c_label, c_bias, c_seg, c_pos = (x[None, lo:hi].clone() for x in (self.k_label, self.k_bias, self.k_seg,
                                                                           self.k_pos))
        return label, c_label, c_bias, seg, pos, c_seg, c_pos, self.rule

    def grad_buffers(self, need_q: bool, need_k: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """fp32 zero gradients of the queries and of the keys; one shared buffer when the keys are the queries."""
        def zeros(x: Tensor) -> Tensor:
            return torch.zeros(x.shape, dtype=torch.float32, device=x.device)

        grad_q = zeros(self.queries) if need_q or self.same_tensor else None
        grad_k = grad_q if self.same_tensor else (zeros(self.keys) if need_k else None)
        return grad_q, grad_k

    def mask_pad_queries_(self, lse_all: Tensor, lse_pos: Tensor) -> None:
        """Pad queries see nothing: -inf in their (last-dim) entries."""
        if self.visibility.query_valid is not None:
            invalid = ~self.visibility.query_valid.to(self.queries.device)
            lse_all.masked_fill_(invalid, _NEG_INF)
            lse_pos.masked_fill_(invalid, _NEG_INF)


@dataclass
class _Tile:
    """One score tile: ``scores`` of query rows [start, end) against keys [lo, hi), and what its kernels read.

    Tiles are 2-d (rows, keys), or (g, L, L) on the local in-batch schedule (g segments,
    each against its own keys). ``vectors`` are the kernels' arguments after the scores
    (:meth:`_Problem.vectors`). A tile holds every visible key of its rows, except on the
    symmetric schedule: there ``mirror`` is the first column whose keys are later
    segments, whose own terms also take the tile's rows as their keys (``row_bias``).
    """

    start: int
    end: int
    lo: int
    hi: int
    queries: Tensor  # the rows' queries times the scale
    keys: Tensor
    scores: Tensor
    vectors: Tuple[Tensor, ...]
    kernels: loss_compile.Kernels
    mirror: Optional[int] = None
    row_bias: Optional[Tensor] = None

    def rows_of(self, *per_query: Tensor) -> Tuple[Tensor, ...]:
        """(N,) per-query vectors cut to the tile's rows, shaped to broadcast over its scores (copies)."""
        shape = tuple(self.scores.shape[:-1]) + (1,)
        return tuple(x[self.start : self.end].reshape(shape).clone() for x in per_query)

    def add_grads(self, grad_q: Optional[Tensor], grad_k: Optional[Tensor], scale: float) -> None:
        """Add this tile's share to the queries' and keys' gradients, once its scores hold d loss / d scores."""
        if self.scores.dim() == 2:
            if grad_q is not None:
                grad_q[self.start : self.end].addmm_(self.scores, self.keys, alpha=scale)
            if grad_k is not None:
                grad_k[self.lo : self.hi].addmm_(self.scores.T, self.queries)
            return
        shape = self.keys.shape
        if grad_q is not None:
            grad_q[self.start : self.end].view(shape).baddbmm_(self.scores, self.keys, alpha=scale)
        if grad_k is not None:
            grad_k[self.lo : self.hi].view(shape).baddbmm_(self.scores.transpose(1, 2), self.queries)


def _workspace(problem: _Problem, largest: int) -> Tensor:
    return torch.empty(max(1, largest), dtype=torch.float32, device=problem.queries.device)


def _tile(workspace: Tensor, shape: Tuple[int, ...]) -> Tensor:
    return workspace[: math.prod(shape)].view(shape)


def _tiles(p: _Problem, kernels: loss_compile.Kernels) -> Iterator[_Tile]:
    """Every score tile of a call, on its schedule, with its scores computed (at ``p.scale``).

    Forward, backward (which recomputes the scores) and the one-pass forward all walk these
    tiles. The scores of every tile live in one reused workspace: a tile is valid until the
    next one is taken.
    """
    schedule = p.schedule()
    if schedule == "local_batched":
        yield from _local_tiles(p)
    elif schedule == "symmetric":
        yield from _symmetric_tiles(p, kernels)
    else:
        yield from _general_tiles(p, kernels)


def _general_tiles(p: _Problem, kernels: loss_compile.Kernels) -> Iterator[_Tile]:
    """One tile per block of query rows, holding every key that may be visible to them."""
    v, n = p.visibility, p.visibility.num_queries
    rows = max(1, p.block_size)
    if v.rule is not Rule.EXTERNAL and v._keys_sorted:
        # ordered keys: a tile's keys end at its last query, so fewer rows per tile
        # leave fewer unused scores in the (triangular) diagonal part
        rows = max(1, min(rows, _LONG_TILE_ROWS))
    ranges = []
    for start in range(0, n, rows):
        end = min(start + rows, n)
        if v.query_valid is not None and not bool(v.query_valid[start:end].any()):
            continue
        lo, hi = v.key_range(start, end)
        if hi > lo:
            ranges.append((start, end, lo, hi))
    ws = _workspace(p, max(((e - s) * (hi - lo) for s, e, lo, hi in ranges), default=0))
    for start, end, lo, hi in ranges:
        q, keys = p.queries[start:end] * p.scale, p.keys[lo:hi]
        scores = torch.mm(q, keys.T, out=_tile(ws, (end - start, hi - lo)))
        if v.query_group is not None:
            scores.masked_fill_(v.key_group[None, lo:hi] != v.query_group[start:end, None], _NEG_INF)
        yield _Tile(start, end, lo, hi, q, keys, scores, p.vectors(start, end, lo, hi), kernels)


def _local_tiles(p: _Problem) -> Iterator[_Tile]:
    """(g, L, L) tiles of g whole segments, each against its own keys; always the eager kernels."""
    seq_len = p.visibility._batch_shape[1]
    blocks = list(p.visibility.row_blocks(p.block_size))
    ws = _workspace(p, max(((e - s) * seq_len for s, e in blocks), default=0))
    for start, end in blocks:
        g = (end - start) // seq_len
        q = (p.queries[start:end] * p.scale).view(g, seq_len, -1)
        k = p.keys[start:end].view(g, seq_len, -1)
        scores = torch.bmm(q, k.transpose(1, 2), out=_tile(ws, (g, seq_len, seq_len)))
        yield _Tile(start, end, start, end, q, k, scores, _local_vectors(p, start, end, g, seq_len), _EAGER)


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


def _symmetric_tiles(p: _Problem, kernels: loss_compile.Kernels) -> Iterator[_Tile]:
    """Rows [start, end) (whole segments) against keys [start, N): each pair of segments is scored once.

    The tile's keys after ``end`` are used twice: for the rows (as keys of the queries)
    and for the columns (as queries, with the rows as their keys).
    """
    v = p.visibility
    seq_len = v._batch_shape[1]
    segments = max(1, min(p.block_size, _SYMMETRIC_TILE_ROWS) // seq_len)
    own = v.external_local or segments > 1
    n = v.num_queries
    ranges = []
    for start in range(0, n, segments * seq_len):
        end = min(start + segments * seq_len, n)
        k0 = start if own else end
        if k0 < n:
            ranges.append((start, end, k0))
    ws = _workspace(p, max(((e - s) * (n - k0) for s, e, k0 in ranges), default=0))
    h = p.queries
    for start, end, k0 in ranges:
        q = h[start:end] * p.scale
        scores = torch.mm(q, h[k0:].T, out=_tile(ws, (end - start, n - k0)))
        yield _Tile(start, end, k0, n, q, h[k0:], scores, p.vectors(start, end, k0, n), kernels, mirror=end - k0,
                    row_bias=p.q_bias[start:end, None].clone())


def _at_factors(scores: Tensor, factors: Sequence[float]) -> Iterator[Tuple[int, Tensor]]:
    """(index, tile) of ``scores`` multiplied by each factor (the tile itself for a factor of 1)."""
    for i, factor in enumerate(factors):
        yield i, scores if factor == 1.0 else scores * factor


# ---- the passes over the tiles ---------------------------------------------------


def _forward(p: _Problem, kernels: loss_compile.Kernels, factors: Sequence[float] = (1.0,)) -> Tuple[Tensor, Tensor]:
    """(lse_all, lse_pos) as (len(factors), N): the scores of every tile are computed once (at ``p.scale``)
    and reduced at ``p.scale`` x each factor."""
    n, s = p.visibility.num_queries, len(factors)
    device = p.queries.device
    lse_all = torch.full((s, n), _NEG_INF, dtype=torch.float32, device=device)
    lse_pos = torch.full_like(lse_all, _NEG_INF)
    scaled = None  # every factor in one fused call: an (S, 1, ..., 1) tensor
    if s > 1 or factors[0] != 1.0:
        scaled = torch.tensor(list(factors), dtype=torch.float32, device=device)
    for t in _tiles(p, kernels):
        rows = slice(t.start, t.end)
        if t.mirror is None:  # the tile holds every visible key of its rows
            if scaled is None:
                a, b = t.kernels.rows_lse(t.scores, *t.vectors)
            else:
                a, b = t.kernels.rows_lse_scaled(t.scores, scaled.view(-1, *([1] * t.scores.dim())), *t.vectors)
            lse_all[:, rows], lse_pos[:, rows] = a.reshape(s, -1), b.reshape(s, -1)
            continue
        label, c_label = t.vectors[0], t.vectors[1]
        for i, x in _at_factors(t.scores, factors):
            a, b = t.kernels.rows_lse(x, *t.vectors)
            lse_all[i, rows] = torch.logaddexp(lse_all[i, rows], a)
            lse_pos[i, rows] = torch.logaddexp(lse_pos[i, rows], b)
            if t.mirror < t.hi - t.lo:  # the later segments' own terms, with the rows as their keys
                a, b = t.kernels.cols_lse(x[:, t.mirror :], label, c_label[:, t.mirror :].clone(), t.row_bias)
                lse_all[i, t.end :] = torch.logaddexp(lse_all[i, t.end :], a)
                lse_pos[i, t.end :] = torch.logaddexp(lse_pos[i, t.end :], b)
    p.mask_pad_queries_(lse_all, lse_pos)
    return lse_all, lse_pos


def _backward(p: _Problem, kernels: loss_compile.Kernels, lse_all: Tensor, lse_pos: Tensor, grad_all: Tensor,
              grad_pos: Tensor, need_q: bool, need_k: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(grad of queries, grad of keys) in fp32, recomputing the scores; in-batch: the total in the first."""
    grad_q, grad_k = p.grad_buffers(need_q, need_k)
    safe_all, safe_pos = _safe(lse_all), _safe(lse_pos)
    grad_all, grad_pos = grad_all.float(), grad_pos.float()
    inf = torch.full((1, 1), float("inf"), device=p.queries.device)
    for t in _tiles(p, kernels):
        row_stats = t.rows_of(safe_all, safe_pos, grad_all, grad_pos)
        if t.mirror is None:
            t.kernels.rows_grad_(t.scores, *t.vectors, row_stats)
        else:
            # the columns' own terms, for the later segments only (the own block is in the rows' terms)
            col_stats = tuple(
                torch.cat([inf.expand(1, t.mirror) if i < 2 else inf.new_zeros(1, t.mirror), x[None, t.end :]], dim=1)
                for i, x in enumerate((safe_all, safe_pos, grad_all, grad_pos))
            )
            t.kernels.symmetric_grad_(t.scores, *t.vectors, t.row_bias, row_stats, col_stats)
        t.add_grads(grad_q, grad_k, p.scale)
    return grad_q, (None if p.same_tensor else grad_k)


def _one_pass(p: _Problem, kernels: loss_compile.Kernels, score: Tensor, log_partition: Tensor, keep: Tensor,
              need_q: bool, need_k: bool) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """(lse_all, lse_pos, grad of queries, grad of keys) of sum(joint nll), in one walk over the tiles.

    Only where every tile holds every visible key of its rows (not the symmetric schedule):
    the rows' lse are final while their scores are still in the tile, so the tile becomes
    its gradient at once (no recomputation in backward). Grads as in ``_backward``.
    """
    if p.schedule() == "symmetric":
        raise ValueError("the one-pass gradient needs tiles that hold every key of their rows")
    n = p.visibility.num_queries
    lse_all = torch.full((n,), _NEG_INF, dtype=torch.float32, device=p.queries.device)
    lse_pos = torch.full_like(lse_all, _NEG_INF)
    grad_q, grad_k = p.grad_buffers(need_q, need_k)
    for t in _tiles(p, kernels):
        a, b = t.kernels.rows_nll_grad_(t.scores, *t.vectors, t.rows_of(p.q_bias, score, log_partition, keep))
        lse_all[t.start : t.end], lse_pos[t.start : t.end] = a.reshape(-1), b.reshape(-1)
        t.add_grads(grad_q, grad_k, p.scale)
    p.mask_pad_queries_(lse_all, lse_pos)
    return lse_all, lse_pos, grad_q, (None if p.same_tensor else grad_k)


# ---- autograd functions ------------------------------------------------------------


class _MemoryLogSumExp(torch.autograd.Function):
    """Blockwise (lse over visible keys, lse over visible positive keys), recomputed in backward."""

    @staticmethod
    def forward(ctx, queries, keys, key_labels, query_targets, visibility, scale, block_size):
        same = _same_tensor(queries, keys, key_labels, query_targets)
        with torch.no_grad():
            problem = _Problem.build(queries, keys, key_labels, query_targets, visibility, scale, block_size, same)
            lse_all, lse_pos = (x[0] for x in _forward(problem, problem.kernels()))
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
            grad_q, grad_k = _backward(problem, problem.kernels(), lse_all, lse_pos, grad_all, grad_pos, need_q,
                                       need_k)
        return (
            None if grad_q is None or not (need_q or need_k) else grad_q.to(queries.dtype),
            None if grad_k is None else grad_k.to(keys.dtype),
            None,
            None,
            None,
            None,
            None,
        )


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
            kernels = problem.kernels()
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
                    grad_q, grad_k = _backward(problem, problem.kernels(), lse_all, lse_pos, grad_nll * w_all,
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


# ---- public entry points -----------------------------------------------------------


def memory_scale(dim: int, temperature: float = 1.0) -> float:
    """The memory logit scale: 1/sqrt(d), divided by a temperature (>0; 1 in training)."""
    if temperature <= 0:
        fail(f"temperature must be > 0, got {temperature}")
    return 1.0 / (math.sqrt(dim) * temperature)


def _check_inputs(queries: Tensor, keys: Tensor, visibility: Visibility) -> None:
    """(N, d) queries and (M, d) keys that ``visibility`` describes."""
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must be (N, d) and (M, d)")
    if visibility.num_queries != queries.shape[0] or visibility.num_keys != keys.shape[0]:
        raise ValueError("visibility metadata does not match the number of queries/keys")


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
        scale: logit scale, default :func:`memory_scale` (1/sqrt(d)); divide it by a temperature at eval.
        block_size: query rows per block; extra memory is O(block_size * M).

    Returns:
        (lse_all, lse_pos): fp32 (N,) tensors, -inf where the set is empty.
    """
    _check_inputs(queries, keys, visibility)
    if scale is None:
        scale = memory_scale(queries.shape[1])
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
    _check_inputs(queries, keys, visibility)
    scales = [float(x) for x in scales]
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales must be a non-empty list of positive numbers, got {scales}")
    same = _same_tensor(queries, keys, key_labels, query_targets)
    with torch.no_grad():
        problem = _Problem.build(queries, keys, key_labels, query_targets, visibility, scales[0], int(block_size), same)
        return _forward(problem, problem.kernels(passes=len(scales)), [x / scales[0] for x in scales])


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
    _check_inputs(queries, keys, visibility)
    if scale is None:
        scale = memory_scale(queries.shape[1])
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
    """The arguments of one memory's :func:`memory_logsumexp` call, for callers that may want its
    (lse_all, lse_pos), at one or several scales, or, for a loss that is a plain sum over rows,
    :func:`memory_joint_nll`."""

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

    def logsumexp_at_scales(self, scales: Sequence[float]) -> Tuple[Tensor, Tensor]:
        """(S, N) (lse_all, lse_pos) of :func:`memory_logsumexp_at_scales` (``scale`` is not used)."""
        return memory_logsumexp_at_scales(self.queries, self.keys, self.key_labels, self.query_targets,
                                          self.visibility, scales, block_size=self.block_size)

    def joint_nll(self, token_target_score: Tensor, token_log_partition: Tensor,
                  valid: Optional[Tensor] = None) -> Tensor:
        """Per-token nll of :func:`memory_joint_nll` with this memory alone."""
        return memory_joint_nll(self.queries, self.keys, self.key_labels, self.query_targets, self.visibility,
                                token_target_score, token_log_partition, valid=valid, scale=self.scale,
                                block_size=self.block_size)


def in_batch_memory(
    reps: Tensor,
    labels: Tensor,
    valid: Optional[Tensor],
    rule: Rule,
    external_local: bool = True,
    query_valid: Optional[Tensor] = None,
    scale: Optional[float] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> MemoryInputs:
    """The memory of a (B, T, d) batch whose keys are its own tokens, under ``rule`` (:meth:`Visibility.for_batch`).

    Queries and keys are the B*T row-major flattened ``reps``; a position's (B, T) ``labels``
    entry is both its target as a query and its label as a key (the token that follows
    it). ``valid`` (B, T) marks the tokens that are keys and queries; ``query_valid`` (B, T),
    if given, marks the queries instead (e.g. only the scored positions).
    """
    batch, seq_len, dim = reps.shape
    flat = reps.reshape(batch * seq_len, dim)
    flat_labels = labels.reshape(-1)
    visibility = Visibility.for_batch(Rule(rule), batch, seq_len, valid=valid, external_local=external_local,
                                      device=reps.device)
    if query_valid is not None:
        visibility.query_valid = query_valid.reshape(-1)
    return MemoryInputs(flat, flat, flat_labels, flat_labels, visibility, scale=scale, block_size=block_size)


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
