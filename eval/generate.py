"""``trime-generate``: continue prompts with a memory-augmented LM (none, local, long or external memory).

The model and window flags are ``trime-eval``'s (:mod:`trime.cli.model_args`), and so are the memory
flags, borrowed from its parser (``--memory``, ``--mem-size``, ``--softmax-temp``, ``--datastore``,
``--k``, ``--lmbda``, ``--knnlm``, ``--cache``, ...): a setting means the same in both tools, and a
token gets the log-probability ``trime-eval`` gives it (:mod:`trime.eval.generation`). Memories:

- ``--memory local``: the prompt and the generated tokens;
- ``--memory long --mem-size M --context-file FILE``: plus the last M tokens of FILE, read before the
  prompt (the model also reads its last ``--context-window`` tokens as the window's context);
- ``--memory external ... --datastore DIR``: plus the datastore (``--knnlm``: by interpolation only).

``--settings-from FILE`` takes the tuned temperatures and weights (and the memory settings) of a
``trime-eval --tune --results-json FILE`` run; flags given explicitly win. Decoding uses Hugging
Face ``generate``'s flag names and defaults: greedy by default, ``--do-sample`` (``--temperature``,
``--top-k``, ``--top-p``, ``--seed``) or ``--num-beams N``.

Prompts come from ``--prompt TEXT`` (repeatable) or ``--prompt-file FILE`` (one per line, blank lines
skipped). stdout has one line per prompt, the prompt followed by its continuation (a newline in the
continuation written as ``\\n``); ``--jsonl`` writes one JSON object per generated token instead:
the prompt's number, the token, its probability with memory, the model's own and the part that came
from memory. Settings and notes go to stderr.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from trime.cli import NONNEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, Number, Parser, logger
from trime.cli.model_args import add_model_args, model_from_args
from trime.errors import fail, file_faults_as_errors
from trime.eval import evaluate
from trime.eval.generation import Decoding, Generator
from trime.hf.model import is_gguf
from trime.io_utils import identity_key, quiet_libraries, read_json

PROG = "trime-generate"
TOP_P = Number(float, gt=0, le=1)
# what --settings-from takes from a results file when the flag is not given: flag dest -> key of "settings"
RECORDED = {"memory": "memory", "knnlm": "knnlm", "cache": "cache", "mem_size": "mem_size", "k": "k", "metric": "metric"}
# the tuned values (the results file's tuning.chosen), each checked by trime-eval's rule for its flag
TUNED = ("softmax_temp", "external_temp", "lmbda", "interp_temp", "cache_lmbda", "cache_temp")
# the configuration the tuned values belong to: a flag that disagrees with the file is refused
TUNED_FOR = ("memory", "knnlm", "cache")
DEFAULTS = {"memory": "none", "knnlm": False, "cache": "joint", "k": 1024, "softmax_temp": 1.0, "interp_temp": 1.0}


def build_parser() -> Parser:
    """The ``trime-generate`` command-line parser."""
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_model_args(p, gen_subset="test", gen_subset_help=argparse.SUPPRESS, required=False)
    for action in p._actions:
        if action.dest == "data":
            action.help = "fairseq checkpoints: the data-bin with the dict.txt the checkpoint was trained with " \
                "(Hugging Face models read none)"
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for several)")
    prompts.add_argument("--prompt-file", metavar="FILE", help="a UTF-8 file of prompts, one per line (blank lines "
                         "are skipped)")
    p.add_argument("--context-file", metavar="FILE", help="text read before every prompt, tokenized as a split is: "
                   "its last --context-window tokens are the window's context and, with --memory long or external, "
                   "its last --mem-size tokens the long-term memory")
    evaluate.add_memory_args(p)
    p.set_defaults(**{name: None for name in DEFAULTS})  # resolved after --settings-from
    p.add_argument("--settings-from", metavar="FILE", help="take the tuned temperatures and weights, and the memory "
                   "settings not given as flags, from a trime-eval --tune --results-json FILE of this model")
    decoding = p.add_argument_group("decoding (Hugging Face generate's names and defaults)")
    decoding.add_argument("--max-new-tokens", type=POSITIVE_INT, default=20, help="tokens to generate (default 20)")
    decoding.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    decoding.add_argument("--temperature", type=POSITIVE_FLOAT, default=1.0, help="sampling temperature (default 1)")
    decoding.add_argument("--top-k", type=NONNEGATIVE_INT, default=50, help="sample among the k most likely tokens "
                          "(default 50; 0: all)")
    decoding.add_argument("--top-p", type=TOP_P, default=1.0, help="sample among the most likely tokens whose "
                          "probabilities sum to p (default 1: all)")
    decoding.add_argument("--num-beams", type=POSITIVE_INT, default=1, help="beam search with N beams (default 1: "
                          "greedy or sampling)")
    decoding.add_argument("--seed", type=NONNEGATIVE_INT, default=None, help="seed of --do-sample (default: random)")
    p.add_argument("--jsonl", action="store_true", help="write one JSON object per generated token (prompt, id, "
                   "token, prob, lm_prob, memory_prob) instead of one line per prompt")
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    """``--prompt`` values, or the non-blank lines of ``--prompt-file``."""
    if args.prompt is not None:
        return list(args.prompt)
    path = Path(args.prompt_file)
    if not path.is_file():
        fail(f"--prompt-file {path}: no such file; pass a text file with one prompt per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        fail(f"--prompt-file {path} is not UTF-8 text (byte {err.start}); convert it to UTF-8")
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        fail(f"--prompt-file {path} has no prompt (every line is blank); write one prompt per line")
    return prompts


def apply_settings_file(args: argparse.Namespace) -> dict | None:
    """Fill the flags not given from ``--settings-from`` (its memory settings and tuned values); the record."""
    if not args.settings_from:
        return None
    flag = f"--settings-from {args.settings_from}"
    record = read_json(args.settings_from, what="--settings-from")
    settings = record.get("settings") if isinstance(record, dict) else None
    tuning = record.get("tuning") if isinstance(record, dict) else None
    if not isinstance(settings, dict):
        fail(f"{flag} is not a trime-eval --results-json file (no settings); write one with trime-eval --tune "
             "--results-json FILE")
    if not isinstance(tuning, dict) or not isinstance(tuning.get("chosen"), dict):
        fail(f"{flag} holds no tuned values (trime-eval ran without --tune); tune with trime-eval --tune "
             "--results-json FILE")
    for name in TUNED_FOR:
        given, tuned = getattr(args, name), settings.get(name)
        if given is not None and given != tuned:
            option = "--" + name.replace("_", "-")
            fail(f"{option} {given} disagrees with {flag}, tuned with {option} {tuned}; drop {option}, or tune "
                 f"these settings with trime-eval --tune")
    for name, key in RECORDED.items():
        if getattr(args, name) is None and settings.get(key) is not None:
            setattr(args, name, settings[key])
    for name in TUNED:
        value = tuning["chosen"].get(name)
        if getattr(args, name) is None and value is not None:
            setattr(args, name, evaluate.SWEEP_RULES[name.replace("_", "-")].check(f"{flag}: {name}", value))
    return record


def resolve_args(args: argparse.Namespace) -> dict | None:
    """``--settings-from``, then trime-eval's defaults and its checks of flag combinations."""
    record = apply_settings_file(args)
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.do_sample and args.num_beams > 1:
        fail("--do-sample with --num-beams (beam sampling) is not offered; drop one of them")
    eval_view = argparse.Namespace(**vars(args), tune=False, sweep=None, tune_tokens=None)
    evaluate.check_args(eval_view)
    return record


