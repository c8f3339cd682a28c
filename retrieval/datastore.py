"""The external memory's on-disk format and its loader: every check of a datastore against a model lives here.

Layout of a datastore directory::

    meta.json     count, dim, dtypes, key type, window settings, dictionary (or tokenizer) and
                  checkpoint hashes, model front-end and architecture, per-shard bookkeeping, and (once built) the index settings
    keys.npy      (count, dim) float16 or float32 last-FFN inputs of every scored token
    vals.npy      (count,) int32 next-token ids
    origins.npy   (count, 2) int64 where each key came from: (source id, position of its target token
                  in that source's token stream), so vals[i] == stream[position]
    documents.json  per source, the first token position and the title of each document
    index.faiss   FAISS index over keys.npy (row i of keys.npy has FAISS id i); its size and sha256 are in meta.json
    shards/shard-XXX-of-NNN/   per-shard keys/vals/origins/documents/meta of a sharded build (before --merge)
    segments/NNNN/  keys/vals/origins/documents (and the extraction's own meta.json) of each source added later

Segments and deletions (:mod:`trime.retrieval.updates`). A datastore built in one go is one segment,
its files at the top. ``--add`` writes each new source into a segment folder of its own and
appends its keys to the trained index; meta.json (the manifest, always written last, so that a
killed update leaves the previous datastore whole) then lists ``segments``: each one's folder,
global ``rows`` [lo, hi) and checksums. Row i of the concatenated segments is FAISS id i.
``--remove``/``--remove-docs`` only record ``deleted`` row ranges (tombstones): searches skip
them at once (:meth:`Datastore.search` asks for more neighbours until k live ones are found), and
``--compact`` rewrites the files and the index without them. ``history`` lists every build,
addition, removal and compaction with its identities and checksums. The index file is named in
meta.json's ``index.file``: each update writes a new one, so that the old one stays valid until
the manifest moves.

Sources. meta.json's ``sources`` lists what the keys were read from, one record per source:
its ``id`` (origins.npy's first column), ``name`` (default: the split), ``split``, ``file`` (the
file holding its tokens), ``files`` (size and sha256 of each data file, :func:`data_identity`),
``tokens`` (its stream's length), ``documents`` (how many) and ``document_rule`` (``heading``:
WikiText articles, ``file``, or ``blocks``: blank-line-separated blocks; ``--documents``). Sources added
later also record their ``rows``, ``segment`` and windows, and removed ones ``removed`` (until
``--compact`` drops them) or their ``removed_documents``. A key's document is the last one that starts at or before its
position. :meth:`Datastore.origins` reads them; :func:`snippets` shows a key's surrounding text
through an adapter over the same data (refused when the files' sha256 differ). origins.npy and
documents.json are checksummed in meta.json and read only when asked for (and by :func:`verify`),
so they cost a search or an evaluation nothing. A datastore built before sources were recorded
has neither: it opens, searches and evaluates as before, and asking for origins is one error line.

The search metric (``ip``: inner product, ``l2``: minus the squared L2 distance) is chosen when
the datastore is built and recorded in meta.json's ``metric``, with or without an index
(default DEFAULT_METRIC, ``l2``: measured better for kNN-LM and for TRIME's external memory alike,
docs/results.md); a datastore that records none (built before the metric was recorded) is read as
``ip``, the old default. ``trime-eval --metric`` may search another metric exactly (``--knn-search
torch``), never through an index built for the other one.

:meth:`Datastore.open` checks meta.json against the files, the values' checksum and range,
the index's checksum, and the datastore against the model (key size, dictionary, model family,
checkpoint); :func:`verify` adds the keys' checksums and that every key is finite. Every
run that writes a datastore directory holds its lock (:func:`build_lock`). Building (extraction, merging, the index, the
``trime-build-datastore`` command) is :mod:`trime.retrieval.build_datastore`.
"""

import contextlib
import errno
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from trime.errors import fail
from trime.io_utils import exclusive_lock, identity_key, read_json, sha256_file
from trime.retrieval import checksums
from trime.retrieval.faiss_index import METRICS
from trime.version import __version__  # --metric: inner product, or minus the squared L2 distance

