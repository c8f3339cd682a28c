"""One command-line style: every console script of setup.py has the same parser, entry point and errors.

* every entry point is ``main(argv: Sequence[str] | None = None) -> int``;
* every parser is built by ``build_parser()`` as a :class:`trime.cli.Parser`, and every
  option has help text (hidden test-only options are marked ``argparse.SUPPRESS``);
* a usage error (bad value, unknown flag, missing argument) is one stderr line
  ``trime: error: ... (see PROG --help)`` naming the flag, with exit status 2, also when run
  as a real command;
* trime-eval and trime-build-datastore declare their shared model and window flags once
  (:mod:`trime.cli.model_args`).
"""

import argparse
import importlib
import inspect
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.reliability_helpers import BIN, command_env
from trime.cli import Parser

SETUP = Path(__file__).resolve().parent.parent / "setup.py"
# trime-train forwards its command line to fairseq-train: the parser and usage errors are fairseq's
FAIRSEQ_PARSER = {"trime-train"}


def console_scripts() -> dict[str, str]:
    """``name -> "module:function"`` of setup.py's console scripts, read from its text (setup() is not run)."""
    found = dict(re.findall(r'"(trime-[a-z0-9-]+)=([a-z0-9_.]+:[a-z_]+)"', SETUP.read_text()))
    assert len(found) >= 6, found
    return found


SCRIPTS = console_scripts()
OWN_PARSERS = sorted(set(SCRIPTS) - FAIRSEQ_PARSER)


def module_of(name: str):
    return importlib.import_module(SCRIPTS[name].partition(":")[0])


def entry_point(name: str):
    module_name, _, function = SCRIPTS[name].partition(":")
    return getattr(importlib.import_module(module_name), function)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_entry_point_is_main_argv_to_int(name):
    assert SCRIPTS[name].endswith(":main"), SCRIPTS[name]
    main = entry_point(name)
    signature = inspect.signature(main)
    assert list(signature.parameters) == ["argv"], signature
    argv = signature.parameters["argv"]
    assert argv.default is None
    assert argv.annotation in (Sequence[str] | None, "Sequence[str] | None"), argv.annotation
    assert signature.return_annotation in (int, "int"), signature.return_annotation


@pytest.mark.parametrize("name", OWN_PARSERS)
def test_every_option_has_help(name):
    parser = module_of(name).build_parser()
    assert isinstance(parser, Parser) and parser.prog == name
    missing = [
        action.option_strings or [action.dest]
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and not (action.help and action.help.strip())
    ]
    assert not missing, f"{name}: options without help: {missing}"


def _usage_error(parser: argparse.ArgumentParser, argv: list[str], capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    captured = capsys.readouterr()
    assert captured.out == ""
    return exit_info.value.code, captured.err.splitlines()


# (tool, argv, the flag the one line must name)
USAGE_ERRORS = [
    ("trime-eval", ["data", "--path", "x.pt", "--k", "abc"], "--k"),
    ("trime-eval", ["data", "--path", "x.pt", "--no-such-flag"], "--no-such-flag"),
    ("trime-eval", ["data"], "--path"),
    ("trime-eval", ["data", "--path", "x.pt", "--fp16", "--bf16"], "--bf16"),
    ("trime-build-datastore", ["--output", "ds", "--num-shards", "two"], "--num-shards"),
    ("trime-build-datastore", ["data", "--path", "x.pt"], "--output"),
    ("trime-prepare", ["wikitext-2-sample", "--dest", "d", "--workers", "1.5"], "--workers"),
    ("trime-bm25-batches", ["data", "--tokens-per-sample", "64", "--k", "abc"], "--k"),
    ("trime-bm25-batches", ["data"], "--tokens-per-sample"),
    ("trime-hf-train", ["--model", "m", "--train-file", "t", "--output-dir", "o", "--memory", "huge"], "--memory"),
    ("trime-hf-train", ["--model", "m", "--train-file", "t", "--output-dir", "o", "--max-steps", "x"], "--max-steps"),
]


@pytest.mark.parametrize("name, argv, flag", USAGE_ERRORS, ids=[f"{n} {' '.join(a[-2:])}" for n, a, _ in USAGE_ERRORS])
def test_usage_errors_are_one_line_naming_the_flag(name, argv, flag, capsys):
    code, lines = _usage_error(module_of(name).build_parser(), argv, capsys)
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("trime: error: ") and lines[0].endswith(f" (see {name} --help)"), lines
    assert flag in lines[0], lines


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["trime-eval", "data-bin", "--path", "ckpt.pt", "--k", "abc"], "--k"),
        (["trime-build-datastore", "--output", "ds", "--bogus"], "--bogus"),
        (["trime-bm25-batches", "data-bin", "--tokens-per-sample", "many"], "--tokens-per-sample"),
        (["trime-prepare", "wikitext-2-sample", "--dest", "d", "--workers", "x"], "--workers"),
    ],
    ids=["trime-eval", "trime-build-datastore", "trime-bm25-batches", "trime-prepare"],
)
@pytest.mark.slow  # one subprocess per console script
def test_usage_errors_of_the_real_commands(argv, flag, tmp_path):
    proc = subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=tmp_path, capture_output=True, text=True,
                          env=command_env(), timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("trime: error: ") and flag in lines[0], proc.stderr[-2000:]
    assert lines[0].endswith(f" (see {argv[0]} --help)")


def test_help_exits_zero_on_stdout(capsys):
    with pytest.raises(SystemExit) as exit_info:
        module_of("trime-eval").build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: trime-eval")


def test_eval_and_datastore_share_the_model_flags():
    """The model and window flags are declared once (trime.cli.model_args.add_model_args): same help, same defaults."""
    eval_parser = module_of("trime-eval").build_parser()
    store_parser = module_of("trime-build-datastore").build_parser()

    def options(parser):
        return {a.option_strings[0] if a.option_strings else a.dest: a for a in parser._actions}

    ours, theirs = options(eval_parser), options(store_parser)
    shared = ["data", "--path", "--context-window", "--tokens-per-sample", "--key-module", "--cpu", "--fp16",
              "--bf16", "--max-tokens", "--batch-size", "--no-progress-bar", "--trust-checkpoint"]
    for flag in shared:
        assert ours[flag].help == theirs[flag].help, flag
        assert ours[flag].default == theirs[flag].default, flag
        assert ours[flag].type == theirs[flag].type, flag
    # the one default that differs: which split each tool runs over
    assert ours["--gen-subset"].default == "test" and theirs["--gen-subset"].default == "train"
    # trime-eval needs a model; trime-build-datastore --merge/--build-index/--verify do not
    assert ours["--path"].required and not theirs["--path"].required
