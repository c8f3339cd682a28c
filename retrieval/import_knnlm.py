"""``trime-build-datastore --import-knnlm``: convert a knnlm / TRIME datastore into trime's format.

urvashik/knnlm and princeton-nlp/TRIME save a datastore as two headerless ``np.memmap`` files,
``dstore_keys.npy`` of shape (N, D) and ``dstore_vals.npy`` of shape (N, 1), whose N
(``--dstore-size``) and D (``--decoder-embed-dim``) live only on the command line. Keys are
float16 (``--dstore-fp16``) or float32, values int16 (knnlm with ``--dstore-fp16``) or int64,
so a file's size is exactly N*D*itemsize or N*itemsize: the key dtype is read from it, and so is
the values' dtype (``--vals-dtype`` may state it; one that contradicts the size is refused).

Checks, each one error line naming the file or flag and the fix: a missing file; sizes that are
not ``--size``/``--dim``; ``--dim`` other than the key size of ``--path``; int16 values for a
dictionary larger than 32,767 types (knnlm's int16 overflow: such values are corrupt); a negative
value, or one outside the dictionary; a NaN or inf key; an ``--output`` that already holds a
datastore or a trime build in progress (an import never overwrites one).

What is written is a fresh trime datastore (:mod:`trime.retrieval.datastore`): ``keys.npy`` in the
source's key dtype (or ``key_dtype``, converted), ``vals.npy`` as int32, and ``meta.json`` last, with
the fields of a trime build, checksums, the search metric, ``imported`` (both files' path, size and
sha256, the source dtypes, N and D) and a ``history`` of one ``import`` record. An imported datastore
records no ``sources`` (a memmap does not say which tokens its keys came from, so
``Datastore.has_sources`` is False), and no ``split``, ``data``, ``windows`` or ``model_precision``.
Each file appears atomically; a killed import leaves no ``meta.json``, and re-running it replaces what
it left. The files are read once each, in chunks of at most IMPORT_CHUNK_ROWS rows and CHUNK_BYTES
bytes (never whole), to convert, check and sha256 them together; the written ``keys.npy`` is read
once more for its chunk checksums (:func:`record_checksums`). The index is not built here.
"""

import argparse
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from trime.cli import POSITIVE_INT, logger, silent
from trime.errors import fail
from trime.io_utils import atomic_path, naming_file, progress_meter, require_free_disk, write_json_atomic
from trime.retrieval.checksums import nonfinite_keys_message
from trime.retrieval.datastore import (
    DEFAULT_METRIC,
    FORMAT,
    KEY_DTYPES,
    KEY_TYPE,
    KEYS_NAME,
    META_NAME,
    METRICS,
    PROGRESS_NAME,
    VAL_DTYPE,
    VALS_NAME,
    build_lock,
    check_npy,
    create_npy,
    history_entry,
    model_info,
    record_checksums,
)
from trime.version import __version__

if TYPE_CHECKING:  # torch is imported only when a model is loaded
    from trime.adapters import ModelAdapter

PROG = "trime-build-datastore"  # the command whose --import-knnlm this is
SOURCE_FORMAT = "knnlm"
# knnlm's key dtypes (by item size) and value dtypes, as --vals-dtype names them
SOURCE_KEY_DTYPES = {2: np.dtype(np.float16), 4: np.dtype(np.float32)}
VALS_DTYPES = {"int16": np.dtype(np.int16), "int64": np.dtype(np.int64)}
INT16_MAX_VOCAB = int(np.iinfo(np.int16).max)  # int16 values hold token ids up to 32,767
IMPORT_CHUNK_ROWS = 500_000  # rows converted at a time
CHUNK_BYTES = 256 << 20  # and at most this many bytes of the source at a time
NPY_MAGIC = b"\x93NUMPY"
FLAGS = "--import-knnlm KEYS VALS"


@dataclass(frozen=True)
class KnnlmFiles:
    """A knnlm datastore's two memmaps, checked against ``--size``/``--dim``: their dtypes as the sizes say."""

    keys: Path
    vals: Path
    size: int
    dim: int
    key_dtype: np.dtype
    vals_dtype: np.dtype


