"""Benchmark of generation with memory (``trime.eval.generation``, ``trime-generate``): tokens/s per memory.

Setup (cached in ``--workdir``): the model, data-bin and training of :mod:`bench.eval` (a 4 x 256
transformer LM on the shipped WikiText-2 sample, 30 updates: speed does not depend on how well it is
trained) and its datastore over the sample's train split, built with ``trime-build-datastore`` (default
metric and ``auto`` index). Every mode reads the same text before its prompts (``--context-file``: the
first lines of the sample's test split), so the model runs on the same inputs and only the memory differs:

- ``none``: no memory (the baseline of every ratio);
- ``local``: the window's context, the prompt and the generated tokens;
- ``long``: plus a FIFO of the context text's last ``MEM`` tokens;
- ``external``: plus the datastore's ``K`` neighbours of every new position, in the joint softmax (TrimeLM_ext);
- ``knnlm``: no in-context memory, the datastore by interpolation (lambda 0.25).

Measured in one process with one torch and one FAISS thread: greedy generation of ``--new-tokens`` tokens
from each of ``--prompts`` prompts (the first words of valid lines), the modes interleaved prompt by prompt
(in a rotating order), ``--rounds`` times; tokens/s by process CPU time (robust to other jobs on the machine)
and by wall time, and each mode's ratio to ``none``. The context's FIFO (``long``, ``external``) is computed
once per mode before the timing and reported apart. Writes ``bench/results/generate.json`` and ``generate.md``.
Usage: ``.venv/bin/python -m bench.generate`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import machine_info, today, write_json
from bench.eval import setup

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TPS, CONTEXT, MEM, K, NPROBE, LMBDA = 512, 64, 2048, 1024, 32, 0.25
MODES = ("none", "local", "long", "external", "knnlm")
CONTEXT_LINES = 40  # lines of the test split read before every prompt


def log(msg: str) -> None:
    print(f"[bench/generate {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def mode_settings(mode: str):
    from trime.eval.memory import MemorySettings

    return {
        "none": MemorySettings(level="none"),
        "local": MemorySettings(level="local"),
        "long": MemorySettings(level="long", mem_size=MEM),
        "external": MemorySettings(level="external", mem_size=MEM, knn_in_joint=True, k=K),
        "knnlm": MemorySettings(level="none", lmbda=LMBDA, k=K),
    }[mode]


def build_datastore(data: Path, ckpt: Path, out: Path) -> None:
    """The datastore over the sample's train split (reused when it is there)."""
    if (out / "meta.json").is_file() and json.loads((out / "meta.json").read_text()).get("index"):
        return
    log("building the datastore")
    subprocess.run([str(BIN / "trime-build-datastore"), str(data), "--path", str(ckpt), "--output", str(out),
                    "--context-window", str(CONTEXT), "--tokens-per-sample", str(TPS), "--cpu", "--no-progress-bar"],
                   check=True, capture_output=True)


def inputs(workdir: Path) -> tuple[Path, list[str]]:
    """The context file (the first CONTEXT_LINES non-blank lines of the test sample) and the prompts."""
    sample = REPO / "samples" / "wikitext-2"
    test_lines = [line for line in (sample / "wiki.test.tokens").read_text(encoding="utf-8").splitlines() if line.strip()]
    context = workdir / "context.txt"
    context.write_text("\n".join(test_lines[:CONTEXT_LINES]) + "\n", encoding="utf-8")
    valid = [line.split() for line in (sample / "wiki.valid.tokens").read_text(encoding="utf-8").splitlines()]
    prompts = [" ".join(words[:6]) for words in valid if len(words) > 20 and words[0] != "="]
    return context, prompts


