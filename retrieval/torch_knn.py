"""Exact k-nearest-neighbour search with torch matrix products (no FAISS), chunked over the keys.

``trime-eval --knn-search torch`` uses it instead of ``index.faiss``: the datastore's keys
are copied once onto the model's device, in the compute dtype (fp16/bf16 on a GPU, fp32 on
the CPU), and every search scores the queries against all keys, one chunk of keys at a
time, so the score matrix never exceeds ``queries x key_chunk``. Each chunk's top-k is
taken in fp32 and merged with the running top-k, so the result is exact up to the
rounding of the products (fp32 accumulation; with fp16/bf16 inputs the products are
returned in fp32 where torch's ``mm(..., out_dtype=float32)`` exists, else rounded to the
input dtype before the merge). This is the GPU search of the original's ``--knn-exact``
at FAISS-GPU speed on a machine without faiss-gpu; on a CPU it is a brute-force reference.

Scores follow :func:`trime.retrieval.faiss_index.search`: the inner product (``ip``), or
minus the squared L2 distance (``l2``); higher is closer. When fewer than ``k`` keys exist,
the missing neighbours have id -1 and score -inf, as FAISS pads.
"""

from __future__ import annotations

import numpy as np
import torch

from trime.errors import fail
from trime.retrieval.faiss_index import METRICS

# Bytes of fp32 scores one chunk may hold (queries x keys); bounds the search's working memory.
DEFAULT_SCORE_BYTES = 1 << 30
# Keys copied to the device per transfer when loading (bounds the host-side fp32/fp16 staging copy).
LOAD_ROWS = 1 << 18
COMPUTE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_compute_dtype(device: torch.device, key_dtype: np.dtype) -> torch.dtype:
    """fp16 keys stay fp16 on a GPU; everything is fp32 on the CPU (half matmuls are slow there)."""
    if device.type == "cpu":
        return torch.float32
    return torch.float16 if np.dtype(key_dtype) == np.float16 else torch.float32


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are the same device when the current device is 0."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def _check_device_memory(device: torch.device, needed: int) -> None:
    """One-line error if the keys cannot fit on the GPU (before anything is allocated)."""
    free, _ = torch.cuda.mem_get_info(device)
    if needed > free:
        fail(
            f"--knn-search torch needs {needed / 2**30:.1f} GiB on {device} for the datastore's keys but "
            f"{free / 2**30:.1f} GiB are free; use --knn-search faiss (an IVF-PQ index) or a smaller datastore"
        )


# (device type, dtype) -> whether torch.mm(..., out_dtype=float32) works there (tried once)
_MM_OUT_DTYPE: dict[tuple[str, torch.dtype], bool] = {}


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """a @ b with fp32 output; (result, True) if the product itself was returned in fp32."""
    if a.dtype == torch.float32:
        return a @ b, True
    key = (a.device.type, a.dtype)
    if _MM_OUT_DTYPE.get(key, True):
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _MM_OUT_DTYPE[key] = True
            return out, True
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE[key] = False
    return (a @ b).float(), False


