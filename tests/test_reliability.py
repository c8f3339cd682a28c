"""Reliability: bad input is one line through every entry point, honest defaults, exact resume.

* ``test_bad_input_table_row``: every row of the README's bad-input table is run as the
  literal command in a sandbox folder; stderr must be exactly the documented line.
* ``test_ext_loss_kill_and_resume``: a ``trime_ext_loss`` run killed after a checkpoint and
  resumed draws the same local-memory coins, and reaches the same losses and weights, as
  an uninterrupted run.
* Datastores: loading never unpickles; values outside the dictionary are refused; kNN
  hits are searched and scored in chunks (same result as one search).
* ``trime-eval``: reports test by default (as ``fairseq-eval-lm``); ``--sweep mem-size``
  works without ``--mem-size`` and records no ``k``. Index training has a heartbeat and
  one final ``index add`` bar; ``trime-bm25-batches --no-progress-bar`` is quiet.
"""

import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.reliability_helpers import BIN, SAMPLES_DIR, TINY_LM, bad_input_rows, command_env, json_log_records, run_command

pytestmark = pytest.mark.slow  # every case runs the commands as a user does, end to end

ROWS = bad_input_rows()


EXT_TRAIN = [
    "--task", "trime_lm", *TINY_LM, "--criterion", "trime_ext_loss", "--allow-random-batches", "--cross-sent-ratio", "0.5",
    "--max-update", "6", "--save-interval-updates", "3", "--no-epoch-checkpoints", "--log-format", "json", "--log-interval", "1",
]


@pytest.fixture(scope="module")
def ext_run(tmp_path_factory, wt2_sample_bin) -> tuple[Path, str]:
    """An uninterrupted 6-update trime_ext_loss run (checkpoints at updates 3 and 6) and its log."""
    save = tmp_path_factory.mktemp("ext_run")
    out = run_command([BIN / "fairseq-train", wt2_sample_bin, *EXT_TRAIN, "--save-dir", save]).stdout
    return save, out


# ----------------------------------------------------------------------------- the README's bad-input table


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, wt2_sample_bin, ext_run) -> Path:
    """A folder with the inputs the table's commands name (read-only for the tests)."""
    root = tmp_path_factory.mktemp("bad_input")
    (root / "data-bin").mkdir()
    (root / "data-bin" / "wt2-sample").symlink_to(wt2_sample_bin)
    (root / "ckpt").symlink_to(ext_run[0])
    # a data-bin whose train and test splits are empty (and valid is 80 lines), binarized by fairseq itself
    raw = root / "raw"
    raw.mkdir()
    (raw / "empty.txt").write_text("")
    valid_lines = (SAMPLES_DIR / "wikitext-2" / "wiki.valid.tokens").read_text().splitlines(keepends=True)[:80]
    (raw / "valid.txt").write_text("".join(valid_lines))
    run_command([BIN / "fairseq-preprocess", "--only-source", "--trainpref", raw / "empty.txt",
                 "--validpref", raw / "valid.txt", "--testpref", raw / "empty.txt", "--srcdict",
                 wt2_sample_bin / "dict.txt", "--destdir", root / "data-bin" / "empty-train"], cwd=root)
    # a truncated enwik8 prefix (the size is checked before the checksum)
    (root / "enwik8-cut").mkdir()
    (root / "enwik8-cut" / "enwik8.prefix").write_bytes(b"x" * 999_999)
    # a datastore of the last checkpoint (valid split, exact index), and damaged copies of it
    run_command([BIN / "trime-build-datastore", "data-bin/wt2-sample", "--path", "ckpt/checkpoint_last.pt",
                 "--output", "ds", "--gen-subset", "valid", "--index-factory", "Flat", "--cpu", "--no-progress-bar"],
                cwd=root)
    for name in ("ds-bad-vals", "ds-bad-keys", "ds-edited-meta"):
        shutil.copytree(root / "ds", root / name)
    with open(root / "ds-bad-vals" / "vals.npy", "r+b") as f:  # same size, 4 KB of 0xFF
        f.seek(4096)
        f.write(b"\xff" * 4096)
    with open(root / "ds-bad-keys" / "keys.npy", "r+b") as f:
        f.seek(20_000)
        f.write(b"\xff" * 64)
    meta = json.loads((root / "ds-edited-meta" / "meta.json").read_text())
    (root / "ds-edited-meta" / "meta.json").write_text(json.dumps({**meta, "dim": 64}))
    shutil.copytree(root / "ds", root / "ds-bad-index")
    with open(root / "ds-bad-index" / "index.faiss", "r+b") as f:  # same size, 100 KB of zeros
        f.seek(200_000)
        f.write(b"\0" * 100_000)
    # a diverged checkpoint: one NaN weight in the last layer's FFN
    (root / "ckpt-nan").mkdir()
    state = torch.load(ext_run[0] / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    state["model"]["decoder.layers.1.fc1.weight"][0, 0] = float("nan")
    torch.save(state, root / "ckpt-nan" / "checkpoint_last.pt")
    _add_hf_inputs(root)
    return root


def _add_hf_inputs(root: Path) -> None:
    """Hugging Face inputs: a tiny GPT-2 dir, text splits, a 2-step trime-hf-train run, damaged model dirs."""
    from tests.hf_helpers import model_dir, text_head

    (root / "hf").mkdir()
    shutil.copytree(model_dir("gpt2"), root / "hf" / "tiny")
    text_head(SAMPLES_DIR / "wikitext-2" / "wiki.train.tokens", root / "hf" / "train.txt", 24_000)
    (root / "data").mkdir()
    for split in ("train", "valid", "test"):
        (root / "data" / f"wiki.{split}.tokens").symlink_to(SAMPLES_DIR / "wikitext-2" / f"wiki.{split}.tokens")
    run_command([BIN / "trime-hf-train", "--model", "hf/tiny", "--train-file", "hf/train.txt", "--output-dir", "hf/run",
                 "--block-size", "32", "--per-device-train-batch-size", "4", "--max-steps", "2", "--save-steps", "2",
                 "--cpu", "--no-progress-bar"], cwd=root)
    shutil.copytree(root / "hf" / "tiny", root / "hf-truncated")
    weights = root / "hf-truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(root / "hf" / "tiny", root / "hf-h0")
    (root / "hf-h0" / "trime_hf_train.json").write_text(json.dumps({"block_size": 32, "key_module": "transformer.h.0.mlp"}))
    shutil.copytree(root / "hf" / "tiny", root / "hf-badconfig")
    (root / "hf-badconfig" / "config.json").write_text("{not json")


def test_bad_input_table_is_complete():
    cases = [row.case for row in ROWS]
    assert len(cases) >= 6 and len(set(cases)) == len(cases), cases


@pytest.mark.parametrize("row", ROWS, ids=[row.case for row in ROWS])
def test_bad_input_table_row(row, sandbox):
    proc = run_command(row.argv, cwd=sandbox, check=False)
    usage_error = row.error.endswith(" --help)")  # argparse-level: exit 2, like every CLI's usage errors
    assert proc.returncode == (2 if usage_error else 1), (proc.returncode, proc.stderr[-3000:])
    assert proc.stderr.splitlines() == [row.error], proc.stderr[-3000:]


# ----------------------------------------------------------------------------- exact resume of trime_ext_loss


def _train_records(output: str) -> dict[int, dict]:
    return {int(r["num_updates"]): r for r in json_log_records(output, "train_inner")}


def _valid_records(output: str) -> dict[int, dict]:
    return {int(r["valid_num_updates"]): r for r in json_log_records(output, "valid")}


def test_ext_loss_kill_and_resume(tmp_path, wt2_sample_bin, ext_run):
    command = [BIN / "fairseq-train", wt2_sample_bin, *EXT_TRAIN]
    whole_dir, whole = ext_run

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
    final = [torch.load(run / "checkpoint_last.pt", weights_only=False)["model"] for run in (whole_dir, tmp_path / "killed")]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][name], final[1][name]) for name in final[0])


