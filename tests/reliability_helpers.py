"""Shared helpers of the reliability tests: run commands as a user would, read the README's bad-input table.

The README's "Bad input" table lists, per case, a literal command and the exact line it
prints on stderr. :func:`bad_input_rows` parses it; ``tests/test_reliability.py`` runs
every command in a sandbox folder (relative paths, so the printed paths are the
README's) and compares the whole of stderr with that line.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.tiny_lm import tiny_lm_argv

BIN = Path(sys.executable).parent
README = Path(__file__).resolve().parent.parent / "README.md"
SAMPLES_DIR = README.parent / "samples"
BAD_INPUT_HEADING = "### Bad input: what each command says"

# A small fairseq LM: seconds per run on one CPU thread.
TINY_LM = [*tiny_lm_argv(32, io_dims=True, tokens_per_sample=32, max_tokens=256, lr="0.002"), "--max-valid-steps", "1"]


def command_env(extra: dict | None = None) -> dict:
    """The environment of a user's shell inside the venv: its bin first on PATH, one thread."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
            **(extra or {})}


def run_command(argv: list, cwd: Path | None = None, env: dict | None = None, timeout: int = 300, check: bool = True):
    """Run ``argv`` (str/Path items) and return the CompletedProcess; with ``check``, fail on a non-zero exit."""
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True,
                          env=command_env(env), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def json_log_records(output: str, tag: str) -> list[dict]:
    """fairseq's ``--log-format json`` records of one kind (``train_inner``, ``valid``, ``train``)."""
    records = []
    for line in output.splitlines():
        marker = f"| {tag} | "
        if marker in line:
            records.append(json.loads(line.split(marker, 1)[1]))
    return records


@dataclass(frozen=True)
class BadInputRow:
    case: str
    command: str
    error: str

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.command)


def _cell(text: str) -> str:
    """A table cell's content: one backtick span, with markdown's escaped pipes restored."""
    text = text.strip()
    match = re.fullmatch(r"`(.*)`", text)
    return (match.group(1) if match else text).replace("\\|", "|")


def bad_input_rows(readme: Path = README) -> list[BadInputRow]:
    """The rows of the README's bad-input table (``| case | command | stderr |``)."""
    lines = readme.read_text(encoding="utf-8").splitlines()
    start = lines.index(BAD_INPUT_HEADING)
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        if len(cells) != 3 or cells[0].strip() == "case":
            continue
        rows.append(BadInputRow(*(_cell(c) for c in cells)))
    return rows
