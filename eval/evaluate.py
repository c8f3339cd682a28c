"""``trime-eval``: perplexity (or bits per character) with local, long-term and external memory.

One tool produces every row of the paper's tables from a fairseq checkpoint or a Hugging
Face model dir (any :mod:`trime.adapters` front-end):

- ``--memory none``: the plain LM (equals ``fairseq-eval-lm`` with the same windows);
- ``--memory local``: TrimeLM (context + earlier window tokens as memory);
- ``--memory long --mem-size M``: TrimeLM_long (with ``--cache interp``: the continuous cache, for any model);
- ``--memory external --mem-size M --datastore DIR``: TrimeLM_ext (optionally ``--lmbda``);
- ``--knnlm --datastore DIR``: kNN-LM (with ``--memory long``: kNN-LM + cache).

``--cache interp`` turns the local + long-term memory into the continuous cache of Grave et
al. (2017), interpolated with the model (``--cache-lmbda``, ``--cache-temp``) instead of
joined to its softmax (``--cache joint``, the default: TRIME's memory). With ``--knnlm`` it is
the papers' "kNN-LM + continuous cache": (1 - lmbda - cache_lmbda) P + lmbda p_knn + cache_lmbda p_cache.

Windows: ``--tokens-per-sample`` (default: the checkpoint's) tokens per window of which
the first ``--context-window`` are context, as ``fairseq-eval-lm`` does. ``--tune``
searches the temperatures (and lambda) on ``--tune-subset`` and reports
``--gen-subset`` with them; ``--sweep NAME=V1,V2,..`` plots a metric against one setting.
See :mod:`trime.eval.memory` for the exact probability.

What memory did (:mod:`trime.eval.inspection`): ``--dump-neighbors FILE`` writes one JSON record per
scored token of ``--gen-subset`` (the first ``--dump-limit``) with the reported settings, and
``--report-html FILE`` one self-contained page of them; both score those tokens again after the results.
"""

import argparse
import datetime
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from trime.adapters.base import window_defaults_note
from trime.cli import POSITIVE_FLOAT, POSITIVE_INT, Number, Parser, logger
from trime.cli.model_args import LoadedModel, add_model_args, model_from_args
from trime.databin import is_byte_level
from trime.errors import fail, file_faults_as_errors
from trime.eval.cache import EvalCache
from trime.eval.engine import Evaluator, cache_inputs, memory_label, metric_line
from trime.eval.inspection import DEFAULT_TOP, REPORT_TOKENS, Inspector, write_outputs
from trime.eval.memory import CACHE_MODES, MemorySettings
from trime.eval.sweep import SWEEPABLE, run_sweep, sweep_name, sweep_values
from trime.eval.tuning import CachedRun, tune
from trime.io_utils import quiet_libraries, write_json_atomic
from trime.memories import CROSS_SEGMENT_MEMORIES, MEMORIES
from trime.retrieval.datastore import METRICS, Datastore, model_info
from trime.version import __version__

PROG = "trime-eval"
LMBDA = Number(float, ge=0, lt=1)
# the rule of every numeric flag that --sweep can set: a swept value is checked as the flag's value
SWEEP_RULES = {
    "mem-size": POSITIVE_INT,
    "lmbda": LMBDA,
    "k": POSITIVE_INT,
    "softmax-temp": POSITIVE_FLOAT,
    "external-temp": POSITIVE_FLOAT,
    "interp-temp": POSITIVE_FLOAT,
    "cache-lmbda": LMBDA,
    "cache-temp": POSITIVE_FLOAT,
}
DEFAULT_LMBDA = 0.25  # --lmbda with --knnlm, and --cache-lmbda, when neither is given nor tuned
assert set(SWEEP_RULES) == set(SWEEPABLE), "every sweepable setting needs its flag's rule"


