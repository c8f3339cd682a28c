"""Datastores that change without retraining: add a source, remove a source or documents, compact.

Every operation holds the datastore's lock and ends by replacing meta.json (the manifest) in one
atomic rename; everything it writes before that goes under names the old manifest does not use
(a new segment folder, a new ``index.N.faiss``), so a killed update leaves the previous datastore
whole, and the next update deletes what it left (:func:`trime.retrieval.datastore.unreferenced_files`).

- **Add** (``trime-build-datastore --add``): :func:`plan_addition` checks that the model, its key
  module, tokenizer or dictionary, precision, windows and key dtype are the datastore's, then the
  CLI extracts the new source into ``segments/NNNN`` (resumable, like any build) and
  :func:`commit_addition` appends its keys to the trained index (no retraining) and moves the
  manifest. Each source is windowed as its own token stream, so its keys do not depend on what
  else the datastore holds. The drift report compares the new keys' quantization error with the
  indexed keys' and says when to retrain (``--build-index``).
- **Remove** (``--remove NAME``, ``--remove-docs FILE``): the rows become tombstones (meta.json's
  ``deleted`` ranges); searches skip them from then on.
- **Compact** (``--compact``): one new segment holding the live rows in order, and the trained index
  emptied and refilled with them (the same codes as before, renumbered).
"""

import copy
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from trime.errors import fail
from trime.io_utils import (
    atomic_path,
    identity_key,
    naming_file,
    progress_meter,
    read_json,
    sha256_file,
    write_json_atomic,
)
from trime.retrieval.datastore import (
    DOCUMENTS_FORMAT,
    DOCUMENTS_NAME,
    INDEX_NAME,
    KEY_DTYPES,
    KEYS_NAME,
    META_NAME,
    ORIGIN_DTYPE,
    ORIGINS_NAME,
    SEGMENTS_DIR,
    VAL_DTYPE,
    VALS_NAME,
    Datastore,
    check_index_file,
    create_npy,
    history_entry,
    model_info,
    segment_checksums,
    segment_records,
    unreferenced_files,
)

if TYPE_CHECKING:
    from trime.adapters import ModelAdapter, WindowSettings

COPY_ROWS = 500_000  # rows copied or indexed at once
DRIFT_SAMPLE = 4096  # keys sampled (seeded) on each side to compare quantization errors
DRIFT_RETRAIN_RATIO = 1.5  # retraining is advised once the new keys' error exceeds the indexed keys' by this factor
DOCUMENT_REF = re.compile(r"(?P<source>.+)#(?P<document>\d+)")  # --remove-docs: SOURCE#N, document N of SOURCE


def _silent(message: str) -> None:
    """The default ``log``: library calls print nothing."""


@dataclass(frozen=True)
class AdditionPlan:
    """Where an addition goes: the new source's ``id`` and ``name``, and its ``segment`` folder (relative)."""

    id: int
    name: str
    segment: str


def source_rows(meta: dict, source: dict) -> tuple[int, int]:
    """The rows [lo, hi) holding a source's keys (a datastore built in one go holds one source in all rows)."""
    if "rows" in source:
        return int(source["rows"][0]), int(source["rows"][1])
    return 0, int(meta["count"])


def live_sources(meta: dict) -> list[dict]:
    """The sources not removed, in row order."""
    return [src for src in meta.get("sources") or [] if not src.get("removed")]


def _require_sources(store: Datastore, flag: str) -> None:
    if not store.has_sources:
        fail(f"{flag}: --output {store.directory} does not record its sources (built before they were recorded, or "
             "imported); rebuild it with trime-build-datastore to add or remove sources")


