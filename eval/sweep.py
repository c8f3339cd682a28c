"""Sweeps: a metric against one memory setting (``trime-eval --sweep NAME=V1,V2,..``), as .json and .png.

Every point is scored from one collected split (:class:`trime.eval.tuning.CachedRun`): the
forward passes and kNN searches are done once, whatever the number of values.
"""

from collections.abc import Callable
from pathlib import Path

from trime.errors import fail
from trime.eval.engine import Evaluator, memory_label, metric_line
from trime.eval.memory import MemorySettings
from trime.eval.tuning import CachedRun
from trime.io_utils import atomic_path, write_json_atomic
from trime.memories import CROSS_SEGMENT_MEMORIES

SWEEPABLE = {
    "mem-size": ("mem_size", int),
    "lmbda": ("lmbda", float),
    "k": ("k", int),
    "softmax-temp": ("softmax_temp", float),
    "external-temp": ("external_temp", float),
    "interp-temp": ("interp_temp", float),
    "cache-lmbda": ("cache_lmbda", float),
    "cache-temp": ("cache_temp", float),
}


def sweep_name(spec: str | None) -> str:
    """The swept setting's flag name of ``NAME=V1,...`` ("" without a sweep)."""
    return (spec or "").partition("=")[0]


def sweep_values(spec: str) -> tuple[str, list]:
    """(flag name, values) of ``--sweep NAME=V1,...``, as numbers of the flag's type; one-line errors.

    The values' range is the CLI's to check (the rule of the flag NAME): this only parses them.
    """
    name, _, values_text = spec.partition("=")
    if name not in SWEEPABLE or not values_text:
        fail(f"--sweep must look like NAME=V1,V2 with NAME in {', '.join(SWEEPABLE)}; got {spec!r}")
    cast = SWEEPABLE[name][1]
    try:
        values = [cast(v) for v in values_text.split(",") if v.strip()]
    except ValueError:
        fail(f"--sweep {name}: values must be {cast.__name__}s, got {values_text!r}")
    if not values:
        fail(f"--sweep {name}: give at least one value, e.g. --sweep {name}=V1,V2")
    return name, values


def parse_sweep(spec: str, evaluator: Evaluator, base: MemorySettings) -> tuple[str, str, list]:
    """(flag name, MemorySettings field, values) of ``--sweep NAME=V1,...``; one-line errors for what cannot work."""
    name, values = sweep_values(spec)
    field_name = SWEEPABLE[name][0]
    if name == "mem-size" and base.level not in CROSS_SEGMENT_MEMORIES:
        fail("--sweep mem-size needs --memory long or external")
    if name == "external-temp" and not base.knn_in_joint:
        fail("--sweep external-temp needs --memory external")
    if name in ("cache-lmbda", "cache-temp") and not base.interp_cache:
        fail(f"--sweep {name} needs --cache interp (with --memory long or local)")
    if name in ("k", "lmbda", "interp-temp") and evaluator.store is None:
        fail(f"--sweep {name} needs a datastore (--memory external or --knnlm with --datastore)")
    other = {"lmbda": base.cache_lmbda, "cache-lmbda": base.lmbda}.get(name, 0.0)
    if name in ("lmbda", "cache-lmbda") and max(values) + other >= 1:
        fail(f"--sweep {name} values must leave the model a weight: lmbda + cache-lmbda below 1")
    if name == "k" and max(values) > evaluator.k:
        fail(f"--sweep k values must be <= --k {evaluator.k} (the search depth)")
    return name, field_name, values


def run_sweep(
    spec: str,
    evaluator: Evaluator,
    cached: CachedRun,
    base: MemorySettings,
    is_bytes: bool,
    prefix: str | None = None,
    title: str = "",
    knnlm: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> dict:
    """Evaluate ``spec`` (``NAME=V1,...``) on a collected split; write ``PREFIX.json`` and ``PREFIX.png``.

    ``prefix`` defaults to ``trime-sweep-NAME``; ``title`` (the split) and ``knnlm`` label the plot.
    Returns the record written to the .json. A failure writing them (a full disk) leaves
    both files untouched.
    """
    name, field_name, values = parse_sweep(spec, evaluator, base)
    metric = "bpc" if is_bytes else "ppl"
    points = []
    for v in values:
        lp = cached.log_probs(base.with_(**{field_name: v}))
        point = metric_line(-float(lp.double().sum()), lp.numel(), is_bytes)
        point["value"] = v
        points.append(point)
        log(f"sweep {name}={v}: {metric} {point[metric]:.4f}")
    out = Path(prefix or f"trime-sweep-{name}")
    recorded = dict(base.__dict__)
    if evaluator.store is None:  # a sweep without a datastore has no neighbours: record none of their settings
        for key in ("k", "lmbda", "interp_temp", "knn_in_joint"):
            recorded.pop(key, None)
    if not base.interp_cache:  # nor the continuous cache's without one
        for key in ("cache_lmbda", "cache_temp"):
            recorded.pop(key, None)
    if name == "mem-size":
        recorded["mem_size"] = None  # the swept value, per point
    record = {"parameter": name, "metric": metric, "points": points, "settings": recorded}
    png = out.with_suffix(".png")
    with atomic_path(png) as png_tmp:  # a failure writing either file leaves both untouched
        plot_points(points, name, metric, f"{title}: {memory_label(base, knnlm)}", png_tmp)
        write_json_atomic(out.with_suffix(".json"), record)
    log(f"wrote {out.with_suffix('.json')} and {png}")
    return record


def plot_points(points: list[dict], name: str, metric: str, title: str, png: Path) -> None:
    """A line plot of ``metric`` against the swept value, written to ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p["value"] for p in points], [p[metric] for p in points], marker="o")
    ax.set_xlabel(name)
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(png, format="png", dpi=120)
    finally:
        plt.close(fig)
