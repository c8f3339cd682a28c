"""fairseq criterion ``trime_ext_loss`` (TrimeLM_ext): in-batch external memory.

A token sees every token of every *other* segment of the global batch (all ranks'
batches, gathered with ``torch.distributed``), future positions included, plus the
strictly earlier tokens of its own segment (local memory). Train with ``--task
trime_lm --predefined-batches PLAN`` so that a global batch holds BM25-similar
segments (``--keep-order``, consecutive segments, is accepted too). Without either,
the batches are fairseq's random ones and the external memory holds unrelated
segments: the criterion then refuses to start unless ``--allow-random-batches`` says
that is meant, and warns when it does.

In training the local memory is switched off for the whole batch with probability
``--cross-sent-ratio`` (default 0.9). Each coin is a pure function of (``--seed``,
rank, update number, index of the forward within the update), hashed with numpy's
``SeedSequence`` (the original drew from Python's global ``random``): a run killed and
resumed from a checkpoint draws exactly what an uninterrupted run draws, with no
generator state to checkpoint. The fraction of forwards with local memory off is
logged as ``local_off``. Validation always keeps the local memory on. Keys gathered
from other ranks are constants; this rank's keys (all of its segments) receive gradient.
"""

import logging
from dataclasses import dataclass, field

from fairseq import metrics
from fairseq.criterions import register_criterion
from omegaconf import II
from torch import Tensor

from trime.criterions.trime_loss import OrderedBatchesConfig, TrimeLoss, require_ordered_batches
from trime.distributed import gather_tokens, is_dummy_batch, world_size_and_rank
from trime.errors import fail
from trime.loss import DEFAULT_BLOCK_SIZE, MemoryInputs, Rule
from trime.memories import local_off


@dataclass
class TrimeExtLossConfig(OrderedBatchesConfig):
    cross_sent_ratio: float = field(
        default=0.9,
        metadata={"help": "probability, per training forward, of switching off the local (own-segment) memory"},
    )
    seed: int = II("common.seed")


logger = logging.getLogger(__name__)


@register_criterion("trime_ext_loss", dataclass=TrimeExtLossConfig)
class TrimeExtLoss(TrimeLoss):
    """Memory = all tokens of the other segments of the global batch + earlier tokens of the own segment."""

    rule = Rule.EXTERNAL

    def __init__(
        self,
        task,
        ce_warmup_epoch: int = 0,
        memory_block_size: int = DEFAULT_BLOCK_SIZE,
        cross_sent_ratio: float = 0.9,
        allow_random_batches: bool = False,
        seed: int = 1,
    ) -> None:
        super().__init__(task, ce_warmup_epoch=ce_warmup_epoch, memory_block_size=memory_block_size)
        if not 0.0 <= cross_sent_ratio <= 1.0:
            fail(f"--cross-sent-ratio must be in [0, 1], got {cross_sent_ratio}")
        self.cross_sent_ratio = float(cross_sent_ratio)
        self.allow_random_batches = bool(allow_random_batches)
        self.seed = int(seed)
        self._update: int | None = None  # the trainer's update number (None: not driven by task.train_step)
        self._forward_in_update = 0
        self._untracked_draws = 0
        self._local_off: bool | None = None  # this forward's draw (None: no draw)
        _follow_task_updates(task)
        require_ordered_batches(task, "trime_ext_loss", self.allow_random_batches, plans_accepted=True)

    @classmethod
    def criterion_name(cls) -> str:
        return "trime_ext_loss"

    def start_update(self, update: int) -> None:
        """Called with the trainer's update number before each training forward."""
        if update != self._update:
            self._update, self._forward_in_update = update, 0

    def draw_local_off(self) -> bool:
        """One coin flip: True (local memory off) with probability ``cross_sent_ratio``.

        The coin of forward j of update u on rank r is :func:`trime.memories.local_off` of
        ``(seed, r, u, j)``, the coin ``trime-hf-train`` draws for step u, micro-batch j; called
        outside a fairseq trainer, successive calls number themselves 0, 1, 2 ... as updates.
        """
        _, rank = world_size_and_rank()
        if self._update is None:
            update, forward = self._untracked_draws, 0
            self._untracked_draws += 1
        else:
            update, forward = self._update, self._forward_in_update
            self._forward_in_update += 1
        return local_off(self.seed, rank, update, forward, self.cross_sent_ratio)

    def forward(self, model, sample, reduce: bool = True):
        self._local_off = None
        loss, sample_size, logging_output = super().forward(model, sample, reduce)
        # both keys always present, so logging outputs sum cleanly across ranks
        logging_output["local_off"] = int(bool(self._local_off))
        logging_output["local_draws"] = int(self._local_off is not None)
        return loss, sample_size, logging_output

    def memory(self, reps: Tensor, targets: Tensor, valid: Tensor, model, sample) -> MemoryInputs:
        local_on = True
        if model.training:
            self._local_off = self.draw_local_off()
            local_on = not self._local_off
        if is_dummy_batch(sample):  # a dummy batch joins the gather but offers no keys
            valid = valid.new_zeros(valid.shape)
        if world_size_and_rank()[0] == 1:  # no other ranks: the in-batch fast path
            return self.in_batch_memory(reps, targets, valid, external_local=local_on)
        tokens = gather_tokens(reps, targets, valid)
        return self.gathered_memory(tokens, range(len(tokens.shapes)), Rule.EXTERNAL, external_local=local_on)

    @staticmethod
    def reduce_metrics(logging_outputs: list[dict]) -> None:
        TrimeLoss.reduce_metrics(logging_outputs)
        draws = sum(log.get("local_draws", 0) for log in logging_outputs)
        if draws:
            local_off = sum(log.get("local_off", 0) for log in logging_outputs)
            metrics.log_scalar("local_off", local_off / draws, draws, round=3)


def _follow_task_updates(task) -> None:
    """Wrap ``task.train_step`` once so that a ``TrimeExtLoss`` it is given learns the update number."""
    if getattr(task, "_trime_tracks_updates", False):
        return
    train_step = task.train_step

    def train_step_and_track(sample, model, criterion, optimizer, update_num, *args, **kwargs):
        if isinstance(criterion, TrimeExtLoss):
            criterion.start_update(int(update_num))
        return train_step(sample, model, criterion, optimizer, update_num, *args, **kwargs)

    task.train_step = train_step_and_track
    task._trime_tracks_updates = True
