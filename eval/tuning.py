"""Tuning ``--softmax-temp``, ``--external-temp`` and kNN-LM's lambda / interp-temp on cached forward passes.

The model forward and the FAISS search run once (:class:`CachedRun`); every candidate
setting then only re-scores the memory, which is what makes the search cheap. The local +
long-term terms are kept per softmax temperature, so trials of the external temperature,
lambda or interp-temp re-score only the neighbours.

- softmax temperature T: a geometric grid (extended while the best point is on its edge), then
  rounds of 7 points spread evenly (in log T) between the best point's neighbours, each round 4x
  narrower, until they are TEMP_TOLERANCE apart. The candidates of one round are scored together:
  the local + long memory scores are computed once per round, not once per temperature;
- external temperature T_ext (the datastore's neighbours in the joint softmax): the same search on
  a grid of T x 1/4 .. 4, with the tuned T fixed;
- interpolation: for each interp-temp on a fixed geometric grid (p_knn depends only on
  it, so it is computed once per grid point), the best lambda by golden-section search;
  the mixture's NLL is convex in lambda, so that search is exact.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from trime.eval.memory import (
    MemorySettings,
    ScoreState,
    context_memory_terms_at_temps,
    interpolate,
    knn_log_prob,
    require_finite,
    score_with_context_terms,
)
from trime.knn import KnnResults

GOLDEN = (math.sqrt(5) - 1) / 2
TEMP_GRID = tuple(2.0**e for e in range(-3, 4))  # 0.125 .. 8; golden-section search refines between neighbours
TEMP_TOLERANCE = 0.03  # in log T: the NLL is flat near its optimum, so ~3% in T changes it by < 0.001 bits
TEMP_LIMITS = (1 / 1024, 1024.0)  # how far the grid is extended when the optimum is on its edge
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
    seconds: float = 0.0
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
        trials that change only the external memory's settings (T_ext, lambda, interp-temp, k) reuse them."""
        self.prefetch(settings, [settings.softmax_temp])
        return self._context_memo[settings.context_key()]

    def prefetch(self, settings: MemorySettings, temps: Sequence[float]) -> None:
        """Compute the context terms of ``settings`` at each softmax temperature of ``temps`` that is not
        memoised yet, in one pass over the batches (each memory score is computed once for all of them)."""
        keyed = {settings.with_(softmax_temp=t).context_key(): t for t in temps}
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
            self._context_memo[settings.with_(softmax_temp=t).context_key()] = terms

    def log_probs(self, settings: MemorySettings) -> Tensor:
        """Per-token log P of every scored token (CPU, fp32) under ``settings``; NaN or inf is refused."""
        out = []
        for batch, knn, terms in zip(self.batches, self.knn, self.context_terms(settings)):
            batch = batch.to(self.device)
            knn = knn.to(self.device) if knn is not None else None
            terms = tuple(t.to(self.device) for t in terms)
            out.append(score_with_context_terms(batch, settings, terms, knn, dim=self.dim).cpu())
        log_probs = torch.cat(out) if out else torch.zeros(0)
        require_finite(log_probs, settings)
        return log_probs


def mean_nll(log_probs: Tensor) -> float:
    return float(-log_probs.double().mean())


@dataclass
class TuneResult:
    settings: MemorySettings
    nll: float
    trials: list[dict]


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


REFINE_POINTS = 7  # candidates per refinement round (scored together), spread evenly between two neighbours


