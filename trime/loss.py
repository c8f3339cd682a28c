"""TRIME's joint vocabulary + memory negative log-likelihood, in pure torch.

For query token i with target y_i, memory keys h_j carrying labels y_j (the token
that followed position j) and the set V(i) of keys visible to i, the loss is

    -log [ (Z_t p_tok(y_i) + sum_{j in V(i), y_j = y_i} exp(s_ij))
           / (Z_t           + sum_{j in V(i)}             exp(s_ij)) ]

with s_ij = h_i . h_j * scale (scale = 1/sqrt(d), divided further by a temperature at
evaluation). Z_t is the token head's partition function: the full vocabulary for a
plain softmax, the head cluster for an adaptive softmax (as the original code does),
and Z_t p_tok(y) is the head's unnormalised score of y.

The memory sums are computed blockwise over query rows by a custom autograd
function that recomputes the logits in backward, so no N x M matrix is held: extra
memory is O(block_size x M). Empty sets give exactly -inf (no -10000 constants), so
a query with no visible memory gets exactly the plain cross-entropy. Accumulation is
always fp32, whatever the input dtype.

This module never imports fairseq; ``adaptive_softmax_terms`` only duck-types
fairseq's ``AdaptiveSoftmax`` (``forward(input, target) -> (outputs, new_targets)``).
"""

