"""``trime-build-datastore``: build the external memory (keys, values, FAISS index) of a model over a split.

Extraction runs the model (any :class:`trime.adapters.base.ModelAdapter`: a fairseq
checkpoint or a Hugging Face model dir) over a split with the evaluation windowing and
keeps every scored token: unlike the original, the first windows (with a short context)
are not skipped. Shards are contiguous runs of whole batches, so a sharded build merged
together is byte-identical to an unsharded one.
Extraction is resumable: ``progress.json`` records the batches already written to the
``*.partial.npy`` files; a killed build re-run with the same flags and the same data (the
sha256 of the split's files, recorded in ``meta.json``) continues and ends with
byte-identical files; other data is refused. Final files appear atomically (rename),
``meta.json`` last. The partial files' space is reserved up front, so a full disk is one
error line and never a SIGBUS; a re-run after freeing space resumes. NaN or inf keys (a
diverged model) stop the build before anything final is written. Every run that writes
holds the directory's lock (a shard's own directory for a sharded extraction); a second
run fails at once, naming the first.
The format, its loader and every check are :mod:`trime.retrieval.datastore`.
"""

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from trime.cli import (
    NONNEGATIVE_FLOAT,
    NONNEGATIVE_INT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    Number,
    Parser,
    logger,
    silent,
)
from trime.cli.model_args import add_model_args, model_from_args
from trime.errors import fail, file_faults_as_errors
from trime.io_utils import (
    atomic_path,
    identity_key,
    naming_file,
    progress_meter,
    quiet_libraries,
    read_json,
    require_free_disk,
    sha256_file,
    shard_range,
    write_json_atomic,
)
from trime.retrieval.checksums import nonfinite_keys_message
from trime.retrieval.datastore import (
    DEFAULT_METRIC,
    DOCUMENTS_FORMAT,
    DOCUMENTS_NAME,
    FORMAT,
    INDEX_NAME,
    KEY_DTYPES,
    KEY_TYPE,
    KEYS_NAME,
    LEGACY_METRIC,
    LOCK_NAME,
    META_NAME,
    METRICS,
    ORIGIN_DTYPE,
    ORIGINS_NAME,
    PROGRESS_NAME,
    VAL_DTYPE,
    VALS_NAME,
    Datastore,
    build_lock,
    check_npy,
    create_npy,
    data_identity,
    history_entry,
    model_info,
    record_checksums,
    recorded_metric,
    reserve_file,
    shard_dir_name,
    verify,
)
from trime.retrieval.import_knnlm import add_import_args, import_step
from trime.version import __version__

if TYPE_CHECKING:  # torch is imported only when a model is loaded (not for --merge/--build-index)
    from trime.adapters import ModelAdapter, SplitWindows, WindowSettings
    from trime.adapters.base import Documents

PROG = "trime-build-datastore"
DEFAULT_PROGRESS_SECONDS = 30.0
DEFAULT_HEARTBEAT_SECONDS = 10.0
ADD_CHUNK = 500_000
FINAL_NAMES = {"keys": KEYS_NAME, "vals": VALS_NAME, "origins": ORIGINS_NAME}  # per-row files of an extraction
NO_SOURCES_NOTE = " (built before sources were recorded: rebuild it into a new --output to record them)"
SEED = Number(int, ge=0, le=2**31 - 1)  # FAISS's k-means seed is a C int


@contextlib.contextmanager
def heartbeat(message: str, every_seconds: float, log: Callable[[str], None] = silent) -> Iterator[None]:
    """``log`` ``message: N s`` every ``every_seconds`` while the block runs (FAISS releases the GIL)."""
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



@dataclass(frozen=True)
class SourceSpec:
    """The source an extraction reads: its ``id`` (origins.npy's first column), its ``name`` (default: the
    split) and the rule that cuts it into documents (:data:`trime.adapters.base.DOCUMENT_RULES`)."""

    id: int = 0
    name: str | None = None
    document_rule: str = "auto"


