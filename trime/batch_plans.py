"""Training batch orders shared by the fairseq ``trime_lm`` task and ``trime-hf-train``.

- The **batch-plan file** (``trime-bm25-batches``): ``{"format": "trime-batch-plan",
  "version": 1, "ids": [...], "meta": {...}}``, the training order of the segments (blocks).
  :func:`read_batch_plan` checks the format; :func:`check_plan` checks that a plan was made
  for the data it is used with, described by a :class:`PlanTarget` (a fairseq data-bin, or
  a text file's blocks under a Hugging Face tokenizer). The meta is checked *before* the ids,
  so a plan of other data is reported as such, with the sizes of both sides, and not as a
  damaged id list.
- **Sharding** of an ordered batch list across ranks: :func:`keep_order_shard` (long memory:
  consecutive batches on consecutive ranks at every step) and :func:`grouped_shuffle_shard`
  (plan order: each step's ranks hold consecutive plan entries).

Pure Python + numpy: neither fairseq nor transformers is imported.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from trime.errors import fail
from trime.io_utils import atomic_path, read_json

PLAN_FORMAT = "trime-batch-plan"
PLAN_VERSION = 1
# meta["kind"] of a plan built over a tokenizer's blocks of a text file (absent: a fairseq data-bin)
TEXT_PLAN_KIND = "hf-text"


# ----------------------------------------------------------------------------- plan file


def write_batch_plan(path: str | Path, ids: np.ndarray, meta: dict[str, object]) -> None:
    """Write ``{"format", "version", "ids", "meta"}`` atomically (compact ids, indented meta).

    A failed write (a full disk) raises an OSError naming ``path``; the old file, if any, is untouched.
    """
    body = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "meta": meta}
    text = json.dumps(body, indent=2, sort_keys=True)
    # ids on one line: 33k ids stay ~200 KB instead of one line each
    text = text[:-2] + ',\n  "ids": ' + json.dumps([int(i) for i in ids]) + "\n}\n"
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def read_batch_plan(path: str | Path) -> tuple[np.ndarray, dict[str, object]]:
    """``(ids, meta)`` of a plan file, format checked; ``meta["path"]`` is the file (for messages).

    The ids are not yet checked against any data: use :func:`check_plan`.
    """
    path = Path(path)
    if not path.is_file():
        fail(f"batch plan {path}: no such file; build one with trime-bm25-batches")
    body = read_json(path, "batch plan")
    if not isinstance(body, dict) or body.get("format") != PLAN_FORMAT:
        fail(f"batch plan {path} is not a {PLAN_FORMAT} file; make one with trime-bm25-batches")
    if body.get("version") != PLAN_VERSION:
        fail(f"batch plan {path} has version {body.get('version')!r}; this trime reads version {PLAN_VERSION}")
    meta, raw_ids = body.get("meta"), body.get("ids")
    if not isinstance(meta, dict) or not isinstance(raw_ids, list):
        fail(f"batch plan {path} lacks 'meta' or 'ids'; re-create it with trime-bm25-batches")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in raw_ids):
        fail(f"batch plan {path}: 'ids' must be integers")
    return np.asarray(raw_ids, dtype=np.int64), {**meta, "path": str(path)}


def permutation_problem(ids: np.ndarray, n: int) -> Optional[str]:
    """Why ``ids`` is not a permutation of ``0..n-1`` (None if it is)."""
    if len(ids) != n:
        return f"it lists {len(ids):,} ids for {n:,} segments"
    if n == 0:
        return None
    if ids.min() < 0 or ids.max() >= n:
        return f"ids range over {int(ids.min()):,}..{int(ids.max()):,}, outside 0..{n - 1:,}"
    counts = np.bincount(ids, minlength=n)
    if counts.max() != 1:
        return f"{int((counts > 1).sum()):,} ids repeat and {int((counts == 0).sum()):,} are missing"
    return None


@dataclass
class PlanTarget:
    """The data a plan must have been built for.

    ``description`` names it in messages ("the train split of data-bin X"), ``tokens_flag``
    is the training flag of the segment length, ``identity`` the meta entries that must be
    equal (e.g. ``{"dataset": {...}}``, plus ``"tokenizer"`` for a text plan), and
    ``rebuild`` the command that makes a matching plan.
    """

    description: str
    tokens_per_sample: int
    num_segments: int
    identity: dict = field(default_factory=dict)
    rebuild: str = "trime-bm25-batches"
    kind: Optional[str] = None
    tokens_flag: str = "--tokens-per-sample"


def data_bin_plan_target(data_dir: str | Path, tokens_per_sample: int, num_segments: int) -> PlanTarget:
    """What a plan for the train split of a fairseq data-bin must match."""
    from trime.databin import dataset_identity

    return PlanTarget(
        description=f"the train split of {data_dir}",
        tokens_per_sample=tokens_per_sample,
        num_segments=num_segments,
        identity={"dataset": dataset_identity(data_dir)},
        rebuild=f"trime-bm25-batches {data_dir} --tokens-per-sample {tokens_per_sample}",
    )


def first_difference(old: dict, new: dict) -> str:
    """The first key (sorted) whose values differ, as "key: OLD there vs NEW now"."""
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {json.dumps(old.get(key))} there vs {json.dumps(new.get(key))} now"
    return "none"


def check_plan(ids: Optional[np.ndarray], meta: dict[str, object], target: PlanTarget) -> None:
    """Fail with one line naming the plan file unless it was built for ``target``.

    Order: kind of data, segment length, data identity (the tokenizer for a text plan),
    number of segments, and last the ids themselves (a permutation of the target's ids;
    skipped when ``ids`` is None).
    """
    name = str(meta.get("path", "<batch plan>"))
    rebuild = f"rebuild it with: {target.rebuild} --output {name}"
    kind = meta.get("kind")
    if kind != target.kind:
        built = "over a tokenizer's blocks of a text file" if kind == TEXT_PLAN_KIND else "for a fairseq data-bin"
        fail(f"batch plan {name} was built {built}, not for {target.description}; {rebuild}")
    if meta.get("tokens_per_sample") != target.tokens_per_sample:
        fail(
            f"batch plan {name} was built with --tokens-per-sample {meta.get('tokens_per_sample')} "
            f"but training uses {target.tokens_flag} {target.tokens_per_sample}; {rebuild}"
        )
    if "tokenizer" in target.identity and meta.get("tokenizer") != target.identity["tokenizer"]:
        recorded = str(meta.get("tokenizer"))[:12]
        fail(
            f"batch plan {name} was built for another tokenizer (identity {recorded}... there, "
            f"{str(target.identity['tokenizer'])[:12]}... for {target.description}); {rebuild}"
        )
    for key, expected in target.identity.items():
        recorded = meta.get(key)
        if recorded != expected:
            what = first_difference(recorded if isinstance(recorded, dict) else {key: recorded},
                                     expected if isinstance(expected, dict) else {key: expected})
            fail(f"batch plan {name} was built from different data than {target.description} ({what}); {rebuild}")
    if meta.get("num_segments") != target.num_segments:
        fail(
            f"batch plan {name} has {meta.get('num_segments')} segments but {target.description} has "
            f"{target.num_segments:,} at {target.tokens_flag} {target.tokens_per_sample}; "
            f"the plan belongs to other data; {rebuild}"
        )
    problem = None if ids is None else permutation_problem(ids, target.num_segments)
    if problem:
        fail(
            f"batch plan {name} is damaged: its ids are not a permutation of the {target.num_segments:,} "
            f"segment ids 0..{target.num_segments - 1:,} of {target.description} ({problem}); {rebuild}"
        )


def load_plan_for(path: str | Path, target: PlanTarget) -> np.ndarray:
    """The plan's ids (int64) after :func:`check_plan` against ``target``."""
    ids, meta = read_batch_plan(path)
    check_plan(ids, meta, target)
    return ids


