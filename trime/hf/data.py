"""Blocks of a text file for ``trime-hf-train``, in the order each memory needs.

A text file is tokenized as one string without special tokens (:mod:`trime.hf.text`) and
cut into consecutive blocks of ``block_size`` tokens (the tail shorter than a block is
dropped, as in transformers' ``run_clm``). Block ``i`` is segment ``i`` of a BM25 plan.
The blocks are a view of the token cache's memory map: a block is read and made int64 only
when the data loader asks for it, so the corpus need not fit in memory.

Orders (what the Trainer's data loader sees; see :func:`train_order`):

- ``none``/``local``: the blocks, shuffled by the Trainer's own sampler;
- ``long``: blocks in file order;
- ``external``: blocks in BM25-plan order.

For ``long`` and ``external`` the dataset is laid out for a sequential sampler: batch ``j``
holds items ``[j*B, (j+1)*B)`` and accelerate hands batch ``s*W + r`` to rank ``r`` at step
``s`` (W ranks), so the ranks of one step hold consecutive batches in rank order, as the
fairseq ``trime_lm --keep-order`` / ``--predefined-batches`` layouts do. The order is cut
to whole steps (a multiple of ``B*W`` blocks), so every rank runs the same number of
full batches.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from trime.errors import fail
from trime.hf.text import tokenize_text_file
from trime.memories import CROSS_SEGMENT_MEMORIES


def text_blocks(path: str, tokenizer: Any, block_size: int, option: str = "--train-file", model: str = "",
                progress_bar: Optional[bool] = None) -> np.ndarray:
    """(num_blocks, block_size) blocks of the file's token stream, a read-only view of the token cache's memmap
    (uint16 or uint32); fails if not even one block fits. ``progress_bar``: as in :func:`tokenize_text_file`."""
    if block_size < 2:
        fail(f"--block-size must be >= 2 (a block predicts block_size - 1 tokens), got {block_size}")
    ids = tokenize_text_file(path, tokenizer, option, progress_bar=progress_bar)
    num_blocks = len(ids) // block_size
    if num_blocks < 1:
        under = f" under the tokenizer of {model}" if model else ""
        fail(
            f"{option} {path} has {len(ids):,} tokens{under}, fewer than one block of --block-size {block_size}; "
            "use a smaller --block-size or a longer file"
        )
    return ids[: num_blocks * block_size].reshape(num_blocks, block_size)


class BlockDataset(torch.utils.data.Dataset):
    """Item ``i`` is block ``order[i]`` as ``{"input_ids", "labels"}`` (labels = input_ids, HF shifts them)."""

    def __init__(self, blocks: np.ndarray, order: Optional[np.ndarray] = None) -> None:
        self.blocks = blocks  # kept as given (a memmap view): one block is read per item
        self.order = None if order is None else np.asarray(order, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.blocks) if self.order is None else len(self.order)

    def block_index(self, i: int) -> int:
        return int(i) if self.order is None else int(self.order[i])

    def __getitem__(self, i: int) -> dict:
        block = torch.from_numpy(np.array(self.blocks[self.block_index(i)], dtype=np.int64))  # a writable copy
        return {"input_ids": block, "labels": block}


def whole_steps(order: np.ndarray, batch_size: int, world_size: int, option: str = "--train-file") -> np.ndarray:
    """``order`` cut to a multiple of ``batch_size * world_size`` blocks; fails if not one step fits."""
    per_step = batch_size * world_size
    usable = len(order) // per_step * per_step
    if usable == 0:
        fail(
            f"{option} has {len(order):,} blocks, fewer than one step of {world_size} rank(s) x "
            f"--per-device-train-batch-size {batch_size}; use a smaller batch or --block-size, or more text"
        )
    return order[:usable]


def train_order(memory: str, num_blocks: int, plan_ids: Optional[np.ndarray], batch_size: int,
                world_size: int) -> Optional[np.ndarray]:
    """The block order of the training dataset: None (shuffled by the Trainer) for none/local."""
    if memory not in CROSS_SEGMENT_MEMORIES:
        return None
    order = np.arange(num_blocks, dtype=np.int64) if memory == "long" else np.asarray(plan_ids, dtype=np.int64)
    return whole_steps(order, batch_size, world_size)


def step_blocks(order: np.ndarray, batch_size: int, world_size: int, step: int, rank: int) -> np.ndarray:
    """Blocks that rank ``rank`` holds at step ``step`` under the sequential layout (for tests and docs)."""
    start = (step * world_size + rank) * batch_size
    return order[start : start + batch_size]
