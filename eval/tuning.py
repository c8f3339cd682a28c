"""Tuning ``--softmax-temp``, ``--external-temp``, kNN-LM's lambda / interp-temp and the continuous cache's
``--cache-lmbda`` / ``--cache-temp`` on cached forward passes.

The model forward and the FAISS search run once (:class:`CachedRun`); every candidate
setting then only re-scores the memory, which is what makes the search cheap. The local +
long-term terms are kept per temperature, so trials of the external temperature,
lambda or interp-temp re-score only the neighbours.

- the memory's temperature (``--softmax-temp``, or ``--cache-temp`` with ``--cache interp``): a
  geometric grid, widened x2 per step while the best point is on its edge and the curve still falls
  towards it (up to TEMP_LIMITS), then rounds of 7 points spread evenly (in log T) between the best
  point's neighbours, each round 4x narrower, until they are TEMP_TOLERANCE apart or the curve between
  them is flat (within FLAT_NLL). The candidates of one round are scored together: the local + long
  memory scores are computed once per round, not once per temperature. The cache's grid is the softmax
  grid times sqrt(d) (``--cache-temp`` divides raw dot products, ``--softmax-temp`` scaled ones);
- external temperature T_ext (the datastore's neighbours in the joint softmax): the same search on
  a grid of T x 1/4 .. 4, with the tuned T fixed;
- interpolation weights: for each interp-temp on a fixed geometric grid (p_knn depends only on
  it, so it is computed once per grid point), the best lambda by golden-section search; the
  mixture's NLL is convex in its weights, so that search is exact. With the continuous cache the
  interp-temp is first tuned for kNN-LM alone, then every cache temperature gets the best
  (lambda, cache-lambda) pair by nested golden-section searches (exact as well).

Every weight search includes 0, so kNN-LM or the cache is switched off when it hurts. The
result is compared with the model without memory: a memory that hurts is reported as such.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from trime.eval.memory import (
    MemorySettings,
    ScoreState,
    cache_log_prob,
    context_memory_terms_at_temps,
    interpolate,
    knn_log_prob,
    mixture,
    require_finite,
    score_with_context_terms,
)
from trime.knn import KnnResults

GOLDEN = (math.sqrt(5) - 1) / 2
TEMP_GRID = tuple(2.0**e for e in range(-3, 4))  # 0.125 .. 8; golden-section search refines between neighbours
TEMP_TOLERANCE = 0.03  # in log T: the NLL is flat near its optimum, so ~3% in T changes it by < 0.001 bits
TEMP_LIMITS = (1 / 1024, 1024.0)  # how far the grid is extended when the optimum is on its edge
FLAT_NLL = 1e-4  # mean NLL (nats per token; 0.01% of perplexity) below which a temperature curve counts as flat
INTERP_TEMP_GRID = tuple(2 ** (e / 4) for e in range(-8, 29))  # 0.25 .. 128
LAMBDA_RANGE = (0.0, 0.99)
CONTEXT_MEMO_ENTRIES = 64  # local + long terms kept per CachedRun (8 bytes per scored token each)


def golden_section(
    f: Callable[[float], float], lo: float, hi: float, tol: float, max_iter: int = 60
) -> tuple[float, float]:
    """Minimise a unimodal ``f`` on [lo, hi]; returns (x, f(x)) of the best point evaluated."""
    cache: dict[float, float] = {}

    def g(x: float) -> float:
        if x not in cache:
            cache[x] = f(x)
        return cache[x]

    a, b = lo, hi
    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    for _ in range(max_iter):
        if abs(b - a) <= tol:
            break
        if g(c) <= g(d):
            b, d = d, c
            c = b - GOLDEN * (b - a)
        else:
            a, c = c, d
            d = a + GOLDEN * (b - a)
    for x in (lo, hi):
        g(x)
    best = min(cache, key=cache.get)
    return best, cache[best]


@dataclass
class CachedRun:
    """Forward passes (and search results) of one split, kept on the CPU for re-scoring."""

    batches: list
    knn: list[KnnResults | None]
    device: torch.device
    dim: int
    seconds: float = 0.0  # spent now on the forward passes and searches (loading from --cache-dir included)
    reused: dict = field(default_factory=dict)  # part read from --cache-dir -> the seconds it took when computed
    _targets: Tensor | None = field(default=None, repr=False)
    _context_memo: dict = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return sum(b.num_scored for b in self.batches)

    def targets(self) -> Tensor:
        if self._targets is None:
            self._targets = (
                torch.cat([b.targets for b in self.batches]) if self.batches else torch.zeros(0, dtype=torch.long)
            )
        return self._targets

    def all_knn(self) -> KnnResults | None:
        if not self.knn or self.knn[0] is None:
            return None
        return KnnResults.cat(self.knn)

    def context_terms(self, settings: MemorySettings) -> list[tuple[Tensor, Tensor]]:
        """Local + long-term memory terms of every batch (CPU), computed once per :meth:`~MemorySettings.context_key`:
        trials that change only the external memory's settings (T_ext, lambda, interp-temp, k) or the
        cache's weight reuse them."""
        self.prefetch(settings, [settings.context_temp])
        return self._context_memo[settings.context_key()]

    def prefetch(self, settings: MemorySettings, temps: Sequence[float]) -> None:
        """Compute the context terms of ``settings`` at each temperature of ``temps`` (its
        :attr:`~MemorySettings.context_temp`: softmax or cache temperature) that is not memoised yet, in one
        pass over the batches (each memory score is computed once for all of them)."""
        keyed = {settings.with_context_temp(t).context_key(): t for t in temps}
        missing = [t for key, t in keyed.items() if key not in self._context_memo]
        if not missing:
            return
        state = ScoreState.fresh(settings)
        per_temp: list[list[tuple[Tensor, Tensor]]] = [[] for _ in missing]
        for b in self.batches:
            lse_all, lse_pos = context_memory_terms_at_temps(b.to(self.device), settings, missing, state, dim=self.dim)
            for i in range(len(missing)):
                per_temp[i].append((lse_all[i].cpu(), lse_pos[i].cpu()))
        for t, terms in zip(missing, per_temp):
            while len(self._context_memo) >= CONTEXT_MEMO_ENTRIES:
                self._context_memo.pop(next(iter(self._context_memo)))  # the oldest
            self._context_memo[settings.with_context_temp(t).context_key()] = terms

    def log_probs(self, settings: MemorySettings) -> Tensor:
        """Per-token log P of every scored token (CPU, fp32) under ``settings``; NaN or inf is refused."""
        out = []
        context = self.context_terms(settings) if settings.uses_context_terms else [None] * len(self.batches)
        for batch, knn, terms in zip(self.batches, self.knn, context):
            batch = batch.to(self.device)
            knn = knn.to(self.device) if knn is not None else None
            terms = tuple(t.to(self.device) for t in terms) if terms is not None else None
            out.append(score_with_context_terms(batch, settings, terms, knn, dim=self.dim).cpu())
        log_probs = torch.cat(out) if out else torch.zeros(0)
        require_finite(log_probs, settings)
        return log_probs

    def cache_log_probs(self, settings: MemorySettings, log_p_model: Tensor) -> Tensor:
        """log p_cache of every scored token (CPU) with the local + long-term memory of ``settings`` as the
        continuous cache at its ``cache_temp``; tokens with an empty cache get ``log_p_model``."""
        terms = self.context_terms(settings)
        if not terms:
            return log_p_model
        lse_all, lse_pos = (torch.cat([t[i] for t in terms]) for i in (0, 1))
        return cache_log_prob(lse_all, lse_pos, log_p_model)


