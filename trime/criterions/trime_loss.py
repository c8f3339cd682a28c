"""fairseq criterion ``trime_loss`` (TrimeLM): the TRIME loss with local memory.

Thin glue: it runs the model with the last-FFN-input capture on, asks the token head
for log Z_t p(y) and log Z_t, and hands everything to :mod:`trime.loss`. Subclasses
(long-term and external memory) override :meth:`TrimeLoss.memory` only; the loss of
one memory is :func:`trime.loss.memory_joint_nll` (one-pass gradient where it applies).

Logged (bits per non-pad token): ``loss`` (what is optimised), ``ori_loss`` (plain
cross-entropy of the token head), ``norm_loss`` (the TRIME loss, when computed) and
the derived ``ppl``. With ``--ce-warmup-epoch N`` training epochs 1..N optimise the
plain cross-entropy; validation always reports the TRIME loss.
"""

import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.tasks.language_modeling import LanguageModelingTask
from torch import Tensor

from trime.errors import fail
from trime.heads import token_head_terms
from trime.hooks import KeyCapture
from trime.loss import DEFAULT_BLOCK_SIZE, MemoryInputs, Rule, in_batch_memory, joint_nll

logger = logging.getLogger(__name__)


@dataclass
class TrimeLossConfig(FairseqDataclass):
    ce_warmup_epoch: int = field(
        default=0,
        metadata={"help": "train with plain cross-entropy in epochs 1..N; validation always reports the TRIME loss"},
    )
    memory_block_size: int = field(
        default=DEFAULT_BLOCK_SIZE,
        metadata={"help": "query rows per block of the memory computation (extra memory is O(block x keys))"},
    )


@dataclass
class OrderedBatchesConfig(TrimeLossConfig):
    allow_random_batches: bool = field(
        default=False,
        metadata={
            "help": "train on fairseq's random batches: the cross-segment memory then holds unrelated segments "
            "(without this flag the criterion refuses to start unless the task sets the batch order)"
        },
    )


def require_ordered_batches(task, criterion: str, allow_random: bool, plans_accepted: bool) -> None:
    """Refuse to train a cross-segment memory on random batches unless ``--allow-random-batches`` says so.

    The order comes from ``--task trime_lm --keep-order`` (consecutive segments) or, where
    ``plans_accepted``, ``--predefined-batches PLAN`` (BM25-similar segments).
    """
    ordered = getattr(task, "keep_order", False) or (plans_accepted and getattr(task, "predefined_batches", None))
    if ordered:
        return
    if not allow_random:
        if plans_accepted:
            fail(
                f"{criterion} trains on batches of similar segments: pass --task trime_lm --predefined-batches "
                "PLAN (make PLAN with trime-bm25-batches), or --allow-random-batches to train on random batches"
            )
        fail(
            f"{criterion} trains on consecutive segments: pass --task trime_lm --keep-order, "
            "or --allow-random-batches to train on random batches"
        )
    logger.warning(
        "%s: training on random batches (--allow-random-batches): the cross-segment memory holds unrelated segments",
        criterion,
    )


