"""What memory did, token by token: each scored token's probabilities and the memory entries behind them.

:class:`Inspector` scores the first tokens of a split exactly as ``trime-eval`` streams them (the
:class:`~trime.eval.engine.Evaluator`'s forward passes and :func:`~trime.eval.memory.score_batch`, from the
split's first batch, so the long-term memory holds what it holds in the evaluation) and yields one
:class:`TokenRecord` per scored token. :func:`inspect_tokens` returns them as a list (notebooks),
:func:`write_jsonl` writes them as JSONL (``trime-eval --dump-neighbors``) and :func:`report_html` renders
one self-contained HTML page of them (``trime-eval --report-html``).

What a record holds. P(y) of :mod:`trime.eval.memory` is a sum of parts, one per memory entry:

    P(y) = a Z_t p_tok(y) / D  +  sum_{j in joint, y_j = y} a e^{s_j} / D
           + lmbda sum_{j in hits, v_j = y} softmax_j(score_j / interp_temp)
           + cache_lmbda sum_{j in cache, y_j = y} softmax_j(s_j)

with D = Z_t + sum_{j in joint} e^{s_j} the joint softmax's normaliser and a = 1 - lmbda - cache_lmbda
its weight in the mixture (plus cache_lmbda where the cache is empty: it then predicts P_joint). So every
entry j (a key of the window: ``local``; of the FIFO: ``long``; a datastore neighbour: ``external``) adds a
*weight* to the probability of its value token. A record gives the token's final probability (``prob``,
``log_prob``: the numbers ``trime-eval`` scores), the model's own (``lm_prob``: ``--memory none``'s), the
part that came from memory (``memory_prob``, as ``trime-generate --jsonl`` reports it), the share of the
whole next-token distribution that memory holds (``memory_mass``), each level's part of ``prob``
(``levels``: ``local``, ``long`` and ``external`` in the joint softmax, ``knn`` for kNN-LM's
interpolation, ``cache`` for the continuous cache; they sum to ``memory_prob``), the level of the largest
part (``top_level``) and the entries of largest weight (``neighbors``). Local and long-term entries point
into the evaluated split (stream position and its surrounding text); datastore neighbours point to
their origin (:meth:`~trime.retrieval.datastore.Datastore.origins`, :func:`~trime.retrieval.datastore.snippets`),
or say that the datastore records none.

Cost: the level parts come from the evaluation's own log-sum-exp terms, recomputed for the batches that
hold dumped tokens; the neighbours are the top entries of each window's rows against that window's keys,
its FIFO slice and its hits (rows x window, rows x mem-size, rows x k: no N x N matrix over a split).
Nothing here runs unless asked for: ``trime-eval`` without ``--dump-neighbors``/``--report-html`` scores
exactly as before, and with them scores the dumped tokens a second time after its results.
"""

import html
import json
import math
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from trime.adapters.base import Documents, WindowBatch
from trime.errors import TrimeError
from trime.eval.engine import Evaluator, check_hits
from trime.eval.memory import (
    LabelTerms,
    LongMemory,
    MemorySettings,
    ScoreState,
    knn_row_terms,
    local_memory_terms,
    long_memory_terms,
    require_finite,
    score_batch,
)
from trime.io_utils import atomic_path
from trime.knn import KnnResults, knn_chunk_rows
from trime.loss import memory_scale
from trime.retrieval.datastore import NO_SOURCES, Datastore, snippets

LEVELS = ("local", "long", "external", "knn", "cache")
DEFAULT_TOP = 5  # neighbours per record (--dump-top)
REPORT_TOKENS = 1000  # tokens on the HTML page when --dump-limit is not given
SNIPPET_BEFORE, SNIPPET_AFTER = 16, 8  # tokens of text around a neighbour's value token
HELP_SATURATION_BITS = 3.0  # the page's colours are full at this change of log2 P
_NEG_INF = float("-inf")


@dataclass(frozen=True)
class Neighbor:
    """One memory entry and what it added to P: ``weight`` is the probability it adds to its value token ``id``
    (``token``). ``score`` is its raw similarity to the query: the dot product of the keys (local, long) or the
    datastore's score (inner product or minus the squared L2 distance). ``split``/``position``: where its value
    token is, the evaluated split's stream (local, long) or the datastore source's (external, with ``key``, its
    row, ``source``, the datastore source's name, and ``document``, the article's title). ``before``/``after``: the
    text around the value token; ``note``: why there is none (a datastore that records no sources, or a source whose
    data is not DATA)."""

    level: str
    weight: float
    score: float
    id: int
    token: str
    matches: bool  # its value token is the scored token
    split: str | None = None
    position: int | None = None
    key: int | None = None
    source: str | None = None
    document: str | None = None
    before: str | None = None
    after: str | None = None
    note: str | None = None

    def snippet(self, left: str = "[[", right: str = "]]") -> str | None:
        """The text around the value token with the token between ``left`` and ``right`` (None without text)."""
        if self.before is None or self.after is None:
            return None
        return f"{self.before}{left}{self.token}{right}{self.after}"