def plan_addition(store: Datastore, lm: "ModelAdapter", settings: "WindowSettings", name: str,
                  key_dtype: str | None = None) -> AdditionPlan:
    """Check that ``lm`` and ``settings`` give keys comparable to the datastore's; returns the new source's place.

    Refused in one line: another key size, model family or key module, tokenizer or dictionary,
    checkpoint, precision, window or key dtype, or a source name already in use.
    """
    _require_sources(store, "--add")
    meta, out = store.meta, store.directory
    fix = f"add with the model and settings --output {out} was built with, or build a new datastore"
    if lm.dim != store.dim:
        fail(f"--add: --path {lm.path} gives {lm.dim}-d keys but --output {out} holds {store.dim}-d keys; {fix}")
    built = meta.get("model") or {}
    if built and built != model_info(lm):
        now = model_info(lm)
        fail(f"--add: --output {out} holds keys of a {built.get('frontend')} {built.get('architecture')} model from "
             f"{built.get('key_source')}, not of this {now['frontend']} {now['architecture']} model from "
             f"{now['key_source']} (another model or --key-module); {fix}")
    if (meta.get("dictionary") or {}).get("sha256") != lm.dict_sha256:
        fail(f"--add: --path {lm.path} has another tokenizer or dictionary than --output {out} was built with; {fix}")
    if meta.get("checkpoint") and identity_key(meta["checkpoint"]) != identity_key(lm.identity):
        fail(f"--add: --output {out} was built with another checkpoint ({meta['checkpoint'].get('path')}), not "
             f"--path {lm.path}; {fix}")
    precision = str(lm.dtype).replace("torch.", "")
    if meta.get("model_precision") and meta["model_precision"] != precision:
        fail(f"--add: --output {out} was built in {meta['model_precision']}, this model runs in {precision}; pass the "
             f"precision flag it was built with")
    windows = meta.get("windows") or {}
    if (windows.get("tokens_per_sample"), windows.get("context_window")) != (settings.tokens_per_sample,
                                                                              settings.context_window):
        fail(f"--add: --output {out} was built with windows of {windows.get('tokens_per_sample')} tokens, "
             f"{windows.get('context_window')} of them context, not {settings.tokens_per_sample} and "
             f"{settings.context_window}; pass --tokens-per-sample {windows.get('tokens_per_sample')} "
             f"--context-window {windows.get('context_window')}")
    if key_dtype is not None and np.dtype(KEY_DTYPES[key_dtype]).name != meta["key_dtype"]:
        fail(f"--key-dtype {key_dtype}: --output {out} stores {meta['key_dtype']} keys; drop --key-dtype")
    taken = {str(src["name"]) for src in live_sources(meta)}
    if name in taken:
        fail(f"--source {name!r} is already in --output {out} (sources: {', '.join(sorted(taken))}); choose another "
             f"--source name, or --remove {name} first")
    source_id = 1 + max(int(src["id"]) for src in meta["sources"])
    return AdditionPlan(id=source_id, name=name, segment=f"{SEGMENTS_DIR}/{source_id:04d}")


def clear_leftovers(directory: Path, meta: dict, keep: Path | None = None) -> list[Path]:
    """Delete the files and folders the manifest does not name (except ``keep``); returns them."""
    gone = unreferenced_files(directory, meta, keep=[keep] if keep is not None else [])
    for path in gone:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return gone


def _explicit_segments(meta: dict) -> list[dict]:
    """The segment records with their sources and checksums written out (a one-segment datastore has neither)."""
    segments = copy.deepcopy(segment_records(meta))
    if not meta.get("segments"):
        segments[0]["sources"] = [int(src["id"]) for src in meta.get("sources") or []]
    return segments


def _with_rows(meta: dict) -> list[dict]:
    """meta.json's sources, each with its ``rows`` written out."""
    out = copy.deepcopy(meta.get("sources") or [])
    for src in out:
        src["rows"] = list(source_rows(meta, src))
    return out


def _next_index_name(meta: dict) -> tuple[int, str]:
    generation = int(meta.get("generation", 0)) + 1
    return generation, f"index.{generation}.faiss"


def _write_index(directory: Path, index, name: str) -> dict:
    """Write ``index`` as ``name`` (atomically); its record's file, size and sha256."""
    from trime.retrieval import faiss_index

    with atomic_path(directory / name) as tmp:
        faiss_index.write_index(index, tmp)
        digest = sha256_file(tmp)
    return {"file": name, "ntotal": int(index.ntotal), "bytes": (directory / name).stat().st_size, "sha256": digest}


def _read_index(directory: Path, info: dict):
    from trime.retrieval import faiss_index

    check_index_file(directory, info, require_sha256=False)
    return faiss_index.import_faiss().read_index(str(directory / info.get("file", INDEX_NAME)))


def _commit(directory: Path, meta: dict, keep: Path | None = None) -> None:
    """Move the manifest (the update's one atomic step), then delete what it no longer names."""
    if meta.get("segments"):  # each segment carries its own checksums
        meta.pop("checksums", None)
    with naming_file(directory / META_NAME):
        write_json_atomic(directory / META_NAME, meta)
    clear_leftovers(directory, meta, keep)


