#!/usr/bin/env python
"""Profile: where the time of TRIME's long and external memory terms goes, per op.

Runs the memory term alone (``trime.loss.memory_logsumexp`` + ``joint_nll`` with constant
token terms, in-batch keys = queries, as in training) forward and backward under
``torch.profiler`` for the long and the external rule, and records the per-op self
time, split into forward and backward (the backward of the custom autograd function
recomputes the scores). The ops are grouped into matrix products, elementwise passes
(exp, masks, scaling, compares, copies), reductions and allocation/other, which is the
breakdown behind the loss's time and memory targets.

Usage::

    python -m bench.profile_memory [--n 12288] [--dim 512] [--seg-len 512] [--threads 2]
                            [--label before|after] [--out bench/results/profile]

writes/updates ``<out>.json`` (one entry per label and rule) and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List

from bench.common import machine_info, today, write_json

_REPO = Path(__file__).resolve().parent.parent

RULES = {"long": ("long", True), "ext": ("external", True), "ext_local_off": ("external", False)}
MATMUL = ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear")
REDUCTION = ("sum", "amax", "max", "logsumexp", "any", "all")
OTHER_PREFIX = ("empty", "zeros", "full", "ones", "arange", "resize", "as_strided", "view", "slice", "select",
                "reshape", "expand", "transpose", "t", "permute", "unsqueeze", "squeeze", "alias", "detach", "item",
                "_local_scalar_dense", "is_nonzero", "lift", "contiguous", "clone")


def op_group(name: str) -> str:
    """matmul / elementwise / reduction / other for an ``aten::`` op name (compiled kernels count as fused)."""
    base = name.split("::")[-1].rstrip("_")
    if name.startswith(("cpp_fused", "triton_")) or "Compiled" in name or "inductor" in name.lower():
        return "fused (compiled)"
    if "::" not in name:  # python-level regions: the autograd function's own code (tile loop, vectors)
        return "python (autograd function)"
    if base in MATMUL:
        return "matmul"
    if base in REDUCTION:
        return "reduction"
    if base in OTHER_PREFIX or base.startswith("_"):
        return "alloc/view/other"
    return "elementwise"


def profile_rule(rule: str, external_local: bool, args: argparse.Namespace) -> Dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from trime.loss import Rule, Visibility, joint_nll, memory_logsumexp

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    n, d, seg = args.n, args.dim, args.seg_len
    h = torch.randn(n, d, generator=gen).requires_grad_(True)
    targets = torch.randint(0, args.vocab, (n,), generator=gen)
    zero = torch.zeros(n)
    vis = Visibility.for_batch(Rule(rule), n // seg, seg, external_local=external_local)

    def step() -> None:
        h.grad = None
        with record_function("forward"):
            lse_all, lse_pos = memory_logsumexp(h, h, targets, targets, vis)
            loss = joint_nll(zero, zero, lse_all, lse_pos).sum()
        with record_function("backward"):
            loss.backward()

    step()  # warm-up (and compile, when the compiled path is on)
    start = time.perf_counter()
    step()
    plain_s = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        step()
    events = prof.key_averages()
    ops: List[Dict[str, Any]] = []
    for ev in events:
        if ev.key in ("forward", "backward") or ev.key.startswith("autograd::") or ev.key.startswith("Torch-Compiled"):
            continue
        self_ms = ev.self_cpu_time_total / 1000.0
        if self_ms < 0.05:
            continue
        ops.append({"op": ev.key, "calls": ev.count, "self_ms": round(self_ms, 2)})
    ops.sort(key=lambda o: -o["self_ms"])
    phases = {ev.key: round(ev.cpu_time_total / 1000.0, 1) for ev in events if ev.key in ("forward", "backward")}
    flops = 2 * n * n * d * (1 if rule == "long" else 2)  # one score matrix product over the visible pairs
    return {
        "rule": rule,
        "external_local": external_local,
        "n": n,
        "dim": d,
        "seg_len": seg,
        "threads": args.threads,
        "unprofiled_step_s": round(plain_s, 3),
        "phase_ms": phases,
        "group_ms": group_ms(ops),
        "ops": ops,
        "ops_complete": True,
        "score_product_gflop": round(flops / 2 / 1e9, 1),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def group_ms(ops: List[Dict[str, Any]]) -> Dict[str, float]:
    """Self time per op group, largest first."""
    groups: Dict[str, float] = {}
    for o in ops:
        g = op_group(o["op"])
        groups[g] = round(groups.get(g, 0.0) + o["self_ms"], 1)
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def entry_groups(entry: Dict[str, Any]) -> Dict[str, float]:
    """Group times of an entry; early entries stored only their top ops, so their stored totals are used
    (where python-level regions were still filed under "fused (compiled)")."""
    if entry.get("ops_complete"):
        return group_ms(entry["ops"])
    has_fused = any(op_group(o["op"]) == "fused (compiled)" for o in entry["ops"])
    return {("python (autograd function)" if g == "fused (compiled)" and not has_fused else g): ms
            for g, ms in entry["group_ms"].items()}


def render(report: Dict[str, Any], top: int = 15) -> str:
    lines = [
        "# Where the memory term's time goes (`python -m bench.profile_memory`)",
        "",
        "The memory term alone (`memory_logsumexp` + `joint_nll`, constant token terms, in-batch keys = queries), "
        "forward + backward under `torch.profiler`, CPU, fp32. *self ms* is each op's own time; groups: "
        "*matmul* (mm/addmm/bmm), *elementwise* (exp, masks, scaling, compares, copies, fills), *reduction* "
        "(sum, amax), *fused (compiled)* (inductor kernels), *python (autograd function)* (the custom autograd "
        "function's own time: tile loop and small vector ops), *alloc/view/other*. Other processes share the "
        "2 cores, so absolute times are noisy (load average recorded); the shares are what to read.",
        "",
    ]
    for entry in report["entries"]:
        m = entry.get("machine", {})
        lines += [
            f"## {entry['label']}: rule {entry['rule']}"
            + ("" if entry["rule"] == "long" else f", external_local {entry['external_local']}")
            + f", N = {entry['n']:,}, d = {entry['dim']}, L = {entry['seg_len']}",
            "",
            f"{entry['date']}, code {entry.get('code', '?')}, {m.get('cpu_model')} ({entry['threads']} threads), "
            f"load {entry['loadavg']}. Unprofiled step {entry['unprofiled_step_s']} s; profiled forward "
            f"{entry['phase_ms'].get('forward')} ms, backward {entry['phase_ms'].get('backward')} ms.",
            "",
            "| group | self ms | share |",
            "|---|---:|---:|",
        ]
        groups = entry_groups(entry)
        total = sum(groups.values()) or 1.0
        for g, ms in groups.items():
            lines.append(f"| {g} | {ms:.0f} | {100 * ms / total:.0f}% |")
        lines += ["", "| op | calls | self ms | group |", "|---|---:|---:|---|"]
        for o in entry["ops"][:top]:
            lines.append(f"| `{o['op']}` | {o['calls']} | {o['self_ms']:.0f} | {op_group(o['op'])} |")
        lines.append("")
    if report.get("notes"):
        lines += ["## Reading", ""] + [f"- {x}" for x in report["notes"]] + [""]
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=12288)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--seg-len", type=int, default=512)
    p.add_argument("--vocab", type=int, default=256, help="target ids drawn from this many types (bytes: 256)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rules", default="long,ext", help="comma-separated: " + ",".join(RULES))
    p.add_argument("--top", type=int, default=15, help="ops listed per entry")
    p.add_argument("--label", default="current")
    p.add_argument("--note", action="append", default=[])
    p.add_argument("--render-only", action="store_true", help="only rewrite <out>.md (and add --note lines)")
    p.add_argument("--out", default=str(_REPO / "bench" / "results" / "profile"))
    args = p.parse_args(argv)
    out = Path(args.out)
    report: Dict[str, Any] = {"entries": [], "notes": []}
    if out.with_suffix(".json").exists():
        report = json.loads(out.with_suffix(".json").read_text())
    import subprocess

    code = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(_REPO), "status", "--porcelain", "--", "trime/loss.py"],
                           capture_output=True, text=True).stdout.strip()
    code_id = code.stdout.strip() + (" + uncommitted trime/loss.py" if dirty else "")
    for key in [] if args.render_only else args.rules.split(","):
        rule, external_local = RULES[key]
        entry = profile_rule(rule, external_local, args)
        entry.update(label=args.label, date=today(), code=code_id, machine=machine_info())
        print(json.dumps({k: entry[k] for k in ("rule", "external_local", "unprofiled_step_s", "phase_ms", "group_ms")}),
              flush=True)
        same = (args.label, rule, external_local, args.n)
        report["entries"] = [e for e in report["entries"]
                             if (e["label"], e["rule"], e["external_local"], e["n"]) != same] + [entry]
    report["notes"] = list(dict.fromkeys(report.get("notes", []) + args.note))
    write_json(str(out.with_suffix(".json")), report)
    out.with_suffix(".md").write_text(render(report, args.top))


if __name__ == "__main__":
    main()
