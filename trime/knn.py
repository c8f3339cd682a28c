"""Search results of the external memory (a FAISS datastore), shared by the datastore and evaluation."""

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KnnResults:
    """FAISS results for the N scored rows of a batch: similarity scores (higher is closer)."""

    scores: Tensor  # (N, k) fp32: inner product, or -squared L2 distance
    labels: Tensor  # (N, k) int64 value (next token) of each neighbour
    valid: Tensor  # (N, k) bool, False for FAISS's -1 padding

    def top(self, k: int | None) -> "KnnResults":
        if k is None or k >= self.scores.shape[1]:
            return self
        return KnnResults(self.scores[:, :k], self.labels[:, :k], self.valid[:, :k])

    def to(self, device: torch.device) -> "KnnResults":
        return KnnResults(self.scores.to(device), self.labels.to(device), self.valid.to(device))

    @classmethod
    def cat(cls, results: list["KnnResults"]) -> "KnnResults":
        """The rows of several results, in order."""
        return cls(
            torch.cat([r.scores for r in results]),
            torch.cat([r.labels for r in results]),
            torch.cat([r.valid for r in results]),
        )