def measure(data: Path, ckpt: Path, store_dir: Path, context_file: Path, prompts: list[str], rounds: int,
            new_tokens: int) -> dict:
    """Interleaved CPU and wall time of greedy generation per mode (one torch and FAISS thread)."""
    import torch

    from trime.adapters import load_adapter
    from trime.eval.generation import Decoding, Generator
    from trime.io_utils import quiet_libraries
    from trime.retrieval.datastore import Datastore
    from trime.retrieval.faiss_index import import_faiss

    quiet_libraries()
    torch.set_num_threads(1)
    import_faiss().omp_set_num_threads(1)
    lm = load_adapter(ckpt, data, cpu=True)
    windows = lm.window_settings(CONTEXT, TPS)
    store = Datastore.open(store_dir, dim=lm.dim, dict_sha256=lm.dict_sha256, nprobe=NPROBE)
    context = lm.encode_file(context_file, "context")
    generators, setup_seconds = {}, {}
    for mode in MODES:
        settings = mode_settings(mode)
        started = time.perf_counter()
        generators[mode] = Generator(lm, settings, windows, store=store if settings.k else None, context=context,
                                     batch_size=4)
        setup_seconds[mode] = time.perf_counter() - started
    decoding = Decoding(max_new_tokens=new_tokens)
    encoded = [lm.encode(p) for p in prompts]
    for mode in MODES:  # warm-up: one prompt each
        generators[mode].generate(encoded[0], decoding)
    totals = {m: {"cpu_s": 0.0, "wall_s": 0.0, "tokens": 0, "memory_prob": 0.0} for m in MODES}
    for r in range(rounds):
        for i, ids in enumerate(encoded):
            shift = (r * len(encoded) + i) % len(MODES)
            for mode in MODES[shift:] + MODES[:shift]:
                cpu0, wall0 = time.process_time(), time.perf_counter()
                out = generators[mode].generate(ids, decoding)
                totals[mode]["cpu_s"] += time.process_time() - cpu0
                totals[mode]["wall_s"] += time.perf_counter() - wall0
                totals[mode]["tokens"] += len(out.ids)
                totals[mode]["memory_prob"] += sum(t.memory_prob for t in out.tokens)
        speeds = ", ".join(f"{m} {t['tokens'] / t['cpu_s']:,.1f}" for m, t in totals.items())
        log(f"round {r + 1}/{rounds} (tokens per CPU second so far): {speeds}")
    out = {}
    for mode, t in totals.items():
        out[mode] = {
            "tokens": t["tokens"], "cpu_s": t["cpu_s"], "wall_s": t["wall_s"],
            "tokens_per_cpu_s": t["tokens"] / t["cpu_s"], "tokens_per_wall_s": t["tokens"] / t["wall_s"],
            "mean_memory_prob": t["memory_prob"] / t["tokens"], "setup_s": setup_seconds[mode],
            "fifo": generators[mode].fifo_size,
        }  # fmt: skip
    for mode in MODES:
        out[mode]["ratio_cpu"] = out[mode]["tokens_per_cpu_s"] / out["none"]["tokens_per_cpu_s"]
        out[mode]["ratio_wall"] = out[mode]["tokens_per_wall_s"] / out["none"]["tokens_per_wall_s"]
    return {
        "modes": out,
        "context_tokens": int(len(context)),
        "datastore": {"count": store.count, "dim": store.dim, "key_dtype": store.meta["key_dtype"],
                      "metric": store.metric, "index": (store.meta.get("index") or {}).get("factory")},
        "model": {"dim": lm.dim, "vocab": int(lm.vocab["size"]), "path": str(ckpt)},
    }


DESCRIPTION = {
    "none": "no memory",
    "local": "window context + prompt + generated tokens",
    "long": f"+ FIFO of the context's last {MEM:,} tokens",
    "external": f"+ k={K:,} datastore neighbours per step, joint softmax",
    "knnlm": f"kNN-LM: k={K:,} neighbours, lambda {LMBDA}",
}


