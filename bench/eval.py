"""Benchmark of ``trime-eval`` and ``trime-build-datastore`` against ``fairseq-eval-lm``.

Setup (cached in ``--workdir``): the shipped WikiText-2 sample as a data-bin, and a small
transformer LM (4 layers x 256, FFN 1024, full softmax tied to the input embeddings,
``--tokens-per-sample 512``) trained for a few updates with ``fairseq-train`` (speed does
not depend on how well it is trained).

Measured:
1. datastore export over the sample's train split (keys/s), FAISS index build (``auto``
   factory: train + add seconds), search QPS at k=1024, nprobe=32 (and 8);
2. evaluation throughput on the valid split with the same windows (``--context-window
   384``: 128 new tokens per window) and batches (16 windows), two ways:

   a. in one process, batch by batch interleaved: fairseq's ``SequenceScorer.generate``
      (what ``fairseq-eval-lm`` runs per batch) and every ``trime-eval`` mode (forward,
      search, scoring) on the same collated batch, one torch/FAISS thread, timed by
      process CPU time and wall time. Interleaving per batch makes the ratios robust to
      the load of other jobs on this shared machine; these are the headline ratios.
   b. end to end, each run in its own process (``fairseq-eval-lm`` and ``trime-eval``
      CLIs, default threads), rounds interleaved, medians of the tokens/s each reports.

``fairseq-eval-lm`` reports tokens/s over ``SequenceScorer.generate`` only; ``trime-eval``
times its whole loop (collation, forward, FAISS search, scoring). Writes
``bench/results/eval.json`` and ``eval.md``.
Usage: ``.venv/bin/python -m bench.eval [--rounds 3 --passes 2]`` (about 15-25 min on 2 busy cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import machine_info, write_json

REPO = Path(__file__).resolve().parents[1]

BIN = Path(sys.executable).parent
DATE = "2026-11-22"
TPS, CONTEXT, BATCH, MEM = 512, 384, 16, 2048
K, NPROBE = 1024, 32
MODEL_ARGS = [
    "--task",
    "language_modeling",
    "--arch",
    "transformer_lm",
    "--decoder-layers",
    "4",
    "--decoder-embed-dim",
    "256",
    "--decoder-input-dim",
    "256",
    "--decoder-output-dim",
    "256",
    "--decoder-ffn-embed-dim",
    "1024",
    "--decoder-attention-heads",
    "4",
    "--decoder-normalize-before",
    "--share-decoder-input-output-embed",
    "--dropout",
    "0.1",
    "--tokens-per-sample",
    str(TPS),
    "--sample-break-mode",
    "none",
    "--max-tokens",
    "4096",
    "--optimizer",
    "adam",
    "--lr",
    "0.001",
    "--max-update",
    "30",
    "--no-epoch-checkpoints",
    "--disable-validation",
    "--seed",
    "1",
    "--cpu",
    "--num-workers",
    "0",
    "--log-format",
    "none",
    "--criterion",
    "cross_entropy",
]
MODES = {
    "none": ["--memory", "none"],
    "local": ["--memory", "local"],
    "long": ["--memory", "long", "--mem-size", str(MEM)],
    "external": ["--memory", "external", "--mem-size", str(MEM), "--k", str(K), "--nprobe", str(NPROBE)],
    "knnlm": ["--memory", "none", "--knnlm", "--k", str(K), "--nprobe", str(NPROBE)],
}
TARGETS = {"none": 0.9, "local": 0.9, "long": 0.9, "external": 0.3, "knnlm": 0.3}


def log(msg: str) -> None:
    print(f"[bench/eval {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def setup(workdir: Path) -> tuple[Path, Path]:
    """The data-bin and the checkpoint (built once, reused from ``workdir``)."""
    from trime.data_prep.prepare import prepare_dataset

    data = workdir / "data-bin"
    if not (data / "dict.txt").is_file():
        prepare_dataset("wikitext-2-sample", REPO / "samples" / "wikitext-2", data)
    ckpt = workdir / "model" / "checkpoint_last.pt"
    if not ckpt.is_file():
        log("training the benchmark model")
        subprocess.run(
            [str(BIN / "fairseq-train"), str(data), *MODEL_ARGS, "--save-dir", str(ckpt.parent)],
            check=True,
            capture_output=True,
        )
    return data, ckpt


def build_datastore(data: Path, ckpt: Path, out: Path) -> dict:
    """Export (keys/s), index build (s) and search QPS."""
    from trime.adapters import batch_size_for, load_adapter
    from trime.io_utils import quiet_libraries
    from trime.retrieval.build_datastore import build_index, extract
    from trime.retrieval.datastore import Datastore

    quiet_libraries()
    lm = load_adapter(ckpt, data, cpu=True)
    settings = lm.window_settings(CONTEXT, None)
    batch = batch_size_for(settings, BATCH, None)
    result: dict = {}
    saved = out.parent / "datastore-bench.json"  # export/index timings of an earlier run of this script
    if (out / "meta.json").is_file() and saved.is_file():
        result = json.loads(saved.read_text())
        result["reused"] = f"export/index timings from an earlier run of this script ({saved})"
    if not (out / "meta.json").is_file():
        started = time.perf_counter()
        extract(lm, "train", settings, batch, out, key_dtype="fp16", show_progress=False)
        seconds = time.perf_counter() - started
        count = json.loads((out / "meta.json").read_text())["count"]
        result["export"] = {
            "keys": count,
            "seconds": seconds,
            "keys_per_s": count / seconds,
            "dim": lm.dim,
            "key_dtype": "float16",
            "split": "train",
        }
    meta = json.loads((out / "meta.json").read_text())
    if not meta.get("index"):
        info = build_index(out, factory="auto", metric="ip", show_progress=False)
        result["index"] = info
    elif "index" not in result:
        result["index"] = meta["index"]
    saved.write_text(json.dumps({k: result[k] for k in ("export", "index") if k in result}))
    store = Datastore.open(out, nprobe=NPROBE)
    rng = np.random.default_rng(0)
    queries = np.asarray(store.keys[np.sort(rng.choice(store.count, 2048, replace=False))], dtype=np.float32)
    queries += rng.standard_normal(queries.shape).astype(np.float32) * 0.01  # not exactly stored keys
    store.index.search(queries[:64], K)  # warm-up
    searches = {}
    for nprobe in (NPROBE, 8):
        from trime.retrieval.faiss_index import set_nprobe

        set_nprobe(store.index, nprobe)
        started = time.perf_counter()
        store.index.search(queries, K)
        seconds = time.perf_counter() - started
        searches[f"nprobe{nprobe}"] = {
            "queries": len(queries),
            "k": K,
            "nprobe": nprobe,
            "seconds": seconds,
            "qps": len(queries) / seconds,
        }
    result["search"] = searches
    result["datastore"] = {"count": store.count, "dim": store.dim, "factory": store.meta["index"]["factory"]}
    return result


def run_fairseq(data: Path, ckpt: Path) -> dict:
    proc = subprocess.run(
        [
            str(BIN / "fairseq-eval-lm"),
            str(data),
            "--path",
            str(ckpt),
            "--gen-subset",
            "valid",
            "--context-window",
            str(CONTEXT),
            "--tokens-per-sample",
            str(TPS),
            "--batch-size",
            str(BATCH),
            "--max-tokens",
            "1000000",
            "--cpu",
            "--num-workers",
            "0",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    text = proc.stdout + proc.stderr
    speed = re.search(r"Evaluated ([0-9,]+) tokens in ([0-9.]+)s \(([0-9.]+) tokens/s\)", text)
    loss = re.search(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)", text)
    return {
        "tokens": int(speed.group(1).replace(",", "")),
        "seconds": float(speed.group(2)),
        "tokens_per_s": float(speed.group(3)),
        "ppl": float(loss.group(2)),
    }


def run_trime(data: Path, ckpt: Path, store: Path, mode: str, workdir: Path) -> dict:
    out = workdir / f"result-{mode}.json"
    extra = ["--datastore", str(store)] if mode in ("external", "knnlm") else []
    subprocess.run(
        [
            str(BIN / "trime-eval"),
            str(data),
            "--path",
            str(ckpt),
            "--gen-subset",
            "valid",
            "--context-window",
            str(CONTEXT),
            "--batch-size",
            str(BATCH),
            "--cpu",
            "--no-progress-bar",
            "--results-json",
            str(out),
            *MODES[mode],
            *extra,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    row = json.loads(out.read_text())["results"][-1]
    return {"tokens": row["tokens"], "seconds": row["seconds"], "tokens_per_s": row["tokens_per_s"], "ppl": row["ppl"]}


def mode_settings(mode: str):
    from trime.eval.memory import MemorySettings

    return {
        "none": MemorySettings(level="none"),
        "local": MemorySettings(level="local"),
        "long": MemorySettings(level="long", mem_size=MEM),
        "external": MemorySettings(level="external", mem_size=MEM, knn_in_joint=True, k=K),
        "knnlm": MemorySettings(level="none", lmbda=0.25, k=K),
    }[mode]


def interleaved(data: Path, ckpt: Path, store_dir: Path, passes: int) -> dict:
    """Per-batch interleaved CPU/wall timing of fairseq's scorer and every trime mode (1 thread)."""
    import torch
    from fairseq.sequence_scorer import SequenceScorer

    from trime.adapters import load_adapter
    from trime.eval.memory import ScoreState, score_batch
    from trime.io_utils import quiet_libraries
    from trime.retrieval.datastore import Datastore
    from trime.retrieval.faiss_index import import_faiss

    quiet_libraries()
    torch.set_num_threads(1)
    import_faiss().omp_set_num_threads(1)
    lm = load_adapter(ckpt, data, cpu=True)
    windows = lm.window_settings(CONTEXT, None)
    store = Datastore.open(store_dir, dim=lm.dim, dict_sha256=lm.dict_sha256, nprobe=NPROBE)
    scorer = SequenceScorer(lm.task.target_dictionary)
    names = ["fairseq", *MODES]
    totals = {n: {"cpu_s": 0.0, "wall_s": 0.0, "tokens": 0, "nll": 0.0} for n in names}
    for _ in range(passes):
        states = {m: ScoreState.fresh(mode_settings(m)) for m in MODES}
        samples = list(lm.windows("valid", windows).batches(BATCH))  # collation is not timed
        for sample in samples:
            for name in names:
                cpu0, wall0 = time.process_time(), time.perf_counter()
                if name == "fairseq":
                    hypos = scorer.generate([lm.model], sample)
                    scores = torch.cat([h[0]["positional_scores"] for h in hypos])
                else:
                    settings = mode_settings(name)
                    batch = lm.forward(sample)
                    knn = None
                    if name in ("external", "knnlm"):
                        knn = store.search(batch.queries.float().numpy(), K)
                    scores = score_batch(batch, settings, states[name], knn, dim=lm.dim)
                totals[name]["cpu_s"] += time.process_time() - cpu0
                totals[name]["wall_s"] += time.perf_counter() - wall0
                totals[name]["tokens"] += scores.numel()
                totals[name]["nll"] -= float(scores.double().sum())
        speeds = ", ".join(f"{n} {t['tokens'] / t['cpu_s']:,.0f}" for n, t in totals.items())
        log(f"interleaved pass done (tokens per CPU second): {speeds}")
    out = {}
    for name, t in totals.items():
        out[name] = {
            "tokens": t["tokens"],
            "cpu_s": t["cpu_s"],
            "wall_s": t["wall_s"],
            "tokens_per_cpu_s": t["tokens"] / t["cpu_s"],
            "tokens_per_wall_s": t["tokens"] / t["wall_s"],
            "ppl": math.exp(t["nll"] / t["tokens"]),
        }
    for name in MODES:
        out[name]["ratio_cpu"] = out[name]["tokens_per_cpu_s"] / out["fairseq"]["tokens_per_cpu_s"]
        out[name]["ratio_wall"] = out[name]["tokens_per_wall_s"] / out["fairseq"]["tokens_per_wall_s"]
    return out


