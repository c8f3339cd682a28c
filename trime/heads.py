"""Token heads' terms of the TRIME loss, in pure torch: (log Z_t p_tok(y), log Z_t) per position.

Z_t is the token head's partition function: the full vocabulary for a plain softmax, the
head cluster for an adaptive softmax (as the original TRIME code does), and Z_t p_tok(y)
is the head's unnormalised score of y. Both front-ends use these; this module imports
neither fairseq nor transformers and only duck-types fairseq's objects: an adaptive
softmax is anything with ``forward(input, target) -> (outputs, new_targets)`` and a
``cutoff`` list, a model anything with ``model.decoder`` (and optionally
``model.decoder.adaptive_softmax``).
"""

from typing import Any, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["adaptive_softmax_terms", "full_softmax_terms", "token_head_terms"]


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


def adaptive_softmax_terms(adaptive_softmax: Any, features: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor]:
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


def token_head_terms(model: Any, net_output: Sequence[Tensor], targets: Tensor) -> Tuple[Tensor, Tensor]:
    """(log Z_t p_tok(y), log Z_t) per flattened position of a fairseq LM's output, adaptive or full softmax.

    ``net_output[0]`` is the decoder's output: features for an adaptive softmax
    (``model.decoder.adaptive_softmax``), logits otherwise.
    """
    adaptive_softmax = getattr(model.decoder, "adaptive_softmax", None)
    if adaptive_softmax is not None:
        return adaptive_softmax_terms(adaptive_softmax, net_output[0], targets)
    return full_softmax_terms(net_output[0], targets)
