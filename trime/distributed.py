"""Cross-rank gathering of TRIME memory tokens for ``trime_long_loss`` and ``trime_ext_loss``.

Every rank contributes its batch's flattened representations, labels and non-pad mask.
Ranks may hold batches of different shapes (uneven batch sizes or segment lengths):
shapes are exchanged first, each rank pads its tokens to the largest count, and the
padding is cut off again after ``all_gather``. The rank's own slot is then replaced by
its live local tensor, so gradients reach only this rank's keys; the other ranks' keys
are constants, exactly as in the original ``my_gather``.

Works with any ``torch.distributed`` backend (gloo on CPU, NCCL on GPU: tensors stay on
the device of the representations). Without an initialised process group everything
degenerates to a single rank and no collective is issued.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from trime.loss import DEFAULT_BLOCK_SIZE, MemoryInputs, Rule, Visibility


def world_size_and_rank() -> tuple[int, int]:
    """(world size, rank) of the default process group, or (1, 0) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@dataclass
class GatheredTokens:
    """Every rank's tokens, in rank order; ``reps[rank]`` is the live local tensor.

    ``shapes[r]`` is rank r's (batch, seq_len); ``reps[r]`` is (batch*seq_len, dim),
    ``labels[r]`` and ``valid[r]`` are (batch*seq_len,).
    """

    rank: int
    shapes: list[tuple[int, int]]
    reps: list[Tensor]
    labels: list[Tensor]
    valid: list[Tensor]

    @property
    def sizes(self) -> list[int]:
        """Number of (flattened) tokens per rank."""
        return [b * t for b, t in self.shapes]

    def token_offsets(self) -> list[int]:
        """Index of each rank's first token in the rank-order concatenation of all tokens."""
        offsets, total = [], 0
        for size in self.sizes:
            offsets.append(total)
            total += size
        return offsets

    def row_offsets(self) -> list[int]:
        """Index of each rank's first segment in the rank-order concatenation of all segments."""
        offsets, total = [], 0
        for batch, _ in self.shapes:
            offsets.append(total)
            total += batch
        return offsets

    def stream(self, ranks) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(reps, labels, valid, segment, position) of ``ranks``' tokens, concatenated in rank order.

        ``segment`` is the global segment (row) index and ``position`` the global index of
        the token in the rank-order concatenation of every rank's flattened batch.
        """
        ranks = list(ranks)
        token_offsets, row_offsets = self.token_offsets(), self.row_offsets()
        device = self.reps[self.rank].device
        segments, positions = [], []
        for r in ranks:
            batch, seq_len = self.shapes[r]
            local = torch.arange(batch * seq_len, device=device)
            segments.append(row_offsets[r] + local // max(seq_len, 1))
            positions.append(token_offsets[r] + local)
        return (
            torch.cat([self.reps[r] for r in ranks]),
            torch.cat([self.labels[r] for r in ranks]),
            torch.cat([self.valid[r] for r in ranks]),
            torch.cat(segments),
            torch.cat(positions),
        )

    def memory_inputs(
        self,
        key_ranks,
        rule: Rule,
        external_local: bool = True,
        scale: float | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> MemoryInputs:
        """The memory of this rank's tokens over the tokens of ``key_ranks`` (for ``logsumexp`` or ``joint_nll``).

        Positions and segments are global, so ``rule`` applies across ranks in rank order.
        """
        keys, key_labels, key_valid, key_segment, key_position = self.stream(key_ranks)
        queries, query_targets, query_valid, query_segment, query_position = self.stream([self.rank])
        visibility = Visibility(
            rule=rule,
            query_segment=query_segment,
            query_position=query_position,
            key_segment=key_segment,
            key_position=key_position,
            query_valid=query_valid,
            key_valid=key_valid,
            external_local=external_local,
        )
        return MemoryInputs(queries, keys, key_labels, query_targets, visibility, scale=scale, block_size=block_size)


def gather_tokens(reps: Tensor, labels: Tensor, valid: Tensor) -> GatheredTokens:
    """All ranks' (reps, labels, valid) of a (B, T, C) batch; a collective every rank must call.

    The local batch appears untouched (with its autograd graph) in its own slot; the
    slots of other ranks are detached copies.
    """
    world, rank = world_size_and_rank()
    batch, seq_len, dim = reps.shape
    flat_reps = reps.reshape(batch * seq_len, dim)
    flat_labels = labels.reshape(-1)
    flat_valid = valid.reshape(-1)
    if world == 1:
        return GatheredTokens(rank, [(batch, seq_len)], [flat_reps], [flat_labels], [flat_valid])

    device = reps.device
    shape = torch.tensor([batch, seq_len], dtype=torch.long, device=device)
    all_shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(all_shapes, shape)
    shapes = [(int(s[0]), int(s[1])) for s in all_shapes]
    sizes = [b * t for b, t in shapes]
    slot = max(max(sizes), 1)  # every rank sends `slot` tokens (zero padding is cut off below)
    own = batch * seq_len

    padded_reps = flat_reps.new_zeros(slot, dim)
    padded_reps[:own] = flat_reps.detach()
    rep_slots = [torch.empty_like(padded_reps) for _ in range(world)]
    dist.all_gather(rep_slots, padded_reps)

    # labels and the valid mask travel together in one int64 tensor
    padded_meta = torch.zeros(2, slot, dtype=torch.long, device=device)
    padded_meta[0, :own] = flat_labels
    padded_meta[1, :own] = flat_valid.long()
    meta_slots = [torch.empty_like(padded_meta) for _ in range(world)]
    dist.all_gather(meta_slots, padded_meta)

    gathered_reps = [rep_slots[r][: sizes[r]] for r in range(world)]
    gathered_labels = [meta_slots[r][0, : sizes[r]] for r in range(world)]
    gathered_valid = [meta_slots[r][1, : sizes[r]].bool() for r in range(world)]
    # own slot: the live tensors, so this rank's keys receive gradient
    gathered_reps[rank], gathered_labels[rank], gathered_valid[rank] = flat_reps, flat_labels, flat_valid
    return GatheredTokens(rank, shapes, gathered_reps, gathered_labels, gathered_valid)


# Key under which trime_lm marks fairseq's dummy batch (the stand-in a rank processes
# when its shard has run out, so that collectives stay matched across ranks). The
# gathering criteria then contribute no keys from it.
DUMMY_BATCH_KEY = "trime_dummy_batch"


def is_dummy_batch(sample) -> bool:
    """Whether ``sample`` is fairseq's dummy batch as marked by the trime_lm task."""
    return bool(isinstance(sample, dict) and sample.get(DUMMY_BATCH_KEY, False))
