"""``trime-build-datastore``: build the external memory (keys, values, FAISS index) of a model over a split.

Extraction runs the model (any :class:`trime.adapters.base.ModelAdapter`: a fairseq
checkpoint or a Hugging Face model dir) over a split with the evaluation windowing and
keeps every scored token: unlike the original, the first windows (with a short context)
are not skipped. Shards are contiguous runs of whole batches, so a sharded build merged
together is byte-identical to an unsharded one.
Extraction is resumable: ``progress.json`` records the batches already written to the
``*.partial.npy`` files; a killed build re-run with the same flags continues and ends
with byte-identical files. Final files appear atomically (rename), ``meta.json`` last.
The format, its loader and every check are :mod:`trime.retrieval.datastore`.
"""

import argparse
import contextlib
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from trime.cli import Parser, logger, silent
from trime.cli.model_args import add_model_args, model_from_args
from trime.errors import fail
from trime.io_utils import (
    atomic_path,
    identity_key,
    quiet_libraries,
    read_json,
    require_free_disk,
    shard_range,
    write_json_atomic,
)
from trime.retrieval.datastore import (
    FORMAT,
    INDEX_NAME,
    KEY_DTYPES,
    KEY_TYPE,
    KEYS_NAME,
    META_NAME,
    PROGRESS_NAME,
    VAL_DTYPE,
    VALS_NAME,
    Datastore,
    check_npy,
    model_info,
    record_checksums,
    shard_dir_name,
    verify,
)
from trime.version import __version__

if TYPE_CHECKING:  # torch is imported only when a model is loaded (not for --merge/--build-index)
    from trime.adapters import ModelAdapter, WindowSettings

PROG = "trime-build-datastore"
DEFAULT_PROGRESS_SECONDS = 30.0
DEFAULT_HEARTBEAT_SECONDS = 10.0
ADD_CHUNK = 500_000


@contextlib.contextmanager
def heartbeat(
    message: str, every_seconds: float, enabled: bool = True, log: Callable[[str], None] = silent
) -> Iterator[None]:
    """``log`` ``message: N s`` every ``every_seconds`` while the block runs (FAISS releases the GIL)."""
    if not enabled:
        yield
        return
    stop = threading.Event()
    started = time.monotonic()

    def beat() -> None:
        while not stop.wait(every_seconds):
            log(f"{message}: {time.monotonic() - started:.0f} s")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()



