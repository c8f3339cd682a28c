"""``make demo`` / ``python -m trime.demo``: the whole pipeline on the shipped sample.

Prepares the WikiText-2 sample shipped in ``samples/``, trains three tiny models with
the same budget (a cross-entropy Transformer, TrimeLM and TrimeLM_long) on 2 CPU
cores, evaluates each at the memory levels that apply with ``trime-eval`` and prints
their test perplexities side by side (memory temperatures tuned on valid). Everything goes under ``--out``
(default ``demo-out/``); re-running reuses finished checkpoints and evaluations.

With the ``[hf]`` extra installed it also trains a tiny Hugging Face GPT-2 from scratch
(a byte-level BPE tokenizer trained on the sample, ``trime-hf-train --memory none`` and
``--memory local``) and evaluates it with the same ``trime-eval``; its perplexities are
per BPE token, not comparable with the word-level rows. ``--no-hf`` skips it.

The pipeline is :mod:`trime.pipeline`'s, with its small-budget preset (:func:`~trime.pipeline.demo_budget`);
``make reproduce`` runs the same pipeline with the full preset.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from trime.cli import Parser
from trime.io_utils import write_json_atomic
from trime.pipeline import EvalSpec, Pipeline, Reporter, demo_budget, model_flags, read_marker

SAMPLE_TEXT = Path(__file__).resolve().parent.parent / "samples" / "wikitext-2"

# the fairseq models: name -> the name the demo prints
MODELS = {"transformer": "Transformer (CE)", "trimelm": "TrimeLM", "trimelm_long": "TrimeLM_long"}
SPECS = [
    EvalSpec("Transformer", "transformer", "none"),
    EvalSpec("Transformer + continuous cache", "transformer", "long"),
    EvalSpec("TrimeLM", "trimelm", "none"),
    EvalSpec("TrimeLM", "trimelm", "local"),
    EvalSpec("TrimeLM_long", "trimelm_long", "none"),
    EvalSpec("TrimeLM_long", "trimelm_long", "local"),
    EvalSpec("TrimeLM_long", "trimelm_long", "long"),
]
# the Hugging Face rows: a tiny GPT-2 trained from scratch on the same sample and budget
HF_VOCAB = 2000
HF_BLOCK = 64
# name -> (folder, trime-hf-train --memory, memory levels to evaluate with)
HF_MODELS = {"GPT-2 (HF, CE)": ("hf-ce", "none", ["none"]),
             "GPT-2 (HF, TrimeLM)": ("hf-trimelm", "local", ["none", "local"])}
HF_TRAIN_ARGS = [
    "--block-size", HF_BLOCK, "--per-device-train-batch-size", "16", "--learning-rate", "2e-3",
    "--lr-scheduler-type", "inverse_sqrt", "--warmup-steps", "40", "--max-grad-norm", "1.0", "--weight-decay", "0",
    "--cpu", "--no-progress-bar", "--logging-steps", "25", "--save-steps", "100000", "--seed", "1",
]


class DemoReporter(Reporter):
    """The demo's progress: one line per trained (or reused) model, nothing per step."""

    def training(self, name: str) -> None:
        pass

    def trained(self, name: str, checkpoint: Path, seconds: float | None, updates: int) -> None:
        label = MODELS.get(name, name)
        if seconds is None:
            print(f"  {label}: reusing {checkpoint}", flush=True)
        else:
            print(f"  {label}: trained {updates} updates in {seconds:.0f} s", flush=True)

    def datastore(self, name: str) -> None:
        pass

    def evaluating(self, label: str) -> None:
        pass

    def step_done(self, tool: str, seconds: float, log: Path) -> None:
        pass


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


def hf_train(pipeline: Pipeline, name: str, folder: str, memory: str, base: Path, max_steps: int) -> Path:
    """``trime-hf-train`` of one GPT-2 row (reused when its marker records ``max_steps``)."""
    model_dir = pipeline.work / "hf" / folder
    marker = model_dir / "DONE"
    done = read_marker(marker)
    if done is not None and done.get("max_update") == max_steps:
        print(f"  {name}: reusing {model_dir}")
        return model_dir
    start = time.time()
    cmd = [sys.executable, "-m", "trime.hf.train", "--model", base, "--train-file", SAMPLE_TEXT / "wiki.train.tokens",
           "--memory", memory, "--max-steps", max_steps, "--output-dir", model_dir, "--overwrite-output-dir",
           *HF_TRAIN_ARGS]
    pipeline.run_tool(cmd, f"train-{folder}")
    seconds = time.time() - start
    write_json_atomic(marker, {"max_update": max_steps, "seconds": seconds})
    print(f"  {name}: trained {max_steps} steps in {seconds:.0f} s")
    return model_dir


def hf_available() -> bool:
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def build_parser() -> Parser:
    parser = Parser(prog="trime-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="working and output folder (reused)")
    parser.add_argument("--max-update", type=int, default=150, help="training updates per model")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face GPT-2 rows")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo and print its table; returns 0 (a failed step exits with one line naming its log)."""
    args = build_parser().parse_args(argv)
    with_hf = not args.no_hf and hf_available()
    steps = 4 if with_hf else 3
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    out = args.out
    budget = demo_budget(args.max_update)
    flags = model_flags()
    pipeline = Pipeline(budget, out, {name: flags[name] for name in MODELS}, SPECS, reporter=DemoReporter())
    titles = {
        "data": f"1/{steps} preparing the shipped WikiText-2 sample",
        "training": f"2/{steps} training {len(MODELS)} tiny models, {args.max_update} updates each "
                    f"({budget.layers} layers x {budget.dim}, L={budget.tokens_per_sample}, "
                    f"{budget.segments_per_batch} segments/batch)",
        "evaluation": f"3/{steps} evaluating with trime-eval: memory temperature tuned on valid, test reported "
                      f"(context {budget.context_window}, memory {budget.mem_size})",
    }
    rows = pipeline.run(titles, "wikitext-2-sample")
    hf_rows = []
    if with_hf:
        print(f"4/{steps} Hugging Face: a tiny GPT-2 (2 layers x 64, BPE {HF_VOCAB:,}) from scratch with trime-hf-train, "
              f"{args.max_update} steps of 16 x {HF_BLOCK} tokens, without and with TRIME; same trime-eval")
        base = hf_base_model(out)
        for name, (folder, memory, levels) in HF_MODELS.items():
            model_dir = hf_train(pipeline, name, folder, memory, base, args.max_update)
            for level in levels:
                spec = EvalSpec(name, folder, level)
                hf_rows.append(pipeline.row(spec, pipeline.evaluate(name, model_dir, SAMPLE_TEXT, level, folder)))

    print()
    print(f"{'model':34s} {'memory':7s} {'test ppl':>10s} {'tokens/s':>9s}")
    for row in rows:
        print(f"{row['label']:34s} {row['memory']:7s} {row['test']:10.2f} {row['tokens_per_s']:9.0f}")
    for row in hf_rows:
        print(f"{row['label']:34s} {row['memory']:7s} {row['test']:10.2f} {row['tokens_per_s']:9.0f}  (per BPE token)")
    best = min(rows, key=lambda r: r["test"])
    print(f"\nbest: {best['label']} with {best['memory']} memory ({best['test']:.2f}); logs and results under {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
