"""``trime-eval --cache-dir``: forward passes and kNN hits of a split, kept on disk between runs.

Nothing cached depends on a tuned value (temperature, lambda, memory size): a forward
pass depends on the weights, the data, the windows, the batch size and the precision;
kNN hits also on the datastore and the search settings (k, nprobe, exact, backend).
Each entry is named by the sha256 of exactly those inputs, so several ``trime-eval``
runs of one model (``--memory none``, ``local``, ``long``, ``--knnlm`` ...) forward
and search each split once, and a changed checkpoint, datastore or flag misses the
cache instead of reusing stale results.

Entries are one ``torch.save`` file each (tensors, lists and numbers only, loaded with
``weights_only=True``), written atomically. Size: about the split's tokens x
(tokens_per_sample / new tokens) x dim x 4 bytes for a forward pass (e.g. 217k tokens,
256-d, 4/3 overhead: 300 MB) and tokens x k x 13 bytes for kNN hits.
"""

import hashlib
import json
from pathlib import Path

import torch

from trime.adapters.base import WindowBatch
from trime.io_utils import atomic_path, file_identity, identity_key
from trime.knn import KnnResults

FORMAT = 1


def split_files_identity(data_dir: Path, split: str) -> list:
    """Identities of the data files of ``split`` (fairseq ``valid.bin/.idx``, text ``valid.txt``, ...)."""
    files = sorted(p for p in Path(data_dir).iterdir() if p.is_file() and split in p.name.split("."))
    return [[p.name, identity_key(file_identity(p))] for p in files]


def entry_key(**inputs) -> str:
    """sha256 of the JSON of everything an entry depends on."""
    text = json.dumps({"format": FORMAT, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class EvalCache:
    """One cache directory; ``forward_key`` / ``knn_key`` name the entries, ``load_*`` / ``save_*`` move them."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, kind: str, key: str) -> Path:
        return self.directory / f"{kind}-{key}.pt"

    def _load(self, path: Path) -> dict | None:
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # damaged or from another torch: recompute (the entry is replaced atomically)
            return None

    def _save(self, path: Path, payload: dict) -> None:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)

    def load_forward(self, key: str) -> tuple[list[WindowBatch], float] | None:
        """(batches, seconds the forward passes took when computed), or None."""
        payload = self._load(self._path("forward", key))
        if payload is None:
            return None
        return [WindowBatch(**fields) for fields in payload["batches"]], float(payload["seconds"])

    def save_forward(self, key: str, batches: list[WindowBatch], seconds: float) -> None:
        self._save(self._path("forward", key), {"batches": [dict(b.__dict__) for b in batches], "seconds": seconds})

    def load_knn(self, key: str) -> tuple[list[KnnResults], float] | None:
        """(hits of every batch, seconds the searches took when computed), or None."""
        payload = self._load(self._path("knn", key))
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