def mean_nll(log_probs: Tensor) -> float:
    return float(-log_probs.double().mean())


@dataclass
class TuneResult:
    """The chosen settings and their mean NLL (nats per token), every trial, and the model without memory."""

    settings: MemorySettings
    nll: float
    trials: list[dict]
    no_memory_nll: float | None = None  # the plain LM on the same tokens
    verdict: str = "helps"  # or "barely helps" (within FLAT_NLL), "does not help" (equal), "hurts" (worse)


def best_interpolation(joint: Tensor, knn_by_temp: dict[float, Tensor]) -> tuple[float, float, float]:
    """(nll, lambda, interp_temp) minimising the mixture's mean NLL."""
    best = (mean_nll(joint), 0.0, next(iter(knn_by_temp)))
    for temp, log_knn in knn_by_temp.items():
        lam, nll = golden_section(
            lambda x, log_knn=log_knn: mean_nll(interpolate(joint, log_knn, x)), *LAMBDA_RANGE, tol=1e-3
        )
        if nll < best[0]:
            best = (nll, lam, temp)
    return best


def best_mixture(
    model: Tensor,
    knn: Tensor | None,
    cache: Tensor | None,
    lmbda: float | None = None,
    cache_lmbda: float | None = None,
) -> tuple[float, float, float]:
    """(nll, lmbda, cache_lmbda) minimising the mean NLL of (1 - lmbda - cache_lmbda) P_model + lmbda p_knn
    + cache_lmbda p_cache, from per-token log-probs (a part given as None has weight 0).

    A weight given as a number is kept; one given as None is searched on LAMBDA_RANGE (with the other,
    their sum at most its top) by golden section: the NLL is convex in the weights, so the nested search
    (cache_lmbda outside, lmbda inside) is exact to its tolerance and includes 0 (the part switched off).
    """
    lo, top = LAMBDA_RANGE

    def nll(lam: float, lam_c: float) -> float:
        parts = ([(knn, lam)] if knn is not None else []) + ([(cache, lam_c)] if cache is not None else [])
        return mean_nll(mixture(model, parts))

    def best_lmbda(lam_c: float) -> tuple[float, float]:
        """(nll, lmbda) with cache_lmbda = lam_c."""
        if knn is None or lmbda is not None:
            return nll(lmbda or 0.0, lam_c), lmbda or 0.0
        lam, value = golden_section(lambda x: nll(x, lam_c), lo, max(lo, top - lam_c), tol=1e-3)
        return value, lam

    if cache is None or cache_lmbda is not None:
        lam_c = cache_lmbda if cache is not None and cache_lmbda is not None else 0.0
        value, lam = best_lmbda(lam_c)
        return value, lam, lam_c
    inner: dict[float, tuple[float, float]] = {}

    def outer(lam_c: float) -> float:
        inner[lam_c] = best_lmbda(lam_c)
        return inner[lam_c][0]

    lam_c, value = golden_section(outer, lo, max(lo, top - (lmbda or 0.0)), tol=1e-3)
    return value, inner[lam_c][1], lam_c