@register_criterion("trime_loss", dataclass=TrimeLossConfig)
class TrimeLoss(FairseqCriterion):
    """TrimeLM: each token's memory is the strictly earlier tokens of its own segment."""

    rule = Rule.LOCAL

    def __init__(self, task, ce_warmup_epoch: int = 0, memory_block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        super().__init__(task)
        if not isinstance(task, LanguageModelingTask):
            fail(
                f"criterion {self.criterion_name()} needs a language-modelling task "
                f"(--task language_modeling or trime_lm), got {type(task).__name__}"
            )
        if ce_warmup_epoch < 0:
            fail(f"--ce-warmup-epoch must be >= 0, got {ce_warmup_epoch}")
        self.ce_warmup_epoch = ce_warmup_epoch
        self.memory_block_size = memory_block_size
        self.epoch = 1
        self._follow_task_epochs(task)

    @classmethod
    def criterion_name(cls) -> str:
        return "trime_loss"

    def _follow_task_epochs(self, task) -> None:
        """Track the training epoch through the task's begin_epoch hook (works with any LM task).

        The task instance is wrapped once; every trime criterion built on it listens.
        """
        listeners = getattr(task, "_trime_epoch_listeners", None)
        if listeners is None:
            listeners = task._trime_epoch_listeners = weakref.WeakSet()
            begin_epoch = task.begin_epoch

            def begin_epoch_and_track(epoch, model):
                for criterion in list(listeners):
                    criterion.epoch = epoch
                return begin_epoch(epoch, model)

            task.begin_epoch = begin_epoch_and_track
        listeners.add(self)

    def in_ce_warmup(self, model) -> bool:
        return model.training and self.epoch <= self.ce_warmup_epoch

    def forward(self, model, sample, reduce: bool = True):
        with KeyCapture.fairseq(model) as capture:
            net_output = model(**sample["net_input"])
        reps = capture.keys()  # (B, T, C)
        targets = model.get_targets(sample, net_output)  # (B, T)
        valid = targets.ne(self.padding_idx)
        flat_valid = valid.reshape(-1)
        token_score, token_log_partition = token_head_terms(model, net_output, targets)
        ce = torch.where(flat_valid, token_log_partition - token_score, torch.zeros_like(token_score))
        ce_loss = ce.sum()
        ntokens = int(flat_valid.sum())
        logging_output = {
            "ori_loss": ce_loss.data,
            "ntokens": ntokens,
            "nsentences": targets.size(0),
            "sample_size": ntokens,
        }
        if self.in_ce_warmup(model):
            loss = ce_loss
        else:
            if type(self).memory_terms is TrimeLoss.memory_terms:
                # one memory, loss = plain sum over rows: the one-pass memory_joint_nll
                memory = self.memory(reps, targets, valid, model, sample)
                loss = memory.joint_nll(token_score, token_log_partition, valid=flat_valid).sum()
            else:  # a subclass combines its own (lse_all, lse_pos)
                lse_all, lse_pos = self.memory_terms(reps, targets, valid, model, sample)
                loss = joint_nll(token_score, token_log_partition, lse_all, lse_pos, valid=flat_valid).sum()
            logging_output["norm_loss"] = loss.data
        logging_output["loss"] = loss.data
        return loss, ntokens, logging_output

    def memory(self, reps: Tensor, targets: Tensor, valid: Tensor, model, sample) -> MemoryInputs:
        """This criterion's memory (subclasses override this); reps (B, T, C), targets/valid (B, T)."""
        return self.in_batch_memory(reps, targets, valid)

    def memory_terms(self, reps: Tensor, targets: Tensor, valid: Tensor, model, sample) -> Tuple[Tensor, Tensor]:
        """(lse_all, lse_pos) over this criterion's memory (an override keeps the two-pass loss)."""
        return self.memory(reps, targets, valid, model, sample).logsumexp()

    def in_batch_memory(
        self, reps: Tensor, targets: Tensor, valid: Tensor, external_local: bool = True
    ) -> MemoryInputs:
        """Memory = this batch's own tokens under ``self.rule`` (no collective)."""
        return in_batch_memory(reps, targets, valid, self.rule, external_local, block_size=self.memory_block_size)

    def gathered_memory(self, tokens, key_ranks, rule: Rule, external_local: bool = True) -> MemoryInputs:
        """Memory = the tokens of ``key_ranks`` from a cross-rank gather (``trime.distributed``)."""
        return tokens.memory_inputs(key_ranks, rule, external_local, block_size=self.memory_block_size)

    @staticmethod
    def reduce_metrics(logging_outputs: List[Dict]) -> None:
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        denom = max(sample_size, 1) * math.log(2)
        loss = sum(log.get("loss", 0) for log in logging_outputs)
        metrics.log_scalar("loss", loss / denom, sample_size, round=3)
        ori_loss = sum(log.get("ori_loss", 0) for log in logging_outputs)
        metrics.log_scalar("ori_loss", ori_loss / denom, sample_size, round=3)
        if any("norm_loss" in log for log in logging_outputs):
            norm_loss = sum(log.get("norm_loss", 0) for log in logging_outputs)
            metrics.log_scalar("norm_loss", norm_loss / denom, sample_size, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["loss"].avg))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