META_NAME = "meta.json"
LOCK_NAME = ".trime-build.lock"
KEYS_NAME = "keys.npy"
VALS_NAME = "vals.npy"
INDEX_NAME = "index.faiss"
ORIGINS_NAME = "origins.npy"
DOCUMENTS_NAME = "documents.json"
PROGRESS_NAME = "progress.json"
ORIGIN_DTYPE = np.int64  # origins.npy: (source id, token position) per key
DOCUMENTS_FORMAT = 1
SEGMENTS_DIR = "segments"
VERIFY_ORIGIN_ROWS = 1 << 20  # origins checked at once by --verify
NO_SOURCES = "was built before sources were recorded; rebuild it with trime-build-datastore to show them"
FORMAT = 1
KEY_TYPE = "last_ffn_input"
KEY_DTYPES = {"fp16": np.float16, "fp32": np.float32}
KEY_DTYPE_NAMES = tuple(np.dtype(t).name for t in KEY_DTYPES.values())
SEARCH_BACKENDS = ("faiss", "torch")  # trime-eval --knn-search
# the default --metric of a new datastore. Measured (docs/results.md): kNN-LM on SmolLM2 21.43 with l2 vs 22.15-22.30
# with ip; tuned TRIME external memory on the demo's models 153.8 vs 162.0 (TrimeLM), 156.6 vs 167.2 (TrimeLM_long),
# 155.7 vs 170.6 (TrimeLM_ext, trained with dot products); a tie for the demo's CE kNN-LM (264.1 vs 263.8)
DEFAULT_METRIC = "l2"
LEGACY_METRIC = "ip"  # the metric of a datastore that records none (the default before it was recorded)
VAL_DTYPE = np.int32
if TYPE_CHECKING:  # torch is imported only when a model is loaded
    from trime.adapters import ModelAdapter


def _silent(message: str) -> None:
    """The default ``log``: library calls print nothing."""


def recorded_metric(meta: dict) -> str | None:
    """The search metric meta.json records (its ``metric``, else its index's), or None."""
    return meta.get("metric") or (meta.get("index") or {}).get("metric")


def shard_dir_name(shard_id: int, num_shards: int) -> str:
    """The folder of one shard under ``shards/`` (a sharded build, before --merge)."""
    return f"shard-{shard_id:03d}-of-{num_shards:03d}"


def build_lock(directory: Path) -> contextlib.AbstractContextManager:
    """The lock of a datastore directory (or a shard's), held by every run that writes into it."""
    return exclusive_lock(
        Path(directory) / LOCK_NAME, f"--output {directory}", "choose another --output"
    )


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


def reserve_file(path: Path) -> None:
    """Allocate all of a file's blocks now: a full disk is then an ENOSPC error here, never a
    SIGBUS when a page of its memory map is first written."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # no fallocate here: stay sparse
            raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        os.close(fd)


def create_npy(path: Path, dtype, shape: tuple) -> np.memmap:
    """A new .npy of ``shape`` with its space reserved, memory-mapped for writing."""
    np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).flush()
    reserve_file(path)
    return np.lib.format.open_memmap(path, mode="r+")


def history_entry(op: str, **details) -> dict:
    """One record of meta.json's ``history``: what was done, by which trime, and (for an update) when, in UTC.

    A ``build`` record has no time: a build's files, meta.json included, depend only on its inputs
    (a killed build resumed ends byte-identical)."""
    entry = {"op": op, "by": f"trime {__version__}", **details}
    if op != "build":
        entry["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return entry


def segment_records(meta: dict) -> list[dict]:
    """Each segment's record (``dir`` relative to the datastore, global ``rows`` [lo, hi), ``checksums``), in row
    order; a datastore never updated is one segment, its files at the top and its checksums in meta.json."""
    if meta.get("segments"):
        return list(meta["segments"])
    return [{"dir": ".", "rows": [0, int(meta["count"])], "checksums": meta.get("checksums")}]


def segment_meta(meta: dict, segment: dict) -> dict:
    """The count and checksums of one segment, shaped as the checksum checks read a whole datastore's meta."""
    lo, hi = (int(r) for r in segment["rows"])
    out = {"count": hi - lo, "dim": meta["dim"], "key_dtype": meta["key_dtype"]}
    if segment.get("checksums") is not None:
        out["checksums"] = segment["checksums"]
    return out


class RowConcat:
    """Read-only row-wise concatenation of arrays (the segments' memory maps), read without copying them all.

    Indexing takes an int, a slice (step 1) or an integer array (any order, repeats allowed) and returns
    a NumPy array; ``shape`` and ``dtype`` are those of the concatenation.
    """

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.dtype = self.parts[0].dtype
        self.shape = (int(self.starts[-1]), *self.parts[0].shape[1:])
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            row = int(key) + (len(self) if key < 0 else 0)
            part = int(np.searchsorted(self.starts, row, side="right")) - 1
            return self.parts[part][row - self.starts[part]]
        if isinstance(key, slice):
            lo, hi, step = key.indices(len(self))
            if step != 1:
                return self[np.arange(lo, hi, step)]
            pieces = [p[max(lo - s, 0) : max(min(hi - s, len(p)), 0)]
                      for p, s in zip(self.parts, self.starts[:-1].tolist()) if s < hi and s + len(p) > lo]
            return np.concatenate(pieces) if pieces else np.empty((0, *self.shape[1:]), dtype=self.dtype)
        rows = np.asarray(key, dtype=np.int64)
        flat = rows.reshape(-1)
        out = np.empty((flat.size, *self.shape[1:]), dtype=self.dtype)
        part_of = np.searchsorted(self.starts, flat, side="right") - 1
        for part in np.unique(part_of).tolist():
            where = np.flatnonzero(part_of == part)
            out[where] = self.parts[part][flat[where] - self.starts[part]]
        return out.reshape(*rows.shape, *self.shape[1:])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[0 : len(self)]
        return whole if dtype is None else whole.astype(dtype)