REFINE_POINTS = 7  # candidates per refinement round (scored together), spread evenly between two neighbours


def _grid_then_refine(
    objective_logs: Callable[[list[float]], list[float]], grid: Sequence[float],
    limits: tuple[float, float] = TEMP_LIMITS,
) -> None:
    """Minimise over log T: ``grid`` (widened x2 per step while the best point is on an edge and the curve
    still falls by more than FLAT_NLL towards it, up to ``limits``), then rounds of REFINE_POINTS points
    between the best point's neighbours until the neighbours are TEMP_TOLERANCE apart or within FLAT_NLL
    of the best value (a flat curve is not refined). ``objective_logs`` scores a list of log T at once."""
    start = sorted(math.log(t) for t in grid)
    values = dict(zip(start, objective_logs(start)))

    def bracket() -> tuple[int, list[float]]:
        xs = sorted(values)
        return min(range(len(xs)), key=lambda j: values[xs[j]]), xs

    def falling(edge: float, inner: float) -> bool:
        return values[inner] - values[edge] > FLAT_NLL

    i, xs = bracket()
    while len(xs) > 1 and i == len(xs) - 1 and math.exp(xs[-1]) * 2 <= limits[1] and falling(xs[-1], xs[-2]):
        x = xs[-1] + math.log(2)
        values[x] = objective_logs([x])[0]
        i, xs = bracket()
    while len(xs) > 1 and i == 0 and math.exp(xs[0]) / 2 >= limits[0] and falling(xs[0], xs[1]):
        x = xs[0] - math.log(2)
        values[x] = objective_logs([x])[0]
        i, xs = bracket()
    for _ in range(32):  # each round narrows the bracket 4x
        lo, hi = xs[max(0, i - 1)], xs[min(len(xs) - 1, i + 1)]
        if hi - lo <= TEMP_TOLERANCE or max(values[lo], values[hi]) - values[xs[i]] <= FLAT_NLL:
            return
        step = (hi - lo) / (REFINE_POINTS + 1)
        new = [lo + step * j for j in range(1, REFINE_POINTS + 1) if lo + step * j not in values]
        values.update(zip(new, objective_logs(new)))
        i, xs = bracket()