def _config_sha(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


# meta.json entries that are not build settings (excluded from the build's config; the metric does not change the
# keys, and the sources follow from the split, the data and the dictionary)
_NOT_SETTINGS = ("created_by", "build_config_sha256", "checksums", "index", "metric", "sources", "history",
                 "segments", "deleted", "generation")
# the settings a user chooses, named first when two builds differ (the rest follow from them)
_SETTINGS_FIRST = ("checkpoint", "windows", "key_dtype", "model_precision", "dictionary", "model")


def _short(identity: object) -> str:
    sha = identity.get("sha256") if isinstance(identity, dict) else None
    return f"sha256 {sha[:12]}..." if sha else "not recorded"


def settings_difference(old: dict, new: dict, data_dir: object = None) -> tuple[str, bool]:
    """(what differs between two builds' settings, in a few words; whether it is the data).

    The split is compared first, then the data, then the checkpoint and the other settings.
    """
    old_data, new_data = old.get("data"), new.get("data")
    if old.get("split") != new.get("split"):
        return f"split: {json.dumps(old.get('split'))} then, {json.dumps(new.get('split'))} now", False
    if old_data != new_data:
        old_files = (old_data or {}).get("files", {}) if isinstance(old_data, dict) else {}
        new_files = (new_data or {}).get("files", {}) if isinstance(new_data, dict) else {}
        for name in sorted(set(old_files) | set(new_files)):
            if old_files.get(name) != new_files.get(name):
                where = Path(data_dir) / name if data_dir is not None else name
                return f"{where} differs: {_short(old_files.get(name))} then, {_short(new_files.get(name))} now", True
        return "the data's identity is not recorded there", True
    keys = [*_SETTINGS_FIRST, *sorted(set(old) | set(new))]
    for key in keys:
        a, b = old.get(key), new.get(key)
        if key in _NOT_SETTINGS or key == "data" or a == b:
            continue
        if key == "checkpoint" and a and b and identity_key(a) != identity_key(b):
            return f"checkpoint: {a.get('path')} then, {b.get('path')} now", False
        if isinstance(a, dict) and isinstance(b, dict):  # name the entry: "windows.batch_size: 64 then, 32 now"
            sub = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
            key, a, b = f"{key}.{sub}", a.get(sub), b.get(sub)
        return f"{key}: {json.dumps(a, sort_keys=True)[:60]} then, {json.dumps(b, sort_keys=True)[:60]} now", False
    return "build settings", False


def _save_progress(path: Path, config: dict, config_sha: str, arrays: Sequence[np.memmap], batches: int,
                   rows: int) -> None:
    """Flush the partial files, then record how far they are complete (atomically)."""
    for array in arrays:
        array.flush()
    with naming_file(path):
        write_json_atomic(
            path, {"config_sha256": config_sha, "config": config, "batches_done": batches, "rows_done": rows}
        )


def _nonfinite_keys_error(lm: "ModelAdapter", split: str, computed: np.ndarray, stored_dtype, first_row: int,
                          out_dir: Path) -> str:
    """The one-line error of a batch whose keys are NaN or inf (as computed, or once stored)."""
    finite = np.isfinite(computed).all(axis=1)
    if not finite.all():
        row = first_row + int(np.argmin(finite))
        cause = "likely weights from a diverged training run"
        if "float16" in str(lm.dtype):
            cause += ", or an overflow in --fp16 (try --bf16)"
        return (
            f"--path {lm.path} gives NaN or inf keys on the {split} split (datastore row {row:,}): {cause}; "
            f"use a checkpoint from before it diverged (no datastore was written to {out_dir})"
        )
    largest = float(np.abs(computed).max())
    return (
        f"--path {lm.path} gives keys up to {largest:.3g} in size on the {split} split, beyond "
        f"{np.dtype(stored_dtype).name}'s range: pass --key-dtype fp32 (no datastore was written to {out_dir})"
    )


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
    metric: str | None = None,
    log_progress: Callable[[str], None] = silent,
    source: SourceSpec = SourceSpec(),
    restart_stale: bool = False,
) -> Path:
    """Write keys/vals/meta of one shard (the whole datastore when ``num_shards`` is 1).

    ``source`` names what is read (its id, name and document rule). ``restart_stale`` (an addition's
    segment folder) starts over where the folder holds a partial or finished extraction of other
    settings or data, instead of refusing.

    ``metric`` (``ip`` or ``l2``) is recorded in meta.json as the datastore's search metric (None: none
    recorded, read as ``ip``); it is not a build setting (it does not change the keys). Returns the
    directory written; ``log`` gets one line when it is done, ``log_progress`` a progress line every
    30 s without ``show_progress``'s bar. ``kill_after_batches`` (tests only) SIGKILLs the
    process after that many batches of this run, leaving a partial build to resume. The directory's
    lock (:func:`build_lock`) is held throughout. A build resumes only from the same settings and
    the same data (the sha256 of the split's files, :func:`data_identity`). A NaN or inf key stops
    the build and removes its partial files: nothing is written.
    """
    if key_dtype not in KEY_DTYPES:
        fail(f"--key-dtype must be one of {', '.join(KEY_DTYPES)}, got {key_dtype!r}")
    shard_range(1, num_shards, shard_id)  # checks --num-shards/--shard-id before a folder is named after them
    out_dir = output if num_shards == 1 else output / "shards" / shard_dir_name(shard_id, num_shards)
    if metric is not None and metric not in METRICS:
        fail(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    with build_lock(out_dir):
        return _extract_locked(lm, split, settings, batch_size, out_dir, key_dtype, num_shards, shard_id,
                               progress_seconds, kill_after_batches, show_progress, log, metric, log_progress, source,
                               restart_stale)


def _extract_locked(lm, split, settings, batch_size, out_dir, key_dtype, num_shards, shard_id, progress_seconds,
                    kill_after_batches, show_progress, log, metric, log_progress, source, restart_stale) -> Path:
    windows = lm.windows(split, settings)
    total_batches = windows.num_batches(batch_size)
    b0, b1 = shard_range(total_batches, num_shards, shard_id)
    w0, w1 = b0 * batch_size, min(len(windows), b1 * batch_size)
    sizes = windows.scored_counts()
    row0, rows = int(sizes[:w0].sum()), int(sizes[w0:w1].sum())
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
        "data": data_identity(lm, split),
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
    config = {k: v for k, v in meta.items() if k not in ("created_by",)}
    if source.id:  # the origins' first column (0 for a datastore's first source: older builds record none)
        config["source_id"] = source.id
    config_sha = _config_sha(config)
    meta_path = out_dir / META_NAME
    if restart_stale:
        _drop_stale(out_dir, config_sha)
    if meta_path.is_file():
        done = read_json(meta_path, what="datastore meta file")
        if done.get("build_config_sha256") == config_sha:
            note = "" if done.get("sources") else NO_SOURCES_NOTE
            log(f"{out_dir} is already complete ({rows:,} keys){note}")
            return out_dir
        what, is_data = settings_difference(done, meta, lm.data_dir)
        fail(
            f"{out_dir} already holds a datastore built {'from other data' if is_data else 'with other settings'} "
            f"({what}); choose another --output or delete {out_dir}"
        )
    meta["build_config_sha256"] = config_sha
    if metric is not None:
        meta["metric"] = metric
    stream = lm.stream(split)
    documents = lm.documents(split, source.document_rule)
    meta["sources"] = [source_record(lm, split, len(stream), documents, meta["data"], source)]

    partial = {name: _partial_path(out_dir, name) for name in FINAL_NAMES}
    final = {name: out_dir / file_name for name, file_name in FINAL_NAMES.items()}
    shapes = {"keys": ((rows, lm.dim), dtype), "vals": ((rows,), VAL_DTYPE), "origins": ((rows, 2), ORIGIN_DTYPE)}
    described = {"keys": "keys", "vals": "values", "origins": "origins"}
    progress_path = out_dir / PROGRESS_NAME
    progress = read_json(progress_path, what="datastore progress file") if progress_path.is_file() else None
    have = {name: partial[name].is_file() or (progress is not None and final[name].is_file()) for name in partial}
    resume = progress is not None and have["keys"] and have["vals"]
    done_batches, done_rows = 0, 0
    if resume:
        if progress.get("config_sha256") != config_sha:
            what, is_data = settings_difference(progress.get("config") or {}, config, lm.data_dir)
            if is_data:
                fail(
                    f"{out_dir} holds a partial build from other data ({what}); restore the data it was started "
                    f"with, or delete {out_dir} to start over"
                )
            fail(
                f"{progress_path} belongs to a build with other settings ({what}); re-run with the same flags "
                f"or delete {out_dir} to start over"
            )
        done_batches, done_rows = int(progress["batches_done"]), int(progress["rows_done"])
        if not have["origins"]:  # started by a trime that recorded no origins: they need no model
            origins = create_npy(partial["origins"], ORIGIN_DTYPE, (rows, 2))
            filled = _fill_origins(origins, windows, w0, min(w1, w0 + done_batches * batch_size), source.id)
            if filled != done_rows:
                fail(f"{progress_path} records {done_rows:,} keys but its batches score {filled:,}; "
                     f"delete {out_dir} and rebuild")
            origins.flush()
            del origins
    if resume and done_batches == b1 - b0 and not all(path.is_file() for path in partial.values()):
        return _finish(out_dir, meta, documents, rows, lm.dim, dtype, log)  # killed while finishing
    if resume:
        for name, path in partial.items():
            check_npy(path, *shapes[name], described[name])
            reserve_file(path)  # partial files of a build killed before it reserved them are sparse
        arrays = {name: np.lib.format.open_memmap(path, mode="r+") for name, path in partial.items()}
    else:
        require_free_disk(
            out_dir, int(rows * (lm.dim * np.dtype(dtype).itemsize + 4 + 16) * 1.02) + (16 << 20), flag="--output"
        )
        try:
            arrays = {}
            for name, path in partial.items():
                shape, array_dtype = shapes[name]
                arrays[name] = create_npy(path, array_dtype, shape)
        except OSError:
            for path in partial.values():
                path.unlink(missing_ok=True)
            raise
        _save_progress(progress_path, config, config_sha, list(arrays.values()), 0, 0)
    keys, vals, origins = arrays["keys"], arrays["vals"], arrays["origins"]
    del arrays
    bar = progress_meter(total=rows, initial=done_rows, unit="tok", unit_scale=True, desc=f"datastore {out_dir.name}",
                   bar=show_progress, log=log_progress)
    last_save = time.monotonic()
    row = done_rows
    samples = windows.batches(batch_size, b0 + done_batches, b1)
    for batches_this_run, sample in enumerate(samples, start=1):
        batch_no = done_batches + batches_this_run
        batch = lm.forward(sample, need_token_terms=False)
        q = batch.queries.float().cpu().numpy()
        n = q.shape[0]
        with np.errstate(over="ignore"):  # a key beyond float16's range becomes inf: refused just below
            stored = q.astype(dtype)
        if not np.isfinite(stored).all():
            bar.close()
            del keys, vals, origins
            for path in (*partial.values(), progress_path):
                path.unlink(missing_ok=True)
            fail(_nonfinite_keys_error(lm, split, q, dtype, row0 + row, out_dir))
        targets = batch.targets.cpu().numpy()
        first_window = (b0 + batch_no - 1) * batch_size
        positions = windows.target_positions(first_window, min(len(windows), first_window + batch_size))
        if len(positions) != n or not np.array_equal(np.asarray(stream[positions]), targets):
            fail(f"the {lm.frontend} adapter's targets of batch {b0 + batch_no - 1} are not the {split} split's "
                 f"tokens at their positions, so their origins would be wrong (a trime bug: please report it)")
        keys[row : row + n] = stored
        vals[row : row + n] = targets.astype(VAL_DTYPE)
        origins[row : row + n, 0] = source.id
        origins[row : row + n, 1] = positions
        row += n
        bar.update(n)
        if kill_after_batches is not None and batches_this_run >= kill_after_batches:
            os.kill(os.getpid(), signal.SIGKILL)  # tests: die like a killed job, progress not updated
        if time.monotonic() - last_save >= progress_seconds:
            _save_progress(progress_path, config, config_sha, (keys, vals, origins), batch_no, row)
            last_save = time.monotonic()
    bar.close()
    if row != rows:
        fail(f"extraction wrote {row:,} keys but {rows:,} were expected; delete {out_dir} and rebuild")
    _save_progress(progress_path, config, config_sha, (keys, vals, origins), b1 - b0, row)
    del keys, vals, origins
    return _finish(out_dir, meta, documents, rows, lm.dim, dtype, log)


def _drop_stale(out_dir: Path, config_sha: str) -> None:
    """Delete an extraction in ``out_dir`` (partial or finished) whose settings are not ``config_sha``."""
    for record_name in (META_NAME, PROGRESS_NAME):
        path = out_dir / record_name
        if path.is_file():
            record = read_json(path, what="datastore progress file")
            if record.get("build_config_sha256", record.get("config_sha256")) != config_sha:
                for name in (*FINAL_NAMES.values(), DOCUMENTS_NAME, PROGRESS_NAME, META_NAME):
                    (out_dir / name).unlink(missing_ok=True)
                for name in FINAL_NAMES:
                    _partial_path(out_dir, name).unlink(missing_ok=True)
            return


def _partial_path(out_dir: Path, name: str) -> Path:
    """The file an extraction writes ``name`` (keys, vals, origins) into until it is complete."""
    return out_dir / f"{name}.partial.npy"


def source_record(lm: "ModelAdapter", split: str, tokens: int, documents: "Documents", data: dict,
                  source: SourceSpec = SourceSpec()) -> dict:
    """meta.json's record of the one source of a build: the split, its files' identity, tokens and documents."""
    return {
        "id": source.id,
        "name": source.name or split,
        "split": split,
        "file": lm.data_files(split)[0].name,
        "files": data["files"],
        "tokens": int(tokens),
        "documents": len(documents.starts),
        "document_rule": documents.by,
    }


def _fill_origins(origins: np.ndarray, windows: "SplitWindows", first_window: int, end_window: int, source_id: int,
                  chunk_windows: int = 1 << 14) -> int:
    """Write the origins of windows ``first_window .. end_window-1`` from row 0 on; returns the rows written."""
    row = 0
    for lo in range(first_window, end_window, chunk_windows):
        positions = windows.target_positions(lo, min(end_window, lo + chunk_windows))
        origins[row : row + len(positions), 0] = source_id
        origins[row : row + len(positions), 1] = positions
        row += len(positions)
    return row


def _documents_json(meta: dict, documents: "Documents") -> dict:
    source = meta["sources"][0]
    return {"format": DOCUMENTS_FORMAT,
            "sources": [{"id": source["id"], "name": source["name"], "starts": documents.starts,
                         "titles": documents.titles}]}


def _finish(out_dir: Path, meta: dict, documents: "Documents", rows: int, dim: int, dtype,
            log: Callable[[str], None]) -> Path:
    """Move the complete partial files into place, write documents.json, then meta.json (last), and drop
    progress.json.

    A re-run after a kill (or a full disk) here finishes from whatever step was reached.
    """
    for name, final in FINAL_NAMES.items():
        if _partial_path(out_dir, name).is_file():
            os.replace(_partial_path(out_dir, name), out_dir / final)
    check_npy(out_dir / KEYS_NAME, (rows, dim), dtype, "keys")
    check_npy(out_dir / VALS_NAME, (rows,), VAL_DTYPE, "values")
    check_npy(out_dir / ORIGINS_NAME, (rows, 2), ORIGIN_DTYPE, "origins")
    with naming_file(out_dir / DOCUMENTS_NAME):
        write_json_atomic(out_dir / DOCUMENTS_NAME, _documents_json(meta, documents))
    record_checksums(out_dir, meta)
    source = meta["sources"][0]
    meta["history"] = [history_entry("build", source=source["name"], split=source["split"], keys=rows,
                                     files=source["files"], vals_sha256=meta["checksums"]["vals_sha256"])]
    with naming_file(out_dir / META_NAME):
        write_json_atomic(out_dir / META_NAME, meta)
    (out_dir / PROGRESS_NAME).unlink(missing_ok=True)
    log(f"wrote {rows:,} keys ({dim}-d {np.dtype(dtype).name}) to {out_dir}")
    return out_dir


def merge_shards(output: Path, delete_shards: bool = False, log: Callable[[str], None] = silent) -> dict:
    """Concatenate the shards under ``output/shards`` (in shard order) into one datastore; returns its meta.

    The shards must share every setting and their data (:func:`data_identity`); a NaN or inf key is refused.
    """
    with build_lock(output):
        return _merge_locked(output, delete_shards, log)


def _merge_locked(output: Path, delete_shards: bool, log: Callable[[str], None]) -> dict:
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
    same = ("dim", "key_dtype", "val_dtype", "split", "windows", "dictionary", "key_type", "model_precision", "model",
            "sources")
    for shard_id, m in enumerate(metas):
        if m.get("data") != first.get("data"):
            what, _ = settings_difference(first, m)
            fail(
                f"shard {shard_id} was extracted from other data than shard 0 ({what}); "
                "rebuild all shards from the same data"
            )
        differs = [key for key in same if m.get(key) != first.get(key)]
        if identity_key(m["checkpoint"]) != identity_key(first["checkpoint"]):
            differs.append("checkpoint")
        if differs:
            fail(
                f"shard {shard_id} differs from shard 0 in {', '.join(differs)}; rebuild all shards with the same flags"
            )
    total = sum(int(m["count"]) for m in metas)
    dim, dtype = int(first["dim"]), np.dtype(first["key_dtype"])
    with_sources = bool(first.get("sources"))  # shards of a trime that recorded none merge without them
    row_bytes = dim * dtype.itemsize + 4 + (16 if with_sources else 0)
    require_free_disk(output, int(total * row_bytes * 1.02) + (16 << 20), flag="--output")
    shard_dirs = [shard_root / shard_dir_name(shard_id, num_shards) for shard_id in range(num_shards)]
    with contextlib.ExitStack() as stack:
        tmp = {name: stack.enter_context(atomic_path(output / FINAL_NAMES[name]))
               for name in (("keys", "vals", "origins") if with_sources else ("keys", "vals"))}
        keys = create_npy(tmp["keys"], dtype, (total, dim))
        vals = create_npy(tmp["vals"], VAL_DTYPE, (total,))
        origins = create_npy(tmp["origins"], ORIGIN_DTYPE, (total, 2)) if with_sources else None
        row = 0
        for d, m in zip(shard_dirs, metas):
            check_npy(d / KEYS_NAME, (int(m["count"]), dim), dtype, "keys")
            check_npy(d / VALS_NAME, (int(m["count"]),), VAL_DTYPE, "values")
            src_k, src_v = np.load(d / KEYS_NAME, mmap_mode="r"), np.load(d / VALS_NAME, mmap_mode="r")
            for lo in range(0, src_k.shape[0], ADD_CHUNK):
                hi = min(src_k.shape[0], lo + ADD_CHUNK)
                block = np.asarray(src_k[lo:hi])
                finite = np.isfinite(block).all(axis=1)
                if not finite.all():
                    fail(nonfinite_keys_message(d / KEYS_NAME, lo + int(np.argmin(finite))))
                keys[row + lo : row + hi] = block
            vals[row : row + src_v.shape[0]] = src_v
            if origins is not None:
                check_npy(d / ORIGINS_NAME, (int(m["count"]), 2), ORIGIN_DTYPE, "origins")
                origins[row : row + src_v.shape[0]] = np.load(d / ORIGINS_NAME, mmap_mode="r")
            row += src_k.shape[0]
        for array in (keys, vals, origins):
            if array is not None:
                array.flush()
        del keys, vals, origins
        if with_sources:
            documents = stack.enter_context(atomic_path(output / DOCUMENTS_NAME))
            shutil.copyfile(shard_dirs[0] / DOCUMENTS_NAME, documents)  # every shard lists the same documents
    meta = {k: v for k, v in first.items() if k not in ("shards", "build_config_sha256")}
    meta["count"] = total
    meta["shards"] = [s for m in metas for s in m["shards"]]
    meta["index"] = None
    record_checksums(output, meta)
    if with_sources:
        source = meta["sources"][0]
        meta["history"] = [history_entry("build", source=source["name"], split=source["split"], keys=total,
                                         files=source["files"], vals_sha256=meta["checksums"]["vals_sha256"])]
    with naming_file(output / META_NAME):
        write_json_atomic(output / META_NAME, meta)
    if delete_shards:
        for shard_id in range(num_shards):
            d = shard_root / shard_dir_name(shard_id, num_shards)
            for name in (KEYS_NAME, VALS_NAME, ORIGINS_NAME, DOCUMENTS_NAME, META_NAME, LOCK_NAME):
                (d / name).unlink(missing_ok=True)
            d.rmdir()
        shard_root.rmdir()
    log(f"merged {num_shards} shards into {output} ({total:,} keys)")
    return meta


# ----------------------------------------------------------------------------- index


def build_index(
    output: Path,
    factory: str = "auto",
    metric: str | None = None,
    train_sample: int = 1_000_000,
    seed: int = 1,
    use_gpu: bool = True,
    show_progress: bool = True,
    heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS,
    log: Callable[[str], None] = silent,
    log_progress: Callable[[str], None] = silent,
    reduce_dim: int | None = None,
    reduce_with: str = "pca",
) -> dict:
    """Train and fill ``index.faiss`` for the datastore in ``output``; records it in meta.json.

    ``reduce_dim`` (with ``factory="auto"``) puts FAISS's PCA (or OPQ, ``reduce_with``) in front of the
    index: :func:`trime.retrieval.faiss_index.auto_factory`.

    ``metric`` defaults to the one meta.json records (else ``ip``); it is recorded as the datastore's
    metric. ``log`` gets the final line; ``log_progress`` the start of the training, the elapsed
    time every ``heartbeat_seconds`` (FAISS trains silently, minutes for a large IVF-PQ) and, without
    ``show_progress``'s bar, a line every 30 s while keys are added. NaN or inf keys are refused; the
    index's sha256 is recorded in meta.json. The directory's lock is held throughout.
    """
    with build_lock(output):
        return _build_index_locked(output, factory, metric, train_sample, seed, use_gpu, show_progress,
                                   heartbeat_seconds, log, log_progress, reduce_dim, reduce_with)


def _build_index_locked(output, factory, metric, train_sample, seed, use_gpu, show_progress, heartbeat_seconds,
                        log, log_progress, reduce_dim, reduce_with) -> dict:
    from trime.retrieval import faiss_index

    store = Datastore.open(output, need_index=False)
    meta, count, dim = store.meta, store.count, store.dim
    metric = metric or recorded_metric(meta) or LEGACY_METRIC
    if count == 0:
        fail(f"{output} holds no keys; nothing to index")
    if factory == "auto":
        factory = faiss_index.auto_factory(count, dim, reduce_dim, reduce_with)
    elif reduce_dim is not None:
        fail(f"--reduce-dim goes with --index-factory auto; with --index-factory {factory} write the transform into "
             f"the factory string instead, e.g. PCA{reduce_dim},{factory}")
    faiss_index.faiss_metric(metric)
    if train_sample < 1:
        fail(f"--train-sample must be >= 1, got {train_sample}")
    require_free_disk(output, faiss_index.index_bytes_estimate(factory, count, dim), flag="--output")
    gpu = use_gpu and faiss_index.num_gpus() > 0
    rng = np.random.default_rng(seed)
    n_train = min(count, train_sample)
    sample_ids = np.sort(rng.choice(count, size=n_train, replace=False)) if n_train < count else np.arange(count)
    sample = np.asarray(store.keys[sample_ids], dtype=np.float32)
    finite = np.isfinite(sample).all(axis=1)
    if not finite.all():
        fail(nonfinite_keys_message(output / KEYS_NAME, int(sample_ids[np.argmin(finite)])))
    started = time.monotonic()
    log_progress(f"training {factory} ({metric}) on {n_train:,} keys{' on GPU' if gpu else ''}")
    with heartbeat(f"training {factory}", heartbeat_seconds, log=log_progress):
        index = faiss_index.train_index(factory, metric, dim, sample, seed, gpu)
    del sample
    train_seconds = time.monotonic() - started
    with progress_meter(total=count, unit="key", unit_scale=True, desc="index add", bar=show_progress,
                  log=log_progress) as bar:

        def added(n: int) -> None:
            if show_progress and bar.n + n >= count:  # leave tqdm's 100% line to close(): printed once, not twice
                bar.n = count
            else:
                bar.update(n)

        index = faiss_index.add_in_chunks(
            index, store.keys, ADD_CHUNK, progress=added, use_gpu=gpu, source=output / KEYS_NAME
        )
    with atomic_path(output / INDEX_NAME) as tmp:
        faiss_index.write_index(index, tmp)
        index_sha256 = sha256_file(tmp)
    meta["metric"] = metric
    meta["index"] = {
        "file": INDEX_NAME,
        "factory": factory,
        "metric": metric,
        "ntotal": int(index.ntotal),
        "train_sample": n_train,
        "seed": seed,
        **({"reduce_dim": reduce_dim, "reduce_with": reduce_with} if reduce_dim else {}),
        "bytes": (output / INDEX_NAME).stat().st_size,
        "sha256": index_sha256,
    }
    with naming_file(output / META_NAME):
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
        default=None,
        help="dtype the keys are stored in (default fp16: half the disk and RAM of fp32; --add keeps the datastore's)",
    )
    p.add_argument(
        "--source",
        default=None,
        metavar="NAME",
        help="name of the source the keys are read from (default: the split); with --remove-docs: only its documents",
    )
    p.add_argument(
        "--documents",
        default="auto",
        metavar="RULE",
        help="how a source is cut into documents: auto (WikiText ' = Title = ' headings if any, else the file), "
        "heading, file, or blocks (blank-line-separated blocks)",
    )
    p.add_argument(
        "--add",
        default=None,
        metavar="DATA",
        help="add split --gen-subset of DATA as a new --source to the datastore in --output, with its model, windows "
        "and key dtype; its keys go into the trained index",
    )
    p.add_argument("--remove", default=None, metavar="NAME", help="delete every key of source NAME")
    p.add_argument(
        "--remove-docs",
        default=None,
        metavar="FILE",
        help="delete the keys of the documents FILE lists, one a line: a title, or SOURCE#N (document N of SOURCE)",
    )
    p.add_argument(
        "--compact", action="store_true", help="rewrite the files and the index without the deleted keys"
    )
    add_import_args(p)
    p.add_argument(
        "--num-shards",
        type=POSITIVE_INT,
        default=1,
        help="split the extraction into this many shards of whole batches, one run per --shard-id (default 1)",
    )
    p.add_argument(
        "--shard-id", type=NONNEGATIVE_INT, default=0, help="the shard this run extracts, 0..--num-shards-1 (default 0)"
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
        "--reduce-dim",
        type=POSITIVE_INT,
        default=None,
        metavar="D",
        help="with --index-factory auto: project keys (and queries) to D dimensions inside the index, by FAISS's "
        "PCA or OPQ (--reduce-with); smaller codes and faster search, the stored keys stay full-size",
    )
    p.add_argument(
        "--reduce-with",
        choices=("pca", "opq"),
        default="pca",
        help="the transform of --reduce-dim: pca (default) or opq (a rotation trained for the PQ codes)",
    )
    p.add_argument(
        "--metric",
        choices=METRICS,
        default=None,
        help=f"search metric, recorded in meta.json with or without an index: inner product or L2 (default "
        f"{DEFAULT_METRIC}: measured better than ip for kNN-LM and TRIME's external memory, TRIME-trained models "
        "included; --merge/--build-index keep the recorded one)",
    )
    p.add_argument(
        "--train-sample", type=POSITIVE_INT, default=1_000_000, help="keys sampled (seeded) to train the index"
    )
    p.add_argument("--seed", type=SEED, default=1, help="seed of the index's training sample (default 1)")
    p.add_argument("--faiss-cpu", action="store_true", help="never use FAISS GPUs")
    # for tests only: how often progress is saved, killing a build midway, the heartbeat period
    p.add_argument(
        "--progress-seconds", type=NONNEGATIVE_FLOAT, default=DEFAULT_PROGRESS_SECONDS, help=argparse.SUPPRESS
    )
    p.add_argument("--kill-after-batches", type=POSITIVE_INT, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--heartbeat-seconds", type=POSITIVE_FLOAT, default=DEFAULT_HEARTBEAT_SECONDS, help=argparse.SUPPRESS
    )
    return p


