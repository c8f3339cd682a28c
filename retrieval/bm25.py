"""BM25 search of every training segment against all the others (for TrimeLM_ext batches).

The corpus is a list of segments, each a 1-D array of token ids. Every segment is used
as a query, in full, against all other segments, and the top-k hits are kept. Three
backends share one interface (:meth:`BlockSearcher.search`):

* ``scipy`` (default, fastest by measurement, see ``bench/results/bm25.md``): the scores
  of a block of queries are one matrix product ``Q @ W.T`` where ``Q`` holds the
  query term counts and ``W`` the BM25 document weights. Frequent terms (in at least
  ``dense_df_fraction`` of the segments) go through a dense BLAS product, the others
  through a sparse ``csr @ csr`` product; the split only changes speed, not scores.
* ``bm25s``: the ``bm25s`` library's index and ``get_scores_from_ids``, one query at a
  time. Lucene idf only.
* ``rank-bm25``: ``rank_bm25.BM25Okapi``, pure Python; the reference for small corpora.

Scoring (the same in all backends, up to a constant factor that does not change
rankings):

    score(q, d) = sum over query tokens t, with repetition, of
                  idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))

Summing over query tokens with repetition is what ``rank_bm25``'s ``get_scores`` does and
what pyserini's bag-of-words query does (each term's clause is boosted by its count).
Two idf variants are explicit:

* ``lucene``: ``log(1 + (N - n + 0.5) / (n + 0.5))`` (Lucene, pyserini, bm25s), always > 0;
* ``okapi``: ``rank_bm25.BM25Okapi``'s ``log((N - n + 0.5) / (n + 0.5))``, where negative
  values (terms in more than half of the segments) are replaced by
  ``epsilon * mean(idf over all terms)``.

Known differences from the original's pyserini/Lucene run: there is no English
analyzer (no stemming, stopword list or punctuation removal: BM25 runs over the
dictionary's word ids), Lucene >= 8 drops the constant ``(k1 + 1)`` factor, and Lucene
stores document lengths lossily in one byte; we use exact lengths.

Hits: the query segment itself is excluded by id; hits are sorted by score, ties broken
by the smaller id; documents with score <= 0 (sharing no term with the query) are not
hits and are returned as id ``-1`` (Lucene likewise only returns matching documents).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp

from trime.errors import fail

IDF_VARIANTS = ("lucene", "okapi")
BACKENDS = ("scipy", "bm25s", "rank-bm25")
DEFAULT_BACKEND = "scipy"
NO_HIT = -1


@dataclass(frozen=True)
class BM25Params:
    """BM25 parameters. Defaults are Lucene's ``BM25Similarity`` defaults."""

    k1: float = 1.2
    b: float = 0.75
    idf: str = "lucene"
    epsilon: float = 0.25  # only used by idf="okapi" (rank_bm25's floor factor)

    def __post_init__(self) -> None:
        if self.idf not in IDF_VARIANTS:
            fail(f"--idf must be one of {', '.join(IDF_VARIANTS)}, got {self.idf!r}")
        if not (self.k1 >= 0 and math.isfinite(self.k1)):
            fail(f"--k1 must be a finite number >= 0, got {self.k1}")
        if not 0 <= self.b <= 1:
            fail(f"--b must be in [0, 1], got {self.b}")

    def as_dict(self) -> dict[str, object]:
        """JSON-ready description (``epsilon`` only where it matters)."""
        out = asdict(self)
        if self.idf != "okapi":
            del out["epsilon"]
        return out


# pyserini's LuceneSearcher defaults, which the original TRIME batches used.
LUCENE_PRESET = BM25Params(k1=0.9, b=0.4, idf="lucene")