def _speeds(runs: list) -> str:
    return ", ".join(f"{r['tokens_per_s']:,.0f}" for r in runs)


def write_markdown(path: Path, record: dict) -> None:
    m, ds, ev = record["machine"], record["datastore"], record["eval"]
    lines = [
        "# trime-eval / trime-build-datastore benchmark (`python -m bench.eval`)",
        "",
        f"- Date: {record['date']}",
        f"- Machine: {m['cpu_count']} CPU cores ({m['cpu_model']}), {m['mem_total_gib']} GiB RAM, no GPU; torch "
        f"{m['torch']} with {m['torch_threads']} threads; load average at start {m.get('loadavg_at_start')}, "
        f"at end {record['loadavg_at_end']} (shared with other jobs: rounds interleaved, medians reported)",
        f"- Model: {record['settings']['model']}",
        f"- Windows: tokens-per-sample {TPS}, context window {CONTEXT} ({TPS - CONTEXT} new tokens), "
        f"{BATCH} windows per batch, valid split of the WikiText-2 sample "
        f"({ev['fairseq']['runs'][0]['tokens']:,} tokens)",
        f"- Memory: mem-size {MEM}; datastore = train split of the sample ({ds['datastore']['count']:,} keys, "
        f"{ds['datastore']['dim']}-d fp16), index `{ds['datastore']['factory']}` (ip), k={K}, nprobe={NPROBE}",
        "",
        "## Evaluation throughput, in-process, interleaved per batch (headline)",
        "",
        "One torch and FAISS thread; the same collated batches for all; "
        f"{record['settings']['passes']} passes over the valid split.",
        "",
        "| mode | tokens / CPU s | vs fairseq | tokens / wall s | vs fairseq | target | ppl |",
        "|---|---|---|---|---|---|---|",
    ]
    inp = record["interleaved"]
    f_cpu, f_wall = inp["fairseq"]["tokens_per_cpu_s"], inp["fairseq"]["tokens_per_wall_s"]
    lines.append(f"| fairseq scorer | {f_cpu:,.0f} | 1.00 | {f_wall:,.0f} | 1.00 | - | {inp['fairseq']['ppl']:.2f} |")
    for mode in MODES:
        e = inp[mode]
        ok = "met" if e["ratio_cpu"] >= TARGETS[mode] else "MISSED"
        lines.append(
            f"| {mode} | {e['tokens_per_cpu_s']:,.0f} | {e['ratio_cpu']:.2f} | {e['tokens_per_wall_s']:,.0f} "
            f"| {e['ratio_wall']:.2f} | >= {TARGETS[mode]} ({ok}) | {e['ppl']:.2f} |"
        )
    lines += [
        "",
        "## Evaluation throughput, end to end (separate processes, default threads)",
        "",
        f"{record['settings']['rounds']} rounds, interleaved; tokens/s as each tool reports it; noisy under the "
        "shared load.",
        "",
        "| mode | tokens/s (median) | runs | vs fairseq-eval-lm | target | ppl |",
        "|---|---|---|---|---|---|",
    ]
    fq = ev["fairseq"]["median_tokens_per_s"]
    fq_ppl = ev["fairseq"]["runs"][0]["ppl"]
    lines.append(f"| fairseq-eval-lm | {fq:,.0f} | {_speeds(ev['fairseq']['runs'])} | 1.00 | - | {fq_ppl:.2f} |")
    for mode in MODES:
        e = ev[mode]
        ok = "met" if e["ratio"] >= TARGETS[mode] else "MISSED"
        lines.append(
            f"| {mode} | {e['median_tokens_per_s']:,.0f} | {_speeds(e['runs'])} | {e['ratio']:.2f} "
            f"| >= {TARGETS[mode]} ({ok}) | {e['runs'][0]['ppl']:.2f} |"
        )
    exp = ds.get("export")
    lines += ["", "## Datastore", ""]
    if ds.get("reused"):
        lines.append(f"- Note: {ds['reused']}")
    if exp:
        lines.append(
            f"- Export: {exp['keys']:,} keys in {exp['seconds']:.1f} s = **{exp['keys_per_s']:,.0f} keys/s** "
            f"(forward pass + fp16 writes, {exp['dim']}-d)"
        )
    idx = ds["index"]
    if "train_seconds" in idx:
        lines.append(
            f"- Index build `{idx['factory']}` ({idx['metric']}): train {idx['train_seconds']:.1f} s on "
            f"{idx['train_sample']:,} keys, total (train + add + write) {idx['total_seconds']:.1f} s"
        )
    for s in ds["search"].values():
        lines.append(
            f"- Search: {s['queries']:,} queries, k={s['k']}, nprobe={s['nprobe']}: {s['seconds']:.2f} s = "
            f"**{s['qps']:,.0f} queries/s**"
        )
    lines += ["", "## Notes", ""] + [f"- {n}" for n in record["notes"]]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/trime-bench-eval")
    parser.add_argument("--rounds", type=int, default=3, help="end-to-end CLI rounds")
    parser.add_argument("--passes", type=int, default=2, help="in-process interleaved passes over the valid split")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "eval"))
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    data, ckpt = setup(workdir)
    log("datastore export, index, search")
    ds = build_datastore(data, ckpt, workdir / "datastore")
    log("in-process interleaved timing")
    inproc = interleaved(data, ckpt, workdir / "datastore", args.passes)
    runs: dict = {"fairseq": [], **{m: [] for m in MODES}}
    for r in range(args.rounds):
        for mode in ["fairseq", *MODES]:
            if mode == "fairseq":
                result = run_fairseq(data, ckpt)
            else:
                result = run_trime(data, ckpt, workdir / "datastore", mode, workdir)
            runs[mode].append(result)
            log(f"round {r + 1}/{args.rounds} {mode}: {result['tokens_per_s']:,.0f} tokens/s, ppl {result['ppl']:.2f}")
    fq = statistics.median(x["tokens_per_s"] for x in runs["fairseq"])
    ev = {"fairseq": {"runs": runs["fairseq"], "median_tokens_per_s": fq}}
    for mode in MODES:
        med = statistics.median(x["tokens_per_s"] for x in runs[mode])
        ev[mode] = {"runs": runs[mode], "median_tokens_per_s": med, "ratio": med / fq, "target": TARGETS[mode]}
    record = {
        "date": DATE,
        "machine": machine,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "settings": {
            "model": "transformer_lm 4 x 256 (FFN 1024, 4 heads), full softmax tied, vocabulary 12,152, 30 updates",
            "tokens_per_sample": TPS,
            "context_window": CONTEXT,
            "batch_size": BATCH,
            "mem_size": MEM,
            "k": K,
            "nprobe": NPROBE,
            "rounds": args.rounds,
            "passes": args.passes,
            "device": "cpu",
        },
        "datastore": ds,
        "interleaved": inproc,
        "eval": ev,
        "notes": [
            "fairseq-eval-lm times SequenceScorer.generate only; trime-eval times its whole loop "
            "(collation, forward, search, scoring).",
            "trime-eval projects only the scored (new) positions onto the vocabulary; fairseq-eval-lm projects "
            "every position including the context, which is why --memory none can be faster than fairseq.",
            "external/knnlm: the FAISS search runs on the CPU for the scored positions only (no queries for "
            "context positions, one search shared by the joint softmax and the interpolation).",
            "The datastore (136k keys) is small; search cost per query grows with nprobe x list length. "
            "Search QPS uses FAISS's default OpenMP threads (2 here); the in-process comparison uses 1 thread.",
            "On this shared 2-core machine, torch's 2 intra-op threads stall whenever the other jobs take a core "
            "(many small ops wait at OpenMP barriers), so end-to-end numbers swing by 2-3x between rounds; "
            "the per-batch interleaved single-thread numbers are the robust comparison.",
        ],
    }
    write_json(args.out + ".json", record)
    write_markdown(Path(args.out + ".md"), record)
    log(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