class DeletedRows:
    """The tombstoned rows of a datastore: sorted, disjoint [lo, hi) ranges (meta.json's ``deleted``)."""

    def __init__(self, ranges: Sequence[Sequence[int]] = ()) -> None:
        merged: list[list[int]] = []
        for lo, hi in sorted((int(lo), int(hi)) for lo, hi in ranges if int(hi) > int(lo)):
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.ranges = merged
        self.lo = np.asarray([r[0] for r in merged], dtype=np.int64)
        self.hi = np.asarray([r[1] for r in merged], dtype=np.int64)
        self.count = int((self.hi - self.lo).sum())

    def __bool__(self) -> bool:
        return self.count > 0

    def union(self, ranges: Sequence[Sequence[int]]) -> "DeletedRows":
        return DeletedRows([*self.ranges, *ranges])

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Whether each id is deleted (same shape; negative ids are not)."""
        ids = np.asarray(ids, dtype=np.int64)
        if not self.ranges:
            return np.zeros(ids.shape, dtype=bool)
        at = np.searchsorted(self.lo, ids, side="right") - 1
        return (at >= 0) & (ids < self.hi[np.maximum(at, 0)])

    def alive(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The live runs [a, b) of rows lo..hi-1, in order."""
        out, start = [], lo
        for a, b in self.ranges:
            if b <= start or a >= hi:
                continue
            if a > start:
                out.append((start, a))
            start = max(start, b)
        if start < hi:
            out.append((start, hi))
        return out


def data_identity(lm: "ModelAdapter", split: str) -> dict:
    """What the keys are extracted from: size and sha256 of each of the split's files, by name (not folder)."""
    return {
        "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in lm.data_files(split)}
    }


@dataclass(frozen=True)
class KeyOrigin:
    """Where datastore key ``key`` came from: its target token, ``position`` in the token stream of source
    ``source`` (read from ``file`` of split ``split``), inside document ``document`` titled ``title``."""

    key: int
    source: str
    split: str
    file: str
    position: int
    document: int
    title: str