def check_tuned_model(record: dict | None, args: argparse.Namespace, lm) -> None:
    """A ``--settings-from`` file tuned on another checkpoint is refused."""
    if record is None or not isinstance(record.get("checkpoint"), dict):
        return
    try:
        same = identity_key(record["checkpoint"]) == identity_key(lm.identity)
    except KeyError:
        return
    if not same:
        fail(f"--settings-from {args.settings_from} was tuned with another checkpoint "
             f"({record['checkpoint'].get('path')}), not --path {args.path}; tune this one with trime-eval --tune")


def data_dir(args: argparse.Namespace) -> str:
    """DATA: required for a fairseq checkpoint (its dictionary); a Hugging Face model reads none (the current folder)."""
    if args.data is not None:
        return args.data
    path = Path(args.path)
    if path.is_file() and not is_gguf(str(path), args.gguf_file):
        fail(f"--path {path} is a fairseq checkpoint: give DATA, the data-bin with the dict.txt it was trained with")
    return "."


def generate(args: argparse.Namespace) -> list:
    """Run trime-generate on parsed flags; returns the :class:`trime.eval.generation.Generation` of each prompt."""
    record = resolve_args(args)
    prompts = read_prompts(args)
    quiet_libraries()
    warn = logger(PROG, stderr=True)
    args.data = data_dir(args)
    loaded = model_from_args(args)
    lm = loaded.lm
    check_tuned_model(record, args, lm)
    store = evaluate.open_datastore(args, lm, warn)
    settings = evaluate.memory_settings(args, lm.dim)
    context = None
    if args.context_file:
        path = Path(args.context_file)
        if not path.is_file():
            fail(f"--context-file {path}: no such file; pass the text to read before the prompts")
        context = lm.encode_file(path, "--context-file")
        if len(context) == 0:
            fail(f"--context-file {path} holds no tokens; pass a non-empty text")
    decoding = Decoding(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams, seed=args.seed)
    generator = Generator(lm, settings, loaded.windows, store=store, context=context, batch_size=loaded.batch_size,
                          exact=args.knn_exact, progress=not args.no_progress_bar, log=warn)
    line = evaluate.settings_line(settings, args.knnlm, store is not None,
                                  metric=store.metric if store is not None else None)
    notes = [line, decoding.describe(), loaded.windows.describe()]
    if context is not None:
        notes.append(f"context {len(context):,} tokens ({generator.fifo_size:,} in the long-term memory)")
    elif settings.uses_long:
        notes.append("no --context-file: the long-term memory is empty")
    warn("; ".join(notes))
    results = []
    for number, prompt in enumerate(prompts):
        result = generator.generate(lm.encode(prompt), decoding)
        results.append(result)
        if args.jsonl:
            for token in result.tokens:
                print(json.dumps({"prompt": number, **token.as_dict()}, ensure_ascii=False), flush=True)
        else:
            print((prompt + result.text).replace("\r", "\\r").replace("\n", "\\n"), flush=True)
    return results


def run(argv: Sequence[str] | None = None) -> list:
    """trime-generate on ``argv`` in this process; returns the generations. Bad input raises TrimeError (one line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.path:
        parser.error("the following arguments are required: --path")
    with file_faults_as_errors():
        return generate(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trime-generate``; returns the exit status."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