@dataclass
class TokenRecord:
    """One scored token of a split (see the module docstring for every number)."""

    index: int  # the token's number among the split's scored tokens (0 first)
    split: str
    position: int  # its position in the split's token stream
    id: int
    token: str
    log_prob: float  # log P with memory: what trime-eval scores
    lm_log_prob: float  # log P of the model alone: what trime-eval --memory none scores
    prob: float
    lm_prob: float
    memory_prob: float  # the part of prob that came from memory
    memory_mass: float  # the share of the whole next-token distribution that memory holds
    levels: dict[str, float] = field(default_factory=dict)  # each memory level's part of prob
    top_level: str | None = None  # the level of the largest part (None: memory added nothing)
    neighbors: list[Neighbor] = field(default_factory=list)

    @property
    def gain_bits(self) -> float:
        """How much memory changed log2 P of the token (positive: it helped)."""
        return (self.log_prob - self.lm_log_prob) / math.log(2)

    def as_dict(self) -> dict:
        """The record as JSON-ready types (``--dump-neighbors`` writes one per line)."""
        out = asdict(self)
        out["neighbors"] = [asdict(n) for n in self.neighbors]
        return out


def search_with_ids(store: Datastore, queries: Tensor, k: int, exact: bool) -> tuple[KnnResults, Tensor]:
    """:meth:`Datastore.search`'s hits of ``queries`` on the CPU and the datastore rows they are (int64, -1 for
    FAISS's padding); NaN or inf scores are refused as in evaluation."""
    hits = store.search(queries, k, exact=exact).to(torch.device("cpu"))
    check_hits(store, hits)
    return hits, hits.ids


def _union(terms: list[LabelTerms]) -> LabelTerms | None:
    out = None
    for t in terms:
        out = t if out is None else out.union(t)
    return out


def _fifo_slices(fifo: LongMemory, ids: list[int], offsets: list[int]) -> list[tuple[int, int]]:
    """The slice [lo, hi) of the buffer ``FIFO + this batch's scored rows`` that each window sees, as
    :func:`~trime.eval.memory.long_memory_terms` takes it (``fifo`` is left as it is)."""
    probe = replace(fifo)
    cached, floor, out = len(fifo), 0, []
    for b, window_id in enumerate(ids):
        if probe.check_id(window_id):
            floor = cached + offsets[b]
        hi = cached + offsets[b]
        out.append((max(floor, hi - fifo.capacity), hi))
    return out


@dataclass
class _Parts:
    """The per-row terms of a batch from which weights follow: log of the joint softmax's mixture weight and its
    normaliser, the interpolated caches' and kNN-LM's normalisers and weights."""

    log_alpha: Tensor  # (N,) log a
    log_d: Tensor  # (N,) log D
    cache_all: Tensor | None  # (N,) log sum over the cache's entries (cache interp), -inf where empty
    cache_lmbda: float
    knn_all: Tensor | None  # (N,) log sum of exp(score / interp_temp) over the hits (kNN-LM)
    lmbda: float

    def context_log_weights(self, logits: Tensor, rows: slice, interp: bool) -> Tensor:
        """log weights of local or long-term entries with (already scaled) ``logits`` of rows ``rows``: their share
        of the joint softmax, or with ``interp`` of the continuous cache (none when its weight is 0)."""
        if not interp:
            return self.log_alpha[rows, None] + logits - self.log_d[rows, None]
        if self.cache_lmbda <= 0:
            return torch.full_like(logits, _NEG_INF)
        return math.log(self.cache_lmbda) + logits - self.cache_all[rows, None]


