"""``trime-eval``: perplexity (or bits per character) with local, long-term and external memory.

One tool produces every row of the paper's tables from a fairseq checkpoint or a Hugging
Face model dir (any :mod:`trime.adapters` front-end):

- ``--memory none``: the plain LM (equals ``fairseq-eval-lm`` with the same windows);
- ``--memory local``: TrimeLM (context + earlier window tokens as memory);
- ``--memory long --mem-size M``: TrimeLM_long, or the continuous cache on a CE model;
- ``--memory external --mem-size M --datastore DIR``: TrimeLM_ext (optionally ``--lmbda``);
- ``--knnlm --datastore DIR``: kNN-LM (with ``--memory long``: kNN-LM + cache).

Windows: ``--tokens-per-sample`` (default: the checkpoint's) tokens per window of which
the first ``--context-window`` are context, as ``fairseq-eval-lm`` does. ``--tune``
searches the temperatures (and lambda) on ``--tune-subset`` and reports
``--gen-subset`` with them; ``--sweep NAME=V1,V2,..`` plots a metric against one setting.
See :mod:`trime.eval.memory` for the exact probability.
"""

import argparse
import datetime
import math
import sys
import time
from pathlib import Path

import torch
from trime.eval.cache import EvalCache, entry_key, split_files_identity
from trime.eval.memory import MemorySettings, ScoreState, score_batch
from trime.eval.tuning import CachedRun, tune

from trime.adapters import batch_size_for, load_adapter
from trime.databin import is_byte_level
from trime.errors import fail
from trime.knn import KnnResults, knn_chunk_rows
from trime.memories import MEMORIES
from trime.io_utils import atomic_path, identity_key, quiet_libraries, write_json_atomic

