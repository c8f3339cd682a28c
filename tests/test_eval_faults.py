"""Faults around trime-eval, trime-prepare and trime-train: non-finite models and datastores, damaged cache
entries, numeric flags given any way, and a full or read-only disk.

Everything is real: a tiny trained checkpoint with one weight set to NaN, a datastore whose
``keys.npy`` holds NaN, cache entries with flipped bytes or an edited tensor, and a small tmpfs
filled to the last byte (or mounted read-only) where the commands write (root only; skipped otherwise).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.eval_helpers import CONTEXT, tiny_checkpoints
from tests.reliability_helpers import TINY_LM, run_command
from trime.errors import TrimeError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per module


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, wt2_sample_bin):
    return tiny_checkpoints(tmp_path_factory, wt2_sample_bin)


@pytest.fixture(scope="module")
def nan_ckpt(ckpts, tmp_path_factory) -> Path:
    """The tiny CE checkpoint with one weight of its last FFN set to NaN (as a diverged run leaves it)."""
    state = torch.load(ckpts["ce"], map_location="cpu", weights_only=False)
    state["model"]["decoder.layers.1.fc1.weight"][0, 0] = float("nan")
    path = tmp_path_factory.mktemp("nan_ckpt") / "checkpoint_nan.pt"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def store(ckpts, wt2_sample_bin, tmp_path_factory) -> Path:
    """An exact (Flat, inner product) datastore of the CE model over the valid split."""
    from trime.adapters import load_adapter
    from trime.retrieval.build_datastore import build_index, extract

    lm = load_adapter(ckpts["ce"], wt2_sample_bin, cpu=True)
    out = tmp_path_factory.mktemp("faults_store")
    extract(lm, "valid", lm.window_settings(CONTEXT, None), 64, out, key_dtype="fp32", show_progress=False)
    build_index(out, factory="Flat", metric="ip", show_progress=False)
    return out


def run_eval(data, ckpt, *extra):
    from trime.eval.evaluate import run

    return run([str(data), "--path", str(ckpt), "--context-window", str(CONTEXT), "--cpu", "--no-progress-bar",
                *map(str, extra)])


def eval_error(*args) -> str:
    """The one line of the TrimeError that trime-eval raises on ``args``."""
    with pytest.raises(TrimeError) as err:
        run_eval(*args)
    message = str(err.value)
    assert message.startswith("trime: error: ") and "\n" not in message
    return message


# ----------------------------------------------------------------------------- non-finite scores


@pytest.mark.parametrize("extra", [
    ["--memory", "none"],
    ["--memory", "local", "--tune"],
    ["--memory", "long", "--mem-size", "64", "--sweep", "mem-size=8,64"],
], ids=["none", "tune", "sweep"])
def test_a_nan_checkpoint_is_refused_naming_path_and_cause(wt2_sample_bin, nan_ckpt, tmp_path, extra):
    results = tmp_path / "results.json"
    message = eval_error(wt2_sample_bin, nan_ckpt, *extra, "--results-json", results,
                         "--sweep-prefix", tmp_path / "sweep", "--cache-dir", tmp_path / "cache")
    assert f"--path {nan_ckpt} gives NaN or inf scores" in message
    assert "1 of its weights is NaN or inf (a diverged training run)" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no results, no sweep files
    assert not any((tmp_path / "cache").iterdir())  # nothing cached from the NaN model


def test_a_datastore_with_nan_keys_is_refused_naming_it(ckpts, wt2_sample_bin, store, tmp_path):
    damaged = tmp_path / "store"
    shutil.copytree(store, damaged)
    keys = np.load(damaged / "keys.npy")
    keys[100:200] = np.nan
    np.save(damaged / "keys.npy", keys)
    message = eval_error(wt2_sample_bin, ckpts["ce"], "--knnlm", "--datastore", damaged, "--knn-search", "torch",
                         "--k", 8)
    assert f"--datastore {damaged} gives NaN or inf neighbour scores: its keys are damaged" in message


def test_a_temperature_that_overflows_the_memory_scores_is_named(ckpts, wt2_sample_bin):
    message = eval_error(wt2_sample_bin, ckpts["ce"], "--memory", "local", "--softmax-temp", "1e-300",
                         "--gen-subset", "valid")
    assert "the memory scores overflow to NaN or inf with --softmax-temp 1e-300" in message


def test_json_refuses_nan_and_infinity_and_leaves_the_old_file(tmp_path):
    from trime.io_utils import write_json_atomic

    path = tmp_path / "r.json"
    write_json_atomic(path, {"ppl": 12.5})
    for bad in (float("nan"), float("inf")):
        with pytest.raises(TrimeError, match="NaN or infinite") as err:
            write_json_atomic(path, {"results": [{"ppl": bad}]})
        assert "\n" not in str(err.value)
    assert json.loads(path.read_text()) == {"ppl": 12.5}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


# ----------------------------------------------------------------------------- damaged cache entries


def _flip_bytes(path: Path, at: float) -> None:
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start:start + 64] = bytes(b ^ 0x5A for b in data[start:start + 64])
    path.write_bytes(bytes(data))


def _edit_tensor(path: Path) -> None:
    """Re-save the entry with one tensor changed and its old checksum: only the checksum tells."""
    entry = torch.load(path, weights_only=True)
    payload = entry["payload"]
    if "batches" in payload:
        payload["batches"][0]["token_score"] += 3.0
    else:
        payload["scores"] *= 2
    torch.save(entry, path)


@pytest.mark.parametrize("kind,damage", [
    ("forward", "edit"),
    pytest.param("knn", "flip", marks=pytest.mark.slow),
    pytest.param("knn", "edit", marks=pytest.mark.slow),
])
def test_a_damaged_cache_entry_is_recomputed_with_a_warning(ckpts, wt2_sample_bin, request, tmp_path, capsys, kind,
                                                             damage):
    if kind == "knn":
        args = ["--knnlm", "--datastore", request.getfixturevalue("store"), "--k", 8]
    else:
        args = ["--memory", "local"]
    args += ["--gen-subset", "valid", "--cache-dir", tmp_path]
    first = run_eval(wt2_sample_bin, ckpts["ce"], *args)["results"]
    (entry,) = tmp_path.glob(f"{kind}-*.pt")
    _flip_bytes(entry, 0.6) if damage == "flip" else _edit_tensor(entry)
    capsys.readouterr()
    again = run_eval(wt2_sample_bin, ckpts["ce"], *args)["results"]
    assert [r["loss_base2"] for r in again] == [r["loss_base2"] for r in first]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [f"trime-eval: warning: --cache-dir entry {entry} is damaged "
                        "(unreadable, or not matching its checksum); recomputing it"]
    run_eval(wt2_sample_bin, ckpts["ce"], *args)  # the entry was rewritten: no warning now
    assert "warning" not in capsys.readouterr().err


def test_a_cache_dir_that_is_a_file_is_one_line(ckpts, wt2_sample_bin, tmp_path):
    (tmp_path / "cache").write_text("not a folder")
    message = eval_error(wt2_sample_bin, ckpts["ce"], "--cache-dir", tmp_path / "cache")
    assert f"--cache-dir {tmp_path / 'cache'} is a file" in message


# ----------------------------------------------------------------------------- numeric flags, every way


@pytest.mark.parametrize("flag,value", [
    ("--softmax-temp", "nan"), ("--softmax-temp", "inf"), ("--softmax-temp", "0"), ("--external-temp", "inf"),
    ("--interp-temp", "nan"), ("--lmbda", "1"), ("--lmbda", "nan"), ("--k", "0"), ("--nprobe", "0"),
    ("--mem-size", "0"), ("--tune-tokens", "0"), ("--context-window", "-1"), ("--tokens-per-sample", "0"),
    ("--max-tokens", "0"), ("--batch-size", "-2"), ("--batch-size", "1.5"),
])
def test_trime_eval_numeric_flags_are_usage_errors_naming_the_flag(flag, value, capsys):
    from trime.eval.evaluate import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["data", "--path", "x.pt", f"{flag}={value}"])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"trime: error: argument {flag}: must be ") and value in line


@pytest.mark.parametrize("spec,line", [
    ("softmax-temp=1,nan", "--sweep softmax-temp must be a finite number > 0, got nan"),
    ("softmax-temp=1e400", "--sweep softmax-temp must be a finite number > 0, got inf"),
    ("external-temp=nan", "--sweep external-temp must be a finite number > 0, got nan"),
    ("interp-temp=0", "--sweep interp-temp must be a finite number > 0, got 0"),
    ("lmbda=0.5,1.5", "--sweep lmbda must be a finite number >= 0 < 1, got 1.5"),
    ("k=0,4", "--sweep k must be an integer >= 1, got 0"),
    ("mem-size=-5", "--sweep mem-size must be an integer >= 1, got -5"),
    ("k=,", "--sweep k: give at least one value, e.g. --sweep k=V1,V2"),
])
def test_sweep_values_keep_the_rule_of_their_flag_before_any_work(tmp_path, spec, line):
    message = eval_error(tmp_path, tmp_path / "missing.pt", "--memory", "long", "--mem-size", 8, "--sweep", spec)
    assert message == f"trime: error: {line}"


def test_trime_prepare_workers_follow_the_rule_every_way(tmp_path, capsys):
    from trime.data_prep.prepare import main, prepare_dataset

    for value in ("0", "nan", "-3"):
        with pytest.raises(SystemExit) as exit_:
            main(["wikitext-2-sample", "--dest", str(tmp_path / "db"), "--workers", value])
        assert exit_.value.code == 2
        assert capsys.readouterr().err.startswith("trime: error: argument --workers: must be an integer >= 1")
    with pytest.raises(TrimeError, match="--workers must be an integer >= 1, got 0"):
        prepare_dataset("wikitext-2-sample", None, tmp_path / "db", workers=0)
    assert not (tmp_path / "db").exists()


@pytest.mark.parametrize("flag,value,line", [
    ("--max-tokens", "0", "--max-tokens must be an integer >= 1, got 0"),
    ("--tokens-per-sample", "0", "--tokens-per-sample must be an integer >= 1, got 0"),
    ("--update-freq", "0", "--update-freq must be an integer >= 1, got 0"),
    ("--dropout", "nan", "--dropout must be a finite number >= 0 <= 1, got nan"),
    ("--clip-norm", "nan", "--clip-norm must be a finite number >= 0, got nan"),
    ("--lr", "1e400", "--lr must be a finite number > 0, got inf"),
    ("--memory-block-size", "0", "--memory-block-size must be an integer >= 1, got 0"),
])
def test_trime_train_numeric_flags_fail_before_training(wt2_sample_bin, tmp_path, flag, value, line):
    from trime.train_cli import main

    argv = [str(wt2_sample_bin), "--task", "language_modeling", "--criterion", "trime_loss", *TINY_LM,
            "--save-dir", str(tmp_path / "ck"), "--max-update", "1"]
    argv = [a for i, a in enumerate(argv) if a != flag and (i == 0 or argv[i - 1] != flag)] + [flag, value]
    with pytest.raises(TrimeError) as err:
        main(argv)
    assert str(err.value) == f"trime: error: {line}"
    assert not (tmp_path / "ck").exists()


# ----------------------------------------------------------------------------- a full or read-only disk


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "filler")


@pytest.mark.parametrize("flag,target", [
    ("--results-json", "r.json"), ("--cache-dir", "cache"), ("--sweep-prefix", "sweep"),
])
def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing(ckpts, wt2_sample_bin, small_disk, flag, target):
    disk = small_disk(full=True)
    extra = ["--memory", "local", "--sweep", "softmax-temp=1,2"] if flag == "--sweep-prefix" else []
    message = eval_error(wt2_sample_bin, ckpts["ce"], "--gen-subset", "valid", *extra, flag, disk / target)
    assert message.startswith(f"trime: error: No space left on device writing or reading {disk / target}")
    assert message.endswith(": free space there or write elsewhere")
    assert _files(disk) == (["cache"] if flag == "--cache-dir" else [])
    if flag == "--cache-dir":
        assert _files(disk / "cache") == []


def test_a_read_only_results_folder_names_the_results_file(ckpts, wt2_sample_bin, small_disk):
    disk = small_disk(read_only=True)
    message = eval_error(wt2_sample_bin, ckpts["ce"], "--gen-subset", "valid", "--results-json", disk / "r.json")
    assert message == (f"trime: error: Read-only file system writing or reading {disk / 'r.json'}: "
                       "the file system is read-only; write elsewhere")


def test_trime_prepare_on_a_full_disk_says_how_much_is_needed(small_disk):
    from trime.data_prep.prepare import prepare_dataset

    disk = small_disk(full=True)
    with pytest.raises(TrimeError) as err:
        prepare_dataset("wikitext-2-sample", None, disk / "db")
    assert str(err.value) == (f"trime: error: the folder of --dest {disk} has 0 bytes free but 2.6 MiB are needed; "
                              "free space or choose another directory")
    assert _files(disk) == []


def test_trime_train_on_a_read_only_save_dir_fails_before_training(wt2_sample_bin, small_disk):
    from trime.train_cli import main

    disk = small_disk(read_only=True)
    with pytest.raises(TrimeError) as err:
        main([str(wt2_sample_bin), "--task", "language_modeling", *TINY_LM, "--max-update", "1",
              "--save-dir", str(disk / "ck")])
    assert str(err.value) == (f"trime: error: Read-only file system writing or reading {disk / 'ck'}: "
                              "the file system is read-only; write elsewhere")


@pytest.mark.slow  # fairseq retries a failed save three times, 2.5 s apart
@pytest.mark.parametrize("size,kept,failed", [
    ("2m", [], "--save-dir {ck}"),  # 1 MiB free: the first checkpoint (9 MiB) fails
    ("14m", ["checkpoint_best.pt"], "{ck}/checkpoint_last.pt"),  # the best fits, its copy to last does not
])
def test_trime_train_on_a_full_disk_ends_in_one_line_and_no_half_written_checkpoint(wt2_sample_bin, small_disk, size,
                                                                                     kept, failed):
    disk = small_disk(size, full=True)
    (disk / "filler").unlink()
    if size == "2m":
        (disk / "filler").write_bytes(b"\0" * (1 << 20))  # room for the probe of --save-dir only
    ck = disk / "ck"
    proc = run_command(["trime-train", wt2_sample_bin, "--task", "language_modeling", *TINY_LM,
                        "--max-update", "2", "--save-dir", ck], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"trime: error: No space left on device writing or reading {failed.format(ck=ck)}: "
                    "free space there or write elsewhere")
    assert _files(ck) == kept  # no half-written checkpoint_last.pt, no *.pt.tmp
    for name in kept:
        assert "model" in torch.load(ck / name, map_location="cpu", weights_only=False)
