"""trime-build-datastore and trime-bm25-batches under faults: NaN models, edited data, damaged indexes, bad flags,
a full disk and a second run into the same output.

Every fault is real: a model whose weights are NaN, a text file edited between a SIGKILLed
build and its resume, bytes zeroed inside ``index.faiss``, a small tmpfs filled to the last
byte (root only), a run stopped with SIGSTOP while it holds its lock and then SIGKILLed.
Datastores are built with a tiny random GPT-2 (``hf_helpers``) over a slice of the shipped
WikiText-2 sample, so a build takes a second.
"""

import contextlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import tests.hf_helpers as H
from tests.conftest import fill_disk
from tests.reliability_helpers import BIN, run_command
from trime.errors import TrimeError

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per module

TPS, CONTEXT, BATCH = 64, 24, 16  # 40 new tokens per window, 16 windows per batch
TRAIN_CHARS = 24_000


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    """DATA: train.txt and valid.txt, slices of the shipped sample."""
    out = tmp_path_factory.mktemp("faults_text")
    (out / "train.txt").write_text(H.SAMPLE_TRAIN.read_text(encoding="utf-8")[:TRAIN_CHARS], encoding="utf-8")
    (out / "valid.txt").write_text(H.SAMPLE_VALID.read_text(encoding="utf-8")[:8_000], encoding="utf-8")
    return out


def load(model: Path, data: Path):
    from trime.adapters import load_adapter

    return load_adapter(model, data, cpu=True)


@pytest.fixture(scope="module")
def lm(text_dir):
    return load(H.model_dir("gpt2"), text_dir)


def build(lm, out: Path, **kwargs) -> Path:
    from trime.retrieval.build_datastore import extract

    return extract(lm, "train", lm.window_settings(CONTEXT, TPS), BATCH, out, show_progress=False, **kwargs)


@pytest.fixture(scope="module")
def reference(lm, tmp_path_factory) -> Path:
    """A datastore built in one uninterrupted run (no index)."""
    return build(lm, tmp_path_factory.mktemp("faults_reference"))


def build_argv(model: Path, data: Path, out: Path, *extra) -> list:
    """The trime-build-datastore command of :func:`build` (same windows, batch size and precision)."""
    return [BIN / "trime-build-datastore", data, "--path", model, "--output", out, "--tokens-per-sample", TPS,
            "--context-window", CONTEXT, "--batch-size", BATCH, "--cpu", "--no-index", "--no-progress-bar", *extra]


def same_files(a: Path, b: Path, names=("keys.npy", "vals.npy", "meta.json")) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message.startswith("trime: error: ") and "\n" not in message, message
    return message


