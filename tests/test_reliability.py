"""Reliability (issue 12): bad input is one line through every entry point, and trime_ext_loss resumes exactly.

* ``test_bad_input_table_row``: every row of the README's bad-input table is run as the
  literal command in a sandbox folder; stderr must be exactly the documented line.
* ``test_ext_loss_kill_and_resume``: a ``trime_ext_loss`` run killed after a checkpoint and
  resumed draws the same local-memory coins, and reaches the same losses, as an
  uninterrupted run.
* ``test_bm25_no_progress_bar_is_quiet``: ``--no-progress-bar`` leaves only the result line.
"""

import signal
import subprocess
from pathlib import Path

import pytest
import torch
from reliability_helpers import BIN, TINY_LM, bad_input_rows, command_env, json_log_records, run_command

ROWS = bad_input_rows()


# ----------------------------------------------------------------------------- the README's bad-input table


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, wt2_sample_bin) -> Path:
    """A folder with the inputs the table's commands name (read-only for the tests)."""
    root = tmp_path_factory.mktemp("bad_input")
    (root / "data-bin").mkdir()
    (root / "data-bin" / "wt2-sample").symlink_to(wt2_sample_bin)
    # a data-bin whose train split is empty, binarized by fairseq itself
    raw = root / "raw"
    raw.mkdir()
    (raw / "empty.txt").write_text("")
    (raw / "valid.txt").write_text((wt2_sample_bin / "dict.txt").read_text().split()[0] + "\n")
    run_command([BIN / "fairseq-preprocess", "--only-source", "--trainpref", raw / "empty.txt",
                 "--validpref", raw / "valid.txt", "--srcdict", wt2_sample_bin / "dict.txt",
                 "--destdir", root / "data-bin" / "empty-train"], cwd=root)
    # a truncated enwik8 prefix (the size is checked before the checksum)
    (root / "enwik8-cut").mkdir()
    (root / "enwik8-cut" / "enwik8.prefix").write_bytes(b"x" * 999_999)
    return root


def test_bad_input_table_is_complete():
    cases = [row.case for row in ROWS]
    assert len(cases) >= 6 and len(set(cases)) == len(cases), cases


@pytest.mark.parametrize("row", ROWS, ids=[row.case for row in ROWS])
def test_bad_input_table_row(row, sandbox):
    proc = run_command(row.argv, cwd=sandbox, check=False)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert proc.stderr.splitlines() == [row.error], proc.stderr[-3000:]


# ----------------------------------------------------------------------------- exact resume of trime_ext_loss


def _train_records(output: str) -> dict[int, dict]:
    return {int(r["num_updates"]): r for r in json_log_records(output, "train_inner")}


def _valid_records(output: str) -> dict[int, dict]:
    return {int(r["valid_num_updates"]): r for r in json_log_records(output, "valid")}


def test_ext_loss_kill_and_resume(tmp_path, wt2_sample_bin):
    command = [
        BIN / "fairseq-train", wt2_sample_bin, "--task", "trime_lm", *TINY_LM, "--criterion", "trime_ext_loss",
        "--allow-random-batches", "--cross-sent-ratio", "0.5", "--max-update", "6", "--save-interval-updates", "3",
        "--no-epoch-checkpoints", "--log-format", "json", "--log-interval", "1",
    ]
    whole = run_command([*command, "--save-dir", tmp_path / "whole"]).stdout

    killed = subprocess.Popen([str(a) for a in [*command, "--save-dir", tmp_path / "killed"]], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=command_env())
    before_kill = []
    for line in killed.stdout:
        before_kill.append(line)
        if "Saved checkpoint" in line and "@ 3 updates" in line:  # logged once every copy is written
            killed.send_signal(signal.SIGKILL)
            break
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL, "".join(before_kill)[-3000:]
    resumed = run_command([*command, "--save-dir", tmp_path / "killed"]).stdout
    assert "(epoch 1 @ 3 updates)" in resumed, resumed[-3000:]

    expected = _train_records(whole)
    first_part = {u: r for u, r in _train_records("".join(before_kill)).items() if u <= 3}
    second_part = _train_records(resumed)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6] and sorted(second_part) == [4, 5, 6]
    draws = [expected[u]["local_off"] for u in range(1, 7)]
    assert draws[:3] != draws[3:]  # a generator restarted on resume would repeat updates 1-3
    assert [{**first_part, **second_part}[u]["local_off"] for u in range(1, 7)] == draws
    for update in (4, 5, 6):
        assert second_part[update]["loss"] == expected[update]["loss"]
    assert _valid_records(resumed)[6]["valid_loss"] == _valid_records(whole)[6]["valid_loss"]
    # the logged losses are rounded: the weights after update 6 must be identical too
    final = [torch.load(tmp_path / run / "checkpoint_last.pt", weights_only=False)["model"] for run in ("whole", "killed")]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][name], final[1][name]) for name in final[0])


# ----------------------------------------------------------------------------- progress flags


def test_bm25_no_progress_bar_is_quiet(tmp_path, wt2_sample_bin):
    proc = run_command([BIN / "trime-bm25-batches", wt2_sample_bin, "--tokens-per-sample", "256",
                        "--output", tmp_path / "plan.json", "--no-progress-bar"])
    assert proc.stderr == ""  # no fairseq INFO lines, no progress lines
    assert proc.stdout.startswith("trime-bm25-batches: wrote") and len(proc.stdout.splitlines()) == 1
