"""Search results of the external memory (a FAISS datastore), shared by the datastore and evaluation.

Memory: a search returns k hits per query (scores, ids, labels, masks: about 30 bytes a
hit while they are built). Evaluation therefore searches and scores at most
:data:`KNN_CHUNK_HITS` hits at a time (:func:`knn_chunk_rows` rows of k hits), so its peak
memory is O(chunk x k) whatever the batch size (``--max-tokens``).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

KNN_CHUNK_HITS = 1 << 21  # hits searched and scored at once (~60 MB while built)


def knn_chunk_rows(k: int) -> int:
    """Queries per search chunk for ``k`` neighbours each (at least 1)."""
    return max(1, KNN_CHUNK_HITS // max(1, k))


@dataclass
class KnnResults:
    """FAISS results for the N scored rows of a batch: similarity scores (higher is closer)."""

    scores: Tensor  # (N, k) fp32: inner product, or -squared L2 distance
    labels: Tensor  # (N, k) int64 value (next token) of each neighbour
    valid: Tensor  # (N, k) bool, False for FAISS's -1 padding
    ids: Tensor | None = None  # (N, k) int64 datastore row of each neighbour (-1: padding); None when not kept

    def top(self, k: int | None) -> "KnnResults":
        if k is None or k >= self.scores.shape[1]:
            return self
        return KnnResults(self.scores[:, :k], self.labels[:, :k], self.valid[:, :k],
                          None if self.ids is None else self.ids[:, :k])

    def rows(self, start: int, stop: int) -> "KnnResults":
        """The results of query rows ``start:stop`` (views, no copy)."""
        return KnnResults(self.scores[start:stop], self.labels[start:stop], self.valid[start:stop],
                          None if self.ids is None else self.ids[start:stop])

    def to(self, device: torch.device) -> "KnnResults":
        return KnnResults(self.scores.to(device), self.labels.to(device), self.valid.to(device),
                          None if self.ids is None else self.ids.to(device))

    @classmethod
    def cat(cls, results: list["KnnResults"]) -> "KnnResults":
        """The rows of several results, in order (rows only when every part has them)."""
        ids = None if any(r.ids is None for r in results) else torch.cat([r.ids for r in results])
        return cls(
            torch.cat([r.scores for r in results]),
            torch.cat([r.labels for r in results]),
            torch.cat([r.valid for r in results]),
            ids,
        )
