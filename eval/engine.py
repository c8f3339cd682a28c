"""The evaluation engine: streams (or caches) a split's forward passes and kNN searches and scores them.

:class:`Evaluator` runs any :class:`trime.adapters.base.ModelAdapter` over the windows of a
split, searches a :class:`trime.retrieval.datastore.Datastore` when one is given, and scores
every batch with :func:`trime.eval.memory.score_batch` (streaming, peak memory O(chunk x k))
or collects a whole split once for tuning and sweeps (:class:`trime.eval.tuning.CachedRun`).

No NaN or inf reaches a result: every forward pass and every search is checked (one
``isfinite`` reduction each) and a non-finite one is refused in one line naming its source,
``--path`` (a diverged checkpoint, or fp16 overflow) or ``--datastore`` (damaged keys); the
scored log-probs are checked as well (:func:`trime.eval.memory.require_finite`).
"""

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import torch

from trime.adapters.base import WindowBatch
from trime.errors import fail
from trime.eval.cache import EvalCache, entry_key, split_files_identity
from trime.eval.memory import MemorySettings, ScoreState, require_finite, score_batch
from trime.eval.tuning import CachedRun
from trime.io_utils import identity_key, progress_meter
from trime.knn import KnnResults, knn_chunk_rows


def cache_inputs(
    lm,
    data_dir: Path,
    windows,
    batch_size: int,
    precision: str,
    store=None,
    nprobe: int = 32,
    search: str = "faiss",
) -> dict:
    """What a cached forward pass (and, under ``"knn"``, a cached search) depends on besides the split.

    ``nprobe`` and ``search`` are the datastore search settings (``--nprobe``, ``--knn-search``).
    """
    inputs = {
        "checkpoint": identity_key(lm.identity),
        "frontend": lm.frontend,
        "architecture": lm.architecture,
        "key_source": lm.key_source,
        "dict_sha256": lm.dict_sha256,
        "data_dir": str(Path(data_dir).resolve()),
        "windows": windows.as_dict(),
        "batch_size": batch_size,
        "precision": precision,
        "device": lm.device.type,
    }
    if store is not None:
        identity = store.identity()
        inputs["knn"] = {
            "datastore": identity["meta_sha256"],
            "index": identity.get("index"),
            "nprobe": nprobe,
            "search": search,
            "metric": store.metric,
            "on_gpu": bool(store.on_gpu),
        }
    return inputs


def memory_label(settings: MemorySettings, knnlm: bool) -> str:
    """The memory column of the results: the level, ``/interp`` for the continuous cache (``--cache interp``),
    ``+knnlm`` for kNN-LM interpolation."""
    return settings.level + ("/interp" if settings.interp_cache else "") + ("+knnlm" if knnlm else "")


def metric_line(nll: float, count: int, is_bytes: bool) -> dict:
    """Loss in bits per token, tokens, and perplexity (or bits per character for byte-level data)."""
    loss2 = nll / max(count, 1) / math.log(2)
    out = {"loss_base2": loss2, "tokens": count}
    if is_bytes:
        out["bpc"] = loss2
    else:
        out["ppl"] = 2**loss2
    return out


def non_finite_weights(lm) -> int:
    """How many of the model's weights are NaN or inf (0 for an adapter without a torch ``model``)."""
    model = getattr(lm, "model", None)
    if not isinstance(model, torch.nn.Module):
        return 0
    return sum(int((~torch.isfinite(p)).sum()) for p in model.parameters() if p.is_floating_point())


def model_not_finite(lm, split: str) -> NoReturn:
    """Refuse a model whose scores on ``split`` are NaN or inf, naming ``--path`` and the likely cause."""
    bad = non_finite_weights(lm)
    if bad:
        cause = (f"{bad:,} of its weights {'is' if bad == 1 else 'are'} NaN or inf (a diverged training run); "
                 "evaluate an earlier checkpoint, or retrain with a lower learning rate")
    elif lm.dtype == torch.float16:
        cause = "its activations overflow in fp16; drop --fp16 (or use --bf16)"
    else:
        cause = "its weights are finite but its activations overflow (a diverged training run); evaluate an earlier checkpoint"
    fail(f"--path {lm.path} gives NaN or inf scores on the {split} split: {cause}")


