"""``trime-build-datastore``: the external memory (keys, values, FAISS index) and its loader.

Layout of a datastore directory::

    meta.json     count, dim, dtypes, key type, window settings, dictionary (or tokenizer) and
                  checkpoint hashes, model front-end and architecture, per-shard bookkeeping, and (once built) the index settings
    keys.npy      (count, dim) float16 or float32 last-FFN inputs of every scored token
    vals.npy      (count,) int32 next-token ids
    index.faiss   FAISS index over keys.npy (row i of keys.npy has FAISS id i)
    shards/shard-XXX-of-NNN/   per-shard keys/vals/meta of a sharded build (before --merge)

Extraction runs the model (any :class:`trime.adapters.base.ModelAdapter`: a fairseq
checkpoint or a Hugging Face model dir) over a split with the evaluation windowing and
keeps every scored token: unlike the original, the first windows (with a short context)
are not skipped. Shards are contiguous runs of whole batches, so a sharded build merged
together is byte-identical to an unsharded one.
Extraction is resumable: ``progress.json`` records the batches already written to the
``*.partial.npy`` files; a killed build re-run with the same flags continues and ends
with byte-identical files. Final files appear atomically (rename), ``meta.json`` last.
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
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from trime.retrieval import checksums

from trime.errors import fail
from trime.io_utils import (
    atomic_path,
    identity_key,
    quiet_libraries,
    read_json,
    require_free_disk,
    sha256_file,
    shard_range,
    write_json_atomic,
)

META_NAME = "meta.json"
KEYS_NAME = "keys.npy"
VALS_NAME = "vals.npy"
INDEX_NAME = "index.faiss"
PROGRESS_NAME = "progress.json"
FORMAT = 1
KEY_TYPE = "last_ffn_input"
KEY_DTYPES = {"fp16": np.float16, "fp32": np.float32}
KEY_DTYPE_NAMES = tuple(np.dtype(t).name for t in KEY_DTYPES.values())
SEARCH_BACKENDS = ("faiss", "torch")  # trime-eval --knn-search
VAL_DTYPE = np.int32
if TYPE_CHECKING:  # torch is imported only when a model is loaded (not for --merge/--build-index)
    from trime.adapters import ModelAdapter, WindowSettings
DEFAULT_PROGRESS_SECONDS = 30.0
DEFAULT_HEARTBEAT_SECONDS = 10.0
ADD_CHUNK = 500_000


def _version() -> str:
    import trime

    return trime.__version__


def shard_dir_name(shard_id: int, num_shards: int) -> str:
    return f"shard-{shard_id:03d}-of-{num_shards:03d}"


def _npy_header(path: Path):
    """(shape, dtype, data offset) from a .npy header; fails with a one-line error if unreadable."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
    except (OSError, ValueError) as e:
        fail(f"{path} is not a valid .npy file ({e}); rebuild the datastore with trime-build-datastore")
    if fortran:
        fail(f"{path} is stored in Fortran order; rebuild the datastore with trime-build-datastore")
    return tuple(shape), np.dtype(dtype), offset


def check_npy(path: Path, shape: tuple, dtype, what: str) -> None:
    """Fail unless ``path`` is a .npy of exactly ``shape``/``dtype`` whose size matches its header."""
    if not path.is_file():
        fail(f"datastore file {path} is missing; rebuild the datastore with trime-build-datastore")
    file_shape, file_dtype, offset = _npy_header(path)
    if file_shape != tuple(shape) or file_dtype != np.dtype(dtype):
        fail(
            f"{path} holds {what} of shape {file_shape} {file_dtype} but {path.parent / META_NAME} says "
            f"{tuple(shape)} {np.dtype(dtype)}; {META_NAME} does not describe this file (edited, or from another "
            "build): rebuild the datastore"
        )
    expected = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    actual = path.stat().st_size
    if actual != expected:
        fail(
            f"{path} is {actual:,} bytes but its header and {META_NAME} need {expected:,}; "
            "the file is truncated or corrupt: rebuild the datastore"
        )