class Inspector:
    """Records of the first scored tokens of a split, as ``evaluator`` scores them under ``settings``.

    ``top``: neighbours kept per record; ``before``/``after``: tokens of text around each neighbour.
    ``evaluator.store`` is the datastore (external memory, kNN-LM); ``evaluator.k`` and ``exact`` its search.
    """

    def __init__(self, evaluator: Evaluator, settings: MemorySettings, top: int = DEFAULT_TOP,
                 before: int = SNIPPET_BEFORE, after: int = SNIPPET_AFTER) -> None:
        if top < 1 or before < 0 or after < 0:
            raise ValueError("top must be >= 1, before and after >= 0")
        self.evaluator, self.settings, self.top = evaluator, settings, top
        self.before, self.after = before, after
        self.lm = evaluator.lm
        needs_store = settings.knn_in_joint or settings.lmbda > 0
        if needs_store and evaluator.store is None:
            raise ValueError("external memory and kNN-LM interpolation need the evaluator's datastore")
        self.store = evaluator.store if needs_store else None
        self.k = settings.k or evaluator.k
        self._external_notes: dict[str, str] = {}  # per datastore source: why its neighbours have no text
        self._warned = False

    # ------------------------------------------------------------------ the records

    def text_before(self, split: str, tokens: int = 64) -> str:
        """The text of the last ``tokens`` stream tokens before the first token ``split``'s windows score (the
        first token of a Hugging Face stream is read, not scored)."""
        windows = self.lm.windows(split, self.evaluator.windows)
        first = windows.target_positions(0, 1) if len(windows) else np.zeros(0, dtype=np.int64)
        if not len(first) or int(first[0]) == 0:
            return ""
        p = int(first[0])
        return self.lm.decode(np.asarray(self.lm.stream(split)[max(0, p - tokens) : p]))

    def records(self, split: str, limit: int | None = None) -> Iterator[TokenRecord]:
        """The records of the first ``limit`` scored tokens of ``split`` (None: all), in order."""
        lm, settings = self.lm, self.settings
        windows = lm.windows(split, self.evaluator.windows)
        state = ScoreState.fresh(settings)
        stream = lm.stream(split)
        docs = lm.documents(split)
        # the stream positions of the rows the FIFO can still hold and of this batch: global row seen_start + i
        # is seen[i] (bounded by mem-size, so a whole-split dump stays linear in the split)
        seen, seen_start = np.zeros(0, dtype=np.int64), 0
        held = settings.mem_size if settings.uses_long else 0
        index = 0
        max_batches = self.evaluator.batches_for_tokens(split, limit)
        for batch in self.evaluator.forward_batches(split, max_batches):
            n = batch.num_scored
            drop = max(0, len(seen) - held)
            seen_start += drop
            seen = np.concatenate([seen[drop:], windows.target_positions(batch.ids[0], batch.ids[-1] + 1)])
            hits = ids = None
            if self.store is not None and n > 0:
                hits, ids = self._search(batch.queries)
                hits = hits.to(batch.targets.device)
            before = ScoreState(long=replace(state.long) if state.long is not None else None,
                                next_position=state.next_position)
            log_probs = score_batch(batch, settings, state, hits, dim=lm.dim)  # what Evaluator.run scores
            require_finite(log_probs, settings)
            take = n if limit is None else min(n, limit - index)
            if take > 0:
                yield from self._batch_records(split, batch, before, hits, ids, log_probs, seen, seen_start, index,
                                               take, stream, docs)
            index += take
            if limit is not None and index >= limit:
                return

    def _search(self, queries: Tensor) -> tuple[KnnResults, Tensor]:
        """Hits and datastore rows of every query, searched in chunks as the evaluation searches them."""
        step = knn_chunk_rows(self.k)
        parts = [search_with_ids(self.store, queries[lo : lo + step], self.k, self.evaluator.exact)
                 for lo in range(0, queries.shape[0], step)]
        return KnnResults.cat([h for h, _ in parts]), torch.cat([i for _, i in parts])

    def _batch_records(self, split: str, batch: WindowBatch, before: ScoreState, hits: KnnResults | None,
                       ids: Tensor | None, log_probs: Tensor, seen: np.ndarray, seen_start: int, first_index: int,
                       take: int, stream: np.ndarray, docs: Documents) -> Iterator[TokenRecord]:
        """The records of the first ``take`` rows of ``batch`` (scored as ``log_probs``, the FIFO as ``before``
        held it; ``seen[i]``: the stream position of global row ``seen_start + i``, this batch's rows last)."""
        settings, lm = self.settings, self.lm
        dim = lm.dim
        n = batch.num_scored
        offsets = [0]
        for count in batch.scored_per_window():
            offsets.append(offsets[-1] + count)
        scale = settings.context_scale(dim)
        # the level terms of the evaluation (trime.eval.memory), at each row's target
        key_valid = batch.key_valid
        local = long = None
        if settings.uses_context_terms:
            key_valid = batch.key_valid.clone()
            if settings.uses_long:
                probe = ScoreState(long=replace(before.long), next_position=before.next_position)
                lse_all, lse_pos = long_memory_terms(batch, batch.queries, offsets, probe, [scale], key_valid)
                long = LabelTerms(lse_all[0], lse_pos[0])
            if settings.uses_local and n > 0:
                lse_all, lse_pos = local_memory_terms(batch, key_valid, [scale])
                local = LabelTerms(lse_all[0], lse_pos[0])
        knn_joint = knn_interp = None
        if hits is not None:
            knn_joint, knn_interp = knn_row_terms(hits, batch.targets, settings, memory_scale(dim, settings.ext_temp))
        interp = settings.interp_cache
        context = [t for t in (local, long) if t is not None]
        joint = _union(([] if interp else context) + ([knn_joint] if knn_joint is not None else []))
        token_score, token_logz = batch.token_score.float(), batch.token_logz.float()
        log_d = token_logz if joint is None else torch.logaddexp(token_logz, joint.lse_all)
        lmbda = settings.lmbda if knn_interp is not None and settings.lmbda > 0 else 0.0
        cache = _union(context) if interp else None
        cache_lmbda = settings.cache_lmbda if cache is not None and settings.cache_lmbda > 0 else 0.0
        alpha = torch.full_like(token_logz, max(0.0, 1.0 - lmbda - cache_lmbda))
        if cache_lmbda > 0:  # an empty cache predicts P_joint: its weight goes there
            alpha = alpha + cache_lmbda * (~torch.isfinite(cache.lse_all)).float()
        log_alpha = alpha.log()
        parts = _Parts(log_alpha, log_d, cache.lse_all if cache is not None else None, cache_lmbda,
                       knn_interp.lse_all if knn_interp is not None else None, lmbda)
        model_part = (log_alpha + token_score - log_d).exp()
        levels: dict[str, Tensor] = {}
        if not interp:
            for name, terms in (("local", local), ("long", long)):
                if terms is not None:
                    levels[name] = (log_alpha + terms.lse_label - log_d).exp()
        if knn_joint is not None:
            levels["external"] = (log_alpha + knn_joint.lse_label - log_d).exp()
        if lmbda > 0:
            share = knn_interp.log_share()
            levels["knn"] = lmbda * torch.where(torch.isfinite(share), share, _NEG_INF).exp()
        if cache_lmbda > 0:
            has = torch.isfinite(cache.lse_all)
            levels["cache"] = cache_lmbda * torch.where(has, cache.lse_label - torch.where(has, cache.lse_all, 0.0),
                                                        _NEG_INF).exp()
        memory_mass = 1.0 - (log_alpha + token_logz - log_d).exp()
        neighbors = self._neighbors(batch, before, hits, ids, parts, offsets, key_valid, scale, take, seen,
                                    seen_start, split, stream, docs)
        rows = {name: values[:take].tolist() for name, values in levels.items()}
        lp = log_probs[:take].double().tolist()
        lm_lp = (token_score - token_logz)[:take].double().tolist()
        model = model_part[:take].double().tolist()
        mass = memory_mass[:take].double().tolist()
        targets = batch.targets[:take].tolist()
        row_positions = seen[len(seen) - n :][:take].tolist()
        for r in range(take):
            prob = math.exp(lp[r])
            parts_r = {name: max(0.0, values[r]) for name, values in rows.items()}
            best = max(parts_r, key=parts_r.get) if parts_r else None
            yield TokenRecord(
                index=first_index + r, split=split, position=int(row_positions[r]), id=int(targets[r]),
                token=lm.decode([targets[r]]), log_prob=lp[r], lm_log_prob=lm_lp[r], prob=prob,
                lm_prob=math.exp(lm_lp[r]), memory_prob=max(0.0, prob - model[r]), memory_mass=min(1.0, max(0.0, mass[r])),
                levels=parts_r, top_level=best if best is not None and parts_r[best] > 0 else None,
                neighbors=neighbors[r],
            )  # fmt: skip

    # ------------------------------------------------------------------ the neighbours

    def _neighbors(self, batch: WindowBatch, before: ScoreState, hits: KnnResults | None, ids: Tensor | None,
                   parts: _Parts, offsets: list[int], key_valid: Tensor, scale: float, take: int, seen: np.ndarray,
                   seen_start: int, split: str, stream: np.ndarray, docs: Documents) -> list[list[Neighbor]]:
        """The ``top`` entries of largest weight of each of the first ``take`` rows, across the levels."""
        settings = self.settings
        n = batch.num_scored
        queries = batch.queries[:take].float()
        targets = batch.targets[:take]
        interp = settings.interp_cache
        batch_positions = seen[len(seen) - n :]
        found: list[list[tuple[float, str, dict]]] = [[] for _ in range(take)]

        def keep(rows: range, log_w: Tensor, scores: Tensor, labels: Tensor, describe) -> None:
            """Add each row's top entries by log weight (``describe(row, column)``: where the entry is)."""
            if log_w.shape[1] == 0:
                return
            best, cols = log_w.topk(min(self.top, log_w.shape[1]), dim=1)
            picked = zip(best.tolist(), cols.tolist(), scores.gather(1, cols).tolist(), labels.gather(1, cols).tolist())
            for r, (row_w, row_c, row_s, row_y) in zip(rows, picked):
                for lw, c, score, label in zip(row_w, row_c, row_s, row_y):
                    if lw == _NEG_INF:
                        break
                    found[r].append((math.exp(lw), score, int(label), describe(r, c)))

        context_on = settings.uses_context_terms
        fifo = before.long
        if context_on and settings.uses_long:
            slices = _fifo_slices(fifo, batch.ids, offsets)
            cached = len(fifo)
            buf_keys = batch.queries if not cached else torch.cat([fifo.keys, batch.queries.to(fifo.keys.dtype)])
            buf_labels = batch.targets if not cached else torch.cat([fifo.labels, batch.targets])
            first_row = before.next_position - cached - seen_start  # the index in ``seen`` of buffer entry 0
        for b in range(len(batch.ids)):
            r0, r1 = offsets[b], min(offsets[b + 1], take)
            if r1 <= r0:
                continue
            rows = range(r0, r1)
            q = queries[r0:r1]
            if context_on and settings.uses_local:
                keys = batch.reps[b].float()
                t_rows = batch.scored[b].nonzero()[:, 0][: r1 - r0]
                visible = key_valid[b][None, :] & (torch.arange(keys.shape[0], device=keys.device)[None, :]
                                                   < t_rows[:, None])
                dots = q @ keys.T
                log_w = parts.context_log_weights(dots * scale, slice(r0, r1), interp).masked_fill(~visible, _NEG_INF)
                shift = int(batch_positions[r0]) - batch.starts[b]  # window position j holds stream target shift + j
                labels = batch.key_labels[b][None, :].expand_as(dots)
                keep(rows, log_w, dots, labels, lambda r, c, shift=shift: ("local", split, shift + c, None))
            if context_on and settings.uses_long:
                lo, hi = slices[b]
                if hi > lo:
                    dots = q @ buf_keys[lo:hi].float().T
                    log_w = parts.context_log_weights(dots * scale, slice(r0, r1), interp)
                    labels = buf_labels[lo:hi][None, :].expand_as(dots)
                    keep(rows, log_w, dots, labels,
                         lambda r, c, lo=lo: ("long", split, int(seen[first_row + lo + c]), None))
            if hits is not None:
                h = hits.rows(r0, r1).top(settings.k)
                log_w = torch.full_like(h.scores, _NEG_INF)
                if settings.knn_in_joint:
                    joint = h.scores * memory_scale(self.lm.dim, settings.ext_temp)
                    log_w = parts.log_alpha[r0:r1, None] + joint - parts.log_d[r0:r1, None]
                if parts.lmbda > 0:
                    interp_w = math.log(parts.lmbda) + h.scores / settings.interp_temp - parts.knn_all[r0:r1, None]
                    log_w = torch.logaddexp(log_w, interp_w)
                log_w = log_w.masked_fill(~h.valid, _NEG_INF)
                rows_ids = ids[r0:r1, : h.scores.shape[1]]
                keep(rows, log_w, h.scores, h.labels,
                     lambda r, c, rows_ids=rows_ids, r0=r0: ("external", None, None, int(rows_ids[r - r0, c])))
        return self._describe(found, targets.tolist(), stream, docs)

    def _describe(self, found: list[list[tuple]], targets: list[int], stream: np.ndarray,
                  docs: Documents) -> list[list[Neighbor]]:
        """Each row's ``top`` entries of largest weight as :class:`Neighbor` records, with their text."""
        lm = self.lm
        chosen = [sorted(entries, key=lambda e: -e[0])[: self.top] for entries in found]
        keys = sorted({where[3] for entries in chosen for *_, where in entries if where[0] == "external"})
        external = self._external(keys)
        starts = np.asarray(docs.starts, dtype=np.int64)
        out = []
        for target, entries in zip(targets, chosen):
            row = []
            for weight, score, label, (level, split, position, key) in entries:
                common = dict(level=level, weight=weight, score=score, id=label, token=lm.decode([label]),
                              matches=label == target)
                if level == "external":
                    row.append(Neighbor(**common, key=key, **external.get(key, {})))
                    continue
                document = docs.titles[int(np.searchsorted(starts, position, side="right")) - 1]
                row.append(Neighbor(**common, split=split, position=position, document=document,
                                    before=lm.decode(np.asarray(stream[max(0, position - self.before) : position])),
                                    after=lm.decode(np.asarray(stream[position + 1 : position + 1 + self.after]))))
            out.append(row)
        return out

    def _external(self, keys: list[int]) -> dict[int, dict]:
        """Where datastore rows ``keys`` came from and their text, or a note saying why there is none."""
        if not keys:
            return {}
        store = self.store
        if not store.has_sources:
            return {key: {"note": f"the datastore {NO_SOURCES}"} for key in keys}
        origins = store.origins(keys)
        out = {o.key: {"source": o.source, "split": o.split, "position": o.position, "document": o.title}
               for o in origins}
        by_source: dict[str, list[int]] = {}
        for o in origins:
            by_source.setdefault(o.source, []).append(o.key)
        for source, rows in by_source.items():  # each source's text, where DATA holds that source's files
            if source not in self._external_notes:
                try:
                    for s in snippets(store, self.lm, rows, before=self.before, after=self.after):
                        out[s.origin.key].update(before=s.before, after=s.after)
                    continue
                except TrimeError as err:  # the data it was built from is not DATA: positions without text
                    self._external_notes[source] = str(err).removeprefix("trime: error: ")
            for key in rows:
                out[key]["note"] = self._external_notes[source]
        return out