def add_memory_args(p: argparse.ArgumentParser) -> None:
    """The memory flags trime-eval and trime-generate share: levels, temperatures, datastore search, kNN-LM
    and the continuous cache (one name, type and default per concept)."""
    p.add_argument("--memory", choices=MEMORIES, default="none", help="memory level (cumulative; default none)")
    p.add_argument(
        "--softmax-temp",
        type=SWEEP_RULES["softmax-temp"],
        default=1.0,
        help="temperature of the memory logits (token logits are never scaled)",
    )
    p.add_argument(
        "--external-temp",
        type=SWEEP_RULES["external-temp"],
        default=None,
        help="temperature of the datastore's neighbours in the joint softmax (--memory external; default: "
        "--softmax-temp). Datastore scores are the best of millions of keys, local/long ones of a few thousand; "
        "--tune tunes it after --softmax-temp unless given",
    )
    p.add_argument("--mem-size", type=SWEEP_RULES["mem-size"], default=None, help="long-term memory: earlier scored tokens kept (FIFO)")
    p.add_argument("--datastore", default=None, help="datastore directory from trime-build-datastore")
    p.add_argument(
        "--k",
        type=SWEEP_RULES["k"],
        default=1024,
        help="neighbours retrieved per scored token (at most the datastore's keys). Memory grows linearly with k: "
        "hits are searched and scored about 2M at a time (~60 MB, whatever --max-tokens), but --tune and --sweep "
        "keep every hit of their split (tokens x k x 13 bytes, e.g. 217k tokens x k=1024: 2.9 GB)",
    )
    p.add_argument("--nprobe", type=POSITIVE_INT, default=32, help="IVF lists probed per search")
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
        type=SWEEP_RULES["lmbda"],
        default=None,
        help="kNN-LM interpolation weight (default 0.25 with --knnlm, else 0 = off); given with --tune, it is "
        "kept (and --interp-temp with it) instead of tuned, e.g. --lmbda 0 for the joint softmax only",
    )
    p.add_argument("--interp-temp", type=SWEEP_RULES["interp-temp"], default=1.0, help="temperature of p_knn = softmax(score / T)")
    p.add_argument(
        "--knnlm", action="store_true", help="kNN-LM: use the datastore by interpolation only, not in the joint softmax"
    )
    p.add_argument(
        "--metric",
        choices=METRICS,
        default=None,
        help="search metric of the datastore: ip (inner product) or l2 (minus the squared distance); default: the "
        "one it was built with (meta.json). Another metric than its index's needs --knn-search torch",
    )
    p.add_argument(
        "--cache",
        choices=CACHE_MODES,
        default="joint",
        help="how --memory local/long counts: joint (default: in the joint softmax, TRIME's memory) or interp (the "
        "continuous cache of Grave et al. 2017: (1 - cache-lmbda) P + cache-lmbda p_cache, which a model not "
        "trained with TRIME can use, and which --tune can switch off)",
    )
    p.add_argument(
        "--cache-lmbda",
        type=SWEEP_RULES["cache-lmbda"],
        default=None,
        help=f"--cache interp: weight of p_cache (default {DEFAULT_LMBDA}); given with --tune, it is kept (and "
        "--cache-temp with it) instead of tuned. With --knnlm: P = (1 - lmbda - cache-lmbda) P_model + lmbda p_knn "
        "+ cache-lmbda p_cache",
    )
    p.add_argument(
        "--cache-temp",
        type=SWEEP_RULES["cache-temp"],
        default=None,
        help="--cache interp: temperature of p_cache(w) = sum over cached w of softmax(h . h_j / T), raw dot products "
        "as --interp-temp divides kNN scores (T = 1/theta of Grave et al.; default sqrt(key size), the scale of "
        "TRIME's memory logits)",
    )


