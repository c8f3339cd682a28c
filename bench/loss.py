#!/usr/bin/env python
"""Benchmark: forward + backward time and peak memory of the TRIME loss.

Three ways of computing a training loss over N tokens with hidden size d and a
full-softmax head over V words (logits = h @ W.T, W of shape (V, d) with gradients):

- ``ce``: plain cross-entropy, the baseline;
- ``trime``: the same head plus :func:`trime.loss.memory_joint_nll` (blockwise; the
  gradient formed in forward for local/long, recomputed for the in-batch external
  memory), as the criteria call it; the in-batch memory keys are the queries
  themselves, as in training;
- ``dense``: a replica of the original TRIME code's dense computation: the full
  N x N ``h @ h.T / sqrt(d)``, an fp32 N x N additive mask of -10000
  (``block_diag`` of per-segment causal masks for ``trime_loss``; ``triu`` for
  ``trime_long_loss_same_device``), ``logsumexp`` and ``log_softmax`` over all N
  columns, an N x N negatives mask, and the ``norm_loss`` combination.

Three memory rules are measured: ``local`` (strictly earlier tokens of the same
segment of length L; TrimeLM), ``long`` (every earlier token of the batch;
TrimeLM_long with ``trime_long_loss_same_device``) and ``ext`` (every token of the
other segments plus the earlier ones of the own segment; ``trime_ext_loss`` with its
local memory on; the dense replica uses the same block mask). ``--compile`` sets
``trime.loss_compile.set_compile`` in the children; kernels are compiled in an untimed
warm-up. ``memterm_trime_*`` and
``memterm_dense_*`` time the memory part alone (token terms held constant, no N x V
head), which shows how each implementation's own memory grows with N: with
V = 32768 > N the head's N x V tensors dominate the total peak.

Peak memory on CPU is the rise of the resident set's high-water mark (reset just
before the call) during the first call in a fresh child process, one process per
(method, N). Times come from one more child per N in which all methods run
interleaved (ce, trime_local, dense_local, ..., then again in rotated order), so that
load from other processes hits every method alike; the median of the repeats is
reported.
On CUDA the peak is ``torch.cuda.max_memory_allocated`` above the memory allocated
before the call.

Usage::

    python -m bench.loss [--sizes 1024,2048,4096,8192,16384] [--device cpu|cuda]
                  [--dtype fp32|bf16|fp16] [--repeats R] [--quick] [--out bench/results/loss]

writes ``<out>.json`` (all raw numbers and settings) and ``<out>.md`` (a table).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from bench.common import (
    cuda_peak_bytes,
    machine_info,
    rss_peak_delta_bytes,
    run_child_json,
    time_once,
    today,
    write_json,
)

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RULES = ("local", "long", "ext")
RULE_NAMES = {"local": "local", "long": "long", "ext": "external"}  # bench name -> trime.loss.Rule
# targets at N = 4096 (TRIME time / CE time): long <= 1.1x
TARGETS = {"local": 1.15, "long": 1.1, "ext": 1.15}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DEFAULT_SIZES = (1024, 2048, 4096, 8192, 16384)
QUICK = {"sizes": (256, 512), "vocab": 4096, "dim": 64, "seg_len": 128, "repeats": 2}
MIB = 2**20

# How many N x N fp32 tensors the dense replica may hold at once (the mm output, the
# mask and its construction temporaries, masked logits, log_softmax output, the
# negatives term, and their gradients); measured: about 6.5 (414 MB for the memory part
# alone at N = 4096). Used only to decide when to skip it.
DENSE_NN_TENSORS = 7


# --------------------------------------------------------------------------- losses
# Every loss takes (h, weight, targets, rule, seg_len, block_size) and returns a scalar.


def _ce_loss(h, weight, targets, rule, seg_len, block_size):
    import torch.nn.functional as F

    logits = h @ weight.T
    return F.cross_entropy(logits, targets, reduction="sum")


def _trime_memory_nll(h, targets, rule, seg_len, block_size, token_score, token_logz):
    from trime.loss import Rule, Visibility, memory_joint_nll

    visibility = Visibility.for_batch(Rule(RULE_NAMES[rule]), h.shape[0] // seg_len, seg_len, device=h.device)
    # the criteria's call: one-pass gradient for local/long, two passes for the in-batch external memory
    return memory_joint_nll(h, h, targets, targets, visibility, token_score, token_logz, block_size=block_size).sum()


def _trime_loss(h, weight, targets, rule, seg_len, block_size):
    from trime.heads import full_softmax_terms

    token_score, token_logz = full_softmax_terms(h @ weight.T, targets)
    return _trime_memory_nll(h, targets, rule, seg_len, block_size, token_score, token_logz)


def _trime_memterm_loss(h, weight, targets, rule, seg_len, block_size):
    """The memory term alone: constant token terms (Z_t = p_tok = 1), no N x V head."""
    import torch

    zero = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
    return _trime_memory_nll(h, targets, rule, seg_len, block_size, zero, zero)


def _dense_mask(rule: str, n: int, seg_len: int, device) -> "torch.Tensor":  # noqa: F821
    """The original's additive fp32 mask: 0 where visible, -10000 where masked."""
    import torch

    if rule == "long":
        # trime_long_loss_same_device: row i sees columns j < i of the whole batch
        return torch.triu(torch.ones(n, n, device=device), diagonal=0) * -10000.0
    if rule == "ext":
        # trime_ext_loss (local memory on): every other segment, and the earlier tokens of the own one
        block = torch.triu(torch.ones(seg_len, seg_len, device=device), diagonal=0) * -10000.0
        return torch.block_diag(*([block] * (n // seg_len)))
    # trime_loss: a per-segment causal block, marked 1 where visible, laid out by
    # block_diag (off-block entries come out 0) and then remapped to 0 / -10000
    block = torch.triu(torch.ones(seg_len, seg_len, device=device), diagonal=0) * -10000.0
    block[block == 0] = 1.0
    mask = torch.block_diag(*([block] * (n // seg_len)))
    mask[mask == 0] = -10000.0
    mask[mask == 1] = 0.0
    return mask


def _dense_memory_nll(h, targets, rule, seg_len, token_loss, norm_t):
    """The original's N x N memory part and its norm_loss combination, summed."""
    import torch
    import torch.nn.functional as F

    # the fp32 mask promotes half-precision logits to fp32, as in the original
    mem_logits = torch.mm(h, h.T) / math.sqrt(h.shape[-1])
    mem_logits = mem_logits + _dense_mask(rule, h.shape[0], seg_len, h.device)
    norm_c = torch.logsumexp(mem_logits, dim=-1)
    log_probs = F.log_softmax(mem_logits, dim=-1)
    negatives = targets[:, None] != targets[None, :]
    ctx_loss = -torch.logsumexp(log_probs + negatives * -10000.0, dim=-1)
    norm_tpc = torch.logsumexp(torch.stack((norm_t, norm_c), dim=-1), dim=-1)
    parts = torch.stack((-token_loss + norm_t - norm_tpc, -ctx_loss + norm_c - norm_tpc), dim=-1)
    return -torch.logsumexp(parts, dim=-1).sum()


def _dense_loss(h, weight, targets, rule, seg_len, block_size):
    import torch
    import torch.nn.functional as F

    logits = h @ weight.T
    # token part computed the way the original does: per-token CE and the head's log Z
    token_loss = F.cross_entropy(logits, targets, reduction="none")
    norm_t = torch.logsumexp(logits, dim=-1)
    return _dense_memory_nll(h, targets, rule, seg_len, token_loss, norm_t)


def _dense_memterm_loss(h, weight, targets, rule, seg_len, block_size):
    """The dense memory part alone, with the same constant token terms as TRIME's."""
    import torch

    zero = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
    return _dense_memory_nll(h, targets, rule, seg_len, zero, zero)


# name -> (loss function, rule); "memterm_*" measure the memory part without the head
METHOD_SPECS: Dict[str, tuple] = {"ce": (_ce_loss, None)}
for _rule in RULES:
    METHOD_SPECS[f"trime_{_rule}"] = (_trime_loss, _rule)
    METHOD_SPECS[f"dense_{_rule}"] = (_dense_loss, _rule)
for _rule in RULES:
    METHOD_SPECS[f"memterm_trime_{_rule}"] = (_trime_memterm_loss, _rule)
    METHOD_SPECS[f"memterm_dense_{_rule}"] = (_dense_memterm_loss, _rule)
METHODS = tuple(METHOD_SPECS)
DENSE_METHODS = tuple(m for m in METHODS if "dense" in m)


# --------------------------------------------------------------------------- child side


def _setup_torch(threads: int, compile_mode: Optional[str] = None):
    import torch

    torch.set_num_threads(threads)
    if compile_mode:
        from trime.loss_compile import set_compile

        set_compile(compile_mode)
    return torch


def _warm_compile(cfg: Dict[str, Any]) -> None:
    """Compile the memory kernels on a small batch first (mode auto would only compile at full size).

    torch.compile's kernels are built for dynamic shapes: the full-size calls reuse them.
    """
    from trime.loss_compile import compile_mode, set_compile

    mode = compile_mode()
    if mode == "never":
        return
    set_compile("always")
    small = dict(cfg, n=2 * cfg["seg_len"])
    sh, sw, st = _make_inputs(small)
    for m in cfg.get("methods") or [cfg["method"]]:
        if m.startswith(("trime", "memterm_trime")):
            _step(m, sh, sw, st, small)()
    set_compile(mode)


def _make_inputs(cfg: Dict[str, Any]):
    """(h, W, targets) for one configuration; h and W require grad."""
    torch = _setup_torch(cfg["threads"], cfg.get("compile"))
    dtype = getattr(torch, DTYPES[cfg["dtype"]])
    device = torch.device(cfg["device"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    n, d, v = cfg["n"], cfg["dim"], cfg["vocab"]
    # h like a LayerNorm output (unit scale), W like a trained embedding (std 1/sqrt(d))
    h = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(v, d, generator=gen) / math.sqrt(d)).to(device=device, dtype=dtype)
    weight.requires_grad_(True)
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    return h, weight, targets


def _step(method: str, h, weight, targets, cfg: Dict[str, Any]) -> Callable[[], float]:
    """One training-style call: fresh gradients, forward, backward."""
    loss_fn, rule = METHOD_SPECS[method]

    def call() -> float:
        h.grad = None
        weight.grad = None
        loss = loss_fn(h, weight, targets, rule, cfg["seg_len"], cfg["block_size"])
        loss.backward()
        return float(loss.detach())

    return call


def _loss_code_hash() -> str:
    """sha256 prefix over the loss code this process imported: trime/loss.py, loss_compile.py and heads.py."""
    import hashlib

    import trime.heads
    import trime.loss
    import trime.loss_compile

    digest = hashlib.sha256()
    for module in (trime.loss, trime.loss_compile, trime.heads):
        with open(module.__file__, "rb") as fh:
            digest.update(fh.read())
    return digest.hexdigest()[:16]


def _worker_mem(cfg: Dict[str, Any]) -> Dict[str, Any]:
    h, weight, targets = _make_inputs(cfg)
    call = _step(cfg["method"], h, weight, targets, cfg)
    _warm_compile(cfg)  # compiling is not part of the loss's memory
    cuda = cfg["device"].startswith("cuda")
    if cuda:
        call()  # the CUDA peak counter can be reset: measure a warm call (no cuBLAS/allocator set-up)
    measure = cuda_peak_bytes if cuda else rss_peak_delta_bytes  # CPU: the first call of a fresh process
    losses: List[float] = []
    result = measure(lambda: losses.append(call()))
    result["peak_mb"] = result["peak_delta_bytes"] / MIB
    result["loss"] = losses[0]
    result["code_sha256"] = _loss_code_hash()
    return result


def _worker_time(cfg: Dict[str, Any]) -> Dict[str, Any]:
    h, weight, targets = _make_inputs(cfg)
    methods: List[str] = cfg["methods"]
    calls = {m: _step(m, h, weight, targets, cfg) for m in methods}
    losses = {}
    _warm_compile(cfg)
    # warm-up: the real size when it is cheap, else a small batch (kernels, thread pool)
    if cfg["n"] <= cfg["full_warmup_max_n"]:
        for m in list(methods):
            try:
                losses[m] = calls[m]()
            except RuntimeError as exc:  # CUDA out of memory (on CPU the process would be killed)
                if "out of memory" not in str(exc):
                    raise
                losses[m] = f"out of memory in warm-up: {str(exc)[:200]}"
                methods.remove(m)
                import torch

                torch.cuda.empty_cache()
    else:
        small = dict(cfg, n=2 * cfg["seg_len"])
        sh, sw, st = _make_inputs(small)
        for m in methods:
            _step(m, sh, sw, st, small)()
        del sh, sw, st
    memory: Dict[str, Any] = {}
    if cfg.get("measure_memory"):  # CUDA: the allocator's peak counter works within one process
        import torch

        for m in list(methods):
            try:
                res = cuda_peak_bytes(calls[m])
                memory[m] = dict(res, ok=True, peak_mb=res["peak_delta_bytes"] / MIB, code_sha256=_loss_code_hash())
            except torch.cuda.OutOfMemoryError as exc:
                memory[m] = {"ok": False, "error": f"CUDA out of memory: {str(exc)[:200]}"}
                methods.remove(m)
                torch.cuda.empty_cache()
    times: Dict[str, List[float]] = {m: [] for m in methods}
    order: List[str] = []
    load_before = os.getloadavg()
    for r in range(cfg["repeats"]):
        rotated = methods[r % len(methods):] + methods[: r % len(methods)]
        for m in rotated:
            times[m].append(time_once(calls[m], cfg["device"]))
            order.append(m)
    return {
        "times_s": times,
        "median_ms": {m: 1000 * statistics.median(t) for m, t in times.items()},
        "order": order,
        "warmup_losses": losses,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "code_sha256": _loss_code_hash(),
        "memory": memory,
    }


# --------------------------------------------------------------------------- parent side

CONFIG_KEYS = ("device", "dtype", "threads", "vocab", "dim", "seg_len", "block_size")
# settings passed to the children that are not part of a configuration's identity
CHILD_KEYS = ("compile",)


def dense_nn_bytes(n: int) -> int:
    """Estimated N x N memory of the dense replica at its peak (fp32)."""
    return DENSE_NN_TENSORS * n * n * 4


def _child(cfg: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    return run_child_json(["-m", "bench.loss", "--_worker", json.dumps(cfg)], timeout=timeout)


def _repeats_for(n: int, repeats: int, big_n: int) -> int:
    """Fewer repeats for the slow, large sizes (keeps the CPU run within bounds)."""
    if n >= 2 * big_n:
        return max(1, repeats - 2)
    if n >= big_n:
        return max(1, repeats - 1)
    return repeats


def run_benchmark(args: argparse.Namespace, run_id: int) -> List[Dict[str, Any]]:
    """Measure every size; one entry per N with the raw child results."""
    base = {k: getattr(args, k) for k in CONFIG_KEYS + CHILD_KEYS}
    base.update(seed=0, full_warmup_max_n=args.full_warmup_max_n)
    entries = []
    started = time.time()
    for n in args.sizes:
        if n % args.seg_len:
            raise SystemExit(f"N={n} is not a multiple of the segment length {args.seg_len}")
        entry: Dict[str, Any] = {**{k: base[k] for k in CONFIG_KEYS}, "n": n, "run": run_id}
        entry.update(memory={}, skipped={}, timings=[])
        methods = list(args.methods)
        if args.device == "cpu" and dense_nn_bytes(n) > args.dense_limit_gb * 2**30:
            for m in DENSE_METHODS:
                if m not in methods:
                    continue
                methods.remove(m)
                entry["skipped"][m] = (
                    f"N x N tensors est. {dense_nn_bytes(n) / 2**30:.1f} GiB > {args.dense_limit_gb:g} GiB limit"
                )
        cuda = args.device == "cuda"
        if not cuda:  # CPU: one fresh process per method for the RSS high-water mark
            for m in methods:
                res = _child(dict(base, n=n, method=m, mode="mem"), timeout=args.child_timeout)
                entry["memory"][m] = dict(res, run=run_id)
                peak = f"{res['peak_mb']:.0f} MB" if res.get("ok") else res.get("error")
                print(f"[mem ] {args.threads}t N={n:6d} {m:12s} {peak}", flush=True)
        timed = [m for m in methods if cuda or entry["memory"][m].get("ok")]
        for m in methods:
            if m not in timed:  # e.g. killed for memory
                entry["skipped"][m] = "memory run failed: " + str(entry["memory"][m].get("error"))
        reps = _repeats_for(n, args.repeats, args.big_n)
        if not timed:
            entries.append(entry)
            continue
        cfg = dict(base, n=n, methods=timed, repeats=reps, mode="time", measure_memory=cuda)
        res = _child(cfg, timeout=args.child_timeout)
        if cuda:
            for m, mem in res.pop("memory", {}).items():
                entry["memory"][m] = dict(mem, run=run_id)
                if not mem.get("ok"):
                    entry["skipped"][m] = mem.get("error")
                    timed.remove(m)
                print(f"[mem ] N={n:6d} {m:12s} " + (f"{mem['peak_mb']:.0f} MB" if mem.get("ok") else mem["error"]))
            for m in list(timed):
                if res.get("ok") and m in res.get("median_ms", {}):
                    continue
                why = res.get("warmup_losses", {}).get(m) if res.get("ok") else res.get("error")
                entry["memory"].setdefault(m, {"ok": False, "error": str(why), "run": run_id})
                entry["skipped"][m] = str(why)
                timed.remove(m)
        entry["timings"].append(dict(res, methods=timed, repeats=reps, run=run_id))
        if res.get("ok"):
            line = ", ".join(f"{m} {res['median_ms'][m]:.0f}" for m in timed)
            print(f"[time] {args.threads}t N={n:6d} (x{reps}) ms: {line}", flush=True)
        else:
            print(f"[time] {args.threads}t N={n:6d} failed: {res.get('error')}", flush=True)
        entries.append(entry)
        print(f"       elapsed {time.time() - started:.0f}s", flush=True)
    return entries


def _config(entry: Dict[str, Any]) -> tuple:
    return tuple(entry.get(k) for k in CONFIG_KEYS)


def _upgrade_entry(entry: Dict[str, Any]) -> Dict[str, Any]:
    """Older files kept one ``timing`` per entry; now ``timings`` is a list."""
    if "timing" in entry:
        timing = entry.pop("timing")
        methods = list(timing.get("median_ms", {}))
        entry["timings"] = [dict(timing, methods=methods, repeats=entry.pop("repeats", None), run=entry["run"])]
    for res in entry.get("memory", {}).values():
        res.setdefault("run", entry.get("run"))
    return entry


def merge_entry(old: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Any]:
    """Merge a new measurement of the same (configuration, N) into an old one, method-wise.

    Methods measured anew replace the old memory results and leave the old timing
    runs; each timing run stays one interleaved process (ratios are taken within one).
    """
    merged = dict(old)
    fresh = set(new["memory"]) | {m for t in new["timings"] for m in t.get("methods", [])}
    merged["memory"] = {**{m: r for m, r in old["memory"].items() if m not in fresh}, **new["memory"]}
    merged["skipped"] = {**{m: r for m, r in old["skipped"].items() if m not in fresh}, **new["skipped"]}
    timings = []
    for t in old["timings"]:
        keep = [m for m in t.get("methods", []) if m not in fresh]
        if keep:
            t = dict(t, methods=keep)
            for key in ("median_ms", "times_s"):
                if key in t:
                    t[key] = {m: v for m, v in t[key].items() if m in keep}
            timings.append(t)
    merged["timings"] = timings + new["timings"]
    merged["run"] = new["run"]
    return merged


def _code_hashes(entries: List[Dict[str, Any]]) -> set:
    """Loss-code hashes (:func:`_loss_code_hash`) seen by the children that produced these entries."""
    found = {res.get("code_sha256") for e in entries for res in e["memory"].values()}
    found |= {t.get("code_sha256") for e in entries for t in e["timings"]}
    return {h for h in found if h}


def _timing_with(entry: Dict[str, Any], *methods: str) -> Dict[str, Any]:
    """The (latest) successful timing run that measured all ``methods``."""
    for t in reversed(entry.get("timings", [])):
        if t.get("ok") and all(m in t.get("median_ms", {}) for m in methods):
            return t
    return {}


def summarize(entries: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (configuration, N, rule) with times, ratios and peaks."""
    rows = []
    for entry in sorted(entries, key=lambda e: (_config(e), e["n"])):
        med: Dict[str, float] = {}
        for t in entry.get("timings", []):
            if t.get("ok"):
                med.update(t.get("median_ms", {}))
        ce_timing = _timing_with(entry, "ce")

        def peak(m, entry=entry):
            res = entry["memory"].get(m)
            return res["peak_mb"] if res and res.get("ok") else None

        def diff(a, b):
            return None if a is None or b is None else a - b

        for rule in RULES:
            t_m, d_m = f"trime_{rule}", f"dense_{rule}"
            ce, tr, de = med.get("ce"), med.get(t_m), med.get(d_m)
            if tr is None and med.get(f"memterm_{t_m}") is None and de is None:
                continue  # rule not measured in this configuration
            tr_ratio = _timing_with(entry, "ce", t_m).get("median_ms", {})
            de_ratio = _timing_with(entry, "ce", d_m).get("median_ms", {})
            rows.append(
                {
                    **{k: entry.get(k) for k in CONFIG_KEYS},
                    "n": entry["n"],
                    "rule": rule,
                    "ce_ms": ce,
                    "trime_ms": tr,
                    "trime_over_ce": tr_ratio[t_m] / tr_ratio["ce"] if tr_ratio else None,
                    "dense_ms": de,
                    "dense_over_ce": de_ratio[d_m] / de_ratio["ce"] if de_ratio else None,
                    "ce_peak_mb": peak("ce"),
                    "trime_peak_mb": peak(t_m),
                    "dense_peak_mb": peak(d_m),
                    "trime_extra_mb": diff(peak(t_m), peak("ce")),
                    "dense_extra_mb": diff(peak(d_m), peak("ce")),
                    "memterm_trime_ms": med.get(f"memterm_{t_m}"),
                    "memterm_dense_ms": med.get(f"memterm_{d_m}"),
                    "memterm_trime_peak_mb": peak(f"memterm_{t_m}"),
                    "memterm_dense_peak_mb": peak(f"memterm_{d_m}"),
                    "dense_skipped": entry["skipped"].get(d_m),
                    "repeats": ce_timing.get("repeats"),
                    "loadavg": (ce_timing.get("loadavg_before") or [None])[0],
                }
            )
    return rows


def growth_exponents(rows: List[Dict[str, Any]], key: str) -> List[Dict[str, Any]]:
    """log(value(N1)/value(N0)) / log(N1/N0) between consecutive sizes: ~1 linear, ~2 quadratic."""
    pts = [(r["n"], r[key]) for r in rows if r[key] is not None and r[key] > 0]
    return [
        {"from": n0, "to": n1, "exponent": math.log(v1 / v0) / math.log(n1 / n0)}
        for (n0, v0), (n1, v1) in zip(pts, pts[1:])
    ]


def _groups(rows: List[Dict[str, Any]]) -> Dict[tuple, List[Dict[str, Any]]]:
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in CONFIG_KEYS), []).append(r)
    return groups


def _fmt(x: Optional[float], spec: str = ".0f") -> str:
    return "—" if x is None else format(x, spec)


def auto_reading(rows: List[Dict[str, Any]]) -> List[str]:
    """Sentences stating the headline numbers of each configuration."""
    out = []
    for key, grp in _groups(rows).items():
        cfg = dict(zip(CONFIG_KEYS, key))
        tag = f"{cfg['device']} {cfg['dtype']} {cfg['threads']} thread(s)"
        at = [r for r in grp if r["n"] == 4096 and r["trime_over_ce"] is not None]
        if at:
            parts = [
                f"{r['rule']} {r['trime_over_ce']:.2f}x "
                f"({'meets' if r['trime_over_ce'] <= TARGETS[r['rule']] else 'misses'} the {TARGETS[r['rule']]}x target)"
                for r in at
            ]
            out.append(f"{tag}: at N = 4096 TRIME costs " + ", ".join(parts) + " of the CE time.")
        for rule in RULES:
            sub = [r for r in grp if r["rule"] == rule]
            msgs = []
            for key, what in (
                ("trime_peak_mb", "TRIME total peak"),
                ("memterm_trime_peak_mb", "TRIME memory term alone"),
                ("memterm_dense_peak_mb", "dense memory term alone"),
            ):
                exps = [g["exponent"] for g in growth_exponents(sub, key)]
                if exps:
                    msgs.append(f"{what} {min(exps):.2f}–{max(exps):.2f}")
            if msgs:
                out.append(f"{tag}, {rule}: memory growth exponents in N (1 linear, 2 quadratic): " + "; ".join(msgs) + ".")
    return out


def render_markdown(report: Dict[str, Any]) -> str:
    runs = {r["id"]: r for r in report["runs"]}
    lines = [
        "# TRIME loss benchmark: forward + backward time and peak memory",
        "",
        "Generated by `python -m bench.loss`. Three losses over the same full-softmax head "
        "(logits = h @ W.T, W of shape (V, d)): plain cross-entropy (**CE**, the baseline); "
        "**TRIME** = the same head + `trime.loss.memory_joint_nll` (blockwise; the gradient formed in "
        "forward for local/long, recomputed for ext; runs of code before 09e0ccd: `memory_logsumexp` + "
        "`joint_nll`, recomputing); **dense** = a replica of the original code's N x N computation (fp32 "
        "-10000 mask, `log_softmax` over all N columns, N x N negatives mask). Rule *local* = "
        "TrimeLM (strictly earlier tokens of the same segment of length L); *long* = "
        "`trime_long_loss_same_device` (every earlier token of the batch); *ext* = `trime_ext_loss` with local "
        "memory on (all other segments + the earlier tokens of the own one). Each call is "
        "forward + backward with fresh gradients for h and W. Times: median of the repeats "
        "(column *reps*), methods interleaved in one process. Peak: on CPU, rise of the "
        "resident set's high-water mark (ru_maxrss, reset just before the call) during the "
        "first call in a fresh process per (method, N); on CUDA, `torch.cuda.max_memory_allocated` above the memory allocated "
        "before the call. *Extra* = peak minus the CE peak. *load* = 1-min load average of the "
        "machine when the timing started (other jobs were running).",
    ]
    for key, grp in _groups(report["rows"]).items():
        cfg = dict(zip(CONFIG_KEYS, key))
        run = runs.get(next((e["run"] for e in report["entries"] if _config(e) == key), None), {})
        mach = run.get("machine", {})
        dev = mach.get("gpu") if str(cfg["device"]).startswith("cuda") else mach.get("cpu_model")
        hashes = _code_hashes([e for e in report["entries"] if _config(e) == key])
        if not hashes and run.get("code", {}).get("trime_loss_sha256"):  # files from before per-child hashes
            hashes = {run["code"]["trime_loss_sha256"]}
        lines += [
            "",
            f"## {cfg['device']}, {cfg['dtype']}, {cfg['threads']} thread(s)",
            "",
            f"{dev}, {mach.get('cpu_count')} cores, {mach.get('mem_total_gib')} GiB RAM, torch "
            f"{mach.get('torch')}, run {run.get('date')}, code {run.get('code', {}).get('git_commit')} "
            f"(trime/loss.py sha256 {', '.join(sorted(hashes)) or '?'}"
            f"{', modified' if run.get('code', {}).get('trime_loss_modified') else ''}). "
            f"V = {cfg['vocab']}, d = {cfg['dim']}, "
            f"L = {cfg['seg_len']}, TRIME block size {cfg['block_size']}.",
            "",
            *([f"**Warning**: this table mixes runs of different trime/loss.py versions {sorted(map(str, hashes))}.", ""]
              if len(hashes) > 1 else []),
            "| N | rule | CE ms | TRIME ms | TRIME/CE | dense ms | dense/CE | CE peak MB | TRIME peak MB "
            "| dense peak MB | TRIME extra MB | dense extra MB | reps | load |",
            "|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in grp:
            dense_ms, dense_mb = _fmt(r["dense_ms"]), _fmt(r["dense_peak_mb"])
            if r["dense_skipped"]:
                dense_ms = dense_mb = "skipped*"
            lines.append(
                f"| {r['n']} | {r['rule']} | {_fmt(r['ce_ms'])} | {_fmt(r['trime_ms'])} | "
                f"{_fmt(r['trime_over_ce'], '.3f')} | {dense_ms} | {_fmt(r['dense_over_ce'], '.2f')} | "
                f"{_fmt(r['ce_peak_mb'])} | {_fmt(r['trime_peak_mb'])} | {dense_mb} | "
                f"{_fmt(r['trime_extra_mb'])} | {_fmt(r['dense_extra_mb'])} | {r['repeats']} | "
                f"{_fmt(r['loadavg'], '.1f')} |"
            )
        for n, why in sorted({(r["n"], r["dense_skipped"]) for r in grp if r["dense_skipped"]}):
            lines += ["", f"\\* N = {n}: dense variant not run ({why})."]
        lines += [
            "",
            "Memory term alone (no N x V head; token terms held constant; timed in its own interleaved process):",
            "",
            "| N | rule | TRIME ms | dense ms | dense/TRIME | TRIME peak MB | dense peak MB |",
            "|---:|:---|---:|---:|---:|---:|---:|",
        ]
        for r in grp:
            tm, dm = r["memterm_trime_ms"], r["memterm_dense_ms"]
            dense_ms, dense_mb = _fmt(dm), _fmt(r["memterm_dense_peak_mb"])
            if r["dense_skipped"]:
                dense_ms = dense_mb = "skipped*"
            lines.append(
                f"| {r['n']} | {r['rule']} | {_fmt(tm)} | {dense_ms} | "
                f"{_fmt(dm / tm if tm and dm else None, '.2f')} | {_fmt(r['memterm_trime_peak_mb'])} | {dense_mb} |"
            )
        lines += ["", "Memory growth exponents, log(peak ratio) / log(N ratio) between consecutive N (1 = linear, 2 = quadratic):", ""]
        for rule in RULES:
            sub = [r for r in grp if r["rule"] == rule]
            for k in ("ce_peak_mb", "trime_peak_mb", "trime_extra_mb", "dense_extra_mb",
                      "memterm_trime_peak_mb", "memterm_dense_peak_mb"):
                exps = growth_exponents(sub, k)
                if exps:
                    vals = ", ".join(f"{g['from']}→{g['to']}: {g['exponent']:.2f}" for g in exps)
                    lines.append(f"- {rule}, {k}: {vals}")
    lines += ["", "## Reading", ""]
    if report.get("notes"):
        lines += [report["notes"].strip(), ""]
    lines += [f"- {s}" for s in report.get("reading", [])]
    lines.append("")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=None, help="comma-separated token counts N (default 1024,...,16384)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per method (default 3 on CPU, 10 on CUDA; on CPU -1 at N >= big-n, -2 at 2 big-n)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    p.add_argument("--out", default=None, help="output prefix: writes PREFIX.json and PREFIX.md (default bench/results/loss)")
    p.add_argument("--append", action="store_true",
                   help="merge into an existing PREFIX.json, replacing entries with the same configuration and N")
    p.add_argument("--notes-file", default=None, help="markdown text put at the top of the Reading section (kept on --append)")
    p.add_argument("--render-only", action="store_true", help="measure nothing: re-render PREFIX.md from PREFIX.json")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of: " + ",".join(METHODS) + " (default all)")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--seg-len", type=int, default=512)
    p.add_argument("--block-size", type=int, default=None, help="memory_logsumexp block size (default: the library's)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every child")
    p.add_argument("--compile", default="auto", choices=["auto", "always", "never"],
                   help="trime.loss_compile.set_compile mode in every child (compiling happens in an untimed warm-up)")
    p.add_argument("--dense-limit-gb", type=float, default=8.0, help="skip the dense variant above this N x N estimate (CPU)")
    p.add_argument("--big-n", type=int, default=8192, help="from this N on, use fewer repeats (CPU)")
    p.add_argument("--full-warmup-max-n", type=int, default=2048,
                   help="warm up at full size up to this N, else with a small batch")
    p.add_argument("--child-timeout", type=float, default=3600.0)
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker is not None:
        return args
    if args.block_size is None:
        from trime.loss import DEFAULT_BLOCK_SIZE

        args.block_size = DEFAULT_BLOCK_SIZE
    if args.repeats is None:
        args.repeats = 10 if args.device == "cuda" else 3
    if args.quick:
        args.vocab, args.dim, args.seg_len = QUICK["vocab"], QUICK["dim"], QUICK["seg_len"]
        args.repeats = min(args.repeats, QUICK["repeats"])
        if args.sizes is None:
            args.sizes = ",".join(map(str, QUICK["sizes"]))
        if args.out is None:
            args.out = os.path.join(tempfile.gettempdir(), "trime-bench", "loss-quick")
    args.sizes = [int(x) for x in (args.sizes.split(",") if args.sizes else DEFAULT_SIZES)]
    selected = args.methods.split(",") if args.methods else list(METHODS)
    unknown = set(selected) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    args.methods = [m for m in METHODS if m in selected]
    if args.out is None:
        args.out = os.path.join(_REPO, "bench", "results", "loss")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available")
        args.big_n = 1 << 30  # repeats are cheap on a GPU
        args.full_warmup_max_n = 1 << 30
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args._worker is not None:
        cfg = json.loads(args._worker)
        result = _worker_mem(cfg) if cfg["mode"] == "mem" else _worker_time(cfg)
        print(json.dumps(result))
        return 0
    _setup_torch(args.threads)
    report: Dict[str, Any] = {"benchmark": "trime loss forward+backward", "runs": [], "entries": []}
    if (args.append or args.render_only) and os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as fh:
            old = json.load(fh)
        report.update(runs=old.get("runs", []), entries=old.get("entries", []), notes=old.get("notes"))
    if args.notes_file:
        with open(args.notes_file) as fh:
            report["notes"] = fh.read()
    if args.render_only:
        if not os.path.exists(args.out + ".json"):
            raise SystemExit(f"--render-only: {args.out}.json does not exist")
        _finish(report, args.out)
        return 0
    run_id = 1 + max((r["id"] for r in report["runs"]), default=0)
    machine = machine_info()
    print(f"machine: {machine.get('cpu_model')} x{machine.get('cpu_count')}, torch {machine.get('torch')}, "
          f"device {args.device} {machine.get('gpu', '')}, load {machine.get('loadavg_at_start')}", flush=True)
    started = time.time()
    code_start = code_version()
    new_entries = run_benchmark(args, run_id)
    code_end = code_version()
    loss_changed = code_end.get("trime_loss_sha256") != code_start.get("trime_loss_sha256")
    if loss_changed:
        print(f"WARNING: trime/loss.py changed during the run: {code_start} -> {code_end}", flush=True)
    settings = {k: getattr(args, k) for k in (
        "sizes", "methods", "device", "dtype", "repeats", "quick", "vocab", "dim", "seg_len", "block_size", "threads",
        "compile",
        "dense_limit_gb", "big_n", "full_warmup_max_n")}
    settings["dense_nn_tensors_estimate"] = DENSE_NN_TENSORS
    settings["memory_method"] = (
        "torch.cuda.max_memory_allocated above allocated before the call" if args.device == "cuda"
        else "ru_maxrss after the first call minus RSS before it, one fresh child process per (method, N)")
    report["runs"].append({
        "id": run_id,
        "date": today(),
        "command": " ".join([os.path.relpath(os.path.abspath(__file__), _REPO), *sys.argv[1:]]),
        "machine": machine,
        "code": code_start,
        **({"code_changed_during_run_to": code_end} if loss_changed else {}),
        "settings": settings,
        "wall_s": round(time.time() - started, 1),
    })
    by_key = {(_config(e), e["n"]): _upgrade_entry(e) for e in report["entries"]}
    for e in new_entries:
        key = (_config(e), e["n"])
        by_key[key] = merge_entry(by_key[key], e) if key in by_key else e
    report["entries"] = list(by_key.values())
    used = {res.get("run") for e in report["entries"] for res in e["memory"].values()}
    used |= {t.get("run") for e in report["entries"] for t in e["timings"]}
    report["runs"] = [r for r in report["runs"] if r["id"] in used]
    report["date"] = today()
    _finish(report, args.out)
    print(f"({time.time() - started:.0f}s)")
    return 0


def code_version() -> Dict[str, Any]:
    """The git commit and a hash of trime/loss.py, so results can be tied to the code."""
    import hashlib
    import subprocess

    info: Dict[str, Any] = {}
    path = os.path.join(_REPO, "trime", "loss.py")
    with open(path, "rb") as fh:
        info["trime_loss_sha256"] = hashlib.sha256(fh.read()).hexdigest()[:16]
    try:
        git = ["git", "-C", _REPO]
        info["git_commit"] = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(git + ["status", "--porcelain", "--", "trime/loss.py"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        info["trime_loss_modified"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def _finish(report: Dict[str, Any], out: str) -> None:
    """Derive rows and reading from the entries; write OUT.json and OUT.md."""
    report["entries"] = [_upgrade_entry(e) for e in report["entries"]]
    report["rows"] = summarize(report["entries"])
    report["reading"] = auto_reading(report["rows"])
    write_json(out + ".json", report)
    with open(out + ".md", "w") as fh:
        fh.write(render_markdown(report))
    print(render_markdown(report))
    print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
    sys.exit(main())