EXTERNAL_TEMP_STEPS = (0.25, 0.5, 1.0, 2.0, 4.0)  # x the tuned softmax-temp: the external temperature's grid


def tune(
    run: CachedRun,
    base: MemorySettings,
    tune_temp: bool,
    tune_interp: bool,
    tune_external: bool = False,
    tune_cache: bool = False,
    temp_grid: Sequence[float] = TEMP_GRID,
    interp_grid: Sequence[float] = INTERP_TEMP_GRID,
    log: Callable[[str], None] = print,
) -> TuneResult:
    """Search T (if ``tune_temp``; the joint softmax), or the cache's temperature and weight (if ``tune_cache``;
    ``base.cache == "interp"``), then T_ext (if ``tune_external``), and lambda / interp-temp (if ``tune_interp``).

    Coordinate search: T first, with the external neighbours at T as well (``external_temp`` unset), then
    T_ext with that T fixed; the interpolation weights are optimised exactly inside every trial. With the
    continuous cache, interp-temp is tuned for kNN-LM alone first. Weights and temperatures that are not
    tuned keep ``base``'s values. The result is compared with the model without memory (:attr:`TuneResult.verdict`).
    """
    trials: list[dict] = []
    interp = base.interp_cache
    targets = run.targets()
    hits = run.all_knn() if (tune_interp or (interp and base.lmbda > 0)) else None
    knn_hits = hits.top(base.k) if hits is not None else None
    knn_by_temp: dict[float, Tensor] = {t: knn_log_prob(knn_hits, targets, t) for t in interp_grid} if tune_interp else {}
    model_memo: dict[tuple, Tensor] = {}

    def model_log_probs(settings: MemorySettings) -> Tensor:
        """P_model of an interpolated cache: the joint softmax without the cache and the kNN-LM mixture."""
        key = (settings.softmax_temp, settings.external_temp)
        if key not in model_memo:
            model_memo[key] = run.log_probs(settings.with_(lmbda=0.0, cache_lmbda=0.0))
        return model_memo[key]

    cache_itemp = base.interp_temp  # the interp-temp used with the cache
    if interp and tune_interp:  # kNN-LM alone first: its interp-temp is then kept while the cache is tuned
        _, _, cache_itemp = best_interpolation(model_log_probs(base), knn_by_temp)
    knn_with_cache = None
    if interp and knn_hits is not None:
        knn_with_cache = knn_by_temp.get(cache_itemp)
        if knn_with_cache is None:
            knn_with_cache = knn_log_prob(knn_hits, targets, cache_itemp)

    def evaluate(settings: MemorySettings) -> tuple[float, float, float, float]:
        """(nll, lmbda, interp_temp, cache_lmbda) of the best weights at ``settings``' temperatures."""
        if interp:
            model = model_log_probs(settings)
            cache = run.cache_log_probs(settings, model)
            nll, lam, lam_c = best_mixture(
                model, knn_with_cache, cache, lmbda=None if tune_interp else base.lmbda,
                cache_lmbda=None if tune_cache else base.cache_lmbda,
            )
            itemp = cache_itemp
        elif tune_interp:
            nll, lam, itemp = best_interpolation(run.log_probs(settings.with_(lmbda=0.0)), knn_by_temp)
            lam_c = 0.0
        else:
            nll, lam, itemp, lam_c = mean_nll(run.log_probs(settings)), base.lmbda, base.interp_temp, 0.0
        trials.append(
            {"softmax_temp": settings.softmax_temp, "external_temp": settings.external_temp, "lmbda": lam,
             "interp_temp": itemp, "cache_temp": settings.cache_temp if interp else None,
             "cache_lmbda": lam_c if interp else None, "nll": nll}
        )  # fmt: skip
        if interp:
            what = f"cache-temp {settings.cache_temp:.4g} cache-lmbda {lam_c:.3g}"
        else:
            external = f" external-temp {settings.external_temp:.4g}" if settings.external_temp is not None else ""
            what = f"softmax-temp {settings.softmax_temp:.4g}{external}"
        knn = f" lmbda {lam:.3g} interp-temp {itemp:.3g}" if tune_interp or base.lmbda > 0 else ""
        log(f"tune {what}{knn}: loss {nll / math.log(2):.4f} bits")
        return nll, lam, itemp, lam_c

    results: dict[tuple, tuple[tuple[float, float, float, float], MemorySettings]] = {}

    def score(settings: MemorySettings) -> float:
        key = (settings.softmax_temp, settings.external_temp, settings.cache_temp)
        if key not in results:
            results[key] = (evaluate(settings), settings)
        return results[key][0][0]

    def score_temps(log_temps: list[float]) -> list[float]:
        run.prefetch(base, [math.exp(x) for x in log_temps])  # one pass over the memory scores for all of them
        return [score(base.with_context_temp(math.exp(x))) for x in log_temps]

    def best() -> tuple[tuple[float, float, float, float], MemorySettings]:
        return min(results.values(), key=lambda r: r[0][0])

    if tune_cache if interp else tune_temp:
        unit = math.sqrt(run.dim) if interp else 1.0  # the cache divides raw dot products, the softmax scaled ones
        _grid_then_refine(score_temps, [t * unit for t in temp_grid], (TEMP_LIMITS[0] * unit, TEMP_LIMITS[1] * unit))
    else:
        score(base)
    if tune_external and not interp:
        current = best()[1]
        _grid_then_refine(
            lambda xs: [score(current.with_(external_temp=math.exp(x))) for x in xs],
            [current.ext_temp * f for f in EXTERNAL_TEMP_STEPS],
        )
    (nll, lam, itemp, lam_c), settings = best()
    chosen = settings.with_(lmbda=lam, interp_temp=itemp, cache_lmbda=lam_c if interp else settings.cache_lmbda)
    no_memory = mean_nll(run.log_probs(MemorySettings()))
    verdict = report_verdict(chosen, nll, no_memory, tune_interp, tune_cache and interp, log)
    return TuneResult(chosen, nll, trials, no_memory_nll=no_memory, verdict=verdict)