def inspect_tokens(
    lm,
    split: str = "test",
    settings: MemorySettings | None = None,
    *,
    store: Datastore | None = None,
    windows=None,
    batch_size: int = 1,
    limit: int | None = 200,
    top: int = DEFAULT_TOP,
    exact: bool = False,
) -> list[TokenRecord]:
    """The records of the first ``limit`` scored tokens of ``split`` (None: all) with memory ``settings``
    (default none): ``trime-eval --dump-neighbors`` as a function, for notebooks.

    ``lm`` is a loaded adapter (:func:`trime.adapters.load_adapter`), ``store`` an open
    :class:`~trime.retrieval.datastore.Datastore` (external memory, kNN-LM; ``settings.k`` neighbours),
    ``windows`` the window settings (default: the model's, :meth:`ModelAdapter.window_settings`) and
    ``batch_size`` the windows per forward pass (long-term memory sees the same stream whatever it is).
    """
    settings = settings or MemorySettings()
    windows = windows or lm.window_settings(None, None)
    evaluator = Evaluator(lm, windows, batch_size, store, k=settings.k or 1, exact=exact, progress=False)
    return list(Inspector(evaluator, settings, top=top).records(split, limit))


def write_jsonl(records: Iterable[TokenRecord], path: Path) -> int:
    """Write one JSON object per record to ``path`` (atomically: complete or untouched); returns the count."""
    return write_outputs(records, Path(path), None, 0)[0]