class Datastore:
    """A finished datastore: values in RAM, keys memory-mapped, and (optionally) the FAISS index."""

    def __init__(
        self,
        directory: Path,
        meta: dict,
        vals: np.ndarray,
        keys: np.ndarray,
        index=None,
        on_gpu: bool = False,
        torch_search=None,
    ) -> None:
        self.directory = directory
        self.on_gpu = on_gpu
        self.meta = meta
        self.vals = vals
        self.keys = keys
        self.index = index
        self.metric = (meta.get("index") or {}).get("metric", "ip")
        # --knn-search torch: a TorchExactSearch over all keys on the model's device (no FAISS index)
        self.torch_search = torch_search
        self._device_vals = None

    @property
    def count(self) -> int:
        return int(self.meta["count"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @classmethod
    def open(
        cls,
        directory: os.PathLike,
        dim: int | None = None,
        dict_sha256: str | None = None,
        model: dict | None = None,
        need_index: bool = True,
        nprobe: int = 32,
        gpus: str = "none",
        search: str = "faiss",
        device=None,
        vocab_size: int | None = None,
    ) -> "Datastore":
        """Open and validate a datastore; every mismatch is a one-line error naming the file and fix.

        ``dim``/``dict_sha256`` are the model's key size and the dictionary's sha256,
        ``model`` its ``{"frontend", "architecture"}`` (:func:`model_info`); ``gpus`` is
        ``none``, ``auto`` or ``all`` (see :func:`faiss_index.search_gpus`). ``search``
        is ``faiss`` (``index.faiss``) or ``torch``: exact search over all keys, copied to
        ``device`` (:mod:`trime.retrieval.torch_knn`); it needs no index.

        Always checked: meta.json against both ``.npy`` headers and file sizes, the sha256
        of ``vals.npy`` (:mod:`trime.retrieval.checksums`) and that every value is a token id
        of the dictionary (``vocab_size``, the model's, or the one recorded in meta.json).
        ``keys.npy``'s checksums are checked only by :func:`verify` (it may be huge).
        Loading never unpickles anything.
        """
        if search not in SEARCH_BACKENDS:
            fail(f"--knn-search must be one of {', '.join(SEARCH_BACKENDS)}, got {search!r}")
        directory = Path(directory)
        meta_path = directory / META_NAME
        if not directory.is_dir():
            fail(f"--datastore {directory} does not exist; build it with trime-build-datastore")
        if not meta_path.is_file():
            hint = (
                " (a sharded build: run trime-build-datastore --merge --output DIR)"
                if (directory / "shards").is_dir()
                else ""
            )
            fail(f"{meta_path} is missing: the datastore is incomplete{hint}; (re)run trime-build-datastore")
        meta = read_json(meta_path, what="datastore meta file")
        for key in ("count", "dim", "key_dtype", "val_dtype", "dictionary", "key_type"):
            if key not in meta:
                fail(f"{meta_path} lacks '{key}'; it was not written by trime-build-datastore: rebuild the datastore")
        count, ds_dim = int(meta["count"]), int(meta["dim"])
        if meta["key_dtype"] not in KEY_DTYPE_NAMES or meta["val_dtype"] != np.dtype(VAL_DTYPE).name:
            fail(
                f"{meta_path} says keys {meta['key_dtype']!r} and values {meta['val_dtype']!r}; a datastore holds "
                f"{' or '.join(KEY_DTYPE_NAMES)} keys and {np.dtype(VAL_DTYPE).name} values: rebuild the datastore"
            )
        keys_path, vals_path = directory / KEYS_NAME, directory / VALS_NAME
        # the files' own headers first: an edited meta.json must not be trusted over them
        check_npy(keys_path, (count, ds_dim), meta["key_dtype"], "keys")
        check_npy(vals_path, (count,), meta["val_dtype"], "values")
        if dim is not None and ds_dim != dim:
            fail(
                f"--datastore {directory} has {ds_dim}-d keys but the model's keys are {dim}-d; "
                "build a datastore with this checkpoint"
            )
        if dict_sha256 is not None and meta["dictionary"].get("sha256") != dict_sha256:
            fail(
                f"--datastore {directory} was built with another dictionary (sha256 in {meta_path} differs "
                "from the data-bin's dict.txt or the model's tokenizer); build the datastore with this "
                "dictionary or tokenizer"
            )
        built_by = meta.get("model")
        if model is not None and built_by is not None and built_by != model:
            fail(
                f"--datastore {directory} was built with a {built_by.get('frontend')} {built_by.get('architecture')} "
                f"model (keys from {built_by.get('key_source')}), not this {model['frontend']} "
                f"{model['architecture']} model (keys from {model['key_source']}); build a datastore with this model"
            )
        checksums.verify_vals(vals_path, meta, meta_path)
        keys = np.load(keys_path, mmap_mode="r", allow_pickle=False)  # never unpickle: plain .npy only
        vals = np.load(vals_path, allow_pickle=False)
        check_value_range(vals, meta, vals_path, vocab_size)
        index, on_gpu, torch_search = None, False, None
        if search == "torch":
            from trime.retrieval.torch_knn import TorchExactSearch

            metric = (meta.get("index") or {}).get("metric", "ip")
            torch_search = TorchExactSearch(keys, metric=metric, device=device if device is not None else "cpu")
        elif need_index:
            index, on_gpu = load_index(directory, meta, nprobe=nprobe, gpus=gpus)
        return cls(directory, meta, vals, keys, index, on_gpu=on_gpu, torch_search=torch_search)

    def search(self, queries: np.ndarray, k: int, exact: bool = False):
        """Top-k neighbours as :class:`trime.knn.KnnResults` (torch, CPU).

        ``exact`` recomputes the scores from the stored keys (kNN-LM's exact distances)
        instead of using FAISS's (possibly PQ-approximated) ones. ``queries`` is an array or
        a tensor; with ``--knn-search torch`` the results stay on the search device.
        """
        import torch
        from trime.retrieval import faiss_index

        from trime.knn import KnnResults

        if self.torch_search is not None:
            return self._search_torch(queries, k, exact)
        if torch.is_tensor(queries):
            queries = queries.detach().float().cpu().numpy()
        scores, ids = faiss_index.search(self.index, queries, k, self.metric)
        valid = ids >= 0
        safe = np.where(valid, ids, 0)
        if exact:
            scores = self.exact_scores(queries, safe)
        labels = self.vals[safe].astype(np.int64)
        return KnnResults(
            scores=torch.from_numpy(np.where(valid, scores, 0.0).astype(np.float32)),
            labels=torch.from_numpy(labels),
            valid=torch.from_numpy(valid),
        )

    def _search_torch(self, queries, k: int, exact: bool):
        import torch

        from trime.knn import KnnResults

        scores, ids = self.torch_search.search(queries, k)
        valid = ids >= 0
        safe = ids.clamp(min=0)
        if exact and self.torch_search.dtype != torch.float32:  # fp32 query . stored key, as FAISS's exact path
            scores = self.torch_search.rescore(queries, safe)
        if self._device_vals is None:
            self._device_vals = torch.from_numpy(self.vals.astype(np.int64)).to(self.torch_search.device)
        return KnnResults(scores=torch.where(valid, scores, 0.0), labels=self._device_vals[safe], valid=valid)

    def exact_scores(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Inner products or -squared L2 distances between each query and its neighbours' stored keys."""
        out = np.empty(ids.shape, dtype=np.float32)
        q = np.asarray(queries, dtype=np.float32)
        for row in range(ids.shape[0]):
            uniq, inverse = np.unique(ids[row], return_inverse=True)
            k = np.asarray(self.keys[uniq], dtype=np.float32)[inverse]
            if self.metric == "ip":
                out[row] = k @ q[row]
            else:
                diff = k - q[row]
                out[row] = -np.einsum("ij,ij->i", diff, diff)
        return out

    def identity(self) -> dict:
        """What identifies this datastore in results files."""
        return {
            "dir": str(self.directory),
            "meta_sha256": sha256_file(self.directory / META_NAME),
            "count": self.count,
            "dim": self.dim,
            "key_dtype": self.meta["key_dtype"],
            "index": self.meta.get("index"),
            "checkpoint": self.meta.get("checkpoint"),
        }


def check_value_range(vals: np.ndarray, meta: dict, vals_path: Path, vocab_size: int | None = None) -> None:
    """Fail unless every value is a token id in [0, vocabulary size)."""
    recorded = (meta.get("dictionary") or {}).get("size")
    sizes = [int(v) for v in (vocab_size, recorded) if v is not None]
    if not sizes or vals.size == 0:
        return
    size = min(sizes)
    low, high = int(vals.min()), int(vals.max())
    if low < 0 or high >= size:
        bad = low if low < 0 else high
        fail(
            f"{vals_path} holds token id {bad:,}, outside the dictionary's 0..{size - 1:,}: the values are damaged "
            "or from another dictionary; rebuild the datastore with trime-build-datastore"
        )


def verify(directory: Path, show_progress: bool = True) -> str:
    """``--verify``: every check of :meth:`Datastore.open` plus keys.npy's chunk checksums; returns a summary."""
    store = Datastore.open(directory, need_index=False)
    meta_path = directory / META_NAME
    if "checksums" not in store.meta:
        fail(f"{meta_path} records no checksums (a datastore built before they were added); rebuild it to verify")
    _, _, offset = _npy_header(directory / KEYS_NAME)
    row_bytes = store.dim * np.dtype(store.meta["key_dtype"]).itemsize
    chunks = checksums.verify_keys(directory / KEYS_NAME, store.meta, meta_path, offset, row_bytes, show_progress)
    index = directory / INDEX_NAME
    info = store.meta.get("index") or {}
    if info and index.is_file() and "bytes" in info and index.stat().st_size != info["bytes"]:
        fail(f"{index} is {index.stat().st_size:,} bytes but {META_NAME} records {info['bytes']:,}; rebuild it with --build-index")
    return (
        f"{directory}: OK ({store.count:,} keys of {store.dim}-d {store.meta['key_dtype']}, checksummed in {chunks} "
        f"chunk{'s' if chunks != 1 else ''}; values verified{'; index size matches' if info else '; no index'})"
    )


def record_checksums(directory: Path, meta: dict) -> None:
    """Add ``meta["checksums"]`` for the finished keys.npy/vals.npy in ``directory``."""
    keys_path = directory / KEYS_NAME
    _, _, offset = _npy_header(keys_path)
    row_bytes = int(meta["dim"]) * np.dtype(meta["key_dtype"]).itemsize
    meta["checksums"] = checksums.datastore_checksums(keys_path, directory / VALS_NAME, offset, int(meta["count"]), row_bytes)


@contextlib.contextmanager
def heartbeat(message: str, every_seconds: float, enabled: bool = True):
    """Print ``message: N s`` to stderr every ``every_seconds`` while the block runs (FAISS releases the GIL)."""
    if not enabled:
        yield
        return
    stop = threading.Event()
    started = time.monotonic()

    def beat() -> None:
        while not stop.wait(every_seconds):
            print(f"{message}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def load_index(directory: Path, meta: dict, nprobe: int = 32, gpus: str = "none"):
    """Read ``index.faiss``, check it against meta, set nprobe and place it on the search GPUs.

    Returns (index, on_gpu).
    """
    from trime.retrieval import faiss_index

    faiss = faiss_index.import_faiss()
    info = meta.get("index")
    path = directory / INDEX_NAME
    if not info or not path.is_file():
        fail(f"{path} is missing; build it with trime-build-datastore --build-index --output {directory}")
    if "bytes" in info and path.stat().st_size != info["bytes"]:
        fail(
            f"{path} is {path.stat().st_size:,} bytes but {META_NAME} records {info['bytes']:,}; "
            "rebuild it with --build-index"
        )
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        fail(
            f"{path} is corrupt ({str(e).splitlines()[0][:120]}); "
            f"rebuild it with trime-build-datastore --build-index --output {directory}"
        )
    if index.ntotal != int(meta["count"]) or index.d != int(meta["dim"]):
        fail(
            f"{path} holds {index.ntotal:,} x {index.d} vectors but {META_NAME} says {meta['count']:,} x "
            f"{meta['dim']}; "
            f"rebuild it with trime-build-datastore --build-index --output {directory}"
        )
    faiss_index.set_nprobe(index, nprobe)
    search_gpus = faiss_index.search_gpus(gpus)
    if search_gpus:  # pragma: no cover - only with faiss-gpu
        moved = faiss_index.to_search_device(index, search_gpus)
        if moved is not index:
            faiss_index.set_nprobe(moved, nprobe, on_gpu=True)
            return moved, True
    return index, False


# ----------------------------------------------------------------------------- extraction


def model_info(lm: "ModelAdapter") -> dict:
    """What a datastore records about the model family that built it (checked by :meth:`Datastore.open`)."""
    return {"frontend": lm.frontend, "architecture": lm.architecture, "key_source": lm.key_source}


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
) -> Path:
    """Write keys/vals/meta of one shard (the whole datastore when ``num_shards`` is 1).

    Returns the directory written. ``kill_after_batches`` (tests only) SIGKILLs the
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
        "created_by": f"trime-build-datastore {_version()}",
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
            print(f"trime-build-datastore: {out_dir} is already complete ({rows:,} keys)")
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
    print(f"trime-build-datastore: wrote {rows:,} keys ({lm.dim}-d {np.dtype(dtype).name}) to {out_dir}")
    return out_dir


def merge_shards(output: Path, delete_shards: bool = False) -> dict:
    """Concatenate the shards under ``output/shards`` (in shard order) into one datastore."""
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
    print(f"trime-build-datastore: merged {num_shards} shards into {output} ({total:,} keys)")
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
) -> dict:
    """Train and fill ``index.faiss`` for the datastore in ``output``; records it in meta.json.

    FAISS trains silently (minutes for a large IVF-PQ): with ``show_progress`` a line with
    the elapsed time is printed every ``heartbeat_seconds``.
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
    print(
        f"trime-build-datastore: training {factory} ({metric}) on {n_train:,} keys{' on GPU' if gpu else ''}",
        file=sys.stderr,
    )
    with heartbeat(f"trime-build-datastore: training {factory}", heartbeat_seconds, enabled=show_progress):
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
    print(
        f"trime-build-datastore: wrote {output / INDEX_NAME} ({factory}, {metric}, {count:,} keys; "
        f"train {train_seconds:.1f}s, total {total_seconds:.1f}s)"
    )
    return {**meta["index"], "train_seconds": train_seconds, "total_seconds": total_seconds}


# ----------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        fail(f"{message} (see trime-build-datastore --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="trime-build-datastore",
        description="Build TRIME's external memory: extract keys/values, merge shards, build the FAISS index.",
    )
    p.add_argument(
        "data", nargs="?", help="fairseq data-bin, or a folder of text splits for a Hugging Face --path (extraction)"
    )
    p.add_argument(
        "--path", help="fairseq checkpoint or Hugging Face model dir (config.json) whose last-FFN inputs are the keys"
    )
    p.add_argument("--output", required=True, help="datastore directory")
    p.add_argument("--gen-subset", default="train", help="split to extract (default: train)")
    p.add_argument(
        "--context-window", type=int, default=0, help="previous tokens prepended to each window, as in trime-eval"
    )
    p.add_argument(
        "--tokens-per-sample", type=int, default=None, help="window length incl. context (default: the checkpoint's)"
    )
    p.add_argument("--key-dtype", choices=sorted(KEY_DTYPES), default="fp16")
    p.add_argument(
        "--key-module", default=None, help="HF models: module whose input are the keys (default: last layer's MLP)"
    )
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--shard-id", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="windows per batch (must be equal for all shards)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per batch incl. context (default 8192)")
    p.add_argument("--cpu", action="store_true", help="run the model on the CPU even if a GPU is present")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument(
        "--fp16", action="store_true", help="run the model in fp16 (keys are still stored as --key-dtype)"
    )
    prec.add_argument("--bf16", action="store_true")
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
    p.add_argument("--metric", choices=("ip", "l2"), default="ip")
    p.add_argument("--train-sample", type=int, default=1_000_000, help="keys sampled (seeded) to train the index")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--faiss-cpu", action="store_true", help="never use FAISS GPUs")
    p.add_argument("--no-progress-bar", action="store_true")
    p.add_argument("--progress-seconds", type=float, default=DEFAULT_PROGRESS_SECONDS, help=argparse.SUPPRESS)
    p.add_argument("--kill-after-batches", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--heartbeat-seconds", type=float, default=DEFAULT_HEARTBEAT_SECONDS, help=argparse.SUPPRESS)
    return p


def cli_main(argv: list | None = None) -> None:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    output = Path(args.output)
    index_kwargs = {
        "factory": args.index_factory,
        "metric": args.metric,
        "train_sample": args.train_sample,
        "seed": args.seed,
        "use_gpu": not args.faiss_cpu,
        "show_progress": not args.no_progress_bar,
        "heartbeat_seconds": args.heartbeat_seconds,
    }
    if args.verify:
        print(f"trime-build-datastore: {verify(output, show_progress=not args.no_progress_bar)}")
        return
    if args.build_index:
        build_index(output, **index_kwargs)
        return
    if args.merge:
        merge_shards(output, delete_shards=args.delete_shards)
        if not args.no_index:
            build_index(output, **index_kwargs)
        return
    if args.data is None or args.path is None:
        fail("extraction needs DATA and --path (or use --merge / --build-index on an existing --output)")
    from trime.adapters import batch_size_for, load_adapter

    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    lm = load_adapter(args.path, args.data, cpu=args.cpu, precision=precision, key_module=args.key_module)
    settings = lm.window_settings(args.context_window, args.tokens_per_sample)
    batch_size = batch_size_for(settings, args.batch_size, args.max_tokens)
    written = extract(
        lm,
        args.gen_subset,
        settings,
        batch_size,
        output,
        key_dtype=args.key_dtype,
        num_shards=args.num_shards,
        shard_id=args.shard_id,
        progress_seconds=args.progress_seconds,
        kill_after_batches=args.kill_after_batches,
        show_progress=not args.no_progress_bar,
    )
    if args.num_shards > 1:
        finished = [
            (output / "shards" / shard_dir_name(i, args.num_shards) / META_NAME).is_file()
            for i in range(args.num_shards)
        ]
        if all(finished):
            print(
                f"trime-build-datastore: all {args.num_shards} shards done; "
                f"merge with: trime-build-datastore --merge --output {output}"
            )
        return
    if not args.no_index:
        meta = read_json(written / META_NAME, what="datastore meta file")
        if meta.get("index") is None or not (written / INDEX_NAME).is_file():
            build_index(output, **index_kwargs)


if __name__ == "__main__":
    cli_main()
