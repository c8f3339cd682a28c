"""fairseq criterion ``trime_ext_loss`` (TrimeLM_ext): in-batch external memory.

A token sees every token of every *other* segment of the global batch (all ranks'
batches, gathered with ``torch.distributed``), future positions included, plus the
strictly earlier tokens of its own segment (local memory). Train with ``--task
trime_lm --predefined-batches PLAN`` so that a global batch holds BM25-similar
segments.

In training the local memory is switched off for the whole batch with probability
``--cross-sent-ratio`` (default 0.9), drawn once per forward from a generator seeded
with ``--seed`` + rank (the original used Python's global ``random``); the fraction of
forwards with local memory off is logged as ``local_off``. Validation always keeps the
local memory on. Keys gathered from other ranks are constants; this rank's keys (all
of its segments) receive gradient.

The generator is not stored in checkpoints: a resumed run draws a fresh sequence.
"""

from dataclasses import dataclass, field

import torch
from fairseq import metrics
from fairseq.criterions import register_criterion
from omegaconf import II
from torch import Tensor

from trime.criterions.trime_loss import TrimeLoss, TrimeLossConfig
from trime.distributed import gather_tokens, is_dummy_batch, world_size_and_rank
from trime.errors import fail
from trime.loss import DEFAULT_BLOCK_SIZE, Rule


@dataclass
class TrimeExtLossConfig(TrimeLossConfig):
    cross_sent_ratio: float = field(
        default=0.9,
        metadata={"help": "probability, per training forward, of switching off the local (own-segment) memory"},
    )
    seed: int = II("common.seed")


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
        seed: int = 1,
    ) -> None:
        super().__init__(task, ce_warmup_epoch=ce_warmup_epoch, memory_block_size=memory_block_size)
        if not 0.0 <= cross_sent_ratio <= 1.0:
            fail(f"--cross-sent-ratio must be in [0, 1], got {cross_sent_ratio}")
        self.cross_sent_ratio = float(cross_sent_ratio)
        self.seed = int(seed)
        self._generator: torch.Generator | None = None
        self._local_off: bool | None = None  # this forward's draw (None: no draw)

    @classmethod
    def criterion_name(cls) -> str:
        return "trime_ext_loss"

    def draw_local_off(self) -> bool:
        """One coin flip: True (local memory off) with probability ``cross_sent_ratio``."""
        if self._generator is None:  # seeded lazily: the rank is known once distributed is up
            _, rank = world_size_and_rank()
            self._generator = torch.Generator().manual_seed(self.seed + rank)
        return bool(torch.rand((), generator=self._generator) < self.cross_sent_ratio)

    def forward(self, model, sample, reduce: bool = True):
        self._local_off = None
        loss, sample_size, logging_output = super().forward(model, sample, reduce)
        # both keys always present, so logging outputs sum cleanly across ranks
        logging_output["local_off"] = int(bool(self._local_off))
        logging_output["local_draws"] = int(self._local_off is not None)
        return loss, sample_size, logging_output

    def memory_terms(self, reps: Tensor, targets: Tensor, valid: Tensor, model, sample) -> tuple[Tensor, Tensor]:
        local_on = True
        if model.training:
            self._local_off = self.draw_local_off()
            local_on = not self._local_off
        if is_dummy_batch(sample):  # a dummy batch joins the gather but offers no keys
            valid = valid.new_zeros(valid.shape)
        if world_size_and_rank()[0] == 1:  # no other ranks: the in-batch fast path
            return self.in_batch_memory_terms(reps, targets, valid, external_local=local_on)
        tokens = gather_tokens(reps, targets, valid)
        return self.gathered_memory_terms(tokens, range(len(tokens.shapes)), Rule.EXTERNAL, external_local=local_on)

    @staticmethod
    def reduce_metrics(logging_outputs: list[dict]) -> None:
        TrimeLoss.reduce_metrics(logging_outputs)
        draws = sum(log.get("local_draws", 0) for log in logging_outputs)
        if draws:
            local_off = sum(log.get("local_off", 0) for log in logging_outputs)
            metrics.log_scalar("local_off", local_off / draws, draws, round=3)