def write_outputs(records: Iterable[TokenRecord], jsonl: Path | None, page: Path | None, page_tokens: int,
                  **page_info) -> tuple[int, int]:
    """``--dump-neighbors`` (every record) and ``--report-html`` (the first ``page_tokens``) from one pass over
    ``records``; each file is written atomically. Returns (records written, tokens on the page)."""
    shown: list[TokenRecord] = []
    count = 0
    with ExitStack() as stack:
        out = None
        if jsonl is not None:
            tmp = stack.enter_context(atomic_path(jsonl))
            out = stack.enter_context(open(tmp, "w", encoding="utf-8"))
        for record in records:
            if out is not None:
                out.write(json.dumps(record.as_dict(), ensure_ascii=False) + "\n")
            count += 1
            if page is not None and len(shown) < page_tokens:
                shown.append(record)
            elif out is None:
                break
        if page is not None:
            with atomic_path(page) as tmp:
                tmp.write_text(report_html(shown, **page_info), encoding="utf-8")
    return (count if jsonl is not None else 0), len(shown)


# ---------------------------------------------------------------------- the HTML page

_LEVEL_COLOURS = {"local": "#1f77b4", "long": "#7b3fb5", "external": "#d9730d", "knn": "#8c564b", "cache": "#138a8a"}

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{padding:12px 20px;background:#fff;border-bottom:1px solid #ddd}
h1{font-size:19px;margin:0 0 6px}
.meta{color:#555;font-size:13px;margin:2px 0;word-break:break-word}
.legend{display:flex;gap:14px;align-items:center;flex-wrap:wrap;font-size:13px;margin-top:8px}
.scale{width:220px;height:12px;border-radius:3px;
 background:linear-gradient(90deg,rgba(215,48,39,.75),rgba(215,48,39,0) 50%,rgba(26,152,80,0) 50%,rgba(26,152,80,.75))}
.key{display:inline-block;width:12px;height:3px;vertical-align:middle;margin-right:4px}
main{display:grid;grid-template-columns:minmax(0,3fr) minmax(320px,2fr);gap:16px;padding:16px 20px}
@media (max-width:900px){main{grid-template-columns:1fr}}
#text{background:#fff;border:1px solid #ddd;border-radius:6px;padding:14px 16px;white-space:pre-wrap;
 font:16px/1.9 Georgia,"Times New Roman",serif;word-break:break-word}
.pre{color:#999}
.t{cursor:pointer;border-radius:3px;border-bottom:3px solid transparent}
.t:hover,.t:focus{outline:1px solid #333}
.t.sel{outline:2px solid #000}
.t.flash{outline:3px solid #e6b800}
#panel{position:sticky;top:12px;align-self:start;max-height:calc(100vh - 24px);overflow:auto;background:#fff;
 border:1px solid #ddd;border-radius:6px;padding:12px 14px;font-size:13px}
#panel h2{font-size:16px;margin:0 0 6px;font-family:Georgia,serif}
#panel table{border-collapse:collapse;width:100%}
#panel td,#panel th{border-top:1px solid #eee;padding:4px 6px;vertical-align:top;text-align:left}
#panel th{font-weight:600;color:#555}
.num{font-variant-numeric:tabular-nums;white-space:nowrap}
.hint{color:#777}
.lvl{display:inline-block;padding:0 5px;border-radius:3px;color:#fff;font-size:11px}
.hit{color:#1a7f37;font-weight:600}
.snip{font-family:Georgia,serif;color:#333}
.snip mark{background:#ffe58a;padding:0 1px}
.bar{display:inline-block;height:8px;background:#888;vertical-align:middle;border-radius:2px}
.note{color:#a40}
a.jump{color:#0969da;cursor:pointer;text-decoration:underline}
"""

_JS = """
(function(){
const data = JSON.parse(document.getElementById('trime-data').textContent);
const LEVELS = data.levels, COLOURS = data.colours;
const recs = data.tokens, panel = document.getElementById('panel');
const spans = Array.from(document.querySelectorAll('#text .t'));
const byPosition = new Map(recs.map((r, i) => [data.split + ':' + r[1], i]));
let pinned = null;
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = text;
  return e;
}
function pct(p) { return p >= 0.001 ? (100 * p).toFixed(1) + '%' : p > 0 ? p.toExponential(1) : '0'; }
function vis(t) { return t.replace(/\\n/g, '\u21b5'); }
function badge(level) { const b = el('span', 'lvl', level); b.style.background = COLOURS[level] || '#666'; return b; }
function jump(i) {
  const s = spans[i]; s.scrollIntoView({block: 'center'});
  s.classList.add('flash'); setTimeout(() => s.classList.remove('flash'), 900);
}
function show(i) {
  const r = recs[i];
  panel.replaceChildren();
  const h = el('h2'); h.append(el('span', null, 'token ')); h.append(el('mark', null, vis(r[2]))); panel.append(h);
  panel.append(el('div', 'meta', 'scored token ' + r[0] + ', position ' + r[1] + ' of ' + data.split + ', id ' + r[3]));
  const t = el('table');
  const rows = [['P with memory', pct(r[4])], ['P of the model alone', pct(r[5])],
    ['from memory', pct(r[6])], ['memory\\u2019s share of the distribution', pct(r[7])],
    ['change of log\\u2082 P', (r[8] >= 0 ? '+' : '') + r[8].toFixed(2) + ' bits']];
  for (const [k, v] of rows) { const tr = el('tr'); tr.append(el('th', null, k)); tr.append(el('td', 'num', v)); t.append(tr); }
  panel.append(t);
  const lv = r[9];
  if (lv.some(v => v !== null)) {
    const lt = el('table'); const head = el('tr'); head.append(el('th', null, 'level')); head.append(el('th', null, 'part of P'));
    lt.append(head);
    LEVELS.forEach((name, j) => {
      if (lv[j] === null) return;
      const tr = el('tr'); const a = el('td'); a.append(badge(name)); tr.append(a);
      const b = el('td', 'num'); const bar = el('span', 'bar');
      bar.style.width = Math.round(120 * Math.min(1, lv[j] / Math.max(r[4], 1e-12))) + 'px';
      bar.style.background = COLOURS[name]; b.append(bar); b.append(el('span', null, ' ' + pct(lv[j]))); tr.append(b); lt.append(tr);
    });
    panel.append(el('p', 'hint', r[10] ? 'the largest part: ' + r[10] : 'memory added nothing to this token'));
    panel.append(lt);
  }
  const nb = r[11];
  panel.append(el('h2', null, 'top ' + nb.length + ' memory entries by weight'));
  if (!nb.length) { panel.append(el('p', 'hint', 'no memory entries')); return; }
  const nt = el('table'); const hr = el('tr');
  ['level', 'weight', 'score', 'value', 'source'].forEach(x => hr.append(el('th', null, x))); nt.append(hr);
  for (const n of nb) {
    const tr = el('tr'); const a = el('td'); a.append(badge(n[0])); tr.append(a);
    tr.append(el('td', 'num', pct(n[1]))); tr.append(el('td', 'num', n[2].toPrecision(4)));
    tr.append(el('td', n[4] ? 'hit' : null, vis(n[3]) + (n[4] ? ' \\u2713' : '')));
    const src = el('td');
    if (n[5] !== null) {
      const where = n[5] + ' @ ' + n[6];
      const idx = byPosition.get(where.replace(' @ ', ':'));
      if (idx !== undefined) { const j = el('a', 'jump', where); j.onclick = () => jump(idx); src.append(j); }
      else src.append(el('span', null, where));
    }
    if (n[7] !== null) src.append(el('span', 'hint', (n[8] !== null ? ' (key ' + n[8] + ')' : '') + ' \\u00b7 ' + n[7]));
    if (n[9] !== null) {
      const s = el('div', 'snip'); s.append(document.createTextNode(vis(n[9]))); s.append(el('mark', null, vis(n[3])));
      s.append(document.createTextNode(vis(n[10]))); src.append(s);
    }
    if (n[11] !== null) src.append(el('div', 'note', n[11]));
    tr.append(src); nt.append(tr);
  }
  panel.append(nt);
}
spans.forEach((s, i) => {
  s.addEventListener('mouseenter', () => { if (pinned === null) show(i); });
  s.addEventListener('focus', () => { if (pinned === null) show(i); });
  s.addEventListener('click', () => {
    if (pinned !== null) spans[pinned].classList.remove('sel');
    if (pinned === i) { pinned = null; return; }
    pinned = i; s.classList.add('sel'); show(i);
  });
});
const asked = /^#(\\d+)$/.exec(location.hash);  // page.html#N opens with scored token N of the page kept
if (asked && +asked[1] < spans.length) { spans[+asked[1]].click(); spans[+asked[1]].scrollIntoView({block: 'center'}); }
else if (spans.length) show(0);
})();
"""


def _colour(gain_bits: float) -> str:
    """The background of a token: green where memory raised log2 P, red where it lowered it, by how much."""
    strength = min(1.0, abs(gain_bits) / HELP_SATURATION_BITS)
    if strength < 0.01:
        return "transparent"
    rgb = "26,152,80" if gain_bits > 0 else "215,48,39"
    return f"rgba({rgb},{0.75 * strength:.3f})"


def _round(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.4g}")


def _page_data(records: list[TokenRecord], split: str) -> str:
    """The records as compact JSON for the page's script, safe inside <script>: no ``<``, ``>`` or ``&``."""
    tokens = []
    for r in records:
        levels = [_round(r.levels[name]) if name in r.levels else None for name in LEVELS]
        neighbors = [[n.level, _round(n.weight), _round(n.score), n.token, n.matches, n.split, n.position,
                      n.document, n.key, n.before, n.after, n.note] for n in r.neighbors]
        tokens.append([r.index, r.position, r.token, r.id, _round(r.prob), _round(r.lm_prob), _round(r.memory_prob),
                       _round(r.memory_mass), round(r.gain_bits, 3), levels, r.top_level, neighbors])
    text = json.dumps({"split": split, "levels": LEVELS, "colours": _LEVEL_COLOURS, "tokens": tokens},
                      ensure_ascii=False, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _shown(text: str) -> str:
    """A token's text on the page: a newline is drawn (and kept, so that lines break where the text does)."""
    return html.escape(text.replace("\n", "\u21b5\n"))


def report_html(records: list[TokenRecord], title: str = "What memory did", lines: Iterable[str] = (),
                prefix: str = "") -> str:
    """One self-contained HTML page (inline CSS and script, nothing fetched) of ``records``: each token coloured
    by how much memory changed its log2 P, its numbers and neighbours on hover or click. ``lines`` are shown
    under the title (model, data, settings); ``prefix`` is the text before the first record, shown in grey."""
    if not records:
        raise ValueError("the page needs at least one record")
    split = records[0].split
    n = len(records)
    nll = -math.fsum(r.log_prob for r in records) / n / math.log(2)
    lm_nll = -math.fsum(r.lm_log_prob for r in records) / n / math.log(2)
    helped = sum(r.log_prob > r.lm_log_prob for r in records)
    tops: dict[str, int] = {}
    for r in records:
        if r.top_level is not None:
            tops[r.top_level] = tops.get(r.top_level, 0) + 1
    summary = (f"{n:,} scored tokens of {split} (positions {records[0].position:,}\u2013{records[-1].position:,}): "
               f"{nll:.3f} bits per token with memory (ppl {2 ** nll:.2f}), {lm_nll:.3f} without (ppl "
               f"{2 ** lm_nll:.2f}); memory raised P of {helped:,} of them")
    if tops:
        summary += "; the largest memory part came from " + ", ".join(f"{k} for {v:,}" for k, v in
                                                                     sorted(tops.items(), key=lambda kv: -kv[1]))
    used = [name for name in LEVELS if name in records[0].levels]
    keys = "".join(f'<span><span class="key" style="background:{_LEVEL_COLOURS[name]}"></span>{name}</span>'
                   for name in used)
    spans = []
    for i, r in enumerate(records):
        border = f";border-bottom-color:{_LEVEL_COLOURS[r.top_level]}" if r.top_level else ""
        tip = f"P {r.prob:.3g} (model {r.lm_prob:.3g}), {r.gain_bits:+.2f} bits"
        spans.append(f'<span class="t" tabindex="0" data-i="{i}" title="{html.escape(tip)}" '
                     f'style="background:{_colour(r.gain_bits)}{border}">{_shown(r.token)}</span>')
    meta = "".join(f'<p class="meta">{html.escape(line)}</p>' for line in lines)
    pre = f'<span class="pre">{_shown(prefix)}</span>' if prefix else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>{html.escape(title)}</h1>
{meta}
<p class="meta">{html.escape(summary)}</p>
<div class="legend"><span>memory lowered log\u2082 P</span><span class="scale"></span>
<span>raised it (full colour at {HELP_SATURATION_BITS:g} bits)</span>
<span>underline: the level that added most</span>{keys}</div>
</header>
<main>
<div id="text">{pre}{"".join(spans)}</div>
<aside id="panel"><p class="hint">Hover over a token to see its numbers and the memory entries behind it; click
to keep them.</p></aside>
</main>
<script type="application/json" id="trime-data">{_page_data(records, split)}</script>
<script>{_JS}</script>
</body>
</html>
"""