def check_batch(lm, batch, split: str) -> None:
    """Refuse a forward pass whose token scores or keys (the memory's) are NaN or inf (one reduction)."""
    finite = (torch.isfinite(batch.token_score).all() & torch.isfinite(batch.token_logz).all()
              & torch.isfinite(batch.reps[batch.key_valid]).all())
    if not bool(finite):
        model_not_finite(lm, split)


def search_datastore(store, queries: torch.Tensor, k: int, exact: bool, device: torch.device) -> KnnResults:
    """The top-k hits of finite ``queries`` in ``store`` (--datastore), on ``device``; keys that give NaN or inf
    scores are refused in one line."""
    hits = store.search(queries, k, exact=exact)
    check_hits(store, hits)
    return hits.to(device)


def check_hits(store, hits: KnnResults) -> None:
    """Refuse neighbour scores that are NaN or inf: the queries are finite (:func:`check_batch`), so the keys of
    ``store`` (--datastore) are damaged."""
    if not bool(torch.isfinite(hits.scores).all()):
        fail(f"--datastore {store.directory} gives NaN or inf neighbour scores: its keys are damaged; "
             "check it with trime-build-datastore --verify and rebuild it")


class Evaluator:
    """Streams (or caches) the forward passes and searches of a split and scores them."""

    def __init__(
        self,
        lm,
        windows,
        batch_size: int,
        store=None,
        k: int = 1024,
        exact: bool = False,
        progress: bool = True,
        cache: EvalCache | None = None,
        cache_inputs: dict | None = None,
        name: str = "eval",
        log: Callable[[str], None] = lambda message: None,
    ):
        """``cache`` (``--cache-dir``) keeps forward passes and hits on disk, named by ``cache_inputs``
        (what they depend on besides the split: see :func:`cache_inputs`). ``name`` starts the
        progress bars' labels. Without bars (``progress`` False) ``log`` gets a progress line every
        30 s instead (:func:`trime.io_utils.progress_meter`)."""
        self.lm, self.windows, self.batch_size = lm, windows, batch_size
        self.name = name
        self.store, self.k, self.exact, self.progress = store, k, exact, progress
        self.cache, self.cache_inputs = cache, cache_inputs or {}
        self.log = log

    def batches_for_tokens(self, split: str, tokens: int | None) -> int | None:
        """The fewest leading batches of ``split`` that score at least ``tokens`` tokens (None: all)."""
        if tokens is None:
            return None
        counts = self.lm.windows(split, self.windows).scored_counts()
        per_batch = [int(counts[i : i + self.batch_size].sum()) for i in range(0, len(counts), self.batch_size)]
        total = 0
        for b, count in enumerate(per_batch):
            total += count
            if total >= tokens:
                return b + 1
        return len(per_batch)

    def _search_rows(self, batch, start: int, stop: int):
        """The top-k hits of scored rows ``start:stop`` of ``batch``, on the batch's device."""
        return search_datastore(self.store, batch.queries[start:stop], self.k, self.exact, batch.targets.device)

    def _search(self, batch):
        """All hits of a batch (for the tuning cache), searched in chunks of about KNN_CHUNK_HITS."""
        if self.store is None:
            return None
        step = knn_chunk_rows(self.k)
        n = batch.num_scored
        if n <= step:
            return self._search_rows(batch, 0, n)
        return KnnResults.cat([self._search_rows(batch, lo, min(n, lo + step)) for lo in range(0, n, step)])

    def _lazy_search(self, batch):
        """What ``score_batch`` searches chunk by chunk while streaming: peak memory O(chunk x k)."""
        if self.store is None:
            return None
        return lambda start, stop: self._search_rows(batch, start, stop)

    def _progress(self, items, total: int, desc: str):
        """A bar over ``items`` (``progress``), else a line to ``log`` every 30 s."""
        return progress_meter(items, total=total, desc=f"{self.name} {desc}" if self.progress else desc, unit="batch",
                        bar=self.progress, log=self.log)

    def _batches(self, split: str, max_batches: int | None = None):
        windows = self.lm.windows(split, self.windows)
        total = windows.num_batches(self.batch_size)
        if max_batches is not None:
            total = min(total, max_batches)
        return self._progress(windows.batches(self.batch_size, 0, total), total, split)

    def forward_batches(self, split: str, max_batches: int | None = None) -> Iterator[WindowBatch]:
        """The forward passes of the first ``max_batches`` batches of ``split`` (None: all), in order, each checked
        finite (:func:`check_batch`): what :meth:`run` scores."""
        for sample in self._batches(split, max_batches):
            batch = self.lm.forward(sample)
            check_batch(self.lm, batch, split)
            yield batch

    def run(
        self, split: str, settings: MemorySettings, cached: CachedRun | None = None
    ) -> tuple[float, int, float, dict[str, float]]:
        """(NLL sum in nats, scored tokens, seconds spent now, what was read from ``--cache-dir``) over ``split``.

        With a cache (or ``cached``, a whole-split :meth:`collect` of ``split``) the split is scored
        from memory; the seconds are then those of its forward passes and searches done now plus the
        scoring. The last item maps each part read from the cache (``forward passes``, ``kNN hits``) to
        the seconds it took when it was computed (empty when everything was measured now).
        """
        if self.cache is not None or cached is not None:
            cached = cached or self.collect(split)
            started = time.perf_counter()
            log_probs = cached.log_probs(settings)
            seconds = cached.seconds + time.perf_counter() - started
            return -float(log_probs.double().sum()), log_probs.numel(), seconds, dict(cached.reused)
        state = ScoreState.fresh(settings)
        nll, count = 0.0, 0
        sync = torch.cuda.synchronize if self.lm.device.type == "cuda" else (lambda: None)
        started = time.perf_counter()
        for batch in self.forward_batches(split):
            log_probs = score_batch(batch, settings, state, self._lazy_search(batch), dim=self.lm.dim)
            require_finite(log_probs, settings)
            nll -= float(log_probs.double().sum())
            count += log_probs.numel()
        sync()
        return nll, count, time.perf_counter() - started, {}

    def collect(self, split: str, max_batches: int | None = None) -> CachedRun:
        """Forward (and search) the batches of ``split`` once, keeping the results on the CPU.

        With a cache, forward passes and hits are loaded from it when they are there and
        saved to it when they are computed. The run's ``seconds`` are those spent now; its ``reused``
        the original seconds of what was read from the cache.
        """
        if self.cache is None:
            batches, knn = [], []
            started = time.perf_counter()
            for batch in self.forward_batches(split, max_batches):
                result = self._search(batch)
                batches.append(batch.to(torch.device("cpu")))
                knn.append(result.to(torch.device("cpu")) if result is not None else None)
            return CachedRun(batches, knn, self.lm.device, self.lm.dim, seconds=time.perf_counter() - started)

        data_dir = self.cache_inputs.get("data_dir")
        forward_key = entry_key(
            **{k: v for k, v in self.cache_inputs.items() if k != "knn"},
            split=split,
            split_files=split_files_identity(Path(data_dir), split) if data_dir else None,
            max_batches=max_batches,
        )
        started = time.perf_counter()
        reused: dict[str, float] = {}
        loaded = self.cache.load_forward(forward_key)
        if loaded is None:
            batches = []
            for sample in self._batches(split, max_batches):
                batch = self.lm.forward(sample)
                check_batch(self.lm, batch, split)  # before anything is cached
                batches.append(batch.to(torch.device("cpu")))
            self.cache.save_forward(forward_key, batches, time.perf_counter() - started)
        else:
            batches, reused["forward passes"] = loaded
        knn: list = [None] * len(batches)
        if self.store is not None:
            knn_key = entry_key(forward=forward_key, k=self.k, exact=self.exact, **self.cache_inputs.get("knn", {}))
            hits = self.cache.load_knn(knn_key)
            if hits is None:
                search_started = time.perf_counter()
                searched = self._progress(batches, len(batches), f"{split} kNN search")
                knn = [self._search(b.to(self.lm.device)).to(torch.device("cpu")) for b in searched]
                self.cache.save_knn(knn_key, knn, time.perf_counter() - search_started)
            else:
                knn, reused["kNN hits"] = hits
        return CachedRun(batches, knn, self.lm.device, self.lm.dim, seconds=time.perf_counter() - started,
                         reused=reused)
