"""``trime-bm25-batches``: BM25 batch plans for TrimeLM_ext (``--predefined-batches``).

Pipeline (paper §4 / original ``bm25_search.py`` + ``bm25_make_batches.py``, with their
bugs fixed, see docs §2.3):

1. **Segments.** The ``train`` split of a fairseq data-bin is blocked exactly as the
   ``language_modeling`` task does with ``--sample-break-mode none --tokens-per-sample T``
   (fairseq's own ``load_indexed_dataset`` + ``TokenBlockDataset``), so segment ``i`` here
   is dataset index ``i`` in training. The dictionary's special symbols (``<s>``,
   ``<pad>``, ``</s>``, ``<unk>``) are dropped; every other word id is a BM25 term.
2. **Search.** Every segment is a query (all its tokens) against all other segments;
   the top-k ids are kept (see :mod:`trime.retrieval.bm25`). The search can be split
   into contiguous shards and is resumable: each shard writes chunk files atomically
   into a work directory and a re-run skips finished chunks, so the shard result is
   byte-identical to an uninterrupted run (also after a full disk: one error line, then a
   re-run). A shard's search, and the run writing the plan, hold a lock in the work
   directory: a second such run fails at once, naming the first.
3. **Greedy chain** (:func:`greedy_chain`). Seeded shuffle of all ids; start at the first;
   repeatedly move to the best-ranked unused neighbour; if none, jump to the next unused
   id in the shuffled order. Integer ids throughout.
4. **Plan.** ``{"format": "trime-batch-plan", "version": 1, "ids": [...], "meta": {...}}``,
   written atomically. The file format and its checks live in :mod:`trime.batch_plans`,
   which the fairseq task and ``trime-hf-train`` read plans with.

With ``--model M`` the plan is built over a Hugging Face tokenizer's blocks of a text
file instead (``trime-hf-train --bm25-plan``): DATA is the training text, tokenized as one
string without special tokens and cut into blocks of ``--tokens-per-sample`` tokens
(block ``i`` is segment ``i``); the BM25 terms are the token ids except the tokenizer's
special ones. The plan records the text file's and the tokenizer's identity, so a plan
for another tokenizer or file is refused with one line.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from trime.batch_plans import (
    TEXT_PLAN_KIND,
    check_plan,
    data_bin_plan_target,
    first_difference,
    permutation_problem,
    read_batch_plan,
    write_batch_plan,
)
from trime.cli import NONNEGATIVE_FLOAT, NONNEGATIVE_INT, POSITIVE_INT, UNIT_FLOAT, Parser, logger, silent
from trime.databin import check_data_bin, dataset_identity
from trime.errors import fail, file_faults_as_errors
from trime.io_utils import (
    atomic_path,
    exclusive_lock,
    naming_file,
    quiet_libraries,
    read_json,
    sha256_file,
    shard_range,
    write_json_atomic,
)
from trime.retrieval.bm25 import (
    BACKENDS,
    DEFAULT_BACKEND,
    IDF_VARIANTS,
    LUCENE_PRESET,
    NO_HIT,
    BM25Params,
    Segments,
    make_searcher,
)
from trime.version import __version__

SEARCH_FORMAT = "trime-bm25-search"
SEARCH_VERSION = 1
CHAIN_ALGORITHM = "greedy-bm25-chain-v1"
DEFAULT_K = 20
DEFAULT_SEED = 1
DEFAULT_CHUNK_SIZE = 4096
DEFAULT_BLOCK_SIZE = 256
SPLIT = "train"


# ----------------------------------------------------------------------------- dataset


def _check_data_dir(data_dir: Path) -> list[str]:
    """Fail early (before importing fairseq) on a missing dir, dictionary, or a missing or empty train split."""
    return check_data_bin(data_dir, [SPLIT])[SPLIT]


def _load_token_blocks(data_dir: Path, tokens_per_sample: int):
    """fairseq's dictionary and the ``TokenBlockDataset`` the LM task builds for ``train``."""
    if tokens_per_sample < 1:
        fail(f"--tokens-per-sample must be >= 1, got {tokens_per_sample}")
    _check_data_dir(data_dir)
    from fairseq.data import Dictionary, TokenBlockDataset, data_utils

    dictionary = Dictionary.load(str(data_dir / "dict.txt"))
    dataset = data_utils.load_indexed_dataset(str(data_dir / SPLIT), dictionary, combine=True)
    if dataset is None:
        fail(f"fairseq could not load the train split of {data_dir}")
    blocks = TokenBlockDataset(
        dataset,
        dataset.sizes,
        tokens_per_sample,
        pad=dictionary.pad(),
        eos=dictionary.eos(),
        break_mode="none",
        include_targets=False,
    )
    if len(blocks) < 2:
        fail(
            f"--tokens-per-sample {tokens_per_sample} leaves {len(blocks)} training segment(s) "
            f"({int(np.sum(dataset.sizes))} train tokens in {data_dir}); BM25 batching needs at least 2"
        )
    return dictionary, blocks