import enum
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "Rule",
    "Visibility",
    "memory_logsumexp",
    "scored_memory_logsumexp",
    "joint_nll",
    "full_softmax_terms",
    "adaptive_softmax_terms",
    "DEFAULT_BLOCK_SIZE",
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
    row-major (batch, seq_len) batch); it takes a fast path that never builds a mask
    outside the diagonal sub-blocks.
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

    # ---- blockwise scores -------------------------------------------------------

    def row_blocks(self, block_size: int) -> Iterator[Tuple[int, int]]:
        """Query row ranges; whole segments per block on the in-batch local/external path."""
        step = max(1, block_size)
        if self._batch_shape is not None and self.rule is not Rule.LONG:
            seq_len = self._batch_shape[1]
            step = max(1, block_size // seq_len) * seq_len
        for start in range(0, self.num_queries, step):
            yield start, min(start + step, self.num_queries)

    def block_scores(self, scaled_queries: Tensor, keys: Tensor, start: int, end: int) -> "_BlockScores":
        """fp32 scores of queries [start, end) against their candidate keys, -inf where invisible."""
        if self._batch_shape is None:
            lo, hi = self.key_range(start, end)
            if hi <= lo:
                return _BlockScores(None, lo, hi, 1)
            scores = scaled_queries @ keys[lo:hi].float().T
            scores.masked_fill_(~self.block_mask(start, end, lo, hi), _NEG_INF)
            return _BlockScores(scores[None], lo, hi, 1)
        seq_len = self._batch_shape[1]
        if self.rule is Rule.LOCAL:
            groups = (end - start) // seq_len
            q = scaled_queries.view(groups, seq_len, -1)
            k = keys[start:end].float().view(groups, seq_len, -1)
            scores = torch.baddbmm(_causal_bias(seq_len, q.device), q, k.transpose(1, 2))
            lo, hi = start, end
        elif self.rule is Rule.LONG:
            lo, hi, groups = 0, end, 1
            scores = (scaled_queries @ keys[:end].float().T)[None]
            scores[0, :, start:end] += _causal_bias(end - start, scores.device)
        else:
            lo, hi, groups = 0, self.num_keys, 1
            scores = (scaled_queries @ keys.float().T)[None]
            for seg_start in range(start, end, seq_len):
                own = scores[0, seg_start - start : seg_start - start + seq_len, seg_start : seg_start + seq_len]
                if self.external_local:
                    own += _causal_bias(seq_len, scores.device)
                else:
                    own.fill_(_NEG_INF)
        if self.key_valid is not None:
            key_valid = self.key_valid[lo:hi].view(groups, 1, -1)
            if not bool(key_valid.all()):
                scores.masked_fill_(~key_valid, _NEG_INF)
        return _BlockScores(scores, lo, hi, groups)


@dataclass
class _BlockScores:
    """Scores (groups, rows, cols) of a block of queries against keys [lo, hi)."""

    scores: Optional[Tensor]
    lo: int
    hi: int
    groups: int

    def labels_match(self, key_labels: Tensor, query_targets: Tensor) -> Tensor:
        rows = query_targets.numel() // self.groups
        return key_labels[self.lo : self.hi].view(self.groups, 1, -1) == query_targets.view(self.groups, rows, 1)

    def key_grad(self, grad_scores: Tensor, scaled_queries: Tensor) -> Tensor:
        q = scaled_queries.view(self.groups, -1, scaled_queries.shape[-1])
        return torch.bmm(grad_scores.transpose(1, 2), q).reshape(self.hi - self.lo, -1)

    def query_grad(self, grad_scores: Tensor, keys: Tensor) -> Tensor:
        k = keys[self.lo : self.hi].float().view(self.groups, -1, keys.shape[-1])
        return torch.bmm(grad_scores, k).reshape(-1, keys.shape[-1])


_causal_cache: dict = {}


def _causal_bias(size: int, device: torch.device) -> Tensor:
    """(size, size) additive mask: 0 strictly below the diagonal, -inf on and above it."""
    key = (size, str(device))
    bias = _causal_cache.get(key)
    if bias is None:
        bias = torch.triu(torch.full((size, size), _NEG_INF, device=device), diagonal=0)
        if len(_causal_cache) > 16:
            _causal_cache.clear()
        _causal_cache[key] = bias
    return bias


def _masked_logsumexp(scores: Tensor, mask: Tensor) -> Tensor:
    """Row-wise logsumexp over ``mask``; exactly -inf for rows with no True entry."""
    masked = scores.masked_fill(~mask, _NEG_INF)
    return _logsumexp_or_neginf(masked)


def _logsumexp_or_neginf(scores: Tensor) -> Tensor:
    """logsumexp over the last dim, -inf (not nan) for all -inf rows."""
    row_max = scores.amax(dim=-1)
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    return (scores - shift[..., None]).exp().sum(dim=-1).log() + shift


# A positive more than this many nats below the row maximum could underflow in the
# shared exp; such (rare) rows are recomputed exactly.
_UNDERFLOW_NATS = 60.0


def _block_lse(scores: Tensor, positive: Tensor) -> Tuple[Tensor, Tensor]:
    """(lse over finite scores, lse over positive finite scores), one exp pass."""
    row_max = scores.amax(dim=-1)
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = (scores - shift[..., None]).exp_()
    lse_all = weights.sum(dim=-1).log_() + shift
    pos_sum = (weights * positive).sum(dim=-1)
    lse_pos = pos_sum.log_() + shift
    pos_max = scores.masked_fill(~positive, _NEG_INF).amax(dim=-1)
    risky = torch.isfinite(pos_max) & ((pos_max - shift) < -_UNDERFLOW_NATS)
    if bool(risky.any()):
        exact = _logsumexp_or_neginf(scores[risky].masked_fill(~positive[risky], _NEG_INF))
        lse_pos[risky] = exact
    return lse_all, lse_pos


def _block_grad(scores: Tensor, positive: Tensor, lse_all, lse_pos, grad_all, grad_pos) -> Tensor:
    """d(g_all . lse_all + g_pos . lse_pos)/d scores for one block, one exp pass."""
    inf = torch.full_like(lse_all, float("inf"))
    safe_all = torch.where(torch.isfinite(lse_all), lse_all, inf)  # empty rows -> all-zero weights
    weights = (scores - safe_all[..., None]).exp_()
    gap = lse_all - lse_pos  # >= 0; exp(gap) rescales the shared weights to the positive softmax
    finite_pos = torch.isfinite(lse_pos)
    exact_rows = finite_pos & (gap > _UNDERFLOW_NATS)
    ratio = torch.where(finite_pos & ~exact_rows, grad_pos * torch.exp(torch.where(finite_pos, gap, 0.0)), 0.0)
    grad = weights * (grad_all[..., None] + positive * ratio[..., None])
    if bool(exact_rows.any()):
        rows = scores[exact_rows]
        pos_weights = torch.where(positive[exact_rows], (rows - lse_pos[exact_rows][..., None]).exp(), 0.0)
        grad[exact_rows] += grad_pos[exact_rows][..., None] * pos_weights
    return grad


class _MemoryLogSumExp(torch.autograd.Function):
    """Blockwise (lse over visible keys, lse over visible positive keys), recomputed in backward."""

    @staticmethod
    def forward(ctx, queries, keys, key_labels, query_targets, visibility, scale, block_size):
        n = queries.shape[0]
        lse_all = torch.full((n,), _NEG_INF, dtype=torch.float32, device=queries.device)
        lse_pos = torch.full_like(lse_all, _NEG_INF)
        for start, end in visibility.row_blocks(block_size):
            scaled = queries[start:end].float() * scale
            block = visibility.block_scores(scaled, keys, start, end)
            if block.scores is None:
                continue
            positive = block.labels_match(key_labels, query_targets[start:end])
            block_all, block_pos = _block_lse(block.scores, positive)
            lse_all[start:end], lse_pos[start:end] = block_all.reshape(-1), block_pos.reshape(-1)
        if visibility.query_valid is not None:  # pad queries see nothing
            lse_all.masked_fill_(~visibility.query_valid, _NEG_INF)
            lse_pos.masked_fill_(~visibility.query_valid, _NEG_INF)
        ctx.save_for_backward(queries, keys, key_labels, query_targets, lse_all, lse_pos)
        ctx.visibility, ctx.scale, ctx.block_size = visibility, scale, block_size
        return lse_all, lse_pos

    @staticmethod
    def backward(ctx, grad_all, grad_pos):
        queries, keys, key_labels, query_targets, lse_all, lse_pos = ctx.saved_tensors
        visibility, scale = ctx.visibility, ctx.scale
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_q = torch.zeros(queries.shape, dtype=torch.float32, device=queries.device) if need_q else None
        grad_k = torch.zeros(keys.shape, dtype=torch.float32, device=keys.device) if need_k else None
        grad_all, grad_pos = grad_all.float(), grad_pos.float()
        for start, end in visibility.row_blocks(ctx.block_size):
            scaled = queries[start:end].float() * scale
            block = visibility.block_scores(scaled, keys, start, end)
            if block.scores is None:
                continue
            shape = block.scores.shape[:2]
            positive = block.labels_match(key_labels, query_targets[start:end])
            grad_scores = _block_grad(
                block.scores,
                positive,
                lse_all[start:end].view(shape),
                lse_pos[start:end].view(shape),
                grad_all[start:end].view(shape),
                grad_pos[start:end].view(shape),
            )
            if need_q:
                grad_q[start:end] += block.query_grad(grad_scores, keys) * scale
            if need_k:
                grad_k[block.lo : block.hi] += block.key_grad(grad_scores, scaled)
        return (
            None if grad_q is None else grad_q.to(queries.dtype),
            None if grad_k is None else grad_k.to(keys.dtype),
            None,
            None,
            None,
            None,
            None,
        )


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
