"""``trime-eval --cache-dir``: forward passes and kNN hits of a split, kept on disk between runs.

Nothing cached depends on a tuned value (temperature, lambda, memory size): a forward
pass depends on the weights, the data, the windows, the batch size and the precision;
kNN hits also on the datastore and the search settings (k, nprobe, exact, backend).
Each entry is named by the sha256 of exactly those inputs, so several ``trime-eval``
runs of one model (``--memory none``, ``local``, ``long``, ``--knnlm`` ...) forward
and search each split once, and a changed checkpoint, datastore or flag misses the
cache instead of reusing stale results.

Entries are one ``torch.save`` file each (tensors, lists and numbers only, loaded with
``weights_only=True``), written atomically, holding the sha256 of their content
(:func:`payload_checksum`: every tensor's dtype, shape and bytes). An entry that does not
match its checksum, or cannot be read, is reported in one warning line and recomputed, so a
damaged cache costs time, never a wrong perplexity. Size: about the split's tokens x
(tokens_per_sample / new tokens) x dim x 4 bytes for a forward pass (e.g. 217k tokens,
256-d, 4/3 overhead: 300 MB) and tokens x k x 13 bytes for kNN hits.
"""

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trime.adapters.base import WindowBatch
from trime.errors import fail
from trime.io_utils import atomic_path, file_identity, identity_key
from trime.knn import KnnResults

FORMAT = 2  # 2: entries carry a checksum of their content


def split_files_identity(data_dir: Path, split: str) -> list:
    """Identities of the data files of ``split`` (fairseq ``valid.bin/.idx``, text ``valid.txt``, ...)."""
    files = sorted(p for p in Path(data_dir).iterdir() if p.is_file() and split in p.name.split("."))
    return [[p.name, identity_key(file_identity(p))] for p in files]


def entry_key(**inputs) -> str:
    """sha256 of the JSON of everything an entry depends on."""
    text = json.dumps({"format": FORMAT, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def payload_checksum(payload: Any) -> str:
    """sha256 of an entry's content: dict keys, list lengths, numbers, and every tensor's dtype, shape and bytes."""
    digest = hashlib.sha256()
    _digest_into(digest, payload)
    return digest.hexdigest()


def _digest_into(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, without a copy
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)};".encode())
        for key in sorted(value, key=str):
            digest.update(f"{key!r}:".encode())
            _digest_into(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"list {len(value)};".encode())
        for item in value:
            _digest_into(digest, item)
    else:
        digest.update(f"{value!r};".encode())


def _silent(message: str) -> None:
    """The default ``log``: nothing."""


class EvalCache:
    """One cache directory; ``forward_key`` / ``knn_key`` name the entries, ``load_*`` / ``save_*`` move them.

    ``log`` gets one warning line per damaged entry (which is then recomputed).
    """

    def __init__(self, directory: str | Path, log: Callable[[str], None] = _silent) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            fail(f"--cache-dir {self.directory} is a file; pass a folder (it is created if missing)")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log = log

    def _path(self, kind: str, key: str) -> Path:
        return self.directory / f"{kind}-{key}.pt"

    def _load(self, path: Path, fields: tuple[str, ...]) -> dict | None:
        """The payload of entry ``path`` (holding ``fields``) if it matches its checksum; None if absent or damaged."""
        if not path.exists():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            payload = entry["payload"]
            intact = entry["checksum"] == payload_checksum(payload) and all(name in payload for name in fields)
        except Exception:  # truncated, overwritten, or not an entry at all: recompute it
            intact = False
        if not intact:
            self.log(f"warning: --cache-dir entry {path} is damaged (unreadable, or not matching its checksum); recomputing it")
            return None
        return payload

    def _save(self, path: Path, payload: dict) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: a full disk raises OSError
            torch.save({"checksum": payload_checksum(payload), "payload": payload}, f)

    def load_forward(self, key: str) -> tuple[list[WindowBatch], float] | None:
        """(batches, seconds the forward passes took when computed), or None."""
        payload = self._load(self._path("forward", key), ("batches", "seconds"))
        if payload is None:
            return None
        return [WindowBatch(**fields) for fields in payload["batches"]], float(payload["seconds"])

    def save_forward(self, key: str, batches: list[WindowBatch], seconds: float) -> None:
        self._save(self._path("forward", key), {"batches": [dict(b.__dict__) for b in batches], "seconds": seconds})

    def load_knn(self, key: str) -> tuple[list[KnnResults], float] | None:
        """(hits of every batch, seconds the searches took when computed), or None."""
        payload = self._load(self._path("knn", key), ("scores", "labels", "valid", "rows", "seconds"))
        if payload is None:
            return None
        results, start = [], 0
        for rows in payload["rows"]:
            results.append(KnnResults(*(payload[name][start : start + rows] for name in ("scores", "labels", "valid"))))
            start += rows
        return results, float(payload["seconds"])

    def save_knn(self, key: str, results: list[KnnResults], seconds: float) -> None:
        if not results:
            return
        joined = KnnResults.cat(results)
        self._save(
            self._path("knn", key),
            {
                "scores": joined.scores,
                "labels": joined.labels,
                "valid": joined.valid,
                "rows": [int(r.scores.shape[0]) for r in results],
                "seconds": seconds,
            },
        )