def count_train_segments(data_dir: str | Path, tokens_per_sample: int) -> int:
    """Number of training segments fairseq makes with ``--sample-break-mode none``."""
    _, blocks = _load_token_blocks(Path(data_dir), tokens_per_sample)
    return len(blocks)


def load_train_segments(data_dir: str | Path, tokens_per_sample: int) -> Segments:
    """The training segments in dataset-index order, special symbols dropped."""
    dictionary, blocks = _load_token_blocks(Path(data_dir), tokens_per_sample)
    arrays = []
    for i in range(len(blocks)):
        ids = blocks[i].numpy()
        arrays.append(ids[ids >= dictionary.nspecial])  # <s> <pad> </s> <unk> (+ extra specials)
    return Segments.from_arrays(arrays, vocab_size=len(dictionary))


# ----------------------------------------------------------------------------- search


def search_config(
    dataset: dict[str, object],
    tokens_per_sample: int,
    num_segments: int,
    backend: str,
    params: BM25Params,
    k: int,
    num_shards: int,
) -> dict[str, object]:
    """Everything that must agree between the shards of one search (and its plan)."""
    return {
        "format": SEARCH_FORMAT,
        "version": SEARCH_VERSION,
        "dataset": dataset,
        "tokens_per_sample": tokens_per_sample,
        "num_segments": num_segments,
        "backend": backend,
        "bm25": params.as_dict(),
        "k": k,
        "num_shards": num_shards,
    }