SWEEPABLE = {
    "mem-size": ("mem_size", int),
    "lmbda": ("lmbda", float),
    "k": ("k", int),
    "softmax-temp": ("softmax_temp", float),
    "external-temp": ("external_temp", float),
    "interp-temp": ("interp_temp", float),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        fail(f"{message} (see trime-eval --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="trime-eval", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "data",
        help="fairseq data-bin (trime-prepare, fairseq-preprocess), or for a Hugging Face --path a folder of "
        "text splits (train.txt/valid.txt/test.txt or wiki.SPLIT.tokens)",
    )
    p.add_argument("--path", required=True, help="fairseq checkpoint, or Hugging Face model dir (with config.json)")
    p.add_argument("--memory", choices=MEMORIES, default="none", help="memory level (cumulative; default none)")
    p.add_argument(
        "--gen-subset",
        default="test",
        help="split to report (default test, as fairseq-eval-lm; --tune tunes on --tune-subset first)",
    )
    p.add_argument(
        "--context-window", type=int, default=0, help="tokens of context (and local memory) before each window"
    )
    p.add_argument(
        "--tokens-per-sample", type=int, default=None, help="window length incl. context (default: the checkpoint's)"
    )
    p.add_argument(
        "--softmax-temp",
        type=float,
        default=1.0,
        help="temperature of the memory logits (token logits are never scaled)",
    )
    p.add_argument(
        "--external-temp",
        type=float,
        default=None,
        help="temperature of the datastore's neighbours in the joint softmax (--memory external; default: "
        "--softmax-temp). Datastore scores are the best of millions of keys, local/long ones of a few thousand; "
        "--tune tunes it after --softmax-temp unless given",
    )
    p.add_argument("--mem-size", type=int, default=None, help="long-term memory: earlier scored tokens kept (FIFO)")
    p.add_argument("--datastore", default=None, help="datastore directory from trime-build-datastore")
    p.add_argument(
        "--k",
        type=int,
        default=1024,
        help="neighbours retrieved per scored token (at most the datastore's keys). Memory grows linearly with k: "
        "hits are searched and scored about 2M at a time (~60 MB, whatever --max-tokens), but --tune and --sweep "
        "keep every hit of their split (tokens x k x 13 bytes, e.g. 217k tokens x k=1024: 2.9 GB)",
    )
    p.add_argument("--nprobe", type=int, default=32, help="IVF lists probed per search")
    p.add_argument(
        "--key-module", default=None, help="HF models: module whose input are the keys (default: last layer's MLP)"
    )
    p.add_argument(
        "--allow-other-checkpoint",
        action="store_true",
        help="use a --datastore built with another checkpoint (of the same model family and dimension); "
        "refused by default, since its keys come from other weights",
    )
    p.add_argument("--knn-exact", action="store_true", help="score neighbours with exact distances from keys.npy")
    p.add_argument(
        "--knn-search",
        choices=("faiss", "torch"),
        default="faiss",
        help="faiss: index.faiss (IVF-PQ, --nprobe, --faiss-gpus); torch: exact search over all keys with torch on "
        "the model's device, no index needed (device memory: count x dim x 2 bytes for fp16 keys)",
    )
    p.add_argument(
        "--faiss-gpus", choices=("auto", "all", "none"), default="auto", help="auto: GPUs 1..n-1 (GPU 0 if only one)"
    )
    p.add_argument(
        "--lmbda",
        type=float,
        default=None,
        help="kNN-LM interpolation weight (default 0.25 with --knnlm, else 0 = off); given with --tune, it is "
        "kept (and --interp-temp with it) instead of tuned, e.g. --lmbda 0 for the joint softmax only",
    )
    p.add_argument("--interp-temp", type=float, default=1.0, help="temperature of p_knn = softmax(score / T)")
    p.add_argument(
        "--knnlm", action="store_true", help="kNN-LM: use the datastore by interpolation only, not in the joint softmax"
    )
    p.add_argument(
        "--tune", action="store_true", help="tune softmax-temp (and lmbda, interp-temp) on --tune-subset first"
    )
    p.add_argument("--tune-subset", default="valid")
    p.add_argument(
        "--tune-tokens",
        type=int,
        default=None,
        help="tune on the first batches of --tune-subset that score at least this many tokens (default: all of it); "
        "a contiguous prefix, so long-term memory sees the same stream as on the whole split",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="keep forward passes and kNN hits here and reuse them in later runs with the same checkpoint, data, "
        "windows, batch size, precision and datastore/search settings (every --memory level and tuned value "
        "shares them); ~tokens x dim x 5 bytes per split, plus tokens x k x 13 bytes of hits",
    )
    p.add_argument("--sweep", default=None, metavar="NAME=V1,V2,...", help=f"one of {', '.join(SWEEPABLE)}")
    p.add_argument(
        "--sweep-prefix", default=None, help="output prefix for the sweep .json/.png (default trime-sweep-NAME)"
    )
    p.add_argument("--results-json", default=None, help="write results, settings and identities here")
    p.add_argument("--cpu", action="store_true")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="model in fp16 (log-probs still fp32)")
    prec.add_argument("--bf16", action="store_true", help="model in bf16 (log-probs still fp32)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per batch incl. context (default 8192)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per batch (overrides --max-tokens)")
    p.add_argument("--no-progress-bar", action="store_true")
    return p


def check_args(args) -> None:
    """Flag combinations that cannot work, as one-line errors."""
    needs_store = args.memory == "external" or args.knnlm
    if needs_store and not args.datastore:
        what = "--knnlm" if args.knnlm else "--memory external"
        fail(f"{what} needs --datastore DIR (build one with trime-build-datastore)")
    if args.datastore and not needs_store:
        fail("--datastore is only used with --memory external or --knnlm; add one of them or drop --datastore")
    if args.knnlm and args.memory == "external":
        fail(
            "--knnlm uses the datastore for interpolation only; "
            "pick the in-context memory with --memory none|local|long"
        )
    sweeps_mem_size = (args.sweep or "").partition("=")[0] == "mem-size"
    if args.memory in ("long", "external") and args.mem_size is None and sweeps_mem_size and not args.tune:
        pass  # the sweep gives the sizes
    elif args.memory in ("long", "external") and (args.mem_size is None or args.mem_size < 1):
        fail(f"--memory {args.memory} needs --mem-size M >= 1 (earlier scored tokens to keep, e.g. 12288)")
    if args.mem_size is not None and args.memory not in ("long", "external"):
        fail("--mem-size is only used with --memory long or external")
    if args.softmax_temp <= 0 or args.interp_temp <= 0 or (args.external_temp is not None and args.external_temp <= 0):
        fail("--softmax-temp, --external-temp and --interp-temp must be > 0")
    if args.external_temp is not None and args.memory != "external":
        fail("--external-temp scales the datastore's neighbours in the joint softmax: it needs --memory external")
    if args.lmbda is not None and not 0 <= args.lmbda < 1:
        fail(f"--lmbda must be in [0, 1), got {args.lmbda}")
    if args.lmbda and not needs_store:
        fail("--lmbda interpolates with a datastore: add --knnlm or --memory external and --datastore")
    if args.k < 1 or args.nprobe < 1:
        fail("--k and --nprobe must be >= 1")
    if args.tune_tokens is not None and (args.tune_tokens < 1 or not args.tune):
        fail("--tune-tokens N needs --tune and N >= 1 (scored tokens of --tune-subset to tune on)")
    if args.knn_search != "faiss" and not args.datastore:
        fail(f"--knn-search {args.knn_search} searches a datastore: add --datastore DIR or drop --knn-search")


