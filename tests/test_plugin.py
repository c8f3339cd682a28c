"""Installation and invocation: the autoload hook, ``--user-dir``, ``trime-train``, and a
tiny end-to-end ``fairseq-train --criterion trime_loss`` run that is resumed and then
evaluated with stock ``fairseq-eval-lm``."""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.tiny_lm import tiny_lm_argv

pytestmark = pytest.mark.slow  # fairseq-train, fairseq-eval-lm and pip wheel runs in subprocesses

BIN = Path(sys.executable).parent
TINY_MODEL = [
    "--task", "language_modeling", *tiny_lm_argv(32, tokens_per_sample=64, max_tokens=512, lr="0.002"),
    "--no-progress-bar", "--log-interval", "1", "--max-valid-steps", "3",
]  # fmt: skip


def run(cmd, env=None, check=True):
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=full_env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_startup_stays_light_and_hook_is_installed():
    code = "import sys; print('torch' in sys.modules, 'fairseq' in sys.modules, 'trime' in sys.modules)"
    out = run([sys.executable, "-c", code]).stdout.split()
    assert out == ["False", "False", "True"]  # the .pth imports only trime's tiny watcher
    out = run([sys.executable, "-c", code], env={"TRIME_NO_AUTOLOAD": "1"}).stdout.split()
    assert out == ["False", "False", "False"]


def test_fairseq_options_import_registers_trime():
    code = (
        "import fairseq.options\n"
        "from fairseq.criterions import CRITERION_REGISTRY\n"
        "from fairseq.models import ARCH_MODEL_REGISTRY\n"
        "print('trime_loss' in CRITERION_REGISTRY, 'transformer_lm_enwik8' in ARCH_MODEL_REGISTRY)"
    )
    assert run([sys.executable, "-c", code]).stdout.split()[-2:] == ["True", "True"]
    off = run([sys.executable, "-c", code], env={"TRIME_NO_AUTOLOAD": "1"}).stdout.split()[-2:]
    assert off == ["False", "False"]


def test_wheel_ships_autoload_pth_and_no_top_level_eval(tmp_path, repo_root):
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path, repo_root])
    (wheel,) = tmp_path.glob("trime-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "trime-fairseq-autoload.pth" in names
    top_level = {n.split("/")[0] for n in names if ".dist-info/" not in n}
    assert top_level == {"trime", "trime-fairseq-autoload.pth"}  # no top-level eval/retrieval/data_prep
    for sub in ["eval", "retrieval", "data_prep"]:
        assert f"trime/{sub}/__init__.py" in names


def _valid_loss(log: str) -> float:
    matches = re.findall(r"valid on 'valid' subset \| loss ([0-9.]+)", log)
    assert matches, log[-2000:]
    return float(matches[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, wt2_sample_bin):
    """A tiny TrimeLM trained with the literal fairseq-train command, then resumed."""
    save = tmp_path_factory.mktemp("ckpt")
    common = [BIN / "fairseq-train", wt2_sample_bin, *TINY_MODEL, "--criterion", "trime_loss",
              "--save-dir", save, "--max-epoch", "1"]
    first = run([*common, "--max-update", "3"])
    assert "trime_loss" in first.stdout + first.stderr
    second = run([*common, "--max-update", "5"])
    return save, first.stdout + first.stderr, second.stdout + second.stderr


def test_literal_fairseq_train_then_resume(trained):
    save, first, second = trained
    assert (save / "checkpoint_last.pt").exists()
    assert re.search(r"num_updates 3\b", first)
    assert re.search(r"loaded checkpoint .*checkpoint_last\.pt \(epoch 1 @ 3 updates\)", second, re.IGNORECASE)
    assert re.search(r"num_updates 5\b", second)
    for log in (first, second):
        assert "norm_loss" in log and "ori_loss" in log


def test_stock_fairseq_eval_lm_reads_the_checkpoint(trained, wt2_sample_bin):
    save, _, _ = trained
    out = run([BIN / "fairseq-eval-lm", wt2_sample_bin, "--path", save / "checkpoint_last.pt", "--cpu",
               "--gen-subset", "valid", "--max-tokens", "2048", "--tokens-per-sample", "64",
               "--context-window", "0"])
    match = re.search(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)", out.stdout + out.stderr)
    assert match, out.stderr[-2000:]
    loss, ppl = float(match.group(1)), float(match.group(2))
    assert 2 ** loss == pytest.approx(ppl, rel=1e-3)
    assert ppl < 33278  # trained, and finite


def test_without_hook_trime_loss_is_unknown_but_user_dir_and_trime_train_work(tmp_path, wt2_sample_bin):
    from trime.plugin import PLUGIN_DIR

    args = [wt2_sample_bin, *TINY_MODEL, "--criterion", "trime_loss", "--max-update", "1", "--max-epoch", "1",
            "--save-dir", tmp_path / "a", "--no-save"]
    no_hook = {"TRIME_NO_AUTOLOAD": "1"}
    bare = run([BIN / "fairseq-train", *args], env=no_hook, check=False)
    assert bare.returncode != 0 and "trime_loss" in bare.stderr
    run([BIN / "fairseq-train", *args, "--user-dir", PLUGIN_DIR], env=no_hook)
    out = run([BIN / "trime-train", *args], env=no_hook)
    assert "num_updates 1" in out.stdout + out.stderr


def test_bad_data_dir_is_one_line(tmp_path):
    proc = run([BIN / "trime-train", tmp_path / "missing", *TINY_MODEL, "--criterion", "trime_loss"], check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trime: error:") and "missing" in lines[0]
    assert "Traceback" not in proc.stderr
