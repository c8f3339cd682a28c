"""Function-style names for the adapter interface, kept for scripts written against them (bench/eval.py).

New code uses :mod:`trime.adapters` directly: ``load_adapter`` -> ``adapter.window_settings``
-> ``adapter.windows(split, settings).batches(...)`` -> ``adapter.forward(batch)``.
"""

import os

from trime.adapters import load_adapter
from trime.adapters.base import ModelAdapter, SplitWindows, WindowBatch, WindowSettings, batch_size_for
from trime.io_utils import quiet_libraries

__all__ = [
    "WindowBatch",
    "WindowSettings",
    "batch_size_for",
    "forward_batch",
    "iter_samples",
    "load_lm",
    "load_windows",
    "num_batches",
    "quiet_libraries",
    "window_settings",
]


def load_lm(path: os.PathLike, data_dir: os.PathLike, cpu: bool = False, precision: str = "fp32") -> ModelAdapter:
    return load_adapter(path, data_dir, cpu=cpu, precision=precision)


def window_settings(lm: ModelAdapter, context_window: int, tokens_per_sample: int | None) -> WindowSettings:
    return lm.window_settings(context_window, tokens_per_sample)


def load_windows(lm: ModelAdapter, split: str, settings: WindowSettings) -> SplitWindows:
    return lm.windows(split, settings)


def num_batches(windows: SplitWindows, batch_size: int) -> int:
    return windows.num_batches(batch_size)


def iter_samples(windows: SplitWindows, batch_size: int, first_batch: int = 0, end_batch: int | None = None):
    return windows.batches(batch_size, first_batch, end_batch)


def forward_batch(lm: ModelAdapter, batch, need_token_terms: bool = True) -> WindowBatch:
    return lm.forward(batch, need_token_terms=need_token_terms)
