"""Shared by the evaluation, datastore and alignment tests: tiny fairseq checkpoints and CLI helpers.

The checkpoints are trained once per session with the real ``fairseq-train`` (2 layers x 32 dims): a
cross-entropy model with a full softmax and a TrimeLM (``trime_loss``) with an adaptive softmax.
"""

import os
import subprocess
import sys
from pathlib import Path

from tests.tiny_lm import tiny_lm_argv

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TPS, CONTEXT = 64, 32  # checkpoint window and evaluation context (32 new tokens per window)

TRAIN_COMMON = [
    "--task", "language_modeling",
    *tiny_lm_argv(32, io_dims=True, dropout=0.1, tokens_per_sample=TPS, max_tokens=512, lr="0.005"),
    "--sample-break-mode", "none", "--max-update", "8", "--no-epoch-checkpoints", "--disable-validation",
    "--log-format", "none",
]  # fmt: skip
MODELS = {
    "ce": ["--criterion", "cross_entropy", "--share-decoder-input-output-embed"],
    "trime": ["--criterion", "trime_loss", "--adaptive-softmax-cutoff", "400,2000", "--adaptive-softmax-dropout", "0"],
}


def tiny_checkpoints(tmp_path_factory, data_bin: Path) -> dict:
    """Train (once per session) the tiny CE and TrimeLM checkpoints; returns {name: checkpoint path}."""
    root = tmp_path_factory.getbasetemp() / "trime_tiny_checkpoints"
    paths = {name: root / name / "checkpoint_last.pt" for name in MODELS}
    if all(p.is_file() for p in paths.values()):
        return paths
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {
        name: subprocess.Popen(
            [str(BIN / "fairseq-train"), str(data_bin), *TRAIN_COMMON, *extra, "--save-dir", str(root / name)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for name, extra in MODELS.items()
    }
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0 and paths[name].is_file(), f"fairseq-train ({name}) failed:\n{out[-3000:]}"
    return paths


def run_cli(*argv, timeout=300):
    return subprocess.run(
        [str(BIN / argv[0]), *map(str, argv[1:])], check=False, capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert err and err[-1].startswith("trime: error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in err[-1]