@dataclass(frozen=True)
class Snippet:
    """A key's surrounding text: the decoded tokens ``before`` its target, the ``target``, and ``after`` it."""

    origin: KeyOrigin
    before: str
    target: str
    after: str

    def marked(self, left: str = "[[", right: str = "]]") -> str:
        """The text with the target between ``left`` and ``right`` (its leading spaces outside; a target that
        is only whitespace, such as a newline, escaped)."""
        core = self.target.lstrip()
        lead = self.target[: len(self.target) - len(core)]
        if not core:
            lead, core = "", self.target.encode("unicode_escape").decode("ascii")
        return f"{self.before}{lead}{left}{core}{right}{self.after}"

    def __str__(self) -> str:
        return self.marked()


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
        metric: str | None = None,
    ) -> None:
        self.directory = directory
        self.on_gpu = on_gpu
        self.meta = meta
        self.vals = vals
        self.keys = keys
        self.index = index
        self.metric = metric or recorded_metric(meta) or LEGACY_METRIC
        # --knn-search torch: a TorchExactSearch over all keys on the model's device (no FAISS index)
        self.torch_search = torch_search
        self.deleted = DeletedRows(meta.get("deleted") or ())
        self._device_vals = None
        self._origins: np.ndarray | None = None  # origins.npy and documents.json, read and checked when first asked
        self._documents: dict | None = None

    @property
    def count(self) -> int:
        return int(self.meta["count"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def alive_count(self) -> int:
        """Keys a search can return: all rows but the deleted ones."""
        return self.count - self.deleted.count

    @property
    def has_sources(self) -> bool:
        """Whether the datastore records where its keys came from (False for one built before sources were)."""
        return bool(self.meta.get("sources"))

    def sources(self) -> dict[int, dict]:
        """meta.json's source records by id; origins.npy and documents.json are checked on the first call
        (header, size and sha256; every document list against its source)."""
        if not self.has_sources:
            fail(f"--datastore {self.directory} {NO_SOURCES}")
        sources = {int(src["id"]): src for src in self.meta["sources"]}
        if self._origins is None:
            documents, origins = {}, []
            for segment in segment_records(self.meta):
                part_meta = segment_meta(self.meta, segment)
                held = {i: sources[i] for i in segment.get("sources", sources)}
                documents.update(_read_documents(self.directory / segment["dir"], part_meta, held))
                origins.append(_read_origins(self.directory / segment["dir"], part_meta))
            self._documents = documents
            self._origins = origins[0] if len(origins) == 1 else RowConcat(origins)
        return sources

    def origins(self, ids: Sequence[int] | np.ndarray) -> list[KeyOrigin]:
        """Where keys ``ids`` (datastore rows, FAISS ids) came from: source, file, position, document and title."""
        sources = self.sources()
        rows = np.asarray(ids, dtype=np.int64).reshape(-1)
        if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= self.count):
            bad = int(rows.min()) if int(rows.min()) < 0 else int(rows.max())
            fail(f"key {bad:,} is not in --datastore {self.directory} (keys 0..{self.count - 1:,})")
        found = np.asarray(self._origins[rows]) if rows.size else np.zeros((0, 2), dtype=ORIGIN_DTYPE)
        out = []
        for key, (source_id, position) in zip(rows.tolist(), found.tolist()):
            src = sources.get(source_id)
            if src is None or not 0 <= position < int(src["tokens"]):
                fail(_bad_origin(self.directory, key, source_id, position))
            docs = self._documents[source_id]
            document = int(np.searchsorted(docs["starts"], position, side="right")) - 1
            out.append(KeyOrigin(key=key, source=str(src["name"]), split=str(src["split"]), file=str(src["file"]),
                                 position=position, document=document, title=docs["titles"][document]))
        return out

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
        checkpoint: dict | None = None,
        model_path: str | None = None,
        allow_other_checkpoint: bool = False,
        log: Callable[[str], None] = _silent,
        metric: str | None = None,
    ) -> "Datastore":
        """Open and validate a datastore; every mismatch is a one-line error naming the file and fix.

        ``metric`` (``--metric``) is the search metric, by default the one the datastore records
        (:func:`recorded_metric`, else ``ip``); an index built for another metric is refused (the exact
        ``torch`` search takes any).

        ``dim``/``dict_sha256`` are the model's key size and the dictionary's sha256,
        ``model`` its ``{"frontend", "architecture"}`` (:func:`model_info`). ``checkpoint`` is
        the model's file identity (:func:`trime.io_utils.file_identity`), ``model_path`` the
        ``--path`` it was given as: a datastore built with another checkpoint is refused unless
        ``allow_other_checkpoint``, which ``log``s a warning instead. ``gpus`` is
        ``none``, ``auto`` or ``all`` (see :func:`faiss_index.search_gpus`). ``search``
        is ``faiss`` (``index.faiss``) or ``torch``: exact search over all keys, copied to
        ``device`` (:mod:`trime.retrieval.torch_knn`); it needs no index.

        Always checked: meta.json against both ``.npy`` headers and file sizes, the sha256
        of ``vals.npy`` (:mod:`trime.retrieval.checksums`) and that every value is a token id
        of the dictionary (``vocab_size``, the model's, or the one recorded in meta.json).
        ``keys.npy``'s checksums are checked only by :func:`verify` (it may be huge). With an index,
        ``index.faiss``'s size and sha256 (when meta.json records one; a warning to ``log`` otherwise).
        Loading never unpickles anything.
        """
        if search not in SEARCH_BACKENDS:
            fail(f"--knn-search must be one of {', '.join(SEARCH_BACKENDS)}, got {search!r}")
        if metric is not None and metric not in METRICS:
            fail(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
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
        ds_dim = int(meta["dim"])
        if meta["key_dtype"] not in KEY_DTYPE_NAMES or meta["val_dtype"] != np.dtype(VAL_DTYPE).name:
            fail(
                f"{meta_path} says keys {meta['key_dtype']!r} and values {meta['val_dtype']!r}; a datastore holds "
                f"{' or '.join(KEY_DTYPE_NAMES)} keys and {np.dtype(VAL_DTYPE).name} values: rebuild the datastore"
            )
        segments = _checked_segments(directory, meta)
        # the files' own headers first: an edited meta.json must not be trusted over them
        for segment in segments:
            rows = int(segment["rows"][1]) - int(segment["rows"][0])
            check_npy(directory / segment["dir"] / KEYS_NAME, (rows, ds_dim), meta["key_dtype"], "keys")
            check_npy(directory / segment["dir"] / VALS_NAME, (rows,), meta["val_dtype"], "values")
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
        if checkpoint is not None:
            check_checkpoint(directory, meta, checkpoint, model_path, allow_other_checkpoint, log)
        key_parts, val_parts = [], []
        for segment in segments:
            seg_dir = directory / segment["dir"]
            checksums.verify_vals(seg_dir / VALS_NAME, segment_meta(meta, segment), meta_path)
            key_parts.append(np.load(seg_dir / KEYS_NAME, mmap_mode="r", allow_pickle=False))  # never unpickle
            val_parts.append(np.load(seg_dir / VALS_NAME, allow_pickle=False))
            check_value_range(val_parts[-1], meta, seg_dir / VALS_NAME, vocab_size)
        keys = key_parts[0] if len(key_parts) == 1 else RowConcat(key_parts)
        vals = val_parts[0] if len(val_parts) == 1 else np.concatenate(val_parts)
        metric = metric or recorded_metric(meta) or LEGACY_METRIC
        index, on_gpu, torch_search = None, False, None
        if search == "torch":
            from trime.retrieval.torch_knn import TorchExactSearch

            torch_search = TorchExactSearch(keys, metric=metric, device=device if device is not None else "cpu")
        elif need_index:
            built_for = (meta.get("index") or {}).get("metric", LEGACY_METRIC)
            if meta.get("index") and built_for != metric:
                fail(
                    f"--metric {metric}: {directory / INDEX_NAME} was built for {built_for}; rebuild it with "
                    f"trime-build-datastore --build-index --metric {metric} --output {directory}, or search "
                    "exactly with --knn-search torch"
                )
            index, on_gpu = load_index(directory, meta, nprobe=nprobe, gpus=gpus, log=log)
        return cls(directory, meta, vals, keys, index, on_gpu=on_gpu, torch_search=torch_search, metric=metric)

    def check_k(self, k: int) -> None:
        """Fail unless ``k`` (``--k``) neighbours can be searched: at most the keys, and FAISS's GPU limit."""
        from trime.retrieval.faiss_index import GPU_MAX_K

        if k > self.alive_count:
            deleted = f" ({self.deleted.count:,} more are deleted)" if self.deleted else ""
            fail(
                f"--k {k:,} is more than the {self.alive_count:,} keys of --datastore {self.directory}{deleted}; "
                f"use --k {self.alive_count} or less"
            )
        if self.on_gpu and k > GPU_MAX_K:
            fail(f"--k {k} exceeds FAISS's GPU limit of {GPU_MAX_K}; use a smaller --k or --faiss-gpus none")

    def search(self, queries: np.ndarray, k: int, exact: bool = False):
        """Top-k neighbours as :class:`trime.knn.KnnResults` (torch, CPU), with the rows they are (``ids``).

        ``exact`` recomputes the scores from the stored keys (kNN-LM's exact distances)
        instead of using FAISS's (possibly PQ-approximated) ones. ``queries`` is an array or
        a tensor; with ``--knn-search torch`` the results stay on the search device. Deleted keys
        are never returned.
        """
        if self.deleted:
            return self._search_live(queries, k, exact)
        return self._search_all(queries, k, exact)

    def _search_all(self, queries, k: int, exact: bool):
        """Top-k over every row, deleted ones included."""
        import torch

        from trime.knn import KnnResults
        from trime.retrieval import faiss_index

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
            ids=torch.from_numpy(ids.astype(np.int64)),
        )

    def _search_live(self, queries, k: int, exact: bool):
        """The top-k among the keys not deleted: each query asks for more neighbours (x4 per round) until k
        live ones are found, the index has no more to give, or every key was asked for."""
        import torch

        from trime.knn import KnnResults

        device = queries.device if torch.is_tensor(queries) else torch.device("cpu")
        n = len(queries)
        scores = torch.zeros((n, k), dtype=torch.float32)
        labels = torch.zeros((n, k), dtype=torch.int64)
        valid = torch.zeros((n, k), dtype=torch.bool)
        ids = torch.full((n, k), -1, dtype=torch.int64)
        live_share = max(self.alive_count, 1) / self.count
        fetch = min(self.count, int(k / live_share) + 16)
        pending = np.arange(n)
        while pending.size:
            part = queries[torch.from_numpy(pending).to(device)] if torch.is_tensor(queries) else queries[pending]
            found = self._search_all(part, fetch, exact).to(torch.device("cpu"))
            keep = found.valid.numpy() & ~self.deleted.contains(found.ids.numpy())
            rank = np.cumsum(keep, axis=1)
            done = (rank[:, -1] >= k) | (fetch >= self.count) | ~found.valid.numpy().all(axis=1)
            taken = keep & (rank <= k)
            order = np.argsort(~taken, axis=1, kind="stable")[:, :k]  # the kept neighbours first, in order
            at, rows, where = torch.from_numpy(order), torch.from_numpy(pending[done]), torch.from_numpy(done)
            scores[rows] = found.scores.gather(1, at)[where]
            labels[rows] = found.labels.gather(1, at)[where]
            ids[rows] = found.ids.gather(1, at)[where]
            valid[rows] = torch.from_numpy(np.take_along_axis(taken, order, axis=1))[where]
            pending = pending[~done]
            fetch = min(self.count, fetch * 4)
        scores, ids = torch.where(valid, scores, 0.0), torch.where(valid, ids, -1)
        return KnnResults(scores=scores, labels=labels, valid=valid, ids=ids).to(device)

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
        return KnnResults(scores=torch.where(valid, scores, 0.0), labels=self._device_vals[safe], valid=valid, ids=ids)

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
            "deleted": self.deleted.count,
            "dim": self.dim,
            "key_dtype": self.meta["key_dtype"],
            "metric": self.metric,
            "index": self.meta.get("index"),
            "checkpoint": self.meta.get("checkpoint"),
        }


