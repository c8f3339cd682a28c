"""fairseq task ``trime_lm``: language modelling with TRIME's two training batch layouts.

``trime_lm`` is fairseq's ``language_modeling`` task plus:

``--keep-order`` (TrimeLM_long)
    Batches are consecutive segments in corpus order (indices ``0..N-1`` chunked by
    fairseq's ``batch_by_size``), never shuffled. Ranks are sharded contiguously: with
    groups of C = ``--train-mem-size`` / ``--max-tokens`` consecutive ranks (C = 1 without
    ``--train-mem-size``), the G = world / C groups each take a contiguous chunk of the
    batches, and inside a group rank g*C + c takes batches c, c+C, c+2C, ... of its chunk,
    so at every step the C ranks of a group hold C consecutive batches (what
    ``trime_long_loss`` concatenates in rank order). Validation batches are laid out the
    same way.

``--predefined-batches PLAN`` (TrimeLM_ext)
    The training order is the plan's id list (``trime-bm25-batches``) chunked
    sequentially into batches. Each epoch only the groups of world-size consecutive
    batches are shuffled (seed + epoch) and rank r takes batch r of every group, so the
    ranks at one step hold consecutive plan entries. The plan must have been built for
    this data-bin and ``--tokens-per-sample`` (the original silently ignored a mismatch;
    here it is an error naming the plan file). Plan reading and checking, and both
    shardings, are :mod:`trime.batch_plans`, shared with ``trime-hf-train``.

With either layout ``--required-batch-size-multiple`` is ignored (set to 1): rounding
the batch size down (default 8) would break the "one batch = max-tokens of consecutive
tokens" layout, e.g. 60 segments of 150 tokens would become 56. ``--fix-batches-to-gpus``
has no effect with them. Recipes use ``--sample-break-mode none``; plans require it.

Whatever the layout, fairseq's dummy batch (what a rank processes when its shard has
run out) is marked, so that ``trime_long_loss``/``trime_ext_loss`` take no keys from it.
"""

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from fairseq import utils
from fairseq.data import FairseqDataset, data_utils, iterators
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask
from omegaconf import II
from omegaconf.errors import OmegaConfBaseException

from trime.batch_plans import (
    check_group_size,
    data_bin_plan_target,
    grouped_shuffle_shard,
    keep_order_shard,
    load_plan_for,
)
from trime.distributed import DUMMY_BATCH_KEY
from trime.errors import fail

logger = logging.getLogger(__name__)

KEEP_ORDER = "keep_order"
PREDEFINED = "predefined"