class Segments:
    """Token-id segments stored flat: segment ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, vocab_size: int | None = None) -> None:
        self.tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[0] != 0 or self.offsets[-1] != len(self.tokens):
            raise ValueError("offsets must start at 0 and end at len(tokens)")
        if np.any(np.diff(self.offsets) < 0):
            raise ValueError("offsets must be non-decreasing")
        if len(self.tokens) and self.tokens.min() < 0:
            raise ValueError("token ids must be >= 0")
        max_id = int(self.tokens.max()) + 1 if len(self.tokens) else 0
        self.vocab_size = max(max_id, vocab_size or 0)

    @classmethod
    def from_arrays(cls, arrays: Sequence[Sequence[int]], vocab_size: int | None = None) -> Segments:
        """Build from a list of token-id arrays (one per segment)."""
        lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        tokens = np.concatenate([np.asarray(a, dtype=np.int64) for a in arrays]) if len(arrays) else np.zeros(0, np.int64)
        return cls(tokens, offsets, vocab_size)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        """Number of tokens of each segment (BM25's document length)."""
        return np.diff(self.offsets)

    def to_lists(self) -> list[list[int]]:
        """Python lists of ids, for the pure-Python backends."""
        return [self[i].tolist() for i in range(len(self))]


def term_frequencies(segments: Segments, dtype: type = np.float32) -> sp.csr_matrix:
    """Segment x term count matrix (CSR, sorted indices)."""
    indptr = np.zeros(len(segments) + 1, dtype=np.int64)
    cols: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    for i in range(len(segments)):
        terms, c = np.unique(segments[i], return_counts=True)
        cols.append(terms)
        counts.append(c)
        indptr[i + 1] = indptr[i] + len(terms)
    indices = np.concatenate(cols).astype(np.int32) if cols else np.zeros(0, np.int32)
    data = np.concatenate(counts).astype(dtype) if counts else np.zeros(0, dtype)
    return sp.csr_matrix((data, indices, indptr), shape=(len(segments), segments.vocab_size))


def idf_values(doc_freq: np.ndarray, num_docs: int, params: BM25Params) -> np.ndarray:
    """Per-term idf (float64) for the chosen variant; terms that never occur get 0."""
    df = doc_freq.astype(np.float64)
    present = doc_freq > 0
    idf = np.zeros(len(doc_freq), dtype=np.float64)
    if params.idf == "lucene":
        idf[present] = np.log1p((num_docs - df[present] + 0.5) / (df[present] + 0.5))
    else:  # rank_bm25.BM25Okapi._calc_idf, term for term
        raw = np.log(num_docs - df[present] + 0.5) - np.log(df[present] + 0.5)
        floor = params.epsilon * raw.mean() if len(raw) else 0.0
        idf[present] = np.where(raw < 0, floor, raw)
    return idf


def bm25_weights(tf: sp.csr_matrix, params: BM25Params, dtype: type = np.float32) -> sp.csr_matrix:
    """Document weights ``W[d, t] = idf(t) * tf (k1 + 1) / (tf + k1 (1 - b + b |d| / avgdl))``."""
    num_docs = tf.shape[0]
    doc_len = np.asarray(tf.sum(axis=1), dtype=np.float64).ravel()
    avgdl = doc_len.mean() if num_docs else 1.0
    avgdl = avgdl if avgdl > 0 else 1.0
    doc_freq = np.bincount(tf.indices, minlength=tf.shape[1])
    idf = idf_values(doc_freq, num_docs, params)
    counts = tf.data.astype(np.float64)
    norm = params.k1 * (1.0 - params.b + params.b * doc_len / avgdl)
    row_norm = np.repeat(norm, np.diff(tf.indptr))
    data = idf[tf.indices] * counts * (params.k1 + 1.0) / (counts + row_norm)
    return sp.csr_matrix((data.astype(dtype), tf.indices.copy(), tf.indptr.copy()), shape=tf.shape)


def select_top_k(scores: np.ndarray, query_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` hits per row of a dense ``(queries, segments)`` score block.

    ``scores`` is modified in place (the query's own column is set to -inf). Returns
    ``(ids, hit_scores)`` of shape ``(queries, k)``, sorted by score, ties by smaller id;
    slots without a positive-score hit hold id -1 and score 0.
    """
    n_rows, n_docs = scores.shape
    ids = np.full((n_rows, k), NO_HIT, dtype=np.int64)
    hit_scores = np.zeros((n_rows, k), dtype=scores.dtype)
    if n_rows == 0:
        return ids, hit_scores
    scores[np.arange(n_rows), query_ids] = -np.inf
    slots = min(k, n_docs - 1)
    if slots <= 0:
        return ids, hit_scores
    cand = np.argpartition(scores, n_docs - slots, axis=1)[:, n_docs - slots :]
    cand_scores = np.take_along_axis(scores, cand, axis=1)
    threshold = cand_scores.min(axis=1)
    # argpartition picks arbitrarily among entries equal to the threshold; redo those
    # rows so that ties go to the smaller ids (only positive thresholds matter: hits <= 0 are dropped)
    tied = np.flatnonzero((threshold > 0) & ((scores >= threshold[:, None]).sum(axis=1) > slots))
    for r in tied:
        above = np.flatnonzero(scores[r] > threshold[r])
        equal = np.flatnonzero(scores[r] == threshold[r])
        cand[r] = np.concatenate([above, equal[: slots - len(above)]])
        cand_scores[r] = scores[r, cand[r]]
    order = np.lexsort((cand, -cand_scores), axis=1)
    cand = np.take_along_axis(cand, order, axis=1)
    cand_scores = np.take_along_axis(cand_scores, order, axis=1)
    valid = cand_scores > 0
    ids[:, :slots] = np.where(valid, cand, NO_HIT)
    hit_scores[:, :slots] = np.where(valid, cand_scores, 0)
    return ids, hit_scores


class BlockSearcher:
    """Common driver: score query blocks densely (one row per query) and keep the top-k."""

    backend = "abstract"

    def __init__(self, num_segments: int, block_size: int = 256) -> None:
        if block_size < 1:
            fail(f"--block-size must be >= 1, got {block_size}")
        self.num_segments = num_segments
        self.block_size = block_size

    def score_block(self, start: int, end: int) -> np.ndarray:
        """Scores of queries ``start..end-1`` against all segments, shape ``(end - start, N)``."""
        raise NotImplementedError

    def search(self, start: int, end: int, k: int, progress: Callable[[int], object] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` hits ``(ids, scores)`` for queries ``start..end-1``, in blocks of ``block_size``.

        ``progress(n)`` is called after each block with its number of queries.
        """
        id_parts, score_parts = [], []
        for lo in range(start, end, self.block_size):
            hi = min(lo + self.block_size, end)
            block = self.score_block(lo, hi)
            ids, scores = select_top_k(block, np.arange(lo, hi), k)
            id_parts.append(ids)
            score_parts.append(scores)
            if progress is not None:
                progress(hi - lo)
        if not id_parts:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        return np.concatenate(id_parts), np.concatenate(score_parts)


def _has_threadpoolctl() -> bool:
    try:
        import threadpoolctl  # noqa: F401  (comes with scikit-learn)
    except ImportError:
        return False
    return True


class ScipySearcher(BlockSearcher):
    """Blocked sparse/dense matrix products; exact BM25, never an N x N matrix.

    ``dense_df_fraction``: terms present in at least this fraction of segments are
    scored with a dense BLAS product (cheaper for them: cost N per query instead of
    df per query, but at BLAS speed); ``dense_max_bytes`` caps that dense weight matrix.
    ``dtype=np.float64`` gives scores bit-close to rank_bm25's (used by the tests).
    ``overlap`` runs the dense and sparse products of consecutive blocks concurrently
    (see :meth:`search`). The split depends only on the corpus and ``dense_df_fraction``,
    so results are deterministic; float32 rounding can differ from float64 at near-ties.
    """

    backend = "scipy"

    def __init__(
        self,
        segments: Segments,
        params: BM25Params,
        block_size: int = 256,
        dtype: type = np.float32,
        dense_df_fraction: float = 0.06,
        dense_max_bytes: int = 2 << 30,
        overlap: bool = True,
    ) -> None:
        super().__init__(len(segments), block_size)
        self.params = params
        self.dense_df_fraction = dense_df_fraction
        self.overlap = overlap and _has_threadpoolctl()
        self.dtype = np.dtype(dtype)
        tf = term_frequencies(segments, dtype=self.dtype)
        weights = bm25_weights(tf, params, dtype=self.dtype)
        doc_freq = np.bincount(tf.indices, minlength=tf.shape[1])
        n = max(self.num_segments, 1)
        max_dense = int(dense_max_bytes // (self.dtype.itemsize * n))
        by_df = np.argsort(-doc_freq, kind="stable")
        dense_terms = by_df[: max_dense][doc_freq[by_df[: max_dense]] >= max(dense_df_fraction * n, 1)]
        dense_terms = np.sort(dense_terms)
        sparse_mask = doc_freq > 0
        sparse_mask[dense_terms] = False
        sparse_terms = np.flatnonzero(sparse_mask)
        self.num_dense_terms = len(dense_terms)
        self.num_sparse_terms = len(sparse_terms)
        # queries: term counts (rows of tf); documents: BM25 weights, transposed for the product
        self._q_dense = tf[:, dense_terms].tocsr()
        self._w_dense_t = np.ascontiguousarray(weights[:, dense_terms].T.toarray())
        self._q_sparse = tf[:, sparse_terms].tocsr()
        self._w_sparse_t = weights[:, sparse_terms].T.tocsr()
        self._w_sparse_t.sort_indices()

    def _sparse_part(self, start: int, end: int) -> np.ndarray:
        return (self._q_sparse[start:end] @ self._w_sparse_t).toarray()

    def _dense_part(self, start: int, end: int) -> np.ndarray | None:
        if not self.num_dense_terms:
            return None
        return self._q_dense[start:end].toarray() @ self._w_dense_t

    def score_block(self, start: int, end: int) -> np.ndarray:
        scores = self._sparse_part(start, end)
        dense = self._dense_part(start, end)
        if dense is not None:
            scores += dense
        return scores

    def search(self, start: int, end: int, k: int, progress: Callable[[int], object] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`BlockSearcher.search`, but overlapped on two cores when ``overlap`` is set.

        scipy's sparse product holds the GIL and is single-threaded, BLAS releases it: a
        worker thread runs the dense product of block i+1 (BLAS limited to one thread)
        while this thread finishes block i's top-k and computes block i+1's sparse part.
        """
        if not self.overlap or self.num_dense_terms == 0:
            return super().search(start, end, k, progress)
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        blocks = [(lo, min(lo + self.block_size, end)) for lo in range(start, end, self.block_size)]
        id_parts, score_parts = [], []
        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self._dense_part, *blocks[0]) if blocks else None
            for i, (lo, hi) in enumerate(blocks):
                scores = self._sparse_part(lo, hi)
                scores += pending.result()
                if i + 1 < len(blocks):
                    pending = pool.submit(self._dense_part, *blocks[i + 1])
                ids, hit_scores = select_top_k(scores, np.arange(lo, hi), k)
                id_parts.append(ids)
                score_parts.append(hit_scores)
                if progress is not None:
                    progress(hi - lo)
        if not id_parts:
            return np.zeros((0, k), np.int64), np.zeros((0, k), self.dtype)
        return np.concatenate(id_parts), np.concatenate(score_parts)


class Bm25sSearcher(BlockSearcher):
    """The ``bm25s`` library (method "lucene"), one query at a time; idf="lucene" only.

    bm25s's term-frequency part omits the ``(k1 + 1)`` factor, so its scores are ours
    divided by ``k1 + 1``; rankings are identical.
    """

    backend = "bm25s"

    def __init__(self, segments: Segments, params: BM25Params, block_size: int = 256) -> None:
        super().__init__(len(segments), block_size)
        if params.idf != "lucene":
            fail("--backend bm25s supports only --idf lucene; use --backend scipy for --idf okapi")
        import bm25s

        # bm25s wants contiguous term ids 0..U-1, so remap the corpus vocabulary
        vocab, compact = np.unique(segments.tokens, return_inverse=True)
        self._compact = Segments(compact.astype(np.int64), segments.offsets)
        corpus_ids = self._compact.to_lists()
        self._retriever = bm25s.BM25(k1=params.k1, b=params.b, method="lucene", idf_method="lucene")
        self._retriever.index((corpus_ids, {i: i for i in range(len(vocab))}), show_progress=False)

    def score_block(self, start: int, end: int) -> np.ndarray:
        rows = []
        for i in range(start, end):
            query = self._compact[i]
            if len(query) == 0:
                rows.append(np.zeros(self.num_segments, dtype=np.float32))
            else:
                rows.append(np.asarray(self._retriever.get_scores_from_ids(query.tolist()), dtype=np.float32))
        return np.stack(rows) if rows else np.zeros((0, self.num_segments), np.float32)


def rank_bm25_model(corpus: list[list[int]], params: BM25Params):
    """A ``rank_bm25.BM25Okapi`` over ``corpus``; with idf="lucene" its idf is replaced by Lucene's."""
    from rank_bm25 import BM25Okapi

    class LuceneIdfBM25(BM25Okapi):
        """BM25Okapi scoring with Lucene's idf."""

        def _calc_idf(self, nd: dict) -> None:
            for word, freq in nd.items():
                self.idf[word] = math.log(1.0 + (self.corpus_size - freq + 0.5) / (freq + 0.5))

    cls = LuceneIdfBM25 if params.idf == "lucene" else BM25Okapi
    return cls(corpus, k1=params.k1, b=params.b, epsilon=params.epsilon)


class RankBM25Searcher(BlockSearcher):
    """``rank_bm25.BM25Okapi`` (pure Python): the reference implementation; small corpora only."""

    backend = "rank-bm25"

    def __init__(self, segments: Segments, params: BM25Params, block_size: int = 256) -> None:
        super().__init__(len(segments), block_size)
        self._queries = segments.to_lists()
        self._model = rank_bm25_model(self._queries, params)

    def score_block(self, start: int, end: int) -> np.ndarray:
        return np.stack([np.asarray(self._model.get_scores(self._queries[i]), dtype=np.float64) for i in range(start, end)])


def make_searcher(backend: str, segments: Segments, params: BM25Params, block_size: int = 256) -> BlockSearcher:
    """Build the index for ``backend`` (one of :data:`BACKENDS`) over ``segments``."""
    if backend == "scipy":
        return ScipySearcher(segments, params, block_size=block_size)
    if backend == "bm25s":
        return Bm25sSearcher(segments, params, block_size=block_size)
    if backend == "rank-bm25":
        if len(segments) > 5000:
            print(
                f"trime-bm25-batches: warning: rank-bm25 is a slow pure-Python reference; "
                f"{len(segments)} segments may take hours (use --backend scipy)",
                file=sys.stderr,
            )
        return RankBM25Searcher(segments, params, block_size=block_size)
    fail(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def planted_topic_segments(
    num_topics: int = 8, per_topic: int = 40, length: int = 120, seed: int = 0
) -> tuple[Segments, np.ndarray]:
    """A known-answer corpus for checking that BM25 plans group topics: ``(segments, topic of each)``.

    Each segment mixes shared stopwords (ids 0..19) with words of its topic's own 60-word
    vocabulary; segments are shuffled so that ids do not encode the topic.
    """
    rng = np.random.default_rng(seed)
    stop = np.arange(20)
    arrays, topic = [], []
    for t in range(num_topics):
        vocab = 20 + 60 * t + np.arange(60)
        for _ in range(per_topic):
            arrays.append(np.where(rng.random(length) < 0.5, rng.choice(stop, length), rng.choice(vocab, length)))
            topic.append(t)
    perm = rng.permutation(len(arrays))
    return Segments.from_arrays([arrays[i] for i in perm]), np.array(topic)[perm]