def swap_lines(path: Path, i: int = 3, j: int = 40) -> None:
    """Edit a text file keeping its size: swap two lines."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[i], lines[j] = lines[j], lines[i]
    path.write_text("".join(lines), encoding="utf-8")


def saved_model(root: Path, name: str, edit) -> Path:
    """A save_pretrained copy of the tiny GPT-2 whose weights ``edit`` changed in place."""
    import torch

    model = H.build_model("gpt2")
    with torch.no_grad():
        edit(model)
    out = root / name
    model.save_pretrained(out)
    H.load_test_tokenizer().save_pretrained(out)
    return out


# ----------------------------------------------------------------------------- NaN and inf keys


def test_nan_model_is_refused_before_anything_is_written(text_dir, tmp_path):
    # NaN position embeddings from position 16 on: the first tokens of a window are finite, later keys NaN
    nan_model = saved_model(tmp_path, "diverged", lambda m: m.transformer.wpe.weight[16:].fill_(float("nan")))
    out = tmp_path / "ds"
    with pytest.raises(TrimeError) as err:
        build(load(nan_model, text_dir), out)
    message = one_line(err)
    assert f"--path {nan_model} gives NaN or inf keys" in message and "diverged training run" in message
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == []  # no keys, meta or partials
    build(load(H.model_dir("gpt2"), text_dir), out)  # a finite model then builds there
    assert (out / "meta.json").is_file()


def test_keys_beyond_float16_ask_for_fp32(text_dir, tmp_path):
    huge = saved_model(tmp_path, "huge", lambda m: m.transformer.h[1].ln_2.weight.fill_(1e6))  # keys ~1e6
    lm = load(huge, text_dir)
    with pytest.raises(TrimeError) as err:
        build(lm, tmp_path / "ds")
    assert "beyond float16's range: pass --key-dtype fp32" in one_line(err)
    build(lm, tmp_path / "ds", key_dtype="fp32")
    assert np.isfinite(np.load(tmp_path / "ds" / "keys.npy")).all()


def poison(directory: Path, row: int, value: float = np.nan) -> None:
    """Store a non-finite key in row ``row`` with consistent checksums (as an older trime wrote them)."""
    from trime.retrieval.datastore import record_checksums

    keys = np.load(directory / "keys.npy")
    keys[row] = value
    np.save(directory / "keys.npy", keys)
    meta = json.loads((directory / "meta.json").read_text())
    record_checksums(directory, meta)
    (directory / "meta.json").write_text(json.dumps(meta))


def test_stored_nan_keys_are_refused_by_verify_index_and_merge(lm, reference, tmp_path):
    from trime.retrieval.build_datastore import build_index, merge_shards
    from trime.retrieval.datastore import verify

    store = tmp_path / "store"
    shutil.copytree(reference, store)
    poison(store, 100)
    with pytest.raises(TrimeError) as err:
        verify(store, show_progress=False)
    assert "keys.npy row 100 holds a NaN or inf key" in one_line(err)
    with pytest.raises(TrimeError) as err:
        build_index(store, factory="Flat", show_progress=False)
    assert "keys.npy row 100 holds a NaN or inf key" in one_line(err)
    assert not (store / "index.faiss").exists()

    sharded = tmp_path / "sharded"
    for shard_id in (0, 1):
        build(lm, sharded, num_shards=2, shard_id=shard_id)
    poison(sharded / "shards" / "shard-001-of-002", 7, np.inf)
    with pytest.raises(TrimeError) as err:
        merge_shards(sharded)
    assert "shard-001-of-002/keys.npy row 7 holds a NaN or inf key" in one_line(err)
    assert not (sharded / "keys.npy").exists() and not (sharded / "meta.json").exists()


# ----------------------------------------------------------------------------- the data a build reads


@pytest.mark.slow  # a build SIGKILLed in a subprocess
def test_killed_build_refuses_edited_data_then_resumes_byte_identical(reference, text_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(text_dir, data)
    original = (data / "train.txt").read_bytes()
    out = tmp_path / "ds"
    killed = run_command(build_argv(H.model_dir("gpt2"), data, out, "--progress-seconds", "0",
                                    "--kill-after-batches", "2"), check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    swap_lines(data / "train.txt")  # same size
    assert len((data / "train.txt").read_bytes()) == len(original)
    with pytest.raises(TrimeError) as err:
        build(load(H.model_dir("gpt2"), data), out)
    message = one_line(err)
    assert f"{out} holds a partial build from other data ({data / 'train.txt'} differs" in message
    assert f"delete {out} to start over" in message
    (data / "train.txt").write_bytes(original)
    build(load(H.model_dir("gpt2"), data), out)  # the same data again: resumes
    same_files(out, reference, names=("keys.npy", "vals.npy"))
    meta, ref_meta = (json.loads((d / "meta.json").read_text()) for d in (out, reference))
    assert meta["data"] == ref_meta["data"] and meta["build_config_sha256"] == ref_meta["build_config_sha256"]


def test_finished_datastore_of_other_data_is_refused(lm, reference, text_dir, tmp_path):
    meta = json.loads((reference / "meta.json").read_text())
    assert set(meta["data"]["files"]) == {"train.txt"} and len(meta["data"]["files"]["train.txt"]["sha256"]) == 64
    data = tmp_path / "data"
    shutil.copytree(text_dir, data)
    out = tmp_path / "ds"
    shutil.copytree(reference, out)
    build(load(H.model_dir("gpt2"), data), out)  # the same bytes elsewhere: already complete
    swap_lines(data / "train.txt")
    with pytest.raises(TrimeError) as err:
        build(load(H.model_dir("gpt2"), data), out)
    assert f"{out} already holds a datastore built from other data ({data / 'train.txt'} differs" in one_line(err)


def test_merge_refuses_shards_of_other_data(lm, text_dir, tmp_path):
    from trime.retrieval.build_datastore import merge_shards

    data = tmp_path / "data"
    shutil.copytree(text_dir, data)
    swap_lines(data / "train.txt")
    out = tmp_path / "ds"
    build(lm, out, num_shards=2, shard_id=0)
    build(load(H.model_dir("gpt2"), data), out, num_shards=2, shard_id=1)
    with pytest.raises(TrimeError) as err:
        merge_shards(out)
    assert "shard 1 was extracted from other data than shard 0 (train.txt differs" in one_line(err)
    assert not (out / "keys.npy").exists()


# ----------------------------------------------------------------------------- the index's checksum


def test_damaged_index_is_refused_by_verify_and_load(reference, tmp_path):
    from trime.retrieval.build_datastore import build_index
    from trime.retrieval.datastore import Datastore, verify

    store = tmp_path / "store"
    shutil.copytree(reference, store)
    build_index(store, factory="Flat", show_progress=False)
    index = store / "index.faiss"
    meta = json.loads((store / "meta.json").read_text())
    assert meta["index"]["sha256"] and index.stat().st_size > 200_000
    assert "index verified" in verify(store, show_progress=False)
    good = index.read_bytes()
    with open(index, "r+b") as f:  # 100 KB of zeros inside: same size, FAISS still reads it
        f.seek(100_000)
        f.write(b"\0" * 100_000)
    fix = f"rebuild it with trime-build-datastore --build-index --output {store}"
    for check in (lambda: verify(store, show_progress=False), lambda: Datastore.open(store)):
        with pytest.raises(TrimeError) as err:
            check()
        message = one_line(err)
        assert f"{index} does not match the sha256 recorded in meta.json" in message and fix in message

    # a datastore built before index checksums: loaded with a warning, refused by --verify
    index.write_bytes(good)
    del meta["index"]["sha256"]
    (store / "meta.json").write_text(json.dumps(meta))
    warnings = []
    Datastore.open(store, log=warnings.append)
    assert len(warnings) == 1 and "records no sha256 of index.faiss" in warnings[0]
    with pytest.raises(TrimeError) as err:
        verify(store, show_progress=False)
    assert "records no sha256 of index.faiss (built before index checksums)" in one_line(err)
    index.unlink()
    with pytest.raises(TrimeError) as err:
        verify(store, show_progress=False)
    assert f"{index} is missing" in one_line(err)


# ----------------------------------------------------------------------------- numeric flags


@pytest.mark.parametrize(
    "module, argv, flag",
    [
        ("build_datastore", ["--num-shards", "0"], "--num-shards"),
        ("build_datastore", ["--shard-id", "-1"], "--shard-id"),
        ("build_datastore", ["--train-sample", "0"], "--train-sample"),
        ("build_datastore", ["--seed", "-1"], "--seed"),
        ("build_datastore", ["--seed", str(2**40)], "--seed"),
        ("build_datastore", ["--progress-seconds", "nan"], "--progress-seconds"),
        ("build_datastore", ["--heartbeat-seconds", "0"], "--heartbeat-seconds"),
        ("build_datastore", ["--kill-after-batches", "0"], "--kill-after-batches"),
        ("bm25_batches", ["--k", "0"], "--k"),
        ("bm25_batches", ["--k1", "nan"], "--k1"),
        ("bm25_batches", ["--b", "1.5"], "--b"),
        ("bm25_batches", ["--seed", "-1"], "--seed"),
        ("bm25_batches", ["--num-shards", "0"], "--num-shards"),
        ("bm25_batches", ["--shard-id", "-1"], "--shard-id"),
        ("bm25_batches", ["--chunk-size", "0"], "--chunk-size"),
        ("bm25_batches", ["--block-size", "0"], "--block-size"),
        ("bm25_batches", ["--tokens-per-sample", "0"], "--tokens-per-sample"),
    ],
)
def test_numeric_flags_are_usage_errors(module, argv, flag, capsys):
    import importlib

    parser = importlib.import_module(f"trime.retrieval.{module}").build_parser()
    base = ["--output", "out"] if module == "build_datastore" else ["data", "--tokens-per-sample", "64"]
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(base + argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"trime: error: argument {flag}: must be "), err


# ----------------------------------------------------------------------------- a full disk


@pytest.mark.slow  # builds in subprocesses
def test_full_disk_is_one_line_and_a_rerun_resumes(lm, reference, text_dir, small_disk):
    disk = small_disk("24m")
    out = disk / "ds"
    argv = build_argv(H.model_dir("gpt2"), text_dir, out)
    killed = run_command([*argv, "--progress-seconds", "0", "--kill-after-batches", "1"], check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    filler = fill_disk(disk)
    full = run_command(argv, check=False)  # used to die of SIGBUS writing into the sparse keys file
    assert full.returncode == 1, (full.returncode, full.stderr[-2000:])
    assert full.stderr.splitlines() == [full.stderr.strip()] and "No space left on device" in full.stderr
    assert f"writing or reading {out}/" in full.stderr and "free space there or write elsewhere" in full.stderr
    assert not (out / "meta.json").exists() and not (out / "keys.npy").exists()
    filler.unlink()
    build(lm, out)  # after freeing space: resumes
    same_files(out, reference)


def test_bm25_full_disk_is_one_line_and_a_rerun_resumes(wt2_sample_bin, tmp_path, small_disk):
    from trime.retrieval.bm25_batches import main

    argv = [str(wt2_sample_bin), "--tokens-per-sample", "64", "--chunk-size", "512", "--no-progress-bar"]
    main([*argv, "--output", str(tmp_path / "plan.json")])
    disk = small_disk("2m")
    filler = fill_disk(disk, leave=150_000)  # room for one chunk of neighbours (80 KB), not all
    with pytest.raises(TrimeError) as err:
        main([*argv, "--output", str(disk / "plan.json")])
    message = one_line(err)
    assert "No space left on device writing or reading" in message and str(disk / "plan.json.work") in message
    assert not (disk / "plan.json").exists()
    assert not list(disk.rglob("*.tmp"))  # no half-written file
    done = sorted(p.name for p in (disk / "plan.json.work").glob("*.chunk*.npy"))
    assert done  # finished chunks are kept
    filler.unlink()
    main([*argv, "--output", str(disk / "plan.json")])
    ours, whole = (json.loads(p.read_text()) for p in (disk / "plan.json", tmp_path / "plan.json"))
    assert ours["ids"] == whole["ids"]


# ----------------------------------------------------------------------------- two runs, one output


@contextlib.contextmanager
def stopped_holder(argv: list, marker: Path):
    """Run ``argv``, SIGSTOP it once ``marker`` exists (it holds its lock then); SIGKILL it on exit."""
    from tests.reliability_helpers import command_env

    proc = subprocess.Popen([str(a) for a in argv], env=command_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the first run never started writing"
            time.sleep(0.02)
        proc.send_signal(signal.SIGSTOP)
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow  # runs in subprocesses
def test_second_run_into_one_output_fails_at_once_naming_the_first(lm, reference, text_dir, wt2_sample_bin, tmp_path):
    out = tmp_path / "ds"
    argv = build_argv(H.model_dir("gpt2"), text_dir, out, "--progress-seconds", "0")
    with stopped_holder(argv, out / "progress.json") as first:
        started = time.monotonic()
        second = run_command(argv, check=False)
        assert second.returncode == 1 and time.monotonic() - started < 60
        assert second.stderr.splitlines() == [
            second.stderr.strip()
        ] and second.stderr.startswith(f"trime: error: --output {out} is in use by another run (pid {first.pid} on ")
        assert "trime-build-datastore" in second.stderr and "choose another --output" in second.stderr
    build(lm, out)  # the first run was SIGKILLed: its lock went with it
    same_files(out, reference)

    plan = tmp_path / "plan.json"
    bm25 = [BIN / "trime-bm25-batches", wt2_sample_bin, "--tokens-per-sample", "64", "--chunk-size", "256",
            "--output", plan, "--no-progress-bar"]
    with stopped_holder(bm25, tmp_path / "plan.json.work" / "shard000-of-001.progress.json") as first:
        second = run_command(bm25, check=False)
        assert second.returncode == 1, second.stderr[-2000:]
        assert second.stderr.startswith(f"trime: error: --output {plan} (work dir {plan}.work) is in use by "
                                        f"another run (pid {first.pid} on ")
    run_command(bm25)
    assert plan.is_file() and not Path(f"{plan}.work").exists()