def _shard_prefix(num_shards: int, shard_id: int) -> str:
    return f"shard{shard_id:03d}-of-{num_shards:03d}"


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Write a .npy atomically with plain writes (numpy's own file writes lose the errno of a full disk)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    with naming_file(path), atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(buffer.getbuffer())


def _write_json(path: Path, obj: object) -> None:
    with naming_file(path):
        write_json_atomic(path, obj)


def _shard_lock(work_dir: Path, num_shards: int, shard_id: int) -> contextlib.AbstractContextManager:
    """Held while a shard is searched: a second search of the same shard and work dir fails at once."""
    return exclusive_lock(
        work_dir / f"{_shard_prefix(num_shards, shard_id)}.lock",
        f"shard {shard_id} of {num_shards} in the work dir {work_dir}",
        "use another --work-dir",
    )


def shard_result_path(work_dir: str | Path, num_shards: int, shard_id: int) -> Path:
    """Final ``(rows, k)`` int64 neighbour array of one shard."""
    return Path(work_dir) / f"{_shard_prefix(num_shards, shard_id)}.npy"


def run_shard_search(
    segments: Segments,
    config: dict[str, object],
    work_dir: str | Path,
    shard_id: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_chunks: int | None = None,
    show_progress: bool = True,
) -> Path | None:
    """Search the queries of shard ``shard_id`` into ``work_dir``; resumable.

    Chunks of ``chunk_size`` queries are saved atomically as ``.npy`` files; finished
    chunks are skipped on a re-run. When all are done they are concatenated into
    :func:`shard_result_path` plus a ``.json`` record. ``max_chunks`` stops after that
    many newly computed chunks (a test hook simulating a killed job) and returns None;
    otherwise returns the result path. The shard's lock in ``work_dir`` is held throughout.
    """
    num_shards = int(config["num_shards"])
    if chunk_size < 1:
        fail(f"--chunk-size must be >= 1, got {chunk_size}")
    if block_size < 1:
        fail(f"--block-size must be >= 1, got {block_size}")
    if len(segments) != config["num_segments"]:
        raise ValueError("segments do not match config['num_segments']")
    work_dir = Path(work_dir)
    with _shard_lock(work_dir, num_shards, shard_id):
        return _search_shard_locked(segments, config, work_dir, shard_id, chunk_size, block_size, max_chunks,
                                    show_progress)


def _search_shard_locked(segments: Segments, config: dict[str, object], work_dir: Path, shard_id: int,
                         chunk_size: int, block_size: int, max_chunks: int | None, show_progress: bool) -> Path | None:
    from tqdm import tqdm

    num_shards, k = int(config["num_shards"]), int(config["k"])
    start, end = shard_range(len(segments), num_shards, shard_id)
    prefix = _shard_prefix(num_shards, shard_id)
    result_path = shard_result_path(work_dir, num_shards, shard_id)
    record_path = work_dir / f"{prefix}.json"
    progress_path = work_dir / f"{prefix}.progress.json"
    run_settings = {"chunk_size": chunk_size, "block_size": block_size}

    if record_path.is_file() and result_path.is_file():
        record = read_json(record_path, "shard record")
        if record.get("config") != config:
            fail(
                f"work dir {work_dir} already holds shard {shard_id} of {num_shards} for other settings "
                f"({first_difference(record.get('config', {}), config)}); use another --work-dir or delete it"
            )
        return result_path
    if progress_path.is_file():
        progress = read_json(progress_path, "shard progress file")
        if progress.get("config") != config or progress.get("run") != run_settings:
            old = {**progress.get("config", {}), **progress.get("run", {})}
            fail(
                f"work dir {work_dir} holds a partial shard {shard_id} of {num_shards} for other settings "
                f"({first_difference(old, {**config, **run_settings})}); use another --work-dir or delete it"
            )

    chunk_starts = list(range(start, end, chunk_size))
    chunk_paths = [work_dir / f"{prefix}.chunk{j:05d}.npy" for j in range(len(chunk_starts))]
    done = [p.is_file() for p in chunk_paths]
    rows_done = sum(min(chunk_size, end - s) for s, d in zip(chunk_starts, done) if d)

    def write_progress() -> None:
        _write_json(
            progress_path,
            {"config": config, "run": run_settings, "start": start, "end": end,
             "chunks_total": len(chunk_paths), "chunks_done": int(sum(done))},
        )

    write_progress()
    searcher = None
    new_chunks = 0
    bar = tqdm(total=end - start, initial=rows_done, unit="seg", desc=f"BM25 shard {shard_id}/{num_shards}",
               disable=not show_progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for j, chunk_start in enumerate(chunk_starts):
            if done[j]:
                continue
            if max_chunks is not None and new_chunks >= max_chunks:
                return None
            if searcher is None:
                searcher = make_searcher(str(config["backend"]), segments, BM25Params(**config["bm25"]), block_size=block_size)
            chunk_end = min(chunk_start + chunk_size, end)
            ids = searcher.search(chunk_start, chunk_end, k, progress=bar.update)[0]
            _save_npy_atomic(chunk_paths[j], ids)
            done[j] = True
            new_chunks += 1
            write_progress()
    finally:
        bar.close()

    parts = []
    for j, path in enumerate(chunk_paths):
        part = np.load(path, allow_pickle=False)
        expected = (min(chunk_size, end - chunk_starts[j]), k)
        if part.shape != expected or part.dtype != np.int64:
            fail(f"chunk file {path} is damaged (shape {part.shape}, expected {expected}); delete it and re-run this shard")
        parts.append(part)
    result = np.concatenate(parts) if parts else np.zeros((0, k), np.int64)
    _save_npy_atomic(result_path, result)
    _write_json(
        record_path,
        {"config": config, "start": start, "end": end, "rows": len(result),
         "sha256": sha256_file(result_path), "complete": True},
    )
    for path in chunk_paths:
        path.unlink(missing_ok=True)
    progress_path.unlink(missing_ok=True)
    for stray in work_dir.glob(f".{prefix}.*.tmp"):  # temp files of writes interrupted by a kill
        stray.unlink(missing_ok=True)
    return result_path


def merge_shard_results(work_dir: str | Path, config: dict[str, object], rerun_hint: str = "") -> np.ndarray:
    """Concatenate all shards' neighbours into one ``(N, k)`` array; fail on a missing or foreign shard."""
    work_dir = Path(work_dir)
    num_shards = int(config["num_shards"])
    n, k = int(config["num_segments"]), int(config["k"])
    parts = []
    for shard_id in range(num_shards):
        prefix = _shard_prefix(num_shards, shard_id)
        record_path, result_path = work_dir / f"{prefix}.json", shard_result_path(work_dir, num_shards, shard_id)
        hint = f"; run it with --num-shards {num_shards} --shard-id {shard_id} --work-dir {work_dir}{rerun_hint}"
        if not (record_path.is_file() and result_path.is_file()):
            progress_path = work_dir / f"{prefix}.progress.json"
            if progress_path.is_file():
                progress = read_json(progress_path, "shard progress file")
                fail(
                    f"shard {shard_id} of {num_shards} in {work_dir} is incomplete "
                    f"({progress.get('chunks_done')} of {progress.get('chunks_total')} chunks done){hint} to resume"
                )
            fail(f"shard {shard_id} of {num_shards} is missing in {work_dir} (no {result_path.name}){hint}")
        record = read_json(record_path, "shard record")
        if record.get("config") != config:
            fail(
                f"shard {shard_id} of {num_shards} in {work_dir} was searched with other settings "
                f"({first_difference(record.get('config', {}), config)}); re-run it or pass the same options"
            )
        if sha256_file(result_path) != record.get("sha256"):
            fail(f"{result_path} does not match its record {record_path.name} (sha256); delete both and re-run shard {shard_id}")
        part = np.load(result_path, allow_pickle=False)
        start, end = shard_range(n, num_shards, shard_id)
        if part.shape != (end - start, k):
            fail(f"{result_path} has shape {part.shape}, expected {(end - start, k)}; delete it and re-run shard {shard_id}")
        parts.append(part)
    return np.concatenate(parts)


def search_all(
    segments: Segments,
    params: BM25Params,
    backend: str = DEFAULT_BACKEND,
    k: int = DEFAULT_K,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """In-memory search of all segments (no work dir): ``(ids, scores)`` of shape ``(N, k)``."""
    searcher = make_searcher(backend, segments, params, block_size=block_size)
    return searcher.search(0, len(segments), k)


# ----------------------------------------------------------------------------- chain


def greedy_chain(neighbours: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    """Visiting order of the greedy BM25 chain and the fraction of steps that followed a neighbour.

    ``neighbours[i]`` lists segment ``i``'s hits best first (``-1`` = no hit). With
    ``rng = numpy.random.default_rng(seed)`` and ``shuffled = rng.permutation(N)``: start
    at ``shuffled[0]``; at each step move to the first unused id in the current
    segment's neighbour list; if there is none, jump to the next unused id of
    ``shuffled``. The result is a permutation of ``0..N-1``.
    """
    neighbours = np.asarray(neighbours)
    n = len(neighbours)
    if n == 0:
        return np.zeros(0, dtype=np.int64), 0.0
    if neighbours.ndim != 2 or (neighbours.size and (neighbours.max() >= n or neighbours.min() < NO_HIT)):
        raise ValueError("neighbours must be an (N, k) array of ids in [-1, N)")
    shuffled = np.random.default_rng(seed).permutation(n).tolist()
    lists = neighbours.tolist()
    used = [False] * n
    order = np.empty(n, dtype=np.int64)
    cursor = 0
    followed = 0
    current = shuffled[0]
    for step in range(n):
        order[step] = current
        used[current] = True
        if step == n - 1:
            break
        nxt = -1
        for cand in lists[current]:
            if cand >= 0 and not used[cand]:
                nxt = cand
                break
        if nxt >= 0:
            followed += 1
        else:
            while used[shuffled[cursor]]:
                cursor += 1
            nxt = shuffled[cursor]
        current = nxt
    return order, followed / max(n - 1, 1)


# ----------------------------------------------------------------------------- plan file


def load_batch_plan(path: str | Path) -> tuple[np.ndarray, dict[str, object]]:
    """Read a batch plan and check that its ids are a permutation of ``0..N-1`` (N = its own length).

    Returns ``(ids, meta)``; ``meta["path"]`` is the plan file. Training checks a plan
    against its data with :func:`trime.batch_plans.check_plan` instead.
    """
    ids, meta = read_batch_plan(path)
    problem = permutation_problem(ids, len(ids))
    if problem:
        fail(f"batch plan {path}: 'ids' is not a permutation of 0..{len(ids) - 1:,} ({problem}); the file is damaged")
    if meta.get("num_segments") != len(ids):
        fail(f"batch plan {path}: meta.num_segments is {meta.get('num_segments')} but it lists {len(ids):,} ids")
    return ids, meta


def check_plan_matches(
    meta: dict[str, object],
    data_dir: str | Path,
    tokens_per_sample: int,
    num_segments: int,
    plan_path: str | Path | None = None,
) -> None:
    """Fail with one line naming the plan file unless it was built for this data-bin and blocking.

    ``num_segments`` is the training dataset's length; ``plan_path`` defaults to
    ``meta["path"]`` as set by :func:`load_batch_plan`.
    """
    if plan_path is not None:
        meta = {**meta, "path": str(plan_path)}
    check_plan(None, meta, data_bin_plan_target(data_dir, tokens_per_sample, num_segments))


# ----------------------------------------------------------------------------- text under a HF tokenizer


def load_text_segments(text_file: Path, model: str, tokens_per_sample: int,
                       gguf_file: str | None = None) -> tuple[Segments, dict[str, object]]:
    """(segments, plan meta identity) of a text file's blocks under ``model``'s tokenizer (``gguf_file``'s in it)."""
    from trime.hf.data import text_blocks
    from trime.hf.model import load_tokenizer
    from trime.hf.text import special_token_ids, text_file_identity, tokenizer_identity

    if text_file.is_dir():
        fail(f"with --model, DATA {text_file} must be the training text file (as trime-hf-train --train-file)")
    tokenizer = load_tokenizer(model, gguf_file=gguf_file)
    blocks = text_blocks(str(text_file), tokenizer, tokens_per_sample, "DATA", model)
    if len(blocks) < 2:
        fail(
            f"--tokens-per-sample {tokens_per_sample} leaves {len(blocks)} block of {text_file} under the tokenizer "
            f"of {model}; BM25 batching needs at least 2"
        )
    special = np.asarray(special_token_ids(tokenizer), dtype=np.int64)
    arrays = [block[~np.isin(block, special)] for block in blocks]
    vocab_size = max(len(tokenizer), int(blocks.max()) + 1)
    identity = {
        "kind": TEXT_PLAN_KIND,
        "tokenizer": tokenizer_identity(tokenizer),
        "tokenizer_name": str(model),
        "dataset": text_file_identity(text_file),
        "segment_terms": "token ids except the tokenizer's special ids",
    }
    return Segments.from_arrays(arrays, vocab_size=vocab_size), identity


# ----------------------------------------------------------------------------- CLI


def build_parser() -> Parser:
    """The ``trime-bm25-batches`` command-line parser."""
    p = Parser(
        prog="trime-bm25-batches",
        description=(
            "Build a BM25 batch plan for TrimeLM_ext (--predefined-batches): top-k BM25 neighbours of every "
            "training segment, then a seeded greedy chain through them. With --num-shards N, run each "
            "--shard-id separately (same --work-dir), then once more without --shard-id to merge."
        ),
    )
    p.add_argument("data", help="fairseq data-bin with dict.txt and train.{idx,bin}; with --model, the training text file")
    p.add_argument("--model", help="build the plan over this Hugging Face tokenizer's blocks of the text file DATA "
                   "(a save_pretrained dir, hub name or .gguf file; for trime-hf-train --bm25-plan)")
    p.add_argument("--gguf-file", metavar="NAME", help="with --model DIR: the tokenizer of the GGUF file NAME in DIR")
    p.add_argument("--tokens-per-sample", type=POSITIVE_INT, required=True, help="as in training (--sample-break-mode none)")
    p.add_argument("--output", help="batch plan JSON to write (not needed with --shard-id)")
    p.add_argument("--k", type=POSITIVE_INT, default=DEFAULT_K, help=f"BM25 hits kept per segment (default {DEFAULT_K})")
    p.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND, help=f"default {DEFAULT_BACKEND}")
    p.add_argument("--lucene", action="store_true",
                   help=f"pyserini/Lucene preset of the original: k1={LUCENE_PRESET.k1} b={LUCENE_PRESET.b} idf=lucene")
    p.add_argument("--k1", type=NONNEGATIVE_FLOAT, help=f"BM25 k1 (default {BM25Params.k1})")
    p.add_argument("--b", type=UNIT_FLOAT, help=f"BM25 b (default {BM25Params.b})")
    p.add_argument("--idf", choices=IDF_VARIANTS, help="lucene: log(1+(N-n+.5)/(n+.5)) (default); okapi: rank_bm25's")
    p.add_argument("--seed", type=NONNEGATIVE_INT, default=DEFAULT_SEED, help=f"greedy-chain seed (default {DEFAULT_SEED})")
    p.add_argument("--num-shards", type=POSITIVE_INT, default=1, help="split the search into this many shards (default 1)")
    p.add_argument("--shard-id", type=NONNEGATIVE_INT, help="search only this shard into --work-dir")
    p.add_argument("--merge", action="store_true", help="only merge finished shards from --work-dir and write the plan")
    p.add_argument("--work-dir", help="shard/chunk files (default: OUTPUT.work, removed after success)")
    p.add_argument("--chunk-size", type=POSITIVE_INT, default=DEFAULT_CHUNK_SIZE, help="queries per resumable chunk file")
    p.add_argument("--block-size", type=POSITIVE_INT, default=DEFAULT_BLOCK_SIZE, help="queries scored per matrix product")
    p.add_argument("--no-progress-bar", action="store_true", help="no progress bar and no progress lines")
    return p


def _params_from_args(args: argparse.Namespace) -> BM25Params:
    if args.lucene:
        if args.k1 is not None or args.b is not None or args.idf not in (None, "lucene"):
            fail("--lucene sets k1=0.9 b=0.4 idf=lucene; do not combine it with --k1/--b/--idf")
        return LUCENE_PRESET
    defaults = BM25Params()
    return BM25Params(
        k1=defaults.k1 if args.k1 is None else args.k1,
        b=defaults.b if args.b is None else args.b,
        idf=args.idf or defaults.idf,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trime-bm25-batches``; returns 0 (bad input raises :class:`trime.errors.TrimeError`).

    File-system faults (a full disk, a read-only folder) are one error line; finished chunks are
    kept, so a re-run after freeing space resumes. A run that writes the plan holds the lock of its
    work dir's plan, and each shard search the shard's: a second such run fails at once, naming the first.
    """
    args = build_parser().parse_args(argv)
    with file_faults_as_errors(f"--output {args.output}" if args.output else f"--work-dir {args.work_dir}"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Check the flags and paths, then search one shard, or search/merge and write the plan."""
    t0 = time.time()
    data_dir = Path(args.data)
    params = _params_from_args(args)
    sharded_step = args.shard_id is not None
    merge_only = args.merge or (args.num_shards > 1 and not sharded_step)
    if sharded_step and args.merge:
        fail("--merge and --shard-id exclude each other: search each shard, then merge once")
    if args.gguf_file and not args.model:
        fail("--gguf-file names a file inside --model DIR; pass --model too")
    if args.model and (merge_only or sharded_step):
        fail("--model plans are built in one go: drop --num-shards/--shard-id/--merge")
    if sharded_step:
        shard_range(1, args.num_shards, args.shard_id)  # validates --shard-id
        if not args.work_dir:
            fail("--shard-id needs --work-dir (shared by all shards and the final merge)")
    elif not args.output:
        fail("--output PLAN.json is required (except for a single --shard-id search)")
    if merge_only and not args.work_dir:
        fail("merging shards needs --work-dir, the directory the shards were searched into")
    work_dir = Path(args.work_dir) if args.work_dir else Path(f"{args.output}.work")
    if args.output and Path(args.output).is_dir():
        fail(f"--output {args.output} is a directory; give a file name such as plan.json")
    for path, flag in ((Path(args.output) if args.output else None, "--output"), (work_dir, "--work-dir")):
        above = next((p for p in (path.parents if path else []) if p.exists()), None)
        if above is not None and not above.is_dir():
            fail(f"{flag} {path} lies under {above}, which is a file, not a folder; choose another path")
    if work_dir.exists() and not work_dir.is_dir():
        fail(f"the work dir {work_dir} is a file; pass --work-dir FOLDER or remove it")
    if sharded_step:
        return _search_step(args, data_dir, work_dir, params, t0)
    plan_lock = exclusive_lock(work_dir / "plan.lock", f"--output {args.output} (work dir {work_dir})",
                               "choose another --output")
    with plan_lock:
        return _plan_step(args, data_dir, work_dir, params, t0, merge_only)


def _segments_and_config(
    args: argparse.Namespace, data_dir: Path, params: BM25Params, need_segments: bool
) -> tuple[Segments | None, dict[str, object] | None, dict[str, object]]:
    """(segments, the text plan's identity, the search config) of DATA; no segments unless ``need_segments``."""
    text_identity = None
    if args.model:  # a text file under a HF tokenizer: segments are its blocks
        segments, text_identity = load_text_segments(data_dir, args.model, args.tokens_per_sample, args.gguf_file)
        dataset = {**text_identity["dataset"], "tokenizer": text_identity["tokenizer"]}  # the search's config
    else:
        dataset = dataset_identity(data_dir)
    quiet_libraries()  # fairseq configures the root logger on import: no INFO lines
    log = silent if args.no_progress_bar else logger("trime-bm25-batches", stderr=True)
    if text_identity is not None:
        num_segments = len(segments)
    elif not need_segments:
        num_segments = count_train_segments(data_dir, args.tokens_per_sample)
        segments = None
    else:
        log(f"reading segments of {data_dir}/train (tokens-per-sample {args.tokens_per_sample})")
        segments = load_train_segments(data_dir, args.tokens_per_sample)
        num_segments = len(segments)
    config = search_config(dataset, args.tokens_per_sample, num_segments, args.backend, params, args.k, args.num_shards)
    return segments, text_identity, config


def _run_kwargs(args: argparse.Namespace) -> dict[str, object]:
    return {"chunk_size": args.chunk_size, "block_size": args.block_size, "show_progress": not args.no_progress_bar}


def _search_step(args: argparse.Namespace, data_dir: Path, work_dir: Path, params: BM25Params, t0: float) -> int:
    """``--shard-id``: search one shard into the work dir."""
    segments, _, config = _segments_and_config(args, data_dir, params, need_segments=True)
    num_segments = int(config["num_segments"])
    path = run_shard_search(segments, config, work_dir, args.shard_id, **_run_kwargs(args))
    start, end = shard_range(num_segments, args.num_shards, args.shard_id)
    print(
        f"trime-bm25-batches: shard {args.shard_id} of {args.num_shards} done: segments {start}..{end - 1} "
        f"of {num_segments} -> {path} ({time.time() - t0:.1f} s)"
    )
    return 0


def _plan_step(args: argparse.Namespace, data_dir: Path, work_dir: Path, params: BM25Params, t0: float,
               merge_only: bool) -> int:
    """Search (unless only merging), merge the shards, chain them and write the plan."""
    segments, text_identity, config = _segments_and_config(args, data_dir, params, need_segments=not merge_only)
    num_segments = int(config["num_segments"])
    dataset = config["dataset"]
    t_search = time.time()
    if not merge_only:
        run_shard_search(segments, config, work_dir, 0, **_run_kwargs(args))
    rerun = f" {data_dir} --tokens-per-sample {args.tokens_per_sample}"
    neighbours = merge_shard_results(work_dir, config, rerun_hint=f" (same options:{rerun} ...)")
    t_search = time.time() - t_search
    order, followed = greedy_chain(neighbours, args.seed)
    meta = {
        "tokens_per_sample": args.tokens_per_sample,
        "num_segments": num_segments,
        "dataset": dataset,
        "seed": args.seed,
        "backend": args.backend,
        "k": args.k,
        "k1": params.k1,
        "b": params.b,
        "idf": params.idf,
        **({"epsilon": params.epsilon} if params.idf == "okapi" else {}),
        "segment_terms": "dictionary ids except special symbols (<s> <pad> </s> <unk>)",
        **(text_identity or {}),
        "chain": CHAIN_ALGORITHM,
        "followed_fraction": round(followed, 6),
        "created_by": f"trime-bm25-batches {__version__}",
    }
    write_batch_plan(args.output, order, meta)
    if not args.work_dir and not merge_only:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(
        f"trime-bm25-batches: wrote {args.output}: {num_segments} segments of {args.tokens_per_sample} tokens, "
        f"backend {args.backend} (k={args.k} k1={params.k1} b={params.b} idf={params.idf}), seed {args.seed}; "
        f"{100 * followed:.1f}% of steps followed a BM25 neighbour; {time.time() - t0:.1f} s "
        f"(search {t_search:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