def report_verdict(
    chosen: MemorySettings, nll: float, no_memory: float, tuned_lmbda: bool, tuned_cache: bool,
    log: Callable[[str], None],
) -> str:
    """Whether the tuned memory helps, barely helps or hurts against the model without memory; notes to ``log``."""
    bits, plain = nll / math.log(2), no_memory / math.log(2)
    if tuned_lmbda and chosen.lmbda == 0:
        log("note: kNN-LM does not help on the tuning split: --lmbda 0 chosen (no interpolation)")
    if tuned_cache and chosen.cache_lmbda == 0:
        log("note: the continuous cache does not help on the tuning split: --cache-lmbda 0 chosen (no cache)")
    if nll > no_memory + 1e-9:
        fix = ""
        if chosen.uses_local and not chosen.interp_cache:
            fix = "; the joint softmax cannot switch its memory off: --cache interp can"
        log(f"note: the memory hurts on the tuning split: {bits:.4f} bits per token at best, {plain:.4f} without "
            f"memory{fix}")
        return "hurts"
    if nll > no_memory - 1e-9:
        return "does not help"  # every weight 0: the model alone (said above)
    if nll > no_memory - FLAT_NLL:
        log(f"note: the memory barely helps on the tuning split: {bits:.4f} bits per token, {plain:.4f} without it")
        return "barely helps"
    return "helps"