def quantization_drift(index, new_keys: np.ndarray, old_keys: np.ndarray) -> dict | None:
    """How much worse the index encodes ``new_keys`` than ``old_keys`` (keys it was trained for): the ratio of
    their mean relative squared reconstruction errors; None for an index that does not quantize."""
    def error(keys: np.ndarray) -> float | None:
        x = np.ascontiguousarray(keys, dtype=np.float32)
        try:
            decoded = index.sa_decode(index.sa_encode(x))
        except RuntimeError:  # an index without a standalone codec
            return None
        return float(((x - decoded) ** 2).sum() / max(float((x**2).sum()), 1e-30))

    old, new = error(old_keys), error(new_keys)
    if old is None or new is None or old <= 1e-12:
        return None
    return {"indexed_keys_error": old, "new_keys_error": new, "ratio": new / old,
            "retrain_advised": bool(new / old > DRIFT_RETRAIN_RATIO)}


def _sample_rows(count: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(count, size=min(count, size), replace=False))


def commit_addition(directory: Path, plan: AdditionPlan, show_progress: bool = False,
                    log: Callable[[str], None] = _silent, log_progress: Callable[[str], None] = _silent) -> dict:
    """Append the extracted segment ``plan.segment`` to the datastore: keys into the trained index (when there is
    one), its source and segment into the manifest, one ``add`` record into the history. Returns the manifest.

    The caller holds the datastore's lock (:func:`trime.retrieval.datastore.build_lock`).
    """
    from trime.retrieval import faiss_index

    store = Datastore.open(directory, need_index=False)
    meta = copy.deepcopy(store.meta)
    segment_dir = directory / plan.segment
    part = read_json(segment_dir / META_NAME, what="datastore meta file")
    new_keys = np.load(segment_dir / KEYS_NAME, mmap_mode="r", allow_pickle=False)
    lo, hi = store.count, store.count + int(part["count"])
    record = {"dir": plan.segment, "rows": [lo, hi], "checksums": part["checksums"], "sources": [plan.id]}
    source = {**part["sources"][0], "rows": [lo, hi], "segment": plan.segment,
              "windows": {k: part["windows"][k] for k in ("num_windows", "batch_size")}}
    details = {"source": plan.name, "split": source["split"], "keys": hi - lo, "rows": [lo, hi],
               "files": source["files"], "segment": plan.segment, "vals_sha256": part["checksums"]["vals_sha256"]}
    info = meta.get("index")
    if info:
        index = _read_index(directory, info)
        drift = quantization_drift(index, new_keys[_sample_rows(hi - lo, DRIFT_SAMPLE, 1)],
                                   store.keys[_sample_rows(store.count, DRIFT_SAMPLE, 2)])
        with progress_meter(total=hi - lo, unit="key", unit_scale=True, desc="index add", bar=show_progress,
                            log=log_progress) as bar:
            index = faiss_index.add_in_chunks(index, new_keys, COPY_ROWS, progress=bar.update,
                                              source=segment_dir / KEYS_NAME)
        generation, name = _next_index_name(meta)
        meta["generation"] = generation
        meta["index"] = {**info, **_write_index(directory, index, name)}
        details["index"] = {"file": name, "sha256": meta["index"]["sha256"]}
        if drift is not None:
            details["drift"] = drift
            advice = (f"retrain it: trime-build-datastore --build-index --output {directory}"
                      if drift["retrain_advised"] else f"no retraining needed below {DRIFT_RETRAIN_RATIO}x")
            log(f"index drift: the new keys' quantization error is {drift['ratio']:.2f}x the indexed keys'; {advice}")
    meta["segments"] = [*_explicit_segments(meta), record]
    meta["sources"] = [*_with_rows(meta), source]
    meta["count"] = hi
    meta["history"] = [*meta.get("history", []), history_entry("add", **details)]
    _commit(directory, meta)
    log(f"added source {plan.name!r} to {directory}: {hi - lo:,} keys (rows {lo:,}..{hi - 1:,}), "
        f"{store.alive_count + hi - lo:,} live keys in all")
    return meta


def remove_source(directory: Path, name: str, log: Callable[[str], None] = _silent) -> dict:
    """Tombstone every key of source ``name``; returns the manifest. The caller holds the lock."""
    store = Datastore.open(directory, need_index=False)
    _require_sources(store, "--remove")
    meta = copy.deepcopy(store.meta)
    sources = _with_rows(meta)
    found = [src for src in sources if str(src["name"]) == name and not src.get("removed")]
    if not found:
        names = ", ".join(sorted(str(src["name"]) for src in live_sources(meta))) or "none"
        fail(f"--remove {name}: --output {directory} holds no source of that name (sources: {names})")
    src = found[0]
    lo, hi = src["rows"]
    gone = int((~store.deleted.contains(np.arange(lo, hi))).sum()) if store.deleted else hi - lo
    src["removed"] = True
    meta["sources"] = sources
    meta["deleted"] = store.deleted.union([(lo, hi)]).ranges
    meta["history"] = [*meta.get("history", []), history_entry("remove", source=name, rows=[lo, hi], keys=gone)]
    _commit(directory, meta)
    log(f"removed source {name!r} from {directory}: {gone:,} keys deleted (searches skip them; --compact rewrites "
        f"the files without them)")
    return meta