def _size_of(path: Path, what: str) -> int:
    """The size of an input file; one line if it is missing or a folder."""
    if not path.is_file():
        missing = "is a folder" if path.is_dir() else "does not exist"
        fail(f"{FLAGS}: {what} file {path} {missing}; pass knnlm's {what} memmap (dstore_{what}.npy)")
    with open(path, "rb") as f:
        if f.read(len(NPY_MAGIC)) == NPY_MAGIC:
            fail(f"{FLAGS}: {path} starts with a .npy header, so it is not a knnlm memmap (headerless, written with "
                 f"np.memmap); pass the dstore_{what}.npy file knnlm wrote")
    return path.stat().st_size


def _keys_size_meaning(actual: int, size: int, dim: int) -> str:
    """What a keys file of ``actual`` bytes could hold, for the error that it is not ``size`` x ``dim``."""
    readings = []
    for itemsize, dtype in SOURCE_KEY_DTYPES.items():
        if actual % (dim * itemsize) == 0:
            readings.append(f"{actual // (dim * itemsize):,} {dim}-d {dtype.name} keys (--size)")
        if actual % (size * itemsize) == 0:
            readings.append(f"{size:,} {actual // (size * itemsize):,}-d {dtype.name} keys (--dim)")
    if not readings:
        return "no whole number of float16 or float32 keys of either: the file is truncated or not a keys file"
    return "that would be " + " or ".join(readings)


def check_files(keys: os.PathLike, vals: os.PathLike, size: int, dim: int, vals_dtype: str | None = None) -> KnnlmFiles:
    """Check both files against ``size`` (N) and ``dim`` (D); returns them with the dtypes their sizes give.

    The keys are float16 if the file is N*D*2 bytes, float32 if N*D*4. The values are int16 if
    N*2, int64 if N*8; ``vals_dtype`` (``--vals-dtype``), when given, must agree.
    """
    keys_path, vals_path = Path(keys), Path(vals)
    POSITIVE_INT.check("--size", size)
    POSITIVE_INT.check("--dim", dim)
    if vals_dtype is not None and vals_dtype not in VALS_DTYPES:
        fail(f"--vals-dtype must be one of {', '.join(VALS_DTYPES)}, got {vals_dtype!r}")
    keys_bytes = _size_of(keys_path, "keys")
    vals_bytes = _size_of(vals_path, "vals")
    key_dtype = next((t for n, t in SOURCE_KEY_DTYPES.items() if keys_bytes == size * dim * n), None)
    if key_dtype is None:
        fail(
            f"{FLAGS}: {keys_path} is {keys_bytes:,} bytes, not --size {size:,} x --dim {dim:,} float16 "
            f"({size * dim * 2:,}) or float32 ({size * dim * 4:,}); {_keys_size_meaning(keys_bytes, size, dim)}: pass "
            "the --size and --dim it was saved with (knnlm's --dstore-size and --decoder-embed-dim)"
        )
    by_size = next((name for name, t in VALS_DTYPES.items() if vals_bytes == size * t.itemsize), None)
    if by_size is None:
        readings = [f"{vals_bytes // t.itemsize:,} {name} values" for name, t in VALS_DTYPES.items()
                    if vals_bytes % t.itemsize == 0]
        meaning = ("that would be " + " or ".join(readings)) if readings else "no whole number of int16 or int64 values"
        fail(
            f"{FLAGS}: {vals_path} is {vals_bytes:,} bytes, not --size {size:,} int16 ({size * 2:,}) or int64 "
            f"({size * 8:,}) values; {meaning}: pass the --size it was saved with, or the values file of these keys"
        )
    if vals_dtype is not None and vals_dtype != by_size:
        fail(
            f"--vals-dtype {vals_dtype}: {vals_path} is {vals_bytes:,} bytes, which is --size {size:,} {by_size} "
            f"values, not {vals_dtype}; pass --vals-dtype {by_size} (or leave it out: the size tells)"
        )
    return KnnlmFiles(keys_path, vals_path, size, dim, key_dtype, VALS_DTYPES[by_size])