def snippets(store: Datastore, lm: "ModelAdapter", ids: Sequence[int] | np.ndarray, before: int = 16,
             after: int = 8) -> list[Snippet]:
    """The text around keys ``ids``: ``before`` tokens before each target, the target, ``after`` tokens after.

    ``lm`` reads the data the datastore was built from (an adapter over the same files, with the same
    dictionary or tokenizer); files whose sha256 differ from the recorded ones are refused in one line.
    Each piece is decoded on its own (:meth:`ModelAdapter.decode`), so a character split across pieces
    may show as U+FFFD.
    """
    if before < 0 or after < 0:
        fail(f"snippets need before >= 0 and after >= 0 tokens, got {before} and {after}")
    origins = store.origins(ids)
    sources = store.sources()
    built_with = (store.meta.get("dictionary") or {}).get("sha256")
    if built_with != lm.dict_sha256:
        fail(
            f"--path {lm.path} has another dictionary or tokenizer than --datastore {store.directory} was built "
            "with, so its positions count other tokens; use the model (or data-bin) it was built with"
        )
    by_name = {str(src["name"]): source_id for source_id, src in sources.items()}
    streams: dict[int, np.ndarray] = {}
    for source_id in sorted({by_name[o.source] for o in origins}):
        src = sources[source_id]
        _check_source_files(store.directory, src, lm)
        stream = lm.stream(str(src["split"]))
        if len(stream) != int(src["tokens"]):
            fail(
                f"{lm.data_files(str(src['split']))[0]} gives {len(stream):,} tokens, but --datastore "
                f"{store.directory} recorded {int(src['tokens']):,}; use the model and data it was built with"
            )
        streams[source_id] = stream
    out = []
    for origin in origins:
        stream, p = streams[by_name[origin.source]], origin.position
        out.append(Snippet(
            origin=origin,
            before=lm.decode(np.asarray(stream[max(0, p - before) : p])),
            target=lm.decode(np.asarray(stream[p : p + 1])),
            after=lm.decode(np.asarray(stream[p + 1 : p + 1 + after])),
        ))  # fmt: skip
    return out