def parse_document_list(listing: Path, store: Datastore, source: str | None = None) -> list[tuple[int, int]]:
    """(source id, document) of each line of ``listing``: a title (of any live source, or of ``source``), or
    ``SOURCE#N``. Blank lines are skipped; a line that names no document fails, naming the file and line."""
    sources = store.sources()
    live = {int(s["id"]): s for s in live_sources(store.meta) if source is None or str(s["name"]) == source}
    if source is not None and not live:
        fail(f"--source {source}: --output {store.directory} holds no live source of that name")
    by_name = {str(s["name"]): i for i, s in live.items()}
    try:
        lines = listing.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"--remove-docs {listing} cannot be read ({e}); pass a UTF-8 text file with one title or SOURCE#N a line")
    found: list[tuple[int, int]] = []
    for number, line in enumerate(lines, start=1):
        wanted = line.strip()
        if not wanted:
            continue
        ref = DOCUMENT_REF.fullmatch(wanted)
        if ref and ref["source"] in by_name:
            source_id, document = by_name[ref["source"]], int(ref["document"])
            if document >= int(sources[source_id]["documents"]):
                fail(f"--remove-docs {listing} line {number}: source {ref['source']!r} has documents "
                     f"0..{int(sources[source_id]['documents']) - 1}, not {document}")
            found.append((source_id, document))
            continue
        matches = [(i, d) for i in live for d, title in enumerate(store._documents[i]["titles"]) if title == wanted]
        if not matches:
            where = f"source {source!r}" if source is not None else f"--output {store.directory}"
            fail(f"--remove-docs {listing} line {number}: no document of {where} is titled {wanted!r}; give titles as "
                 "trime-eval --dump-neighbors shows them, or SOURCE#N")
        found += matches
    if not found:
        fail(f"--remove-docs {listing} names no document; give one title or SOURCE#N a line")
    return sorted(set(found))


def document_rows(store: Datastore, meta: dict, source_id: int, documents: list[int]) -> list[tuple[int, int]]:
    """The rows [lo, hi) of the keys whose target lies in each of a source's ``documents`` (its rows are in stream
    order, so one read of its positions serves them all)."""
    src = next(s for s in meta["sources"] if int(s["id"]) == source_id)
    lo, hi = source_rows(meta, src)
    starts = np.append(store._documents[source_id]["starts"], int(src["tokens"]))
    positions = np.asarray(store._origins[lo:hi])[:, 1]
    firsts = np.searchsorted(positions, starts[documents])
    ends = np.searchsorted(positions, starts[np.asarray(documents) + 1])
    return [(lo + int(a), lo + int(b)) for a, b in zip(firsts, ends)]


def remove_documents(directory: Path, listing: Path, source: str | None = None,
                     log: Callable[[str], None] = _silent) -> dict:
    """Tombstone the keys of the documents ``listing`` names (:func:`parse_document_list`); returns the manifest."""
    store = Datastore.open(directory, need_index=False)
    _require_sources(store, "--remove-docs")
    wanted = parse_document_list(listing, store, source)
    meta = copy.deepcopy(store.meta)
    sources = {int(s["id"]): s for s in _with_rows(meta)}
    ranges, removed = [], []
    found = {}
    for source_id in sorted({source_id for source_id, _ in wanted}):
        documents = [d for i, d in wanted if i == source_id]
        found.update({(source_id, d): rows for d, rows in zip(documents, document_rows(store, meta, source_id,
                                                                                        documents))})
    for source_id, document in wanted:
        lo, hi = found[(source_id, document)]
        gone = int((~store.deleted.contains(np.arange(lo, hi))).sum()) if store.deleted else hi - lo
        ranges.append((lo, hi))
        src = sources[source_id]
        src["removed_documents"] = sorted({*src.get("removed_documents", []), document})
        removed.append({"source": src["name"], "document": document,
                        "title": store._documents[source_id]["titles"][document], "rows": [lo, hi], "keys": gone})
    total = sum(r["keys"] for r in removed)
    meta["sources"] = list(sources.values())
    meta["deleted"] = store.deleted.union(ranges).ranges
    meta["history"] = [*meta.get("history", []), history_entry(
        "remove-docs", file=str(listing), file_sha256=sha256_file(listing), documents=removed, keys=total)]
    _commit(directory, meta)
    log(f"removed {len(removed)} document{'s' if len(removed) != 1 else ''} from {directory}: {total:,} keys deleted "
        "(searches skip them; --compact rewrites the files without them)")
    return meta