class TorchExactSearch:
    """All keys resident on ``device``; :meth:`search` returns the exact top-k of each query.

    ``keys``: (n, d) array, memmap or tensor (fp16 or fp32). ``key_chunk``: keys scored per
    step (default: as many as ``score_bytes`` of fp32 scores allow for the query batch).
    """

    def __init__(
        self,
        keys,
        metric: str = "ip",
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        key_chunk: int | None = None,
        score_bytes: int = DEFAULT_SCORE_BYTES,
    ) -> None:
        if metric not in METRICS:
            fail(f"exact torch search: metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if len(keys.shape) != 2 or keys.shape[0] == 0:
            fail(f"exact torch search needs a non-empty (count, dim) key matrix, got shape {tuple(keys.shape)}")
        self.device = torch.device(device)
        key_np_dtype = np.float32 if isinstance(keys, torch.Tensor) else keys.dtype  # arrays and RowConcat views
        self.dtype = dtype or default_compute_dtype(self.device, key_np_dtype)
        self.metric = metric
        self.count, self.dim = int(keys.shape[0]), int(keys.shape[1])
        self.key_chunk = key_chunk
        self.score_bytes = int(score_bytes)
        if self.device.type == "cuda" and not isinstance(keys, torch.Tensor):
            _check_device_memory(self.device, self.count * self.dim * torch.tensor([], dtype=self.dtype).element_size())
        # a tensor already on the device in the compute dtype is used as is (no second copy)
        adopt = isinstance(keys, torch.Tensor) and _same_device(keys.device, self.device)
        adopt = adopt and keys.dtype == self.dtype and keys.is_contiguous()
        self.keys = keys if adopt else torch.empty((self.count, self.dim), dtype=self.dtype, device=self.device)
        # squared norms in fp32 for l2 (of the keys as stored on the device, so scores are consistent)
        self.sq_norms = torch.empty(self.count, dtype=torch.float32, device=self.device) if metric == "l2" else None
        for lo in range(0, self.count, LOAD_ROWS):
            if adopt:
                if self.sq_norms is not None:
                    self.sq_norms[lo : lo + LOAD_ROWS] = keys[lo : lo + LOAD_ROWS].float().pow(2).sum(-1)
                continue
            block = keys[lo : lo + LOAD_ROWS]
            if isinstance(block, np.ndarray):  # a memmap slice is read-only: copy it (one block at a time)
                block = torch.from_numpy(np.require(block, requirements=["C", "W"]))
            block = block.to(device=self.device, dtype=self.dtype, non_blocking=False)
            self.keys[lo : lo + block.shape[0]] = block
            if self.sq_norms is not None:
                self.sq_norms[lo : lo + block.shape[0]] = block.float().pow(2).sum(-1)
        self.fp32_products = self.dtype == torch.float32

    @property
    def nbytes(self) -> int:
        """Device memory held by the keys (and norms)."""
        extra = self.sq_norms.numel() * 4 if self.sq_norms is not None else 0
        return self.keys.numel() * self.keys.element_size() + extra

    def _chunk_rows(self, num_queries: int) -> int:
        if self.key_chunk is not None:
            return max(1, int(self.key_chunk))
        return max(1024, self.score_bytes // (4 * max(1, num_queries)))

    @torch.no_grad()
    def search(self, queries, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores fp32 (q, k), ids int64 (q, k)) on the search device, best first."""
        if k < 1:
            fail(f"--k must be at least 1, got {k}")
        q = torch.from_numpy(np.require(queries, requirements=["C", "W"])) if isinstance(queries, np.ndarray) else queries
        if q.dim() != 2 or q.shape[1] != self.dim:
            fail(f"exact torch search: queries must be (n, {self.dim}), got {tuple(q.shape)}")
        q = q.to(device=self.device, dtype=self.dtype)
        nq = q.shape[0]
        keep = min(k, self.count)
        best_scores = torch.full((nq, 0), float("-inf"), dtype=torch.float32, device=self.device)
        best_ids = torch.empty((nq, 0), dtype=torch.int64, device=self.device)
        rows = self._chunk_rows(nq)
        for lo in range(0, self.count, rows):
            chunk = self.keys[lo : lo + rows]
            scores, fp32 = _mm_fp32(q, chunk.T)
            self.fp32_products = self.fp32_products or fp32
            if self.sq_norms is not None:  # -|q - x|^2 = 2 q.x - |x|^2 - |q|^2 (|q|^2 added at the end)
                scores.mul_(2.0).sub_(self.sq_norms[lo : lo + rows])
            top_scores, top_idx = scores.topk(min(keep, scores.shape[1]), dim=1)
            merged_scores = torch.cat([best_scores, top_scores], dim=1)
            merged_ids = torch.cat([best_ids, top_idx + lo], dim=1)
            if lo > 0:  # keep the best `keep`, sorted (also while fewer than `keep` have been seen)
                merged_scores, pos = merged_scores.topk(min(keep, merged_scores.shape[1]), dim=1)
                merged_ids = merged_ids.gather(1, pos)
            best_scores, best_ids = merged_scores, merged_ids
        if self.sq_norms is not None:
            best_scores = best_scores - q.float().pow(2).sum(-1, keepdim=True)
        if keep < k:  # FAISS's padding for missing neighbours
            pad = k - keep
            best_scores = torch.cat([best_scores, best_scores.new_full((nq, pad), float("-inf"))], dim=1)
            best_ids = torch.cat([best_ids, best_ids.new_full((nq, pad), -1)], dim=1)
        return best_scores, best_ids

    @torch.no_grad()
    def rescore(self, queries, ids: torch.Tensor, query_chunk: int = 256) -> torch.Tensor:
        """fp32 scores of each query against the keys ``ids`` (q, k) as stored on the device (``--knn-exact``)."""
        q = torch.from_numpy(np.require(queries, requirements=["C", "W"])) if isinstance(queries, np.ndarray) else queries
        q = q.to(device=self.device, dtype=torch.float32)
        ids = ids.to(self.device).clamp(min=0)
        out = torch.empty(ids.shape, dtype=torch.float32, device=self.device)
        for lo in range(0, ids.shape[0], query_chunk):
            neighbours = self.keys[ids[lo : lo + query_chunk]].float()  # (c, k, d)
            rows = q[lo : lo + query_chunk, None, :]
            if self.metric == "ip":
                out[lo : lo + query_chunk] = (neighbours * rows).sum(-1)
            else:
                out[lo : lo + query_chunk] = -(neighbours - rows).pow(2).sum(-1)
        return out