def _check_source_files(directory: Path, src: dict, lm: "ModelAdapter") -> None:
    """Fail unless ``lm``'s files of the source's split have the sizes and sha256 the datastore recorded."""
    recorded = src.get("files") or {}
    paths = {p.name: p for p in lm.data_files(str(src["split"]))}
    for name in sorted(set(recorded) | set(paths)):
        path = paths.get(name, Path(lm.data_dir) / name)
        then = recorded.get(name)
        if then is None or not path.is_file():
            fail(
                f"{path} is {'not among' if then is None else 'missing from'} the files --datastore {directory} was "
                f"built from; pass the data it was built from"
            )
        now = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        if now != {"bytes": then.get("bytes"), "sha256": then.get("sha256")}:
            fail(
                f"{path} differs from the file --datastore {directory} was built from (sha256 "
                f"{str(then.get('sha256'))[:12]}... then, {now['sha256'][:12]}... now); pass the data it was built from"
            )


def _bad_origin(directory: Path, row: int, source_id: int, position: int) -> str:
    return (f"{directory / ORIGINS_NAME} row {row:,} names source {source_id} position {position:,}, which "
            f"{META_NAME} does not hold: the file is damaged; rebuild the datastore with trime-build-datastore")


def _check_origin_rows(directory: Path, rows: np.ndarray, first_row: int, tokens: dict[int, int]) -> None:
    """Fail unless every row of a block of origins.npy names a recorded source and a position inside it."""
    limit = np.full(len(rows), -1, dtype=np.int64)
    for source_id, count in tokens.items():
        limit[rows[:, 0] == source_id] = count
    bad = np.flatnonzero((rows[:, 1] < 0) | (rows[:, 1] >= limit))
    if bad.size:
        row = int(bad[0])
        fail(_bad_origin(directory, first_row + row, int(rows[row, 0]), int(rows[row, 1])))