class TrimeEpochBatchIterator(iterators.EpochBatchIterator):
    """fairseq's ``EpochBatchIterator`` with the ``--keep-order`` / ``--predefined-batches`` sharding.

    ``layout`` is ``KEEP_ORDER``, ``PREDEFINED`` or None (stock fairseq behaviour). The
    first batch (fairseq's dummy batch) carries ``DUMMY_BATCH_KEY``.
    """

    def __init__(self, *args, layout: str | None = None, group_size: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.layout = layout
        self.group_size = group_size

    def __len__(self) -> int:
        n = len(self.frozen_batches)
        if self.layout == KEEP_ORDER:
            chunk = math.ceil(n / max(self.num_shards // self.group_size, 1))
            return math.ceil(chunk / self.group_size)
        return super().__len__()

    @property
    def first_batch(self):
        batch = super().first_batch
        if isinstance(batch, dict):
            batch[DUMMY_BATCH_KEY] = True
        return batch

    def ordered_batches(self, epoch, fix_batches_to_gpus, shuffle):
        if self.layout is None:
            return super().ordered_batches(epoch, fix_batches_to_gpus, shuffle)
        batches = list(self.frozen_batches)
        if self.layout == KEEP_ORDER:
            batches = keep_order_shard(batches, self.num_shards, self.shard_id, self.group_size)
        else:
            seed = self.seed + epoch if shuffle else None
            batches = grouped_shuffle_shard(batches, self.num_shards, self.shard_id, seed)
        if self._supports_prefetch:
            self.dataset.prefetch([i for batch in batches for i in batch])
        return batches


@dataclass
class TrimeLMConfig(LanguageModelingConfig):
    keep_order: bool = field(
        default=False,
        metadata={"help": "batches of consecutive segments in corpus order, never shuffled (TrimeLM_long)"},
    )
    # fairseq's argparse bridge understands Optional[...] but not "int | None"
    train_mem_size: Optional[int] = field(
        default=None,
        metadata={
            "help": "tokens of long-term memory for trime_long_loss: groups of train_mem_size/max_tokens "
            "consecutive ranks share one memory (needs --keep-order; a multiple of --max-tokens)"
        },
    )
    predefined_batches: Optional[str] = field(
        default=None,
        metadata={"help": "batch plan JSON (trime-bm25-batches): training order of the segments (TrimeLM_ext)"},
    )
    max_tokens: Optional[int] = II("dataset.max_tokens")
    train_subset: str = II("dataset.train_subset")


def _resolved(cfg, name: str, default):
    """``cfg.name``, or ``default`` when absent or an unresolvable interpolation (cfg outside a full config)."""
    try:
        value = getattr(cfg, name, default)
    except OmegaConfBaseException:  # e.g. an interpolation with no root config to resolve it
        return default
    return default if value is None else value


@register_task("trime_lm", dataclass=TrimeLMConfig)
class TrimeLMTask(LanguageModelingTask):
    """``language_modeling`` with ``--keep-order``, ``--train-mem-size`` and ``--predefined-batches``."""

    def __init__(self, args, dictionary, output_dictionary=None, targets=None) -> None:
        super().__init__(args, dictionary, output_dictionary, targets=targets)
        self.keep_order = bool(_resolved(args, "keep_order", False))
        self.predefined_batches = _resolved(args, "predefined_batches", None)
        self.memory_group_size = self._group_size(args)
        if self.keep_order and self.predefined_batches:
            fail("--keep-order and --predefined-batches both set the training order; use only one of them")
        if self.predefined_batches and args.sample_break_mode != "none":
            fail(
                f"--predefined-batches {self.predefined_batches} lists segments of --sample-break-mode none; "
                f"got --sample-break-mode {args.sample_break_mode}"
            )
        if self.predefined_batches and len(utils.split_paths(args.data or "")) > 1:
            fail(
                f"--predefined-batches {self.predefined_batches} describes one data-bin; "
                f"got several data directories ({args.data}); train on a single one"
            )
        self._data_paths: dict[str, str] = {}
        self._plan_ids: np.ndarray | None = None

    def _group_size(self, args) -> int:
        """C = --train-mem-size / --max-tokens (1 without --train-mem-size)."""
        mem_size = _resolved(args, "train_mem_size", None)
        if mem_size is None:
            return 1
        if not self.keep_order:
            fail(f"--train-mem-size {mem_size} needs --keep-order (consecutive batches on a group of ranks)")
        max_tokens = _resolved(args, "max_tokens", None)
        if not max_tokens:
            fail(f"--train-mem-size {mem_size} needs --max-tokens (the memory is a multiple of one batch)")
        if mem_size < max_tokens or mem_size % max_tokens:
            fail(f"--train-mem-size {mem_size} must be a positive multiple of --max-tokens {max_tokens}")
        return mem_size // max_tokens

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs) -> None:
        paths = utils.split_paths(self.args.data)
        self._data_paths[split] = paths[(epoch - 1) % len(paths)]  # the data-bin a plan is checked against
        super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)

    def _layout(self, dataset) -> str | None:
        """Which batch layout ``dataset`` gets: keep-order for every split, a plan for the train split only."""
        if self.keep_order:
            return KEEP_ORDER
        train_subset = _resolved(self.args, "train_subset", "train")
        if self.predefined_batches and dataset is self.datasets.get(train_subset):
            return PREDEFINED
        return None

    def _plan_indices(self, dataset) -> np.ndarray:
        """The plan's ids, after checking that the plan was built for this dataset."""
        if self._plan_ids is None:
            path = self.predefined_batches
            if not os.path.isfile(path):
                fail(f"--predefined-batches {path}: no such file; build one with trime-bm25-batches")
            train_subset = _resolved(self.args, "train_subset", "train")
            data_dir = self._data_paths.get(train_subset, utils.split_paths(self.args.data)[0])
            target = data_bin_plan_target(data_dir, self.args.tokens_per_sample, len(dataset))
            self._plan_ids = np.asarray(load_plan_for(path, target), dtype=np.int64)
        return self._plan_ids

    def get_batch_iterator(
        self,
        dataset,
        max_tokens=None,
        max_sentences=None,
        max_positions=None,
        ignore_invalid_inputs=False,
        required_batch_size_multiple=1,
        seed=1,
        num_shards=1,
        shard_id=0,
        num_workers=0,
        epoch=1,
        data_buffer_size=0,
        disable_iterator_cache=False,
        skip_remainder_batch=False,
        grouped_shuffling=False,
        update_epoch_batch_itr=False,
    ) -> TrimeEpochBatchIterator:
        """fairseq's ``FairseqTask.get_batch_iterator`` with the batch layouts of this task (see module doc)."""
        can_reuse = not disable_iterator_cache and not update_epoch_batch_itr and self.can_reuse_epoch_itr(dataset)
        if can_reuse and dataset in self.dataset_to_epoch_iter:
            return self.dataset_to_epoch_iter[dataset]
        assert isinstance(dataset, FairseqDataset)
        dataset.set_epoch(epoch)

        layout = self._layout(dataset)
        if layout is None:
            with data_utils.numpy_seed(seed + epoch):
                indices = dataset.ordered_indices()
        else:
            if required_batch_size_multiple > 1:
                logger.info(
                    f"trime_lm: batches follow corpus/plan order; --required-batch-size-multiple "
                    f"{required_batch_size_multiple} is ignored (batches are filled to --max-tokens)"
                )
                required_batch_size_multiple = 1
            if layout == KEEP_ORDER:
                check_group_size(num_shards, self.memory_group_size)
                indices = np.arange(len(dataset), dtype=np.int64)
            else:
                indices = self._plan_indices(dataset)
        if max_positions is not None:
            indices = self.filter_indices_by_size(indices, dataset, max_positions, ignore_invalid_inputs)
        batches = dataset.batch_by_size(
            indices,
            max_tokens=max_tokens,
            max_sentences=max_sentences,
            required_batch_size_multiple=required_batch_size_multiple,
        )
        epoch_iter = TrimeEpochBatchIterator(
            dataset=dataset,
            collate_fn=dataset.collater,
            batch_sampler=batches,
            seed=seed,
            num_shards=num_shards,
            shard_id=shard_id,
            num_workers=num_workers,
            epoch=epoch,
            buffer_size=data_buffer_size,
            disable_shuffling=layout == KEEP_ORDER,
            skip_remainder_batch=skip_remainder_batch,
            grouped_shuffling=grouped_shuffling,
            reuse_dataloader=getattr(self.cfg, "reuse_dataloader", True),
            persistent_workers=getattr(self.cfg, "persistent_workers", True),
            layout=layout,
            group_size=self.memory_group_size,
        )
        if can_reuse:
            self.dataset_to_epoch_iter[dataset] = epoch_iter
        return epoch_iter
