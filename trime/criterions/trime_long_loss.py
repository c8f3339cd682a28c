"""fairseq criteria ``trime_long_loss_same_device`` and ``trime_long_loss`` (TrimeLM_long).

Long-term memory: a token sees every earlier token of a stream of consecutive
segments, not only the earlier tokens of its own segment.

- ``trime_long_loss_same_device``: the stream is the local batch flattened row-major
  (all previous rows plus the earlier tokens of the own row). It needs ``--task trime_lm
  --keep-order``, so that the rows are consecutive segments of the corpus; it refuses random
  batches unless ``--allow-random-batches``, as ``trime_ext_loss`` does.
- ``trime_long_loss``: the stream spans a group of C consecutive ranks, concatenated in
  rank order, with C = ``--train-mem-size`` / ``--max-tokens`` (a ``trime_lm`` task
  option; C = 1 otherwise). Keys from the other ranks are gathered with
  ``torch.distributed`` and are constants: only this rank's keys get gradient, as in
  the original. Uneven batch shapes across ranks and dataset padding are handled by
  the non-pad mask. With C = 1 or a single process it equals ``same_device``.
"""

from fairseq.criterions import register_criterion
from torch import Tensor

from trime.criterions.trime_loss import OrderedBatchesConfig, TrimeLoss, require_ordered_batches
from trime.distributed import gather_tokens, is_dummy_batch, world_size_and_rank
from trime.errors import fail
from trime.loss import DEFAULT_BLOCK_SIZE, MemoryInputs, Rule


@register_criterion("trime_long_loss_same_device", dataclass=OrderedBatchesConfig)
class TrimeLongLossSameDevice(TrimeLoss):
    """Memory = every earlier token of the row-major flattened local batch."""

    rule = Rule.LONG

    def __init__(self, task, ce_warmup_epoch: int = 0, memory_block_size: int = DEFAULT_BLOCK_SIZE,
                 allow_random_batches: bool = False) -> None:
        super().__init__(task, ce_warmup_epoch=ce_warmup_epoch, memory_block_size=memory_block_size)
        require_ordered_batches(task, self.criterion_name(), allow_random_batches, plans_accepted=False)

    @classmethod
    def criterion_name(cls) -> str:
        return "trime_long_loss_same_device"


def memory_group_size(task) -> int:
    """C, the number of consecutive ranks whose batches form one memory (1 unless the task sets it)."""
    return int(getattr(task, "memory_group_size", 1) or 1)


@register_criterion("trime_long_loss", dataclass=OrderedBatchesConfig)
class TrimeLongLoss(TrimeLongLossSameDevice):
    """Memory = every earlier token of the group of C consecutive ranks, in rank order."""

    def __init__(self, task, ce_warmup_epoch: int = 0, memory_block_size: int = DEFAULT_BLOCK_SIZE,
                 allow_random_batches: bool = False) -> None:
        super().__init__(task, ce_warmup_epoch=ce_warmup_epoch, memory_block_size=memory_block_size,
                         allow_random_batches=allow_random_batches)
        self.group_size = memory_group_size(task)

    @classmethod
    def criterion_name(cls) -> str:
        return "trime_long_loss"

    def memory(self, reps: Tensor, targets: Tensor, valid: Tensor, model, sample) -> MemoryInputs:
        world, rank = world_size_and_rank()
        group = self.group_size
        if world % group:
            fail(
                f"trime_long_loss: --train-mem-size makes groups of {group} ranks but the world size is "
                f"{world}; use a world size divisible by {group} or change --train-mem-size"
            )
        if group == 1:  # the memory is the local batch: no collective needed
            return self.in_batch_memory(reps, targets, valid)
        if is_dummy_batch(sample):  # this rank's shard ran out: join the collectives, offer no keys
            valid = valid.new_zeros(valid.shape)
        tokens = gather_tokens(reps, targets, valid)
        # later ranks of the group hold only later tokens: the keys are the group's ranks up to this one
        first = rank - rank % group
        return self.gathered_memory(tokens, range(first, rank + 1), Rule.LONG)