def _read_origins(directory: Path, meta: dict) -> np.ndarray:
    """origins.npy, memory-mapped, after its header, size and recorded sha256 are checked."""
    path = directory / ORIGINS_NAME
    check_npy(path, (int(meta["count"]), 2), ORIGIN_DTYPE, "origins")
    _check_recorded_sha256(path, meta, "origins_sha256", "the origins")
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _read_documents(directory: Path, meta: dict, sources: dict[int, dict]) -> dict[int, dict]:
    """documents.json by source id (``starts`` as an int64 array, ``titles``), checked against meta.json."""
    path = directory / DOCUMENTS_NAME
    if not path.is_file():
        fail(f"datastore file {path} is missing; rebuild the datastore with trime-build-datastore")
    _check_recorded_sha256(path, meta, "documents_sha256", "the documents")
    record = read_json(path, what="datastore documents file")
    entries = {int(e["id"]): e for e in record.get("sources", [])} if record.get("format") == DOCUMENTS_FORMAT else {}
    out = {}
    for source_id, src in sources.items():
        entry = entries.get(source_id) or {}
        starts, titles = entry.get("starts"), entry.get("titles")
        if (not isinstance(starts, list) or not isinstance(titles, list) or len(starts) != len(titles)
                or len(starts) != int(src.get("documents", -1)) or not starts or starts[0] != 0):
            fail(f"{path} does not hold the {src.get('documents')} documents {META_NAME} records for source "
                 f"{src.get('name')!r}; rebuild the datastore with trime-build-datastore")
        out[source_id] = {"starts": np.asarray(starts, dtype=np.int64), "titles": [str(t) for t in titles]}
    return out


def _check_recorded_sha256(path: Path, meta: dict, field: str, what: str) -> None:
    recorded = (meta.get("checksums") or {}).get(field)
    if recorded is None:
        fail(f"{path.parent / META_NAME} records no sha256 of {path.name}; rebuild the datastore with "
             "trime-build-datastore")
    if sha256_file(path) != recorded:
        fail(f"{path} does not match the sha256 recorded in {META_NAME}: {what} are damaged or from another build; "
             "rebuild the datastore with trime-build-datastore")


def check_checkpoint(
    directory: Path,
    meta: dict,
    checkpoint: dict,
    model_path: str | None = None,
    allow_other: bool = False,
    log: Callable[[str], None] = _silent,
) -> None:
    """Fail if the datastore was built with another checkpoint than ``checkpoint`` (a file identity).

    With ``allow_other`` the mismatch is a warning passed to ``log`` instead.
    """
    built_with = meta.get("checkpoint")
    if not built_with or identity_key(built_with) == identity_key(checkpoint):
        return
    path = model_path if model_path is not None else checkpoint.get("path")
    if not allow_other:
        fail(
            f"--datastore {directory} was built with another checkpoint ({built_with.get('path')}), "
            f"not --path {path}; rebuild it with trime-build-datastore --path {path}, "
            "or pass --allow-other-checkpoint to use it anyway"
        )
    log(
        f"warning: {directory} was built with another checkpoint ({built_with.get('path')}); "
        "using it (--allow-other-checkpoint)"
    )


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
    key_dtype = np.dtype(store.meta["key_dtype"])
    chunks = 0
    for segment in segment_records(store.meta):
        part_meta = segment_meta(store.meta, segment)
        if "checksums" not in part_meta:
            fail(f"{meta_path} records no checksums (a datastore built before they were added); rebuild it to verify")
        keys_path = directory / segment["dir"] / KEYS_NAME
        _, _, offset = _npy_header(keys_path)
        chunks += checksums.verify_keys(keys_path, part_meta, meta_path, offset, store.dim * key_dtype.itemsize,
                                        show_progress, key_dtype=key_dtype)
    info = store.meta.get("index") or {}
    if info:
        check_index_file(directory, info, require_sha256=True)
    if store.has_sources:
        sources = store.sources()
        tokens = {source_id: int(src["tokens"]) for source_id, src in sources.items()}
        for lo in range(0, store.count, VERIFY_ORIGIN_ROWS):
            _check_origin_rows(directory, np.asarray(store._origins[lo : lo + VERIFY_ORIGIN_ROWS]), lo, tokens)
        documents = sum(int(src["documents"]) for src in sources.values())
        origins = (f"; origins verified ({len(sources)} source{'s' if len(sources) != 1 else ''}, "
                   f"{documents:,} document{'s' if documents != 1 else ''})")
    else:
        origins = "; no sources (built before they were recorded)"
    deleted = f", {store.deleted.count:,} of them deleted" if store.deleted else ""
    return (
        f"{directory}: OK ({store.count:,} keys{deleted} of {store.dim}-d {store.meta['key_dtype']}, checksummed in "
        f"{chunks} "
        f"chunk{'s' if chunks != 1 else ''}, all finite; values verified"
        f"{'; index verified (sha256)' if info else '; no index'}{origins})"
    )