# ----------------------------------------------------------------------------- sharding


def check_group_size(num_shards: int, group_size: int) -> None:
    """Fail unless groups of ``group_size`` ranks tile the ``num_shards`` ranks."""
    if group_size < 1 or num_shards % group_size:
        fail(
            f"--train-mem-size makes groups of {group_size} ranks, which does not divide the world size "
            f"{num_shards}; use a world size that is a multiple of {group_size} or change --train-mem-size"
        )


def keep_order_shard(batches: Sequence, num_shards: int, shard_id: int, group_size: int = 1) -> list:
    """This rank's batches under keep-order, padded with ``[]`` to the same length on every rank.

    The ``num_shards // group_size`` groups each take a contiguous chunk of ``batches``;
    rank ``g*group_size + c`` takes items c, c+group_size, ... of chunk g.
    """
    check_group_size(num_shards, group_size)
    num_groups = num_shards // group_size
    chunk = math.ceil(len(batches) / num_groups)
    group, member = divmod(shard_id, group_size)
    mine = list(batches[group * chunk : (group + 1) * chunk][member::group_size])
    steps = math.ceil(chunk / group_size)
    return mine + [[] for _ in range(steps - len(mine))]


def grouped_shuffle_shard(batches: Sequence, num_shards: int, shard_id: int, seed: int | None) -> list:
    """This rank's batches in plan order: batch ``shard_id`` of every group of ``num_shards``.

    With a ``seed`` the order of the groups is shuffled (never their contents); the last
    group may be short, and ranks without a batch there get ``[]``.
    """
    groups = [batches[i : i + num_shards] for i in range(0, len(batches), num_shards)]
    if seed is not None:
        order = np.random.RandomState(seed % 2**32).permutation(len(groups))
        groups = [groups[i] for i in order]
    return [group[shard_id] if shard_id < len(group) else [] for group in groups]