def _grid_then_refine(objective_logs: Callable[[list[float]], list[float]], grid: Sequence[float]) -> None:
    """Minimise over log T: ``grid`` (extended x2 per step while the best point is on an edge, up to
    TEMP_LIMITS), then rounds of REFINE_POINTS points between the best point's neighbours until the
    neighbours are TEMP_TOLERANCE apart. ``objective_logs`` scores a list of log T at once."""
    start = sorted(math.log(t) for t in grid)
    values = dict(zip(start, objective_logs(start)))

    def bracket() -> tuple[int, list[float]]:
        xs = sorted(values)
        return min(range(len(xs)), key=lambda j: values[xs[j]]), xs

    i, xs = bracket()
    while i == len(xs) - 1 and math.exp(xs[-1]) * 2 <= TEMP_LIMITS[1]:
        x = xs[-1] + math.log(2)
        values[x] = objective_logs([x])[0]
        i, xs = bracket()
    while i == 0 and math.exp(xs[0]) / 2 >= TEMP_LIMITS[0]:
        x = xs[0] - math.log(2)
        values[x] = objective_logs([x])[0]
        i, xs = bracket()
    for _ in range(32):  # each round narrows the bracket 4x
        lo, hi = xs[max(0, i - 1)], xs[min(len(xs) - 1, i + 1)]
        if hi - lo <= TEMP_TOLERANCE:
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
    temp_grid: Sequence[float] = TEMP_GRID,
    interp_grid: Sequence[float] = INTERP_TEMP_GRID,
    log: Callable[[str], None] = print,
) -> TuneResult:
    """Search T (if ``tune_temp``), then T_ext (if ``tune_external``), and lambda / interp-temp (if ``tune_interp``).

    Coordinate search: T first, with the external neighbours at T as well (``external_temp`` unset), then
    T_ext with that T fixed; lambda and interp-temp are optimised exactly inside every trial.
    """
    trials: list[dict] = []
    knn_by_temp: dict[float, Tensor] = {}
    if tune_interp:
        knn = run.all_knn().top(base.k)
        targets = run.targets()
        knn_by_temp = {t: knn_log_prob(knn, targets, t) for t in interp_grid}

    def evaluate(settings: MemorySettings) -> tuple[float, float, float]:
        joint = run.log_probs(settings.with_(lmbda=0.0))
        if tune_interp:
            nll, lam, itemp = best_interpolation(joint, knn_by_temp)
        else:
            nll, lam, itemp = mean_nll(joint), base.lmbda, base.interp_temp
        trials.append(
            {"softmax_temp": settings.softmax_temp, "external_temp": settings.external_temp, "lmbda": lam,
             "interp_temp": itemp, "nll": nll}
        )  # fmt: skip
        external = f" external-temp {settings.external_temp:.4g}" if settings.external_temp is not None else ""
        log(
            f"tune softmax-temp {settings.softmax_temp:.4g}{external} lmbda {lam:.3g} "
            f"interp-temp {itemp:.3g}: loss {nll / math.log(2):.4f} bits"
        )
        return nll, lam, itemp

    results: dict[tuple, tuple[tuple[float, float, float], MemorySettings]] = {}

    def score(settings: MemorySettings) -> float:
        key = (settings.softmax_temp, settings.external_temp)
        if key not in results:
            results[key] = (evaluate(settings), settings)
        return results[key][0][0]

    def score_temps(log_temps: list[float]) -> list[float]:
        run.prefetch(base, [math.exp(x) for x in log_temps])  # one pass over the memory scores for all of them
        return [score(base.with_(softmax_temp=math.exp(x))) for x in log_temps]

    def best() -> tuple[tuple[float, float, float], MemorySettings]:
        return min(results.values(), key=lambda r: r[0][0])

    if tune_temp:
        _grid_then_refine(score_temps, temp_grid)
        best_temp = best()[1].softmax_temp
        if not TEMP_LIMITS[0] * 2 <= best_temp <= TEMP_LIMITS[1] / 2:
            log(f"note: the best softmax-temp {best_temp:.4g} is at the search limit: "
                "the memory barely helps")
    else:
        score(base)
    if tune_external:
        current = best()[1]
        _grid_then_refine(
            lambda xs: [score(current.with_(external_temp=math.exp(x))) for x in xs],
            [current.ext_temp * f for f in EXTERNAL_TEMP_STEPS],
        )
    (nll, lam, itemp), settings = best()
    return TuneResult(settings.with_(lmbda=lam, interp_temp=itemp), nll, trials)