def index_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`build_index` from the flags, with the CLI's loggers."""
    return {
        "factory": args.index_factory,
        "reduce_dim": args.reduce_dim,
        "reduce_with": args.reduce_with,
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
    shard_range(1, args.num_shards, args.shard_id)  # before the model loads
    from trime.adapters.base import window_defaults_note

    loaded = model_from_args(args)
    note = window_defaults_note(loaded.windows, args.context_window, args.tokens_per_sample)
    if note:
        logger(PROG)(note)  # stdout: stderr stays the one error line when a later check fails
    metric = args.metric or DEFAULT_METRIC
    logger(PROG)(f"metric {metric}" + ("" if args.metric else " (the default: measured better than ip for kNN-LM "
                                        "and TRIME's external memory alike)"))
    written = extract(
        loaded.lm,
        args.gen_subset,
        loaded.windows,
        loaded.batch_size,
        output,
        key_dtype=args.key_dtype or "fp16",
        source=SourceSpec(name=args.source, document_rule=args.documents),
        num_shards=args.num_shards,
        shard_id=args.shard_id,
        progress_seconds=args.progress_seconds,
        kill_after_batches=args.kill_after_batches,
        show_progress=not args.no_progress_bar,
        log=logger(PROG),
        metric=metric,
        log_progress=logger(PROG, stderr=True),
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
            build_index(output, **{**index_options(args), "metric": metric})


def add_step(args: argparse.Namespace, output: Path) -> None:
    """``--add``: extract a new source into a segment of the datastore in ``output`` and append it (index included).

    Windows default to the datastore's; a killed addition re-run with the same flags resumes its extraction.
    """
    from trime.retrieval.updates import clear_leftovers, commit_addition, plan_addition

    if args.data is not None:
        fail(f"--add {args.add} names the data to add; drop the positional DATA {args.data}")
    if args.path is None:
        fail("--add needs --path: the model the datastore was built with")
    meta = Datastore.open(output, need_index=False).meta  # a missing or damaged datastore fails before the model loads
    windows = meta.get("windows") or {}
    if args.tokens_per_sample is None and args.context_window is None and windows:
        args.tokens_per_sample, args.context_window = windows["tokens_per_sample"], windows["context_window"]
    args.data = args.add
    loaded = model_from_args(args)
    with build_lock(output):
        store = Datastore.open(output, need_index=False)
        plan = plan_addition(store, loaded.lm, loaded.windows, args.source or args.gen_subset, args.key_dtype)
        clear_leftovers(output, store.meta, keep=output / plan.segment)
        stored_as = next(name for name, t in KEY_DTYPES.items() if np.dtype(t).name == store.meta["key_dtype"])
        extract(
            loaded.lm,
            args.gen_subset,
            loaded.windows,
            loaded.batch_size,
            output / plan.segment,
            key_dtype=stored_as,
            progress_seconds=args.progress_seconds,
            kill_after_batches=args.kill_after_batches,
            show_progress=not args.no_progress_bar,
            log=silent,
            metric=store.metric,
            log_progress=logger(PROG, stderr=True),
            source=SourceSpec(id=plan.id, name=plan.name, document_rule=args.documents),
            restart_stale=True,
        )
        commit_addition(output, plan, show_progress=not args.no_progress_bar, log=logger(PROG),
                        log_progress=logger(PROG, stderr=True))


UPDATE_FLAGS = ("--add", "--remove", "--remove-docs", "--compact", "--import-knnlm", "--merge", "--build-index",
                "--verify")


def _one_operation(args: argparse.Namespace) -> None:
    """Fail unless at most one of the operations in UPDATE_FLAGS is asked for."""
    asked = [flag for flag in UPDATE_FLAGS if getattr(args, flag[2:].replace("-", "_")) not in (None, False)]
    if len(asked) > 1:
        fail(f"{' and '.join(asked)} are separate operations; run trime-build-datastore once for each")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trime-build-datastore``; returns the exit status.

    A run that writes holds the lock of --output (a sharded extraction: of its shard's folder) to
    the end; file-system faults (a full disk, a read-only folder) are one error line.
    """
    args = build_parser().parse_args(argv)
    quiet_libraries()
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        fail(f"--output {output} is a file; pass the datastore's folder")
    with file_faults_as_errors(f"--output {output}"):
        _one_operation(args)
        if args.verify:
            logger(PROG)(verify(output, show_progress=not args.no_progress_bar))
        elif args.add is not None:
            add_step(args, output)
        elif args.import_knnlm is not None:
            with build_lock(output):
                import_step(args, output)
                if not args.no_index:
                    build_index(output, **index_options(args))
        elif args.remove is not None or args.remove_docs is not None or args.compact:
            from trime.retrieval import updates

            with build_lock(output):
                if args.remove is not None:
                    updates.remove_source(output, args.remove, log=logger(PROG))
                elif args.remove_docs is not None:
                    updates.remove_documents(output, Path(args.remove_docs), args.source, log=logger(PROG))
                else:
                    updates.compact(output, show_progress=not args.no_progress_bar, log=logger(PROG),
                                    log_progress=logger(PROG, stderr=True))
        elif args.build_index or args.merge or args.num_shards == 1:
            with build_lock(output):
                if args.build_index:
                    build_index(output, **index_options(args))
                elif args.merge:
                    merge_shards(output, delete_shards=args.delete_shards, log=logger(PROG))
                    if not args.no_index:
                        build_index(output, **index_options(args))
                else:
                    extract_step(args, output)
        else:
            extract_step(args, output)  # one shard: extract() holds the shard folder's lock
    return 0


if __name__ == "__main__":
    sys.exit(main())