def _config_sha(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _save_progress(path: Path, config_sha: str, keys, vals, batches: int, rows: int) -> None:
    """Flush the partial files, then record how far they are complete (atomically)."""
    keys.flush()
    vals.flush()
    write_json_atomic(path, {"config_sha256": config_sha, "batches_done": batches, "rows_done": rows})


def extract(
    lm: "ModelAdapter",
    split: str,
    settings: "WindowSettings",
    batch_size: int,
    output: Path,
    key_dtype: str = "fp16",
    num_shards: int = 1,
    shard_id: int = 0,
    progress_seconds: float = DEFAULT_PROGRESS_SECONDS,
    kill_after_batches: int | None = None,
    show_progress: bool = True,
    log: Callable[[str], None] = silent,
) -> Path:
    """Write keys/vals/meta of one shard (the whole datastore when ``num_shards`` is 1).

    Returns the directory written; ``log`` gets one line when it is done. ``kill_after_batches`` (tests only) SIGKILLs the
    process after that many batches of this run, leaving a partial build to resume.
    """
    from tqdm import tqdm

    if key_dtype not in KEY_DTYPES:
        fail(f"--key-dtype must be one of {', '.join(KEY_DTYPES)}, got {key_dtype!r}")
    windows = lm.windows(split, settings)
    total_batches = windows.num_batches(batch_size)
    b0, b1 = shard_range(total_batches, num_shards, shard_id)
    w0, w1 = b0 * batch_size, min(len(windows), b1 * batch_size)
    sizes = windows.scored_counts()
    row0, rows = int(sizes[:w0].sum()), int(sizes[w0:w1].sum())
    out_dir = output if num_shards == 1 else output / "shards" / shard_dir_name(shard_id, num_shards)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = KEY_DTYPES[key_dtype]

    ckpt = lm.identity
    meta = {
        "format": FORMAT,
        "created_by": f"trime-build-datastore {__version__}",
        "key_type": KEY_TYPE,
        "count": rows,
        "dim": lm.dim,
        "key_dtype": np.dtype(dtype).name,
        "val_dtype": np.dtype(VAL_DTYPE).name,
        "split": split,
        "windows": {**settings.as_dict(), "num_windows": len(windows), "batch_size": batch_size},
        "skipped_tokens": 0,
        "dictionary": dict(lm.vocab),
        "checkpoint": ckpt,
        "model": model_info(lm),
        "model_precision": str(lm.dtype).replace("torch.", ""),
        "shards": [
            {
                "shard_id": shard_id,
                "num_shards": num_shards,
                "batches": [b0, b1],
                "windows": [w0, w1],
                "rows": [row0, row0 + rows],
                "count": rows,
            }
        ],
        "index": None,
    }
    config_sha = _config_sha({k: v for k, v in meta.items() if k not in ("created_by",)})
    meta_path = out_dir / META_NAME
    if meta_path.is_file():
        done = read_json(meta_path, what="datastore meta file")
        if done.get("build_config_sha256") == config_sha:
            log(f"{out_dir} is already complete ({rows:,} keys)")
            return out_dir
        fail(f"{out_dir} already holds a datastore built with other settings; choose another --output or delete it")
    meta["build_config_sha256"] = config_sha

    keys_tmp, vals_tmp = out_dir / "keys.partial.npy", out_dir / "vals.partial.npy"
    progress_path = out_dir / PROGRESS_NAME
    done_batches, done_rows = 0, 0
    resume = progress_path.is_file() and keys_tmp.is_file() and vals_tmp.is_file()
    if resume:
        progress = read_json(progress_path, what="datastore progress file")
        if progress.get("config_sha256") != config_sha:
            fail(
                f"{progress_path} belongs to a build with other settings; re-run with the same flags "
                f"or delete {out_dir} to start over"
            )
        done_batches, done_rows = int(progress["batches_done"]), int(progress["rows_done"])
        check_npy(keys_tmp, (rows, lm.dim), dtype, "keys")
        check_npy(vals_tmp, (rows,), VAL_DTYPE, "values")
        keys = np.lib.format.open_memmap(keys_tmp, mode="r+")
        vals = np.lib.format.open_memmap(vals_tmp, mode="r+")
    else:
        require_free_disk(
            out_dir, int(rows * (lm.dim * np.dtype(dtype).itemsize + 4) * 1.02) + (16 << 20), flag="--output"
        )
        keys = np.lib.format.open_memmap(keys_tmp, mode="w+", dtype=dtype, shape=(rows, lm.dim))
        vals = np.lib.format.open_memmap(vals_tmp, mode="w+", dtype=VAL_DTYPE, shape=(rows,))

    if not resume:
        _save_progress(progress_path, config_sha, keys, vals, 0, 0)
    bar = tqdm(
        total=rows,
        initial=done_rows,
        unit="tok",
        unit_scale=True,
        desc=f"datastore {out_dir.name}",
        disable=not show_progress,
        file=sys.stderr,
    )
    last_save = time.monotonic()
    row = done_rows
    samples = windows.batches(batch_size, b0 + done_batches, b1)
    for batches_this_run, sample in enumerate(samples, start=1):
        batch_no = done_batches + batches_this_run
        batch = lm.forward(sample, need_token_terms=False)
        q = batch.queries
        n = q.shape[0]
        keys[row : row + n] = q.float().cpu().numpy().astype(dtype)
        vals[row : row + n] = batch.targets.cpu().numpy().astype(VAL_DTYPE)
        row += n
        bar.update(n)
        if kill_after_batches is not None and batches_this_run >= kill_after_batches:
            os.kill(os.getpid(), signal.SIGKILL)  # tests: die like a killed job, progress not updated
        if time.monotonic() - last_save >= progress_seconds:
            _save_progress(progress_path, config_sha, keys, vals, batch_no, row)
            last_save = time.monotonic()
    bar.close()
    if row != rows:
        fail(f"extraction wrote {row:,} keys but {rows:,} were expected; delete {out_dir} and rebuild")
    keys.flush()
    vals.flush()
    del keys, vals
    os.replace(keys_tmp, out_dir / KEYS_NAME)
    os.replace(vals_tmp, out_dir / VALS_NAME)
    record_checksums(out_dir, meta)
    write_json_atomic(meta_path, meta)
    progress_path.unlink(missing_ok=True)
    log(f"wrote {rows:,} keys ({lm.dim}-d {np.dtype(dtype).name}) to {out_dir}")
    return out_dir


def merge_shards(output: Path, delete_shards: bool = False, log: Callable[[str], None] = silent) -> dict:
    """Concatenate the shards under ``output/shards`` (in shard order) into one datastore; returns its meta."""
    shard_root = output / "shards"
    dirs = sorted(p for p in shard_root.glob("shard-*-of-*") if p.is_dir()) if shard_root.is_dir() else []
    if not dirs:
        fail(f"{shard_root} holds no shards; run trime-build-datastore with --num-shards/--shard-id first")
    num_shards = int(dirs[0].name.rsplit("-", 1)[1])
    metas = []
    for shard_id in range(num_shards):
        path = shard_root / shard_dir_name(shard_id, num_shards) / META_NAME
        if not path.is_file():
            fail(
                f"shard {shard_id} of {num_shards} is not finished ({path} missing); "
                f"run it with --num-shards {num_shards} --shard-id {shard_id}"
            )
        metas.append(read_json(path, what="shard meta file"))
    if len(dirs) != num_shards:
        fail(f"{shard_root} mixes shards of different --num-shards; delete the stale ones")
    first = metas[0]
    same = ("dim", "key_dtype", "val_dtype", "split", "windows", "dictionary", "key_type", "model_precision", "model")
    for shard_id, m in enumerate(metas):
        differs = [key for key in same if m.get(key) != first.get(key)]
        if identity_key(m["checkpoint"]) != identity_key(first["checkpoint"]):
            differs.append("checkpoint")
        if differs:
            fail(
                f"shard {shard_id} differs from shard 0 in {', '.join(differs)}; rebuild all shards with the same flags"
            )
    total = sum(int(m["count"]) for m in metas)
    dim, dtype = int(first["dim"]), np.dtype(first["key_dtype"])
    require_free_disk(output, int(total * (dim * dtype.itemsize + 4) * 1.02) + (16 << 20), flag="--output")
    with atomic_path(output / KEYS_NAME) as keys_tmp, atomic_path(output / VALS_NAME) as vals_tmp:
        keys = np.lib.format.open_memmap(keys_tmp, mode="w+", dtype=dtype, shape=(total, dim))
        vals = np.lib.format.open_memmap(vals_tmp, mode="w+", dtype=VAL_DTYPE, shape=(total,))
        row = 0
        for shard_id, m in enumerate(metas):
            d = shard_root / shard_dir_name(shard_id, num_shards)
            check_npy(d / KEYS_NAME, (int(m["count"]), dim), dtype, "keys")
            check_npy(d / VALS_NAME, (int(m["count"]),), VAL_DTYPE, "values")
            src_k, src_v = np.load(d / KEYS_NAME, mmap_mode="r"), np.load(d / VALS_NAME, mmap_mode="r")
            for lo in range(0, src_k.shape[0], ADD_CHUNK):
                hi = min(src_k.shape[0], lo + ADD_CHUNK)
                keys[row + lo : row + hi] = src_k[lo:hi]
            vals[row : row + src_v.shape[0]] = src_v
            row += src_k.shape[0]
        keys.flush()
        vals.flush()
        del keys, vals
    meta = {k: v for k, v in first.items() if k not in ("shards", "build_config_sha256")}
    meta["count"] = total
    meta["shards"] = [s for m in metas for s in m["shards"]]
    meta["index"] = None
    record_checksums(output, meta)
    write_json_atomic(output / META_NAME, meta)
    if delete_shards:
        for shard_id in range(num_shards):
            d = shard_root / shard_dir_name(shard_id, num_shards)
            for name in (KEYS_NAME, VALS_NAME, META_NAME):
                (d / name).unlink(missing_ok=True)
            d.rmdir()
        shard_root.rmdir()
    log(f"merged {num_shards} shards into {output} ({total:,} keys)")
    return meta


# ----------------------------------------------------------------------------- index


def build_index(
    output: Path,
    factory: str = "auto",
    metric: str = "ip",
    train_sample: int = 1_000_000,
    seed: int = 1,
    use_gpu: bool = True,
    show_progress: bool = True,
    heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS,
    log: Callable[[str], None] = silent,
    log_progress: Callable[[str], None] = silent,
) -> dict:
    """Train and fill ``index.faiss`` for the datastore in ``output``; records it in meta.json.

    ``log`` gets the final line; ``log_progress`` the start of the training and, with
    ``show_progress``, the elapsed time every ``heartbeat_seconds`` (FAISS trains silently,
    minutes for a large IVF-PQ).
    """
    from tqdm import tqdm

    from trime.retrieval import faiss_index

    store = Datastore.open(output, need_index=False)
    meta, count, dim = store.meta, store.count, store.dim
    if count == 0:
        fail(f"{output} holds no keys; nothing to index")
    if factory == "auto":
        factory = faiss_index.auto_factory(count, dim)
    faiss_index.faiss_metric(metric)
    if train_sample < 1:
        fail(f"--train-sample must be >= 1, got {train_sample}")
    require_free_disk(output, faiss_index.index_bytes_estimate(factory, count, dim), flag="--output")
    gpu = use_gpu and faiss_index.num_gpus() > 0
    rng = np.random.default_rng(seed)
    n_train = min(count, train_sample)
    sample_ids = np.sort(rng.choice(count, size=n_train, replace=False)) if n_train < count else np.arange(count)
    sample = np.asarray(store.keys[sample_ids], dtype=np.float32)
    started = time.monotonic()
    log_progress(f"training {factory} ({metric}) on {n_train:,} keys{' on GPU' if gpu else ''}")
    with heartbeat(f"training {factory}", heartbeat_seconds, enabled=show_progress, log=log_progress):
        index = faiss_index.train_index(factory, metric, dim, sample, seed, gpu)
    del sample
    train_seconds = time.monotonic() - started
    with tqdm(
        total=count, unit="key", unit_scale=True, desc="index add", disable=not show_progress, file=sys.stderr
    ) as bar:

        def added(n: int) -> None:
            if bar.n + n >= count:  # leave the 100% line to close(): printed once, not twice
                bar.n = count
            else:
                bar.update(n)

        index = faiss_index.add_in_chunks(index, store.keys, ADD_CHUNK, progress=added, use_gpu=gpu)
    faiss = faiss_index.import_faiss()
    with atomic_path(output / INDEX_NAME) as tmp:
        faiss.write_index(index, str(tmp))
    meta["index"] = {
        "file": INDEX_NAME,
        "factory": factory,
        "metric": metric,
        "ntotal": int(index.ntotal),
        "train_sample": n_train,
        "seed": seed,
        "bytes": (output / INDEX_NAME).stat().st_size,
    }
    write_json_atomic(output / META_NAME, meta)
    total_seconds = time.monotonic() - started
    log(
        f"wrote {output / INDEX_NAME} ({factory}, {metric}, {count:,} keys; "
        f"train {train_seconds:.1f}s, total {total_seconds:.1f}s)"
    )
    return {**meta["index"], "train_seconds": train_seconds, "total_seconds": total_seconds}


# ----------------------------------------------------------------------------- CLI


def build_parser() -> Parser:
    """The ``trime-build-datastore`` command-line parser."""
    p = Parser(
        prog=PROG,
        description="Build TRIME's external memory: extract keys/values, merge shards, build the FAISS index.",
    )
    add_model_args(p, gen_subset="train", gen_subset_help="split to extract (default: train)", required=False)
    p.add_argument("--output", required=True, help="datastore directory")
    p.add_argument(
        "--key-dtype",
        choices=sorted(KEY_DTYPES),
        default="fp16",
        help="dtype the keys are stored in (default fp16: half the disk and RAM of fp32)",
    )
    p.add_argument(
        "--num-shards",
        type=int,
        default=1,
        help="split the extraction into this many shards of whole batches, one run per --shard-id (default 1)",
    )
    p.add_argument(
        "--shard-id", type=int, default=0, help="the shard this run extracts, 0..--num-shards-1 (default 0)"
    )
    p.add_argument(
        "--merge", action="store_true", help="merge finished shards under OUTPUT/shards, then build the index"
    )
    p.add_argument("--delete-shards", action="store_true", help="with --merge: delete the shard files afterwards")
    p.add_argument("--build-index", action="store_true", help="only (re)build index.faiss for an existing datastore")
    p.add_argument(
        "--verify",
        action="store_true",
        help="only check an existing --output: meta.json vs the .npy headers, vals.npy, and every keys.npy chunk "
        "against the checksums in meta.json (reads all keys; loading checks everything but the keys)",
    )
    p.add_argument("--no-index", action="store_true", help="do not build the index after extraction/merge")
    p.add_argument(
        "--index-factory",
        default="auto",
        help="FAISS factory string, or auto (IVF-PQ sized to the datastore; Flat when tiny)",
    )
    p.add_argument(
        "--metric", choices=("ip", "l2"), default="ip", help="index metric: inner product or L2 (default ip)"
    )
    p.add_argument("--train-sample", type=int, default=1_000_000, help="keys sampled (seeded) to train the index")
    p.add_argument("--seed", type=int, default=1, help="seed of the index's training sample (default 1)")
    p.add_argument("--faiss-cpu", action="store_true", help="never use FAISS GPUs")
    # for tests only: how often progress is saved, killing a build midway, the heartbeat period
    p.add_argument("--progress-seconds", type=float, default=DEFAULT_PROGRESS_SECONDS, help=argparse.SUPPRESS)
    p.add_argument("--kill-after-batches", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--heartbeat-seconds", type=float, default=DEFAULT_HEARTBEAT_SECONDS, help=argparse.SUPPRESS)
    return p


def index_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`build_index` from the flags, with the CLI's loggers."""
    return {
        "factory": args.index_factory,
        "metric": args.metric,
        "train_sample": args.train_sample,
        "seed": args.seed,
        "use_gpu": not args.faiss_cpu,
        "show_progress": not args.no_progress_bar,
        "heartbeat_seconds": args.heartbeat_seconds,
        "log": logger(PROG),
        "log_progress": logger(PROG, stderr=True),
    }


def extract_step(args: argparse.Namespace, output: Path) -> None:
    """Extract (one shard of) the datastore; then, unless sharded or --no-index, build its index."""
    if args.data is None or args.path is None:
        fail("extraction needs DATA and --path (or use --merge / --build-index on an existing --output)")
    loaded = model_from_args(args)
    written = extract(
        loaded.lm,
        args.gen_subset,
        loaded.windows,
        loaded.batch_size,
        output,
        key_dtype=args.key_dtype,
        num_shards=args.num_shards,
        shard_id=args.shard_id,
        progress_seconds=args.progress_seconds,
        kill_after_batches=args.kill_after_batches,
        show_progress=not args.no_progress_bar,
        log=logger(PROG),
    )
    if args.num_shards > 1:
        finished = [
            (output / "shards" / shard_dir_name(i, args.num_shards) / META_NAME).is_file()
            for i in range(args.num_shards)
        ]
        if all(finished):
            logger(PROG)(
                f"all {args.num_shards} shards done; merge with: trime-build-datastore --merge --output {output}"
            )
        return
    if not args.no_index:
        meta = read_json(written / META_NAME, what="datastore meta file")
        if meta.get("index") is None or not (written / INDEX_NAME).is_file():
            build_index(output, **index_options(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trime-build-datastore``; returns the exit status."""
    args = build_parser().parse_args(argv)
    quiet_libraries()
    output = Path(args.output)
    if args.verify:
        logger(PROG)(verify(output, show_progress=not args.no_progress_bar))
    elif args.build_index:
        build_index(output, **index_options(args))
    elif args.merge:
        merge_shards(output, delete_shards=args.delete_shards, log=logger(PROG))
        if not args.no_index:
            build_index(output, **index_options(args))
    else:
        extract_step(args, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