def check_against_model(files: KnnlmFiles, lm: "ModelAdapter") -> None:
    """Fail unless the files fit ``lm``: its key size is ``--dim``, and int16 values can hold its dictionary."""
    if files.dim != lm.dim:
        fail(
            f"--dim {files.dim}: the keys of --path {lm.path} are {lm.dim}-d, so {files.keys} was saved with another "
            "model; pass the checkpoint the datastore was saved with"
        )
    vocab = int(lm.vocab["size"])
    if files.vals_dtype == VALS_DTYPES["int16"] and vocab > INT16_MAX_VOCAB:
        fail(
            f"{files.vals} holds int16 values but the dictionary of --path {lm.path} has {vocab:,} types: knnlm's int16 "
            f"values (--dstore-fp16) overflow above {INT16_MAX_VOCAB:,} (knnlm issue #6), so these are corrupt; "
            "re-save the datastore with int64 values"
        )


def _check_output(output: Path) -> None:
    """Fail if ``output`` is a file, or holds a datastore or a trime build in progress (never overwritten)."""
    if output.exists() and not output.is_dir():
        fail(f"--output {output} is a file; pass a new folder for the imported datastore")
    if (output / META_NAME).is_file():
        fail(f"--output {output} already holds a datastore ({output / META_NAME}); an import never overwrites one: "
             f"choose another --output, or delete {output} to import again")
    if (output / PROGRESS_NAME).is_file() or (output / "shards").is_dir() or any(output.glob("*.partial.npy")):
        fail(f"--output {output} holds a trime-build-datastore build in progress; choose another --output, or delete "
             f"{output}")