# ----------------------------------------------------------------------------- progress flags


def test_bm25_no_progress_bar_is_quiet(tmp_path, wt2_sample_bin):
    proc = run_command([BIN / "trime-bm25-batches", wt2_sample_bin, "--tokens-per-sample", "256",
                        "--output", tmp_path / "plan.json", "--no-progress-bar"])
    assert proc.stderr == ""  # no fairseq INFO lines, no progress lines
    assert proc.stdout.startswith("trime-bm25-batches: wrote") and len(proc.stdout.splitlines()) == 1


# ----------------------------------------------------------------------------- datastore contents


class _WritesAFile:
    """Unpickling this object creates ``path``: a stand-in for code a malicious .npy would run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("meta_says_object", [False, True])
def test_datastore_loading_never_unpickles(sandbox, tmp_path, meta_says_object):
    from trime.errors import TrimeError
    from trime.retrieval.datastore import Datastore

    store, marker = tmp_path / "ds", tmp_path / "unpickled"
    shutil.copytree(sandbox / "ds", store)
    np.save(store / "vals.npy", np.array([_WritesAFile(marker)], dtype=object), allow_pickle=True)
    if meta_says_object:  # an attacker controls meta.json too
        meta = json.loads((store / "meta.json").read_text())
        (store / "meta.json").write_text(json.dumps({**meta, "count": 1, "val_dtype": "object"}))
    with pytest.raises(TrimeError) as err:
        Datastore.open(store, need_index=False)
    assert not marker.exists()
    assert "\n" not in str(err.value) and ("vals.npy" in str(err.value) or "meta.json" in str(err.value))


def test_values_outside_the_dictionary_are_refused_even_with_a_matching_checksum(sandbox, tmp_path):
    from trime.errors import TrimeError
    from trime.retrieval.datastore import Datastore, record_checksums

    store = tmp_path / "ds"
    shutil.copytree(sandbox / "ds", store)
    vals = np.load(store / "vals.npy")
    vals[100] = 12_152  # the dictionary has 12,152 types: ids 0..12,151
    np.save(store / "vals.npy", vals)
    meta = json.loads((store / "meta.json").read_text())
    record_checksums(store, meta)
    (store / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(TrimeError, match=r"token id 12,152, outside the dictionary's 0\.\.12,151"):
        Datastore.open(store, need_index=False)


# ----------------------------------------------------------------------------- kNN memory bound


def test_knn_hits_are_searched_and_scored_in_chunks(sandbox, wt2_sample_bin, monkeypatch):
    """score_batch searches at most knn_chunk_rows(k) rows at a time, with the same result as one search."""
    import trime.knn
    from trime.adapters import batch_size_for, load_adapter
    from trime.eval.engine import Evaluator
    from trime.eval.memory import MemorySettings, ScoreState, score_batch
    from trime.retrieval.datastore import Datastore

    lm = load_adapter(sandbox / "ckpt" / "checkpoint_last.pt", wt2_sample_bin, cpu=True)
    windows = lm.window_settings(8, None)
    store = Datastore.open(sandbox / "ds", dim=lm.dim, dict_sha256=lm.dict_sha256)
    k = 64
    evaluator = Evaluator(lm, windows, batch_size_for(windows, None, 2048), store, k=k, progress=False)
    searched_rows = []
    search = store.search
    monkeypatch.setattr(store, "search", lambda q, kk, exact=False: searched_rows.append(len(q)) or search(q, kk, exact))
    monkeypatch.setattr(trime.knn, "KNN_CHUNK_HITS", 50 * k)  # 50 rows per chunk
    settings = MemorySettings(level="external", mem_size=32, knn_in_joint=True, lmbda=0.2, interp_temp=2.0, k=k)
    chunked, whole = ScoreState.fresh(settings), ScoreState.fresh(settings)
    for sample in evaluator._batches("test", max_batches=2):
        batch = lm.forward(sample)
        assert batch.num_scored > 200
        searched_rows.clear()
        ours = score_batch(batch, settings, chunked, evaluator._lazy_search(batch), dim=lm.dim)
        assert max(searched_rows) == 50 and sum(searched_rows) == batch.num_scored
        reference = score_batch(batch, settings, whole, search(batch.queries, k), dim=lm.dim)
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- trime-eval defaults and sweeps


def test_default_subset_is_test_as_in_fairseq_eval_lm(sandbox, wt2_sample_bin, capsys):
    from trime.eval.evaluate import run

    record = run([str(wt2_sample_bin), "--path", str(sandbox / "ckpt" / "checkpoint_last.pt"), "--cpu",
                   "--no-progress-bar"])
    assert [row["subset"] for row in record["results"]] == ["test"]
    assert record["results"][0]["tokens"] == 20_142  # the sample's test split
    assert capsys.readouterr().out.startswith("trime-eval: subset test, memory none")


def test_sweep_mem_size_needs_no_mem_size_and_records_no_k(sandbox, tmp_path, monkeypatch):
    from trime.eval import engine, evaluate

    def not_again(*args, **kwargs):
        raise AssertionError("the final table was evaluated again")

    monkeypatch.setattr(engine.Evaluator, "run", not_again)
    record = evaluate.run([
        str(sandbox / "data-bin" / "empty-train"), "--path", str(sandbox / "ckpt" / "checkpoint_last.pt"), "--memory", "long",
        "--sweep", "mem-size=16,64", "--sweep-prefix", str(tmp_path / "sweep"), "--gen-subset", "valid",
        "--context-window", "8", "--cpu", "--no-progress-bar",
    ])
    assert [row["memory"] for row in record["results"]] == ["long mem-size=16", "long mem-size=64"]
    points = record["sweep"]["points"]
    assert [row["ppl"] for row in record["results"]] == [p["ppl"] for p in points] and points[0]["ppl"] != points[1]["ppl"]
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert "k" not in saved["settings"] and "lmbda" not in saved["settings"] and saved["settings"]["mem_size"] is None
    assert record["settings"]["k"] is None


# ----------------------------------------------------------------------------- index building output


def test_index_training_heartbeat_and_one_final_bar(sandbox, tmp_path, monkeypatch, capsys):
    from trime.cli import logger
    from trime.retrieval import build_datastore, faiss_index

    store = tmp_path / "ds"
    shutil.copytree(sandbox / "ds", store)
    train = faiss_index.train_index

    def slow_train(*args, **kwargs):  # a training that takes a while, as IVF-PQ on millions of keys does
        time.sleep(0.5)
        return train(*args, **kwargs)

    monkeypatch.setattr(faiss_index, "train_index", slow_train)
    build_datastore.build_index(store, factory="IVF16,Flat", use_gpu=False, heartbeat_seconds=0.1,
                                log_progress=logger("trime-build-datastore", stderr=True))
    err = capsys.readouterr().err
    assert len(re.findall(r"trime-build-datastore: training IVF16,Flat: \d+ s", err)) >= 2, err
    assert len(re.findall(r"index add: 100%", err)) == 1, err
