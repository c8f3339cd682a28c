"""TRIME loss of a Hugging Face causal LM: :func:`causal_lm_loss`.

Thin glue over :mod:`trime.loss`, like the fairseq criteria: one forward pass with the
key capture on (:meth:`trime.hooks.KeyCapture.hf`), the token head's (target logit,
log-partition) from ``full_softmax_terms``, the memory sums from the blockwise
``memory_joint_nll`` under a :class:`trime.loss.Visibility` (memory sums and joint nll in one).

Conventions are HF's own causal-LM loss: position t predicts token t+1 (``labels`` are
shifted inside, never by the caller), a row's last position predicts nothing, and
``-100`` labels are ignored. Without ``labels`` they are ``input_ids`` with ``-100`` where
``attention_mask`` is 0, as ``DataCollatorForLanguageModeling`` makes them. A position is
a query, and a memory key, iff it is a real token and its target is real. The key of
position t carries the label t+1.

Memories (see :class:`trime.loss.Rule`): ``local``, earlier positions of the same row;
``long``, rows are consecutive segments and a position sees every earlier position in
row-major order (across ranks in rank order); ``external``, every position of the
other rows (of every rank) plus, unless ``external_local=False``, earlier positions of
its own row. Under ``torch.distributed`` the long and external memories gather keys
from all ranks with :func:`trime.distributed.gather_tokens`; keys of other ranks are
constants, this rank's keep their gradient (as in the fairseq criteria).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from trime.distributed import gather_tokens, world_size_and_rank
from trime.errors import fail
from trime.heads import full_softmax_terms
from trime.hooks import KeyCapture
from trime.loss import DEFAULT_BLOCK_SIZE, MemoryInputs, Rule, in_batch_memory, memory_scale
from trime.memories import MEMORIES

IGNORE_INDEX = -100


@dataclass
class CausalLMLossOutput:
    """What :func:`causal_lm_loss` returns. Per-position tensors are (B, T); position t predicts t+1.

    - ``loss``: mean TRIME NLL (nats) over predicted tokens, differentiable (= ``ori_loss``
      for ``memory="none"``);
    - ``ori_loss``: mean plain cross-entropy of the token head, HF's ``model(..., labels=...).loss``;
    - ``nll`` / ``ce``: per-position TRIME NLL and cross-entropy, 0 where nothing is predicted;
    - ``valid``: the predicted positions; ``num_tokens``: their number;
    - ``targets``: the predicted token per position (``-100`` where none);
    - ``keys``: the captured (B, T, d) keys/queries; ``logits``: the model's (B, T, V) logits.
    """

    loss: Tensor
    ori_loss: Tensor
    nll: Tensor
    ce: Tensor
    valid: Tensor
    num_tokens: int
    targets: Tensor
    keys: Tensor
    logits: Tensor
    memory: str

    @property
    def loss_sum(self) -> Tensor:
        """Sum of the TRIME NLL over predicted tokens."""
        return self.nll.sum()

    @property
    def ori_loss_sum(self) -> Tensor:
        """Sum of the cross-entropy over predicted tokens."""
        return self.ce.sum()


def shifted_targets(input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                    labels: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(targets, valid), both (B, T): position t's target is label t+1; valid iff it and its target are real."""
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    elif labels.shape != input_ids.shape:
        fail(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    if attention_mask is not None:
        valid &= attention_mask.bool()
    return targets, valid


def memory_inputs(
    keys: Tensor,
    targets: Tensor,
    valid: Tensor,
    memory: str,
    external_local: bool = True,
    scale: Optional[float] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    across_ranks: Optional[bool] = None,
) -> MemoryInputs:
    """The memory over (B, T, d) keys, flat (B*T,) queries; see :func:`causal_lm_loss`."""
    rule = Rule(memory)
    safe_targets = targets.clamp(min=0)
    world, rank = world_size_and_rank()
    if across_ranks is None:
        across_ranks = world > 1
    if not across_ranks or rule is Rule.LOCAL or world == 1:
        return in_batch_memory(keys, safe_targets, valid, rule, external_local, scale=scale, block_size=block_size)
    tokens = gather_tokens(keys, safe_targets, valid)
    key_ranks = range(rank + 1) if rule is Rule.LONG else range(len(tokens.shapes))
    return tokens.memory_inputs(key_ranks, rule, external_local, scale=scale, block_size=block_size)


def causal_lm_loss(
    model: nn.Module,
    input_ids: Tensor,
    memory: str = "local",
    attention_mask: Optional[Tensor] = None,
    external_local: bool = True,
    *,
    labels: Optional[Tensor] = None,
    temperature: float = 1.0,
    key_module: Optional[str] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    across_ranks: Optional[bool] = None,
    **model_kwargs: Any,
) -> CausalLMLossOutput:
    """TRIME loss of an ``AutoModelForCausalLM`` on a (B, T) batch (see the module doc for conventions).

    Args:
        model: a causal LM (possibly DDP-wrapped; the forward goes through the wrapper).
        input_ids: (B, T) token ids.
        memory: ``none``, ``local``, ``long`` or ``external``.
        attention_mask: (B, T), 0 at padding (left or right).
        external_local: external memory also sees earlier positions of the own row.
        labels: HF-style labels (``-100`` ignored), default ``input_ids`` masked by ``attention_mask``.
        temperature: divides the memory logit scale 1/sqrt(d) (1 in training, as the fairseq criteria).
        key_module: dotted name of the module whose input are the keys (default: last layer's MLP).
        block_size: query rows per block of the memory computation (extra memory O(block x keys)).
        across_ranks: gather long/external keys from all ranks; default: when torch.distributed runs.
        model_kwargs: passed on to the model's forward (e.g. ``position_ids``).
    """
    if memory not in MEMORIES:
        fail(f"memory must be one of {', '.join(MEMORIES)}, got {memory!r}")
    if input_ids.dim() != 2:
        fail(f"input_ids must be (batch, time), got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        fail(f"attention_mask {tuple(attention_mask.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
    batch, seq_len = input_ids.shape
    with KeyCapture.hf(model, key_module) as capture:
        output = model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    keys = capture.keys((batch, seq_len))
    logits = output.logits if hasattr(output, "logits") else output[0]
    targets, valid = shifted_targets(input_ids, attention_mask, labels)
    flat_valid = valid.reshape(-1)
    token_score, token_log_partition = full_softmax_terms(logits, targets.clamp(min=0))
    ce = torch.where(flat_valid, token_log_partition - token_score, torch.zeros_like(token_score))
    num_tokens = int(flat_valid.sum())
    denominator = max(num_tokens, 1)
    if memory == "none":
        nll = ce
    else:
        scale = memory_scale(keys.shape[-1], temperature)
        inputs = memory_inputs(keys, targets, valid, memory, external_local, scale, block_size, across_ranks)
        # one memory and a plain mean over rows: the one-pass memory_joint_nll
        nll = inputs.joint_nll(token_score, token_log_partition, valid=flat_valid)
    return CausalLMLossOutput(
        loss=nll.sum() / denominator,
        ori_loss=ce.sum() / denominator,
        nll=nll.view(batch, seq_len),
        ce=ce.view(batch, seq_len),
        valid=valid,
        num_tokens=num_tokens,
        targets=targets,
        keys=keys,
        logits=logits,
        memory=memory,
    )