def build_parser() -> Parser:
    """The ``trime-eval`` command-line parser."""
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_model_args(
        p,
        gen_subset="test",
        gen_subset_help="split to report (default test, as fairseq-eval-lm; --tune tunes on --tune-subset first)",
    )
    add_memory_args(p)
    p.add_argument(
        "--tune",
        action="store_true",
        help="tune softmax-temp (or with --cache interp cache-temp and cache-lmbda; and lmbda, interp-temp) on "
        "--tune-subset first; notes say when the memory barely helps or hurts",
    )
    p.add_argument("--tune-subset", default="valid", help="split --tune tunes on (default valid)")
    p.add_argument(
        "--tune-tokens",
        type=POSITIVE_INT,
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
    p.add_argument(
        "--dump-neighbors",
        default=None,
        metavar="FILE",
        help="write one JSON record per scored token of --gen-subset (the first --dump-limit), with the settings "
        "reported: the token, its probability with memory and the model's, the part that came from memory and each "
        "level's, and the --dump-top memory entries that added most (score, value token, level, source text); "
        "see docs/inspect.md",
    )
    p.add_argument(
        "--report-html",
        default=None,
        metavar="FILE",
        help="write one self-contained HTML page of the first --dump-limit scored tokens, each coloured by how much "
        "memory changed its log-probability; hovering or clicking a token shows its memory entries and their sources",
    )
    p.add_argument(
        "--dump-limit",
        type=POSITIVE_INT,
        default=None,
        help="--dump-neighbors/--report-html: the first N scored tokens of --gen-subset (default: all of them for "
        f"--dump-neighbors, the first {REPORT_TOKENS:,} for --report-html)",
    )
    p.add_argument(
        "--dump-top",
        type=POSITIVE_INT,
        default=None,
        help=f"--dump-neighbors/--report-html: memory entries kept per token, those that added most (default {DEFAULT_TOP})",
    )
    return p


def check_args(args: argparse.Namespace) -> None:
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
    sweeps_mem_size = sweep_name(args.sweep) == "mem-size"
    if args.memory in CROSS_SEGMENT_MEMORIES and args.mem_size is None and sweeps_mem_size and not args.tune:
        pass  # the sweep gives the sizes
    elif args.memory in CROSS_SEGMENT_MEMORIES and args.mem_size is None:
        fail(f"--memory {args.memory} needs --mem-size M >= 1 (earlier scored tokens to keep, e.g. 12288)")
    if args.mem_size is not None and args.memory not in CROSS_SEGMENT_MEMORIES:
        fail("--mem-size is only used with --memory long or external")
    if args.external_temp is not None and args.memory != "external":
        fail("--external-temp scales the datastore's neighbours in the joint softmax: it needs --memory external")
    if args.lmbda and not needs_store:
        fail("--lmbda interpolates with a datastore: add --knnlm or --memory external and --datastore")
    if args.metric and not args.datastore:
        fail("--metric is the datastore's search metric: add --datastore DIR or drop --metric")
    if args.cache == "interp" and args.memory not in ("local", "long"):
        fail(
            "--cache interp interpolates the local and long-term memory: use --memory long --mem-size M (or local)"
            + ("; for kNN-LM + cache add --knnlm" if args.memory == "external" else "")
        )
    if args.cache != "interp" and (args.cache_lmbda is not None or args.cache_temp is not None):
        flag = "--cache-lmbda" if args.cache_lmbda is not None else "--cache-temp"
        fail(f"{flag} sets the continuous cache: add --cache interp (with --memory long --mem-size M)")
    if args.cache == "interp" and (args.lmbda or 0) + (args.cache_lmbda or 0) >= 1:
        fail(f"--lmbda {args.lmbda} and --cache-lmbda {args.cache_lmbda} leave the model no weight: their sum must "
             "be below 1")
    if args.tune_tokens is not None and not args.tune:
        fail("--tune-tokens N needs --tune (it is how many scored tokens of --tune-subset to tune on)")
    if args.knn_search != "faiss" and not args.datastore:
        fail(f"--knn-search {args.knn_search} searches a datastore: add --datastore DIR or drop --knn-search")
    if args.sweep:
        name, values = sweep_values(args.sweep)
        for value in values:  # the swept values keep the rule of the flag they stand for
            SWEEP_RULES[name].check(f"--sweep {name}", value)


def check_dump_args(args: argparse.Namespace) -> None:
    """``--dump-neighbors``/``--report-html`` and their settings: combinations that cannot work, as one-line errors."""
    dumps = args.dump_neighbors or args.report_html
    if not dumps and (args.dump_limit is not None or args.dump_top is not None):
        flag = "--dump-limit" if args.dump_limit is not None else "--dump-top"
        fail(f"{flag} sets what --dump-neighbors and --report-html show: add one of them (FILE) or drop {flag}")
    if dumps and args.memory in CROSS_SEGMENT_MEMORIES and args.mem_size is None:
        fail("--dump-neighbors and --report-html show one setting: give --mem-size M (the sweep's values are not one)")
    if args.dump_neighbors and args.report_html and Path(args.dump_neighbors).resolve() == Path(args.report_html).resolve():
        fail(f"--dump-neighbors and --report-html both name {args.dump_neighbors}; give them different files")


def memory_settings(args: argparse.Namespace, dim: int) -> MemorySettings:
    """The memory settings of the flags (before tuning); ``dim`` is the model's key size."""
    lmbda = args.lmbda if args.lmbda is not None else (DEFAULT_LMBDA if args.knnlm else 0.0)
    interp = args.cache == "interp"
    return MemorySettings(
        level=args.memory,
        softmax_temp=args.softmax_temp,
        mem_size=args.mem_size or 0,
        knn_in_joint=args.memory == "external",
        lmbda=lmbda,
        interp_temp=args.interp_temp,
        k=args.k if args.datastore else None,  # no datastore: no neighbours, nothing to record
        external_temp=args.external_temp,
        cache=args.cache,
        cache_lmbda=(args.cache_lmbda if args.cache_lmbda is not None else DEFAULT_LMBDA) if interp else 0.0,
        cache_temp=args.cache_temp if args.cache_temp is not None else math.sqrt(dim),
    )


def print_table(rows: list[dict]) -> None:
    """The results as a markdown table on stdout; tokens/s only where everything was computed by this run."""
    metric = "bpc" if "bpc" in rows[0] else "ppl"
    print(f"| subset | memory | {metric} | tokens | tokens/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        value = f"{r[metric]:.4f}" if metric == "bpc" else f"{r[metric]:.2f}"
        speed = f"{r['tokens_per_s']:,.1f}" if r.get("tokens_per_s") is not None else "-"
        if r.get("cached_seconds"):
            speed = "cached"
        print(f"| {r['subset']} | {r['memory']} | {value} | {r['tokens']:,} | {speed} |")


def settings_line(settings: MemorySettings, knnlm: bool, uses_store: bool, subset: str | None = None,
                  metric: str | None = None) -> str:
    """The settings a result was scored with, as one line (without the ``trime-eval:`` prefix)."""
    parts = ([f"subset {subset}"] if subset else []) + [f"memory {memory_label(settings, knnlm)}"]
    if settings.level != "none" and not settings.interp_cache:
        parts.append(f"softmax-temp {settings.softmax_temp:.4g}")
    if settings.knn_in_joint:
        parts.append(f"external-temp {settings.ext_temp:.4g}")
    if settings.interp_cache:
        parts += [f"cache-lmbda {settings.cache_lmbda:.4g}", f"cache-temp {settings.cache_temp:.4g}"]
    if settings.uses_long or settings.level in CROSS_SEGMENT_MEMORIES:
        parts.append(f"mem-size {settings.mem_size or 'swept'}")
    if uses_store:
        parts += [f"k {settings.k}", f"metric {metric}", f"lmbda {settings.lmbda:.4g}",
                  f"interp-temp {settings.interp_temp:.4g}"]
    return ", ".join(parts)


# ----------------------------------------------------------------------------- the steps of a run


def open_datastore(args: argparse.Namespace, lm, warn: Callable[[str], None]) -> Datastore | None:
    """``--datastore``, checked against the model (:meth:`Datastore.open`) and ``--k``; None without one."""
    if not args.datastore:
        return None
    store = Datastore.open(
        args.datastore,
        dim=lm.dim,
        dict_sha256=lm.dict_sha256,
        model=model_info(lm),
        checkpoint=lm.identity,
        model_path=args.path,
        allow_other_checkpoint=args.allow_other_checkpoint,
        nprobe=args.nprobe,
        gpus="none" if args.cpu else args.faiss_gpus,
        search=args.knn_search,
        device=lm.device,
        vocab_size=lm.vocab.get("size"),
        log=warn,
        metric=args.metric,
    )
    store.check_k(args.k)
    return store


def tune_step(
    args: argparse.Namespace, evaluator: Evaluator, settings: MemorySettings, is_bytes: bool,
    log: Callable[[str], None],
) -> tuple[MemorySettings, dict, dict, CachedRun]:
    """``--tune``: (tuned settings, the --tune-subset row, the tuning record, the collected --tune-subset)."""
    tune_temp = settings.level != "none" and not settings.interp_cache
    tune_cache = settings.interp_cache and args.cache_lmbda is None
    tune_interp = evaluator.store is not None and args.lmbda is None
    tune_external = settings.knn_in_joint and args.external_temp is None
    if not (tune_temp or tune_interp or tune_cache):
        fail("--tune has nothing to tune with --memory none and no datastore (or a fixed --lmbda / --cache-lmbda)")
    cached = evaluator.collect(args.tune_subset, evaluator.batches_for_tokens(args.tune_subset, args.tune_tokens))
    result = tune(cached, settings, tune_temp, tune_interp, tune_external, tune_cache=tune_cache, log=log)
    settings = result.settings
    lp = cached.log_probs(settings)
    row = {
        "subset": args.tune_subset,
        "memory": memory_label(settings, args.knnlm),
        **metric_line(-float(lp.double().sum()), lp.numel(), is_bytes),
    }
    row.update(seconds=None, tokens_per_s=None, tuned_on=True)
    tuning = {
        "subset": args.tune_subset,
        "tokens": cached.num_tokens,
        "chosen": {
            "softmax_temp": settings.softmax_temp,
            "external_temp": settings.ext_temp if settings.knn_in_joint else None,
            "lmbda": settings.lmbda,
            "interp_temp": settings.interp_temp,
            "cache_lmbda": settings.cache_lmbda if settings.interp_cache else None,
            "cache_temp": settings.cache_temp if settings.interp_cache else None,
        },
        "no_memory_nll": result.no_memory_nll,
        "verdict": result.verdict,
        "trials": result.trials,
    }
    return settings, row, tuning, cached


def report_rows(
    args: argparse.Namespace,
    evaluator: Evaluator,
    settings: MemorySettings,
    is_bytes: bool,
    sweep: dict | None,
    gen_cached: CachedRun | None,
    log: Callable[[str], None] = lambda message: None,
) -> list[dict]:
    """The --gen-subset rows: the sweep's points when it swept mem-size without a --mem-size, else one run.

    A run whose forward passes or kNN hits were read from ``--cache-dir`` has no tokens/s (its time
    was not measured now); the seconds they took when computed are kept as ``cached_seconds``, and ``log``
    says so."""
    label = memory_label(settings, args.knnlm)
    if sweep is not None and args.mem_size is None and sweep["parameter"] == "mem-size":
        # no --mem-size of its own: the sweep points are the results (no extra evaluation)
        rows = []
        for point in sweep["points"]:
            metrics = {key: point[key] for key in ("loss_base2", "tokens", "bpc", "ppl") if key in point}
            rows.append({"subset": args.gen_subset, "memory": f"{label} mem-size={point['value']}", **metrics,
                         "seconds": None, "tokens_per_s": None})
        return rows
    nll, count, seconds, reused = evaluator.run(args.gen_subset, settings, gen_cached)
    row = {"subset": args.gen_subset, "memory": label, **metric_line(nll, count, is_bytes)}
    row.update(seconds=seconds, tokens_per_s=count / seconds if seconds > 0 and not reused else None)
    if reused:
        row["cached_seconds"] = sum(reused.values())
        parts = " and ".join(f"{part} (which took {s:,.1f} s when computed)" for part, s in reused.items())
        log(f"{args.gen_subset}: {parts} read from --cache-dir; {seconds:,.1f} s spent now, so no tokens/s")
    return [row]


def print_results(args: argparse.Namespace, settings: MemorySettings, rows: list[dict], store: Datastore | None,
                  is_bytes: bool, log: Callable[[str], None], windows_note: str | None = None) -> None:
    """The settings line (ending with the windows where they took defaults), fairseq-eval-lm's loss line
    and the results table on stdout."""
    line = settings_line(settings, args.knnlm, store is not None, subset=args.gen_subset,
                         metric=store.metric if store is not None else None)
    log(f"{line}; {windows_note}" if windows_note else line)
    last = rows[-1]
    print(
        f"Loss (base 2): {last['loss_base2']:.4f}, {'bpc' if is_bytes else 'Perplexity'}: "
        f"{last['bpc'] if is_bytes else last['ppl']:.{4 if is_bytes else 2}f}"
    )
    print_table(rows)


def results_record(
    args: argparse.Namespace,
    loaded: LoadedModel,
    store: Datastore | None,
    settings: MemorySettings,
    is_bytes: bool,
    rows: list[dict],
    tuning: dict | None,
    sweep: dict | None,
) -> dict:
    """What ``--results-json`` holds: results, settings and the identities of model, data and datastore."""
    lm = loaded.lm
    return {
        "trime_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "checkpoint": lm.identity,
        "model": {"frontend": lm.frontend, "architecture": lm.architecture, "key_source": lm.key_source},
        "data": {"dir": str(Path(args.data)), "dict_sha256": lm.dict_sha256, "byte_level": is_bytes},
        "datastore": store.identity() if store is not None else None,
        "settings": {
            "memory": args.memory,
            "knnlm": args.knnlm,
            "softmax_temp": settings.softmax_temp,
            "external_temp": settings.ext_temp if settings.knn_in_joint else None,
            "mem_size": settings.mem_size if settings.uses_long else None,
            "cache": settings.cache,
            "cache_lmbda": settings.cache_lmbda if settings.interp_cache else None,
            "cache_temp": settings.cache_temp if settings.interp_cache else None,
            "k": args.k if store else None,
            "metric": store.metric if store else None,
            "nprobe": args.nprobe if store else None,
            "knn_exact": args.knn_exact,
            "knn_search": args.knn_search if store else None,
            "lmbda": settings.lmbda,
            "interp_temp": settings.interp_temp,
            "tune_tokens": args.tune_tokens,
            **loaded.windows.as_dict(),
            "batch_size": loaded.batch_size,
            "precision": loaded.precision,
            "device": str(lm.device),
        },
        "results": rows,
        "tuning": tuning,
        "sweep": sweep,
    }


def evaluate(args: argparse.Namespace) -> dict:
    """Run trime-eval on parsed flags; returns the results record (also written by --results-json)."""
    check_args(args)
    check_dump_args(args)
    quiet_libraries()
    log, warn = logger(PROG), logger(PROG, stderr=True)
    loaded = model_from_args(args)
    lm = loaded.lm
    windows_note = window_defaults_note(loaded.windows, args.context_window, args.tokens_per_sample)
    store = open_datastore(args, lm, warn)
    is_bytes = is_byte_level(Path(args.data))
    settings = memory_settings(args, lm.dim)
    evaluator = Evaluator(
        lm,
        loaded.windows,
        loaded.batch_size,
        store,
        k=args.k,
        exact=args.knn_exact,
        progress=not args.no_progress_bar,
        cache=EvalCache(args.cache_dir, log=warn) if args.cache_dir else None,
        cache_inputs=cache_inputs(lm, Path(args.data), loaded.windows, loaded.batch_size, loaded.precision, store,
                                  nprobe=args.nprobe, search=args.knn_search),
        name=PROG,
        log=warn,
    )
    rows: list[dict] = []
    tuning = None
    cached: CachedRun | None = None
    if args.tune:
        settings, row, tuning, cached = tune_step(args, evaluator, settings, is_bytes, log)
        rows.append(row)
    sweep = None
    gen_cached = None  # the whole --gen-subset, when a sweep collected it (its memory terms are reused)
    if args.sweep:
        if cached is None or args.tune_subset != args.gen_subset or args.tune_tokens is not None:
            cached = evaluator.collect(args.gen_subset)
        gen_cached = cached
        sweep = run_sweep(args.sweep, evaluator, cached, settings, is_bytes, prefix=args.sweep_prefix,
                          title=args.gen_subset, knnlm=args.knnlm, log=log)
    rows += report_rows(args, evaluator, settings, is_bytes, sweep, gen_cached, log=warn)
    print_results(args, settings, rows, store, is_bytes, log, windows_note)
    record = results_record(args, loaded, store, settings, is_bytes, rows, tuning, sweep)
    if args.results_json:
        write_json_atomic(args.results_json, record)
    if args.dump_neighbors or args.report_html:
        inspect_step(args, evaluator, settings, loaded, store, log)
    return record


def inspect_step(args: argparse.Namespace, evaluator: Evaluator, settings: MemorySettings, loaded: LoadedModel,
                 store: Datastore | None, log: Callable[[str], None]) -> None:
    """``--dump-neighbors`` and ``--report-html``: the first scored tokens of --gen-subset scored again from the
    split's start with the reported settings, each with the memory entries behind it (:mod:`trime.eval.inspection`)."""
    page_tokens = args.dump_limit or REPORT_TOKENS
    limit = args.dump_limit if args.dump_neighbors else page_tokens
    inspector = Inspector(evaluator, settings, top=args.dump_top or DEFAULT_TOP)
    line = settings_line(settings, args.knnlm, store is not None, subset=args.gen_subset,
                         metric=store.metric if store is not None else None)
    lines = [f"model {args.path} ({loaded.lm.frontend}), data {args.data}", f"{line}; {loaded.windows.describe()}"]
    if store is not None:
        sources = "its keys' sources recorded" if store.has_sources else "built before sources were recorded"
        deleted = f" ({store.deleted.count:,} more deleted)" if store.deleted else ""
        lines.append(f"datastore {store.directory}: {store.alive_count:,} keys{deleted} ({store.dim}-d, {store.metric}), "
                     f"{sources}")
    jsonl = Path(args.dump_neighbors) if args.dump_neighbors else None
    page = Path(args.report_html) if args.report_html else None
    count, shown = write_outputs(inspector.records(args.gen_subset, limit), jsonl, page, page_tokens,
                                 title=f"{PROG}: what memory did on {args.gen_subset}", lines=lines,
                                 prefix=inspector.text_before(args.gen_subset))
    if jsonl is not None:
        log(f"wrote {count:,} token records to {jsonl}")
    if page is not None:
        log(f"wrote {page}: {shown:,} tokens")


def run(argv: Sequence[str] | None = None) -> dict:
    """trime-eval on ``argv`` in this process; returns the results record.

    Bad input, and a fault of the file system (full disk, read-only folder), raise TrimeError (one line).
    """
    args = build_parser().parse_args(argv)
    with file_faults_as_errors():
        return evaluate(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trime-eval``; returns the exit status."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