def compact(directory: Path, show_progress: bool = False, log: Callable[[str], None] = _silent,
            log_progress: Callable[[str], None] = _silent) -> dict:
    """Rewrite the live keys into one segment and the index without the deleted ones; returns the manifest.

    The index keeps its training: it is emptied and refilled with the live keys in their new order.
    """
    from trime.retrieval import faiss_index

    store = Datastore.open(directory, need_index=False)
    meta = copy.deepcopy(store.meta)
    if not store.deleted and len(segment_records(meta)) == 1:
        log(f"{directory} has nothing to compact (no deleted keys, one segment)")
        return meta
    generation, index_name = _next_index_name(meta)
    segment = f"{SEGMENTS_DIR}/compact-{generation:04d}"
    out = directory / segment
    clear_leftovers(directory, meta)
    out.mkdir(parents=True)
    live = store.deleted.alive(0, store.count)
    count = sum(b - a for a, b in live)
    with_sources = store.has_sources
    if with_sources:
        store.sources()
    keys = create_npy(out / KEYS_NAME, np.dtype(meta["key_dtype"]), (count, store.dim))
    vals = create_npy(out / VALS_NAME, VAL_DTYPE, (count,))
    origins = create_npy(out / ORIGINS_NAME, ORIGIN_DTYPE, (count, 2)) if with_sources else None
    row = 0
    with progress_meter(total=count, unit="key", unit_scale=True, desc="compact", bar=show_progress,
                        log=log_progress) as bar:
        for a, b in live:
            for lo in range(a, b, COPY_ROWS):
                hi = min(b, lo + COPY_ROWS)
                keys[row : row + hi - lo] = store.keys[lo:hi]
                vals[row : row + hi - lo] = store.vals[lo:hi]
                if origins is not None:
                    origins[row : row + hi - lo] = store._origins[lo:hi]
                row += hi - lo
                bar.update(hi - lo)
    for array in (keys, vals, origins):
        if array is not None:
            array.flush()
    del keys, vals, origins

    def moved(r: int) -> int:  # the new row of old row r (the live rows before it)
        return r - int(sum(max(0, min(b, r) - a) for a, b in store.deleted.ranges))

    sources = []
    for src in _with_rows(meta):
        if src.get("removed"):
            continue
        lo, hi = src["rows"]
        sources.append({**src, "rows": [moved(lo), moved(hi)], "segment": segment})
    if with_sources:
        entries = [{"id": int(s["id"]), "name": s["name"], "starts": store._documents[int(s["id"])]["starts"].tolist(),
                    "titles": store._documents[int(s["id"])]["titles"]} for s in sources]
        with naming_file(out / DOCUMENTS_NAME):
            write_json_atomic(out / DOCUMENTS_NAME, {"format": DOCUMENTS_FORMAT, "sources": entries})
    sums = segment_checksums(out, count, store.dim, meta["key_dtype"], with_sources)
    details = {"keys_before": store.count, "keys_deleted": store.deleted.count, "keys": count, "segment": segment,
               "vals_sha256": sums["vals_sha256"]}
    info = meta.get("index")
    if info:
        index = _read_index(directory, info)
        index.reset()  # the trained quantizers stay; the codes are added again under the new row numbers
        fresh = np.load(out / KEYS_NAME, mmap_mode="r", allow_pickle=False)
        with progress_meter(total=count, unit="key", unit_scale=True, desc="index add", bar=show_progress,
                            log=log_progress) as bar:
            index = faiss_index.add_in_chunks(index, fresh, COPY_ROWS, progress=bar.update, source=out / KEYS_NAME)
        meta["index"] = {**info, **_write_index(directory, index, index_name)}
        details["index"] = {"file": index_name, "sha256": meta["index"]["sha256"]}
    meta["generation"] = generation
    meta["segments"] = [{"dir": segment, "rows": [0, count], "checksums": sums,
                         "sources": [int(s["id"]) for s in sources]}]
    meta["sources"] = sources
    meta["count"] = count
    meta.pop("deleted", None)
    meta["history"] = [*meta.get("history", []), history_entry("compact", **details)]
    _commit(directory, meta)
    log(f"compacted {directory}: {count:,} keys kept, {store.deleted.count:,} deleted keys dropped")
    return meta