def _chunks(path: Path, row_bytes: int, rows: int, digest) -> Iterator[tuple[int, memoryview]]:
    """(first row, raw bytes) of successive runs of whole rows of a headerless file, each added to ``digest``."""
    per_chunk = max(1, min(IMPORT_CHUNK_ROWS, CHUNK_BYTES // row_bytes))
    buffer = bytearray(min(rows, per_chunk) * row_bytes)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        for lo in range(0, rows, per_chunk):
            want = (min(rows, lo + per_chunk) - lo) * row_bytes
            got = f.readinto(view[:want])
            if got != want:
                fail(f"{path} ends early (at row {lo + got // row_bytes:,}): it changed while being imported; "
                     "import it again")
            digest.update(view[:want])
            yield lo, view[:want]


def _write_vals(files: KnnlmFiles, vocab: int, lm_path: object, tmp: Path, bar) -> str:
    """Check every value (a token id of the dictionary) and write them as int32; returns the source's sha256."""
    digest = hashlib.sha256()
    out = create_npy(tmp, VAL_DTYPE, (files.size,))
    for lo, raw in _chunks(files.vals, files.vals_dtype.itemsize, files.size, digest):
        vals = np.frombuffer(raw, dtype=files.vals_dtype)
        bad = np.flatnonzero((vals < 0) | (vals >= vocab))
        if bad.size:
            row, value = lo + int(bad[0]), int(vals[bad[0]])
            if value < 0:
                fail(f"{files.vals} row {row:,} holds {value:,}, a negative token id: the file is damaged, or not "
                     f"the values of {files.keys}; pass the values file knnlm wrote with these keys")
            fail(f"{files.vals} row {row:,} holds token id {value:,}, beyond the {vocab:,} types of the dictionary "
                 f"of --path {lm_path}: the values come from another dictionary; pass the checkpoint (and "
                 "data-bin) the datastore was saved with")
        out[lo : lo + len(vals)] = vals
        bar.update(len(vals))
    out.flush()
    return digest.hexdigest()


def _write_keys(files: KnnlmFiles, dtype: np.dtype, tmp: Path, bar) -> str:
    """Check every key (finite, also once stored as ``dtype``) and write them; returns the source's sha256."""
    digest = hashlib.sha256()
    out = create_npy(tmp, dtype, (files.size, files.dim))
    for lo, raw in _chunks(files.keys, files.dim * files.key_dtype.itemsize, files.size, digest):
        keys = np.frombuffer(raw, dtype=files.key_dtype).reshape(-1, files.dim)
        finite = np.isfinite(keys).all(axis=1)
        if not finite.all():
            fail(nonfinite_keys_message(files.keys, lo + int(np.argmin(finite))))
        if dtype == files.key_dtype:
            out[lo : lo + len(keys)] = keys
        else:
            with np.errstate(over="ignore"):  # a key beyond float16's range becomes inf: refused just below
                stored = keys.astype(dtype)
            finite = np.isfinite(stored).all(axis=1)
            if not finite.all():
                fail(f"{files.keys} row {lo + int(np.argmin(finite)):,} holds a key beyond {dtype.name}'s range; "
                     f"import it with key dtype {files.key_dtype.name} (--key-dtype fp32)")
            out[lo : lo + len(keys)] = stored
        bar.update(len(keys))
    out.flush()
    return digest.hexdigest()


def import_knnlm(
    keys_path: os.PathLike,
    vals_path: os.PathLike,
    size: int,
    dim: int,
    vals_dtype: str | None,
    lm: "ModelAdapter",
    output: os.PathLike,
    key_dtype: str | None = None,
    metric: str = DEFAULT_METRIC,
    log: Callable[[str], None] = silent,
    show_progress: bool = True,
    log_progress: Callable[[str], None] = silent,
) -> dict:
    """Convert knnlm's ``keys_path``/``vals_path`` memmaps of ``size`` keys of ``dim`` into a datastore in ``output``.

    ``lm`` is the model the keys were saved with (``--path``): its key size, dictionary, identity
    and family are checked and recorded. ``vals_dtype`` (``int16``/``int64``, None: read from the
    file's size) must agree with the size. ``key_dtype`` (``fp16``/``fp32``, None: the source's) is
    the dtype ``keys.npy`` stores. ``metric`` (``ip`` or ``l2``; knnlm searched by L2 distance) is
    recorded as the search metric. Both input files are read once (converted, checked and sha256'd
    together). ``log`` gets one line when done; ``log_progress`` a line every 30 s without
    ``show_progress``'s bars. Holds the output's lock (:func:`build_lock`); returns the meta written.
    """
    if key_dtype is not None and key_dtype not in KEY_DTYPES:
        fail(f"--key-dtype must be one of {', '.join(KEY_DTYPES)}, got {key_dtype!r}")
    if metric not in METRICS:
        fail(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    output = Path(output)
    files = check_files(keys_path, vals_path, size, dim, vals_dtype)
    check_against_model(files, lm)
    _check_output(output)  # before the lock creates the folder; again under it
    stored = np.dtype(KEY_DTYPES[key_dtype]) if key_dtype is not None else files.key_dtype
    with build_lock(output):
        _check_output(output)
        require_free_disk(output, int(size * (dim * stored.itemsize + 4) * 1.02) + (16 << 20), flag="--output")
        vocab = int(lm.vocab["size"])
        # both files appear only once both are complete (values first: they are checked first, being small)
        with atomic_path(output / VALS_NAME) as tmp_vals, atomic_path(output / KEYS_NAME) as tmp_keys:
            with progress_meter(total=size, desc=f"import {files.vals.name}", unit="val", unit_scale=True,
                                bar=show_progress, log=log_progress) as bar:
                vals_sha = _write_vals(files, vocab, lm.path, tmp_vals, bar)
            with progress_meter(total=size, desc=f"import {files.keys.name}", unit="key", unit_scale=True,
                                bar=show_progress, log=log_progress) as bar:
                keys_sha = _write_keys(files, stored, tmp_keys, bar)
        check_npy(output / KEYS_NAME, (size, dim), stored, "keys")
        check_npy(output / VALS_NAME, (size,), VAL_DTYPE, "values")
        meta = {
            "format": FORMAT,
            "created_by": f"{PROG} {__version__} ({FLAGS.split()[0]})",
            "key_type": KEY_TYPE,
            "count": size,
            "dim": dim,
            "key_dtype": stored.name,
            "val_dtype": np.dtype(VAL_DTYPE).name,
            "split": None,
            "data": None,
            "windows": None,
            "skipped_tokens": None,
            "dictionary": dict(lm.vocab),
            "checkpoint": lm.identity,
            "model": model_info(lm),
            "model_precision": None,  # the precision the keys were computed in is not in knnlm's files
            "index": None,
            "metric": metric,
            "imported": {
                "from": SOURCE_FORMAT,
                "keys": {"path": str(files.keys.resolve()), "bytes": files.keys.stat().st_size, "sha256": keys_sha},
                "vals": {"path": str(files.vals.resolve()), "bytes": files.vals.stat().st_size, "sha256": vals_sha},
                "key_dtype": files.key_dtype.name,
                "vals_dtype": files.vals_dtype.name,
                "size": size,
                "dim": dim,
            },
        }
        record_checksums(output, meta)
        meta["history"] = [history_entry("import", format=SOURCE_FORMAT, keys=size, files={
            name: meta["imported"][name] for name in ("keys", "vals")}, vals_sha256=meta["checksums"]["vals_sha256"])]
        with naming_file(output / META_NAME):
            write_json_atomic(output / META_NAME, meta)
    log(f"imported {size:,} keys ({dim}-d {files.key_dtype.name}, {files.vals_dtype.name} values) from "
        f"{files.keys} into {output} ({stored.name} keys, metric {metric})")
    return meta


# ----------------------------------------------------------------------------- CLI


def add_import_args(parser: argparse.ArgumentParser) -> None:
    """Declare ``--import-knnlm KEYS VALS``, ``--size``, ``--dim`` and ``--vals-dtype`` (see :func:`import_step`)."""
    parser.add_argument(
        "--import-knnlm",
        nargs=2,
        metavar=("KEYS", "VALS"),
        default=None,
        help="convert a knnlm/TRIME datastore into --output: its headerless dstore_keys.npy and dstore_vals.npy "
        "memmaps; needs --size, --dim and --path (the model the keys came from; a fairseq checkpoint also needs "
        "DATA, the data-bin of its dictionary)",
    )
    parser.add_argument(
        "--size", type=POSITIVE_INT, default=None, metavar="N",
        help="with --import-knnlm: the number of keys in the files (knnlm's --dstore-size)",
    )  # fmt: skip
    parser.add_argument(
        "--dim", type=POSITIVE_INT, default=None, metavar="D",
        help="with --import-knnlm: the size of a key (knnlm's --decoder-embed-dim)",
    )  # fmt: skip
    parser.add_argument(
        "--vals-dtype", choices=sorted(VALS_DTYPES), default=None,
        help="with --import-knnlm: the values' dtype, int16 (knnlm's --dstore-fp16) or int64 (default: read from "
        "VALS's size; a --vals-dtype the size contradicts is refused)",
    )  # fmt: skip


def import_step(args: argparse.Namespace, output: Path) -> dict:
    """``--import-knnlm``: check the files, load ``--path``, import into ``output``; returns the meta written.

    DATA is needed for a fairseq checkpoint only (its dict.txt is the dictionary the values index);
    a Hugging Face model carries its tokenizer. ``--key-dtype`` and ``--metric`` are read when the
    parser has them (None: the source's key dtype, DEFAULT_METRIC).
    """
    keys, vals = args.import_knnlm
    if args.size is None or args.dim is None:
        fail(f"{FLAGS} needs --size N and --dim D, the --dstore-size and --decoder-embed-dim the datastore was "
             "saved with")
    if args.path is None:
        fail(f"{FLAGS} needs --path, the checkpoint (or model dir) the keys were saved with")
    check_files(keys, vals, args.size, args.dim, args.vals_dtype)  # before the model loads
    _check_output(output)
    from trime.cli.model_args import model_from_args  # torch and the model's framework load from here on
    from trime.hf.model import is_gguf

    data = args.data
    if data is None:
        if os.path.isfile(args.path) and not is_gguf(args.path, args.gguf_file):
            fail(f"{FLAGS} with the fairseq checkpoint --path {args.path} needs DATA: the data-bin whose dict.txt it "
                 "was trained with (the values are ids in it)")
        data = os.curdir  # a Hugging Face model: an import reads no split, so the adapter's DATA is never read
    loaded = model_from_args(argparse.Namespace(**{**vars(args), "data": data}))
    return import_knnlm(
        keys, vals, args.size, args.dim, args.vals_dtype, loaded.lm, output,
        key_dtype=getattr(args, "key_dtype", None),
        metric=getattr(args, "metric", None) or DEFAULT_METRIC,
        log=logger(PROG),
        show_progress=not args.no_progress_bar,
        log_progress=logger(PROG, stderr=True),
    )  # fmt: skip
