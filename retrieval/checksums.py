"""Checksums of a datastore's ``.npy`` files, recorded in ``meta.json`` and verified on load.

``meta["checksums"]``::

    {"algorithm": "sha256",
     "vals_sha256": "...",                   # the whole vals.npy file (header included)
     "keys_rows_per_chunk": R,               # keys.npy's data in chunks of R rows
     "keys_chunk_sha256": ["...", ...]}      # one per chunk, over the chunk's raw bytes

``vals.npy`` is small (4 bytes a token) and is verified in full every time a datastore is
opened, together with its value range. ``keys.npy`` can be hundreds of GB: it is checked
against its header on every load, and its chunk checksums only by
``trime-build-datastore --verify``, which names the first damaged chunk's rows.
Everything here reads raw bytes: no pickle, no ``np.load(allow_pickle=True)``.
"""

import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from trime.errors import fail
from trime.io_utils import sha256_file

ALGORITHM = "sha256"
KEYS_CHUNK_BYTES = 256 << 20  # ~1 s of hashing per chunk
READ_BYTES = 16 << 20


def keys_rows_per_chunk(row_bytes: int) -> int:
    """Rows of ``row_bytes`` bytes per checksum chunk (at least 1)."""
    return max(1, KEYS_CHUNK_BYTES // max(1, row_bytes))


def chunk_checksums(path: Path, data_offset: int, row_bytes: int, rows: int, rows_per_chunk: int, progress=None,
                    on_block: Callable[[int, bytes], None] | None = None) -> list:
    """sha256 of each run of ``rows_per_chunk`` rows of a .npy file's data (the last run may be shorter).

    ``on_block(byte_offset, block)`` sees every block read (offsets within the data, blocks of whole rows).
    """
    out = []
    read_bytes = max(row_bytes, READ_BYTES - READ_BYTES % max(1, row_bytes))  # whole rows per block
    done = 0
    with open(path, "rb") as f:
        f.seek(data_offset)
        for start in range(0, rows, rows_per_chunk):
            remaining = (min(rows, start + rows_per_chunk) - start) * row_bytes
            digest = hashlib.sha256()
            while remaining:
                block = f.read(min(read_bytes, remaining))
                if not block:
                    fail(f"{path} ends early (at row {start:,}); the file is truncated: rebuild the datastore")
                digest.update(block)
                if on_block is not None:
                    on_block(done, block)
                done += len(block)
                remaining -= len(block)
                if progress is not None:
                    progress(len(block))
            out.append(digest.hexdigest())
    return out


def datastore_checksums(keys_path: Path, vals_path: Path, keys_offset: int, rows: int, row_bytes: int) -> dict:
    """The ``meta["checksums"]`` record of finished ``keys.npy``/``vals.npy`` files."""
    per_chunk = keys_rows_per_chunk(row_bytes)
    return {
        "algorithm": ALGORITHM,
        "vals_sha256": sha256_file(vals_path),
        "keys_rows_per_chunk": per_chunk,
        "keys_chunk_sha256": chunk_checksums(keys_path, keys_offset, row_bytes, rows, per_chunk),
    }


def _recorded(meta: dict, meta_path: Path) -> dict | None:
    record = meta.get("checksums")
    if record is None:
        return None
    if not isinstance(record, dict) or record.get("algorithm") != ALGORITHM:
        fail(f"{meta_path} has an unreadable 'checksums' record; rebuild the datastore with trime-build-datastore")
    return record


def verify_vals(vals_path: Path, meta: dict, meta_path: Path) -> bool:
    """Fail with one line unless vals.npy has the recorded sha256; False if the datastore predates checksums."""
    record = _recorded(meta, meta_path)
    if record is None:
        return False
    if sha256_file(vals_path) != record.get("vals_sha256"):
        fail(
            f"{vals_path} does not match the sha256 recorded in {meta_path.name}: the values are damaged "
            "or from another build; rebuild the datastore with trime-build-datastore"
        )
    return True


def verify_keys(keys_path: Path, meta: dict, meta_path: Path, data_offset: int, row_bytes: int,
                show_progress: bool = True, key_dtype=None) -> int:
    """Check every chunk of keys.npy against meta.json, and (with ``key_dtype``) that every key is finite.

    Returns the number of chunks checked. Damage is reported before non-finite keys.
    """
    from tqdm import tqdm

    record = _recorded(meta, meta_path)
    if record is None:
        fail(f"{meta_path} records no checksums (a datastore built before they were added); rebuild it to verify")
    rows, per_chunk = int(meta["count"]), int(record.get("keys_rows_per_chunk") or 0)
    expected = record.get("keys_chunk_sha256")
    if per_chunk < 1 or not isinstance(expected, list) or len(expected) != -(-rows // per_chunk):
        fail(f"{meta_path}: the keys checksums do not cover {rows:,} rows; rebuild the datastore")
    with tqdm(total=rows * row_bytes, unit="B", unit_scale=True, desc=f"verify {keys_path.name}",
              disable=not show_progress, file=sys.stderr) as bar:
        nonfinite: list[int] = []

        def check_finite(offset: int, block: bytes) -> None:
            if key_dtype is not None and not nonfinite:
                bad = np.flatnonzero(~np.isfinite(np.frombuffer(block, dtype=key_dtype)))
                if bad.size:
                    nonfinite.append((offset + int(bad[0]) * np.dtype(key_dtype).itemsize) // row_bytes)

        actual = chunk_checksums(keys_path, data_offset, row_bytes, rows, per_chunk, progress=bar.update,
                                 on_block=check_finite)
    for chunk, (got, want) in enumerate(zip(actual, expected)):
        if got != want:
            first, last = chunk * per_chunk, min(rows, (chunk + 1) * per_chunk) - 1
            fail(
                f"{keys_path} rows {first:,}..{last:,} do not match their sha256 in {meta_path.name} "
                f"(chunk {chunk} of {len(expected)}): the keys are damaged; rebuild the datastore"
            )
    if nonfinite:
        fail(nonfinite_keys_message(keys_path, nonfinite[0]))
    return len(expected)


def nonfinite_keys_message(source: object, row: int) -> str:
    """The error of a stored key that is NaN or inf (written by a model that gives non-finite keys)."""
    return (
        f"{source} row {row:,} holds a NaN or inf key: the model that built it gives non-finite keys "
        "(likely weights from a diverged training run); rebuild the datastore from a finite checkpoint"
    )