def check_index_file(
    directory: Path, info: dict, require_sha256: bool = False, log: Callable[[str], None] = _silent
) -> None:
    """Fail unless ``index.faiss`` exists and has the size and sha256 recorded in meta.json's ``index``.

    An index recorded without a sha256 (built before index checksums) fails with ``require_sha256``
    (``--verify``); otherwise it is used after a warning passed to ``log``.
    """
    path = directory / info.get("file", INDEX_NAME)
    rebuild = f"rebuild it with trime-build-datastore --build-index --output {directory}"
    if not path.is_file():
        fail(f"{path} is missing; build it with trime-build-datastore --build-index --output {directory}")
    size = path.stat().st_size
    if "bytes" in info and size != info["bytes"]:
        fail(f"{path} is {size:,} bytes but {META_NAME} records {info['bytes']:,}; {rebuild}")
    recorded = info.get("sha256")
    if recorded is None:
        if require_sha256:
            fail(f"{directory / META_NAME} records no sha256 of {INDEX_NAME} (built before index checksums); "
                 f"{rebuild} to verify it")
        log(f"warning: {directory / META_NAME} records no sha256 of {INDEX_NAME} (built before index checksums), "
            f"so it is not checked; {rebuild} to have it checked")
        return
    if sha256_file(path) != recorded:
        fail(f"{path} does not match the sha256 recorded in {META_NAME}: the index is corrupt or from another "
             f"build; {rebuild}")


def record_checksums(directory: Path, meta: dict) -> None:
    """Add ``meta["checksums"]`` for the finished keys.npy/vals.npy in ``directory``."""
    meta["checksums"] = segment_checksums(directory, int(meta["count"]), int(meta["dim"]), meta["key_dtype"],
                                          with_sources=bool(meta.get("sources")))


def segment_checksums(directory: Path, count: int, dim: int, key_dtype, with_sources: bool) -> dict:
    """The checksums of one segment's finished files: keys in chunks, vals, and origins and documents."""
    keys_path = directory / KEYS_NAME
    _, _, offset = _npy_header(keys_path)
    row_bytes = dim * np.dtype(key_dtype).itemsize
    out = checksums.datastore_checksums(keys_path, directory / VALS_NAME, offset, count, row_bytes)
    if with_sources:
        out["origins_sha256"] = sha256_file(directory / ORIGINS_NAME)
        out["documents_sha256"] = sha256_file(directory / DOCUMENTS_NAME)
    return out


def _checked_segments(directory: Path, meta: dict) -> list[dict]:
    """meta.json's segments, checked: folders inside the datastore, rows contiguous from 0 to ``count``."""
    segments, row = segment_records(meta), 0
    for segment in segments:
        folder, rows = str(segment.get("dir", "")), segment.get("rows") or [None, None]
        inside = folder == "." or (folder.startswith(SEGMENTS_DIR + "/") and ".." not in Path(folder).parts)
        if not inside or rows[0] != row or not isinstance(rows[1], int) or rows[1] < row:
            fail(f"{directory / META_NAME} lists a damaged segment ({folder!r}, rows {rows}); the manifest was "
                 "edited or is corrupt: restore it, or rebuild the datastore with trime-build-datastore")
        row = rows[1]
    if row != int(meta["count"]):
        fail(f"{directory / META_NAME} says {int(meta['count']):,} keys but its segments hold {row:,}; the manifest "
             "was edited or is corrupt: restore it, or rebuild the datastore with trime-build-datastore")
    return segments


def unreferenced_files(directory: Path, meta: dict, keep: Sequence[Path] = ()) -> list[Path]:
    """Index files and segment folders of ``directory`` that its manifest does not name (left by an update that
    was killed before its manifest moved, or replaced by one that finished), except ``keep``."""
    named = {directory / s["dir"] for s in segment_records(meta)} | {Path(p) for p in keep}
    index_file = (meta.get("index") or {}).get("file")
    out = [p for p in sorted(directory.glob("index*.faiss")) if p.name != index_file and p not in named]
    if (directory / SEGMENTS_DIR).is_dir():
        out += [p for p in sorted((directory / SEGMENTS_DIR).iterdir()) if p not in named]
    if directory not in named:  # compacted: the first build's files moved into a segment
        out += [directory / n for n in (KEYS_NAME, VALS_NAME, ORIGINS_NAME, DOCUMENTS_NAME) if (directory / n).is_file()]
    return out


def load_index(directory: Path, meta: dict, nprobe: int = 32, gpus: str = "none",
               log: Callable[[str], None] = _silent):
    """Read ``index.faiss``, check it against meta (size, sha256, shape), set nprobe and place it on the search GPUs.

    Returns (index, on_gpu).
    """
    from trime.retrieval import faiss_index

    faiss = faiss_index.import_faiss()
    info = meta.get("index")
    path = directory / (info or {}).get("file", INDEX_NAME)
    if not info or not path.is_file():
        fail(f"{path} is missing; build it with trime-build-datastore --build-index --output {directory}")
    check_index_file(directory, info, log=log)
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


def model_info(lm: "ModelAdapter") -> dict:
    """What a datastore records about the model family that built it (checked by :meth:`Datastore.open`)."""
    return {"frontend": lm.frontend, "architecture": lm.architecture, "key_source": lm.key_source}
