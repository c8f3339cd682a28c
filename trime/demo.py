"""``make demo`` / ``python -m trime.demo``: the whole pipeline on the shipped sample.

Prepares the WikiText-2 sample shipped in ``samples/``, trains three tiny models with
the same budget (a cross-entropy Transformer, TrimeLM and TrimeLM_long) on 2 CPU
cores, evaluates each at the memory levels that apply with ``trime-eval`` and prints
their test perplexities side by side (memory temperatures tuned on valid). Everything goes under ``--out``
(default ``demo-out/``); re-running reuses finished checkpoints.

With the ``[hf]`` extra installed it also trains a tiny Hugging Face GPT-2 from scratch
(a byte-level BPE tokenizer trained on the sample, ``trime-hf-train --memory none`` and
``--memory local``) and evaluates it with the same ``trime-eval``; its perplexities are
per BPE token, not comparable with the word-level rows. ``--no-hf`` skips it.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Sequence

from trime.data_prep.prepare import prepare_dataset
from trime.errors import fail

BIN = Path(sys.executable).parent
SAMPLE_TEXT = Path(__file__).resolve().parent.parent / "samples" / "wikitext-2"

# One small architecture and budget for every model (the paper's pre-norm LM).
MODEL_ARGS = [
    "--arch", "transformer_lm", "--decoder-normalize-before", "--decoder-layers", "2",
    "--decoder-embed-dim", "64", "--decoder-ffn-embed-dim", "256", "--decoder-attention-heads", "2",
    "--adaptive-softmax-cutoff", "1000,4000", "--adaptive-softmax-dropout", "0", "--ddp-backend", "legacy_ddp",
    "--dropout", "0.1", "--tokens-per-sample", "64", "--max-tokens", "1024",
    "--required-batch-size-multiple", "1", "--optimizer", "adam", "--adam-betas", "(0.9,0.98)",
    "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "40", "--clip-norm", "1.0",
    "--cpu", "--num-workers", "0", "--seed", "1", "--no-epoch-checkpoints", "--no-progress-bar",
    "--log-interval", "25", "--max-valid-steps", "0",
]

# name -> (training flags, memory levels to evaluate with)
MODELS = {
    "Transformer (CE)": (["--task", "language_modeling", "--criterion", "adaptive_loss"], ["none", "long"]),
    "TrimeLM": (["--task", "language_modeling", "--criterion", "trime_loss"], ["none", "local"]),
    "TrimeLM_long": (
        ["--task", "trime_lm", "--keep-order", "--criterion", "trime_long_loss_same_device"],
        ["none", "local", "long"],
    ),
}
# the Hugging Face rows: a tiny GPT-2 trained from scratch on the same sample and budget
HF_VOCAB = 2000
HF_BLOCK = 64
HF_MODELS = {"GPT-2 (HF, CE)": ("none", ["none"]), "GPT-2 (HF, TrimeLM)": ("local", ["none", "local"])}
HF_TRAIN_ARGS = [
    "--block-size", HF_BLOCK, "--per-device-train-batch-size", "16", "--learning-rate", "2e-3",
    "--lr-scheduler-type", "inverse_sqrt", "--warmup-steps", "40", "--max-grad-norm", "1.0", "--weight-decay", "0",
    "--cpu", "--no-progress-bar", "--logging-steps", "25", "--save-steps", "100000", "--seed", "1",
]
ROW_LABELS = {
    ("Transformer (CE)", "none"): "Transformer",
    ("Transformer (CE)", "long"): "Transformer + continuous cache",
}


def run_logged(cmd: Sequence, log_path: Path) -> None:
    """Run ``cmd`` with its output in ``log_path``; on failure, a one-line error with the log's tail."""
    with open(log_path, "w") as log:
        proc = subprocess.run([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-5:]
        fail(f"{Path(str(cmd[0])).name} failed (see {log_path}): {' | '.join(tail)}")


def train(name: str, flags: List[str], data: Path, out: Path, max_update: int) -> Path:
    save_dir = out / "checkpoints" / name.split()[0].lower()
    ckpt = save_dir / "checkpoint_last.pt"
    done = save_dir / "DONE"
    if done.exists() and done.read_text().strip() == str(max_update):
        print(f"  {name}: reusing {ckpt}")
        return ckpt
    start = time.time()
    cmd = [BIN / "trime-train", data, *flags, *MODEL_ARGS, "--max-update", max_update, "--save-dir", save_dir]
    run_logged(cmd, save_dir.parent / f"{save_dir.name}.train.log")
    done.write_text(f"{max_update}\n")
    print(f"  {name}: trained {max_update} updates in {time.time() - start:.0f} s")
    return ckpt


def hf_base_model(out: Path) -> Path:
    """A random-initialised tiny GPT-2 and a BPE tokenizer trained on the sample's train split, saved together."""
    base = out / "hf" / "base"
    if (base / "config.json").is_file() and (base / "tokenizer.json").is_file():
        return base
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from trime.hf.text import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer([SAMPLE_TEXT / "wiki.train.tokens"], HF_VOCAB)
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=HF_BLOCK, n_embd=64, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    tmp = base.with_name("base.tmp")
    GPT2LMHeadModel(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, base)
    return base


def hf_train(name: str, memory: str, base: Path, out: Path, max_steps: int) -> Path:
    model_dir = out / "hf" / name.split("(")[1].split(")")[0].replace(", ", "-").lower()
    done = model_dir / "DONE"
    if done.exists() and done.read_text().strip() == str(max_steps):
        print(f"  {name}: reusing {model_dir}")
        return model_dir
    start = time.time()
    cmd = [sys.executable, "-m", "trime.hf.train", "--model", base, "--train-file", SAMPLE_TEXT / "wiki.train.tokens",
           "--memory", memory, "--max-steps", max_steps, "--output-dir", model_dir, "--overwrite-output-dir",
           *HF_TRAIN_ARGS]
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    run_logged(cmd, model_dir.parent / f"{model_dir.name}.train.log")
    done.write_text(f"{max_steps}\n")
    print(f"  {name}: trained {max_steps} steps in {time.time() - start:.0f} s")
    return model_dir


def hf_available() -> bool:
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def evaluate(ckpt: Path, data: Path, memory: str, out: Path, tag: str) -> dict:
    result = out / "eval" / f"{tag}-{memory}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    cmd = [BIN / "trime-eval", data, "--path", ckpt, "--memory", memory, "--context-window", "32", "--cpu",
           "--results-json", result]
    # memory temperatures are tuned on valid and test is reported, so the cache baseline is fair
    cmd += ["--tune"] if memory != "none" else ["--gen-subset", "test"]
    if memory == "long":
        cmd += ["--mem-size", "1024"]
    run_logged(cmd, result.with_suffix(".log"))
    return json.loads(result.read_text())


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--max-update", type=int, default=150, help="training updates per model")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face GPT-2 rows")
    args = parser.parse_args(argv)
    with_hf = not args.no_hf and hf_available()
    steps = 4 if with_hf else 3
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    out = args.out
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)

    print(f"1/{steps} preparing the shipped WikiText-2 sample")
    data = prepare_dataset("wikitext-2-sample", None, out / "data-bin")
    print(f"2/{steps} training 3 tiny models, {args.max_update} updates each (2 layers x 64, L=64, 16 segments/batch)")
    ckpts = {name: train(name, flags, data, out, args.max_update) for name, (flags, _) in MODELS.items()}
    print(f"3/{steps} evaluating with trime-eval: memory temperature tuned on valid, test reported (context 32, memory 1024)")
    rows = []
    for name, (_, levels) in MODELS.items():
        for memory in levels:
            results = evaluate(ckpts[name], data, memory, out, name.split()[0].lower())["results"]
            res = next(r for r in results if r["subset"] == "test")
            rows.append((ROW_LABELS.get((name, memory), name), memory, res["ppl"], res["tokens_per_s"]))
    hf_rows = []
    if with_hf:
        print(f"4/{steps} Hugging Face: a tiny GPT-2 (2 layers x 64, BPE {HF_VOCAB:,}) from scratch with trime-hf-train, "
              f"{args.max_update} steps of 16 x {HF_BLOCK} tokens, without and with TRIME; same trime-eval")
        base = hf_base_model(out)
        for name, (memory, levels) in HF_MODELS.items():
            model_dir = hf_train(name, memory, base, out, args.max_update)
            for level in levels:
                results = evaluate(model_dir, SAMPLE_TEXT, level, out, "hf-" + model_dir.name)["results"]
                res = next(r for r in results if r["subset"] == "test")
                hf_rows.append((name, level, res["ppl"], res["tokens_per_s"]))

    print()
    print(f"{'model':34s} {'memory':7s} {'test ppl':>10s} {'tokens/s':>9s}")
    for label, memory, ppl, tps in rows:
        print(f"{label:34s} {memory:7s} {ppl:10.2f} {tps:9.0f}")
    for label, memory, ppl, tps in hf_rows:
        print(f"{label:34s} {memory:7s} {ppl:10.2f} {tps:9.0f}  (per BPE token)")
    best = min(rows, key=lambda r: r[2])
    print(f"\nbest: {best[0]} with {best[1]} memory ({best[2]:.2f}); logs and results under {out}/")


if __name__ == "__main__":
    main()