def memory_settings(args) -> MemorySettings:
    lmbda = args.lmbda if args.lmbda is not None else (0.25 if args.knnlm else 0.0)
    return MemorySettings(
        level=args.memory,
        softmax_temp=args.softmax_temp,
        mem_size=args.mem_size or 0,
        knn_in_joint=args.memory == "external",
        lmbda=lmbda,
        interp_temp=args.interp_temp,
        k=args.k if args.datastore else None,  # no datastore: no neighbours, nothing to record
        external_temp=args.external_temp,
    )


def cache_inputs(args, lm, windows, batch_size: int, precision: str, store=None) -> dict:
    """What a cached forward pass (and, under ``"knn"``, a cached search) depends on besides the split."""
    inputs = {
        "checkpoint": identity_key(lm.identity),
        "frontend": lm.frontend,
        "architecture": lm.architecture,
        "key_source": lm.key_source,
        "dict_sha256": lm.dict_sha256,
        "data_dir": str(Path(args.data).resolve()),
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
            "nprobe": args.nprobe,
            "search": args.knn_search,
            "on_gpu": bool(store.on_gpu),
        }
    return inputs


def memory_label(settings: MemorySettings, knnlm: bool) -> str:
    return settings.level + ("+knnlm" if knnlm else "")


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
    ):
        """``cache`` (``--cache-dir``) keeps forward passes and hits on disk, named by ``cache_inputs``
        (what they depend on besides the split: see :func:`cache_inputs`)."""
        self.lm, self.windows, self.batch_size = lm, windows, batch_size
        self.store, self.k, self.exact, self.progress = store, k, exact, progress
        self.cache, self.cache_inputs = cache, cache_inputs or {}

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
        hits = self.store.search(batch.queries[start:stop], self.k, exact=self.exact)
        return hits.to(batch.targets.device)

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
        from tqdm import tqdm

        return tqdm(items, total=total, desc=desc, unit="batch", disable=not self.progress, file=sys.stderr)

    def _batches(self, split: str, max_batches: int | None = None):
        windows = self.lm.windows(split, self.windows)
        total = windows.num_batches(self.batch_size)
        if max_batches is not None:
            total = min(total, max_batches)
        return self._progress(windows.batches(self.batch_size, 0, total), total, f"trime-eval {split}")

    def run(self, split: str, settings: MemorySettings, cached: CachedRun | None = None) -> tuple[float, int, float]:
        """(NLL sum in nats, scored tokens, seconds) streaming over ``split``.

        With a cache (or ``cached``, a whole-split :meth:`collect` of ``split``) the split is scored
        from memory; the seconds are then those of its forward passes and searches plus the scoring.
        """
        if self.cache is not None or cached is not None:
            cached = cached or self.collect(split)
            started = time.perf_counter()
            log_probs = cached.log_probs(settings)
            seconds = cached.seconds + time.perf_counter() - started
            return -float(log_probs.double().sum()), log_probs.numel(), seconds
        state = ScoreState.fresh(settings)
        nll, count = 0.0, 0
        sync = torch.cuda.synchronize if self.lm.device.type == "cuda" else (lambda: None)
        started = time.perf_counter()
        for sample in self._batches(split):
            batch = self.lm.forward(sample)
            log_probs = score_batch(batch, settings, state, self._lazy_search(batch), dim=self.lm.dim)
            nll -= float(log_probs.double().sum())
            count += log_probs.numel()
        sync()
        return nll, count, time.perf_counter() - started

    def collect(self, split: str, max_batches: int | None = None) -> CachedRun:
        """Forward (and search) the batches of ``split`` once, keeping the results on the CPU.

        With a cache, forward passes and hits are loaded from it when they are there and
        saved to it when they are computed.
        """
        if self.cache is None:
            batches, knn = [], []
            started = time.perf_counter()
            for sample in self._batches(split, max_batches):
                batch = self.lm.forward(sample)
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
        loaded = self.cache.load_forward(forward_key)
        if loaded is None:
            started = time.perf_counter()
            batches = [self.lm.forward(s).to(torch.device("cpu")) for s in self._batches(split, max_batches)]
            forward_seconds = time.perf_counter() - started
            self.cache.save_forward(forward_key, batches, forward_seconds)
        else:
            batches, forward_seconds = loaded
        knn: list = [None] * len(batches)
        search_seconds = 0.0
        if self.store is not None:
            knn_key = entry_key(forward=forward_key, k=self.k, exact=self.exact, **self.cache_inputs.get("knn", {}))
            hits = self.cache.load_knn(knn_key)
            if hits is None:
                started = time.perf_counter()
                searched = self._progress(batches, len(batches), f"trime-eval {split} kNN search")
                knn = [self._search(b.to(self.lm.device)).to(torch.device("cpu")) for b in searched]
                search_seconds = time.perf_counter() - started
                self.cache.save_knn(knn_key, knn, search_seconds)
            else:
                knn, search_seconds = hits
        return CachedRun(batches, knn, self.lm.device, self.lm.dim, seconds=forward_seconds + search_seconds)