def write_markdown(path: Path, record: dict) -> None:
    m, s, res = record["machine"], record["settings"], record["result"]
    ds = res["datastore"]
    lines = [
        "# Generation with memory: tokens/s per memory (`python -m bench.generate`)",
        "",
        f"- Date: {record['date']}",
        f"- Device: CPU only, {m['cpu_count']} cores ({m['cpu_model']}), {m['mem_total_gib']} GiB RAM, no GPU; torch "
        f"{m['torch']}, one torch and one FAISS thread; load average at start {m.get('loadavg_at_start')}, at end "
        f"{record['loadavg_at_end']}",
        f"- Model: {s['model']} (key size {res['model']['dim']}, vocabulary {res['model']['vocab']:,}), fairseq "
        "incremental decoding (KV cache), greedy",
        f"- Each mode: {s['prompts']} prompts (6 words of a valid line) x {s['new_tokens']} new tokens (fewer where "
        f"the model ends the line) x {s['rounds']} rounds, interleaved prompt by prompt; every mode reads the same "
        f"{res['context_tokens']:,}-token context text (the first {CONTEXT_LINES} lines of the test sample) before "
        f"each prompt, of which the last {CONTEXT} tokens are the window's context",
        f"- Datastore: the sample's train split, **{ds['count']:,} keys** ({ds['dim']}-d {ds['key_dtype']}), index "
        f"`{ds['index']}` ({ds['metric']}), nprobe {NPROBE}",
        "",
        "| memory | what it holds | tokens | tokens / CPU s | vs none | tokens / wall s | vs none | memory part of P |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        e = res["modes"][mode]
        lines.append(f"| {mode} | {DESCRIPTION[mode]} | {e['tokens']:,} | {e['tokens_per_cpu_s']:,.1f} | {e['ratio_cpu']:.2f} | "
                     f"{e['tokens_per_wall_s']:,.1f} | {e['ratio_wall']:.2f} | {e['mean_memory_prob']:.3f} |")
    lines += [
        "",
        "memory part of P: the mean, over the generated tokens, of the part of their probability that came from "
        f"memory (`memory_prob`). Reading the context into the FIFO ({res['modes']['long']['fifo']:,} keys, once "
        f"per Generator, before the timing): {res['modes']['long']['setup_s']:.2f} s.",
        "",
        "## Notes",
        "",
    ] + [f"- {n}" for n in record["notes"]]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/trime-bench-generate")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the prompts")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per round")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt (at most)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "generate"))
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    data, ckpt = setup(workdir)
    build_datastore(data, ckpt, workdir / "datastore")
    context_file, prompts = inputs(workdir)
    log("interleaved generation timing")
    result = measure(data, ckpt, workdir / "datastore", context_file, prompts[: args.prompts], args.rounds,
                     args.new_tokens)
    record = {
        "date": today(),
        "machine": machine,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "settings": {
            "model": "bench.eval's transformer_lm 4 x 256 (FFN 1024, 4 heads), full softmax tied, 30 updates (CE)",
            "tokens_per_sample": TPS, "context_window": CONTEXT, "mem_size": MEM, "k": K, "nprobe": NPROBE,
            "lmbda": LMBDA, "prompts": len(prompts[: args.prompts]), "new_tokens": args.new_tokens,
            "rounds": args.rounds, "device": "cpu",
        },  # fmt: skip
        "result": result,
        "notes": [
            "Per step every mode runs the model on one new position (KV cache) and scores the whole vocabulary; "
            "the memories add the scores of their entries (local: up to the window's positions; long: the FIFO; "
            "external and knnlm: one FAISS search of k neighbours) and a scatter-logsumexp of them by label "
            "(trime.eval.memory.label_logsumexp).",
            "CPU-time ratios are the robust comparison on a shared machine; wall time includes waits for other "
            "jobs. Modes are interleaved prompt by prompt, so every mode sees the same load.",
        ],
    }
    write_json(args.out + ".json", record)
    write_markdown(Path(args.out + ".md"), record)
    log(f"wrote {args.out}.md")


if __name__ == "__main__":
    main()