def metric_line(nll: float, count: int, is_bytes: bool) -> dict:
    loss2 = nll / max(count, 1) / math.log(2)
    out = {"loss_base2": loss2, "tokens": count}
    if is_bytes:
        out["bpc"] = loss2
    else:
        out["ppl"] = 2**loss2
    return out


def print_table(rows: list[dict]) -> None:
    metric = "bpc" if "bpc" in rows[0] else "ppl"
    print(f"| subset | memory | {metric} | tokens | tokens/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        value = f"{r[metric]:.4f}" if metric == "bpc" else f"{r[metric]:.2f}"
        speed = f"{r['tokens_per_s']:,.1f}" if r.get("tokens_per_s") is not None else "-"
        print(f"| {r['subset']} | {r['memory']} | {value} | {r['tokens']:,} | {speed} |")


def settings_line(settings: MemorySettings, knnlm: bool, uses_store: bool, subset: str | None = None) -> str:
    parts = ([f"subset {subset}"] if subset else []) + [f"memory {memory_label(settings, knnlm)}"]
    if settings.level != "none":
        parts.append(f"softmax-temp {settings.softmax_temp:.4g}")
    if settings.knn_in_joint:
        parts.append(f"external-temp {settings.ext_temp:.4g}")
    if settings.uses_long or settings.level in ("long", "external"):
        parts.append(f"mem-size {settings.mem_size or 'swept'}")
    if uses_store:
        parts += [f"k {settings.k}", f"lmbda {settings.lmbda:.4g}", f"interp-temp {settings.interp_temp:.4g}"]
    return "trime-eval: " + ", ".join(parts)


def run_sweep(args, evaluator: Evaluator, cached: CachedRun, base: MemorySettings, is_bytes: bool) -> dict:
    """Evaluate ``--sweep NAME=V1,...`` on a cached split; write json + png."""
    name, _, values_text = args.sweep.partition("=")
    if name not in SWEEPABLE or not values_text:
        fail(f"--sweep must look like NAME=V1,V2 with NAME in {', '.join(SWEEPABLE)}; got {args.sweep!r}")
    field_name, cast = SWEEPABLE[name]
    try:
        values = [cast(v) for v in values_text.split(",") if v]
    except ValueError:
        fail(f"--sweep {name}: values must be {cast.__name__}s, got {values_text!r}")
    if name == "mem-size" and base.level not in ("long", "external"):
        fail("--sweep mem-size needs --memory long or external")
    if name == "external-temp" and not base.knn_in_joint:
        fail("--sweep external-temp needs --memory external")
    if name in ("k", "lmbda", "interp-temp") and evaluator.store is None:
        fail(f"--sweep {name} needs a datastore (--memory external or --knnlm with --datastore)")
    if name == "k" and max(values) > evaluator.k:
        fail(f"--sweep k values must be <= --k {evaluator.k} (the search depth)")
    points = []
    for v in values:
        lp = cached.log_probs(base.with_(**{field_name: v}))
        point = metric_line(-float(lp.double().sum()), lp.numel(), is_bytes)
        point["value"] = v
        points.append(point)
        print(f"trime-eval: sweep {name}={v}: {'bpc' if is_bytes else 'ppl'} {point.get('bpc', point.get('ppl')):.4f}")
    prefix = Path(args.sweep_prefix or f"trime-sweep-{name}")
    metric = "bpc" if is_bytes else "ppl"
    recorded = dict(base.__dict__)
    if evaluator.store is None:  # a sweep without a datastore has no neighbours: record none of their settings
        for key in ("k", "lmbda", "interp_temp", "knn_in_joint"):
            recorded.pop(key, None)
    if name == "mem-size":
        recorded["mem_size"] = None  # the swept value, per point
    record = {"parameter": name, "metric": metric, "points": points, "settings": recorded}
    write_json_atomic(prefix.with_suffix(".json"), record)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p["value"] for p in points], [p[metric] for p in points], marker="o")
    ax.set_xlabel(name)
    ax.set_ylabel(metric)
    ax.set_title(f"{args.gen_subset}: {memory_label(base, args.knnlm)}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    png = prefix.with_suffix(".png")
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    print(f"trime-eval: wrote {prefix.with_suffix('.json')} and {png}")
    return record


def main(argv: list | None = None) -> dict:
    """Run trime-eval on ``argv``; returns the results record (also written by --results-json)."""
    args = build_parser().parse_args(argv)
    check_args(args)
    quiet_libraries()
    data_dir = Path(args.data)
    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    lm = load_adapter(args.path, data_dir, cpu=args.cpu, precision=precision, key_module=args.key_module)
    windows = lm.window_settings(args.context_window, args.tokens_per_sample)
    batch_size = batch_size_for(windows, args.batch_size, args.max_tokens)
    store = None
    if args.datastore:
        from trime.retrieval.datastore import Datastore, model_info
        from trime.retrieval.faiss_index import GPU_MAX_K

        store = Datastore.open(
            args.datastore,
            dim=lm.dim,
            dict_sha256=lm.dict_sha256,
            model=model_info(lm),
            nprobe=args.nprobe,
            gpus="none" if args.cpu else args.faiss_gpus,
            search=args.knn_search,
            device=lm.device,
            vocab_size=lm.vocab.get("size"),
        )
        if args.k > store.count:
            fail(
                f"--k {args.k:,} is more than the {store.count:,} keys of --datastore {args.datastore}; "
                f"use --k {store.count} or less"
            )
        if store.on_gpu and args.k > GPU_MAX_K:
            fail(f"--k {args.k} exceeds FAISS's GPU limit of {GPU_MAX_K}; use a smaller --k or --faiss-gpus none")
        ckpt = store.meta.get("checkpoint")
        if ckpt and identity_key(ckpt) != identity_key(lm.identity):
            if not args.allow_other_checkpoint:
                fail(
                    f"--datastore {args.datastore} was built with another checkpoint ({ckpt.get('path')}), "
                    f"not --path {args.path}; rebuild it with trime-build-datastore --path {args.path}, "
                    "or pass --allow-other-checkpoint to use it anyway"
                )
            print(
                f"trime-eval: warning: {args.datastore} was built with another checkpoint ({ckpt.get('path')}); "
                "using it (--allow-other-checkpoint)",
                file=sys.stderr,
            )
    is_bytes = is_byte_level(data_dir)
    settings = memory_settings(args)
    evaluator = Evaluator(
        lm,
        windows,
        batch_size,
        store,
        k=args.k,
        exact=args.knn_exact,
        progress=not args.no_progress_bar,
        cache=EvalCache(args.cache_dir) if args.cache_dir else None,
        cache_inputs=cache_inputs(args, lm, windows, batch_size, precision, store),
    )
    label = memory_label(settings, args.knnlm)
    rows: list[dict] = []
    tuning = None
    cached: CachedRun | None = None

    if args.tune:
        tune_temp = settings.level != "none"
        tune_interp = store is not None and args.lmbda is None
        tune_external = settings.knn_in_joint and args.external_temp is None
        if not (tune_temp or tune_interp):
            fail("--tune has nothing to tune with --memory none and no datastore (or a fixed --lmbda)")
        cached = evaluator.collect(args.tune_subset, evaluator.batches_for_tokens(args.tune_subset, args.tune_tokens))
        result = tune(cached, settings, tune_temp, tune_interp, tune_external)
        settings = result.settings
        lp = cached.log_probs(settings)
        row = {
            "subset": args.tune_subset,
            "memory": label,
            **metric_line(-float(lp.double().sum()), lp.numel(), is_bytes),
        }
        row.update(seconds=None, tokens_per_s=None, tuned_on=True)
        rows.append(row)
        tuning = {
            "subset": args.tune_subset,
            "tokens": cached.num_tokens,
            "chosen": {
                "softmax_temp": settings.softmax_temp,
                "external_temp": settings.ext_temp if settings.knn_in_joint else None,
                "lmbda": settings.lmbda,
                "interp_temp": settings.interp_temp,
            },
            "trials": result.trials,
        }

    sweep = None
    gen_cached = None  # the whole --gen-subset, when a sweep collected it (its memory terms are reused)
    if args.sweep:
        if cached is None or args.tune_subset != args.gen_subset or args.tune_tokens is not None:
            cached = evaluator.collect(args.gen_subset)
        gen_cached = cached
        sweep = run_sweep(args, evaluator, cached, settings, is_bytes)

    if sweep is not None and args.mem_size is None and sweep["parameter"] == "mem-size":
        # no --mem-size of its own: the sweep points are the results (no extra evaluation)
        for point in sweep["points"]:
            metrics = {key: point[key] for key in ("loss_base2", "tokens", "bpc", "ppl") if key in point}
            rows.append({"subset": args.gen_subset, "memory": f"{label} mem-size={point['value']}", **metrics,
                         "seconds": None, "tokens_per_s": None})
    else:
        nll, count, seconds = evaluator.run(args.gen_subset, settings, gen_cached)
        row = {"subset": args.gen_subset, "memory": label, **metric_line(nll, count, is_bytes)}
        row.update(seconds=seconds, tokens_per_s=count / seconds if seconds > 0 else None)
        rows.append(row)

    print(settings_line(settings, args.knnlm, store is not None, subset=args.gen_subset))
    last = rows[-1]
    print(
        f"Loss (base 2): {last['loss_base2']:.4f}, {'bpc' if is_bytes else 'Perplexity'}: "
        f"{last['bpc'] if is_bytes else last['ppl']:.{4 if is_bytes else 2}f}"
    )
    print_table(rows)
    record = {
        "trime_version": _version(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "checkpoint": lm.identity,
        "model": {"frontend": lm.frontend, "architecture": lm.architecture, "key_source": lm.key_source},
        "data": {"dir": str(data_dir), "dict_sha256": lm.dict_sha256, "byte_level": is_bytes},
        "datastore": store.identity() if store is not None else None,
        "settings": {
            "memory": args.memory,
            "knnlm": args.knnlm,
            "softmax_temp": settings.softmax_temp,
            "external_temp": settings.ext_temp if settings.knn_in_joint else None,
            "mem_size": settings.mem_size if settings.uses_long else None,
            "k": args.k if store else None,
            "nprobe": args.nprobe if store else None,
            "knn_exact": args.knn_exact,
            "knn_search": args.knn_search if store else None,
            "lmbda": settings.lmbda,
            "interp_temp": settings.interp_temp,
            "tune_tokens": args.tune_tokens,
            **windows.as_dict(),
            "batch_size": batch_size,
            "precision": precision,
            "device": str(lm.device),
        },
        "results": rows,
        "tuning": tuning,
        "sweep": sweep,
    }
    if args.results_json:
        write_json_atomic(args.results_json, record)
    return record


def _version() -> str:
    import trime

    return trime.__version__


def cli_main() -> None:
    main()


if __name__ == "__main__":
    cli_main()
