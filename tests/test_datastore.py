"""trime-build-datastore: completeness, resumability, sharding, the FAISS index and loader errors.

The tiny checkpoints come from ``eval_helpers.tiny_checkpoints`` (trained once per session);
datastores are built over the small valid split of the shipped WikiText-2 sample.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.eval_helpers import CONTEXT, assert_one_line_error, run_cli, tiny_checkpoints
from trime.errors import TrimeError

BIN = Path(sys.executable).parent
BATCH = 64  # windows per batch: 9 batches over the valid split


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per module


@pytest.fixture(scope="module")
def lm(tmp_path_factory, wt2_sample_bin):
    from trime.adapters import load_adapter

    ckpts = tiny_checkpoints(tmp_path_factory, wt2_sample_bin)
    return load_adapter(ckpts["ce"], wt2_sample_bin, cpu=True)


@pytest.fixture(scope="module")
def settings(lm):

    return lm.window_settings(CONTEXT, None)


@pytest.fixture(scope="module")
def reference(lm, settings, tmp_path_factory):
    """A datastore built in one uninterrupted run (no index)."""
    from trime.retrieval.build_datastore import extract

    out = tmp_path_factory.mktemp("ds_reference")
    extract(lm, "valid", settings, BATCH, out, show_progress=False)
    return out


def files_equal(a: Path, b: Path, names=("keys.npy", "vals.npy", "meta.json")):
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_every_scored_token_is_kept(lm, reference):
    from fairseq.data import data_utils

    meta = json.loads((reference / "meta.json").read_text())
    raw = data_utils.load_indexed_dataset(str(lm.data_dir / "valid"), lm.dictionary)
    stream = torch.cat([raw[i] for i in range(len(raw))]).numpy()
    vals = np.load(reference / "vals.npy")
    keys = np.load(reference / "keys.npy")
    assert meta["count"] == len(stream) == 18345 and meta["skipped_tokens"] == 0
    assert vals.dtype == np.int32 and keys.dtype == np.float16 and keys.shape == (len(stream), lm.dim)
    np.testing.assert_array_equal(vals, stream)  # values are the next tokens, in corpus order
    assert meta["key_type"] == "last_ffn_input" and meta["windows"]["context_window"] == CONTEXT
    assert meta["dictionary"]["sha256"] == lm.dict_sha256 and meta["checkpoint"]["sha256"]
    assert not (reference / "progress.json").exists() and not list(reference.glob("*.partial.npy"))


@pytest.mark.slow  # a build killed in a subprocess, then resumed
def test_killed_build_resumes_byte_identical(lm, reference, wt2_sample_bin, tmp_path):
    from trime.retrieval.build_datastore import extract

    out = tmp_path / "ds"
    proc = subprocess.run(
        [
            str(BIN / "trime-build-datastore"),
            str(wt2_sample_bin),
            "--path",
            str(lm.path),
            "--output",
            str(out),
            "--gen-subset",
            "valid",
            "--context-window",
            str(CONTEXT),
            "--batch-size",
            str(BATCH),
            "--cpu",
            "--no-index",
            "--no-progress-bar",
            "--progress-seconds",
            "0",
            "--kill-after-batches",
            "3",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILLed after writing batch 3's rows
    progress = json.loads((out / "progress.json").read_text())
    assert progress["batches_done"] == 2 and not (out / "keys.npy").exists()
    extract(lm, "valid", lm_settings(lm), BATCH, out, show_progress=False)  # resume
    files_equal(out, reference)
    assert not (out / "progress.json").exists()


def lm_settings(lm):

    return lm.window_settings(CONTEXT, None)


def test_sharded_build_merges_to_the_unsharded_bytes(lm, settings, reference, tmp_path):
    from trime.retrieval.build_datastore import extract, merge_shards

    out = tmp_path / "sharded"
    for shard_id in (1, 0, 2):
        extract(lm, "valid", settings, BATCH, out, num_shards=3, shard_id=shard_id, show_progress=False)
    merged = merge_shards(out)
    files_equal(out, reference, names=("keys.npy", "vals.npy"))
    ref_meta = json.loads((reference / "meta.json").read_text())
    drop = ("shards", "build_config_sha256")
    assert {k: v for k, v in merged.items() if k not in drop} == {k: v for k, v in ref_meta.items() if k not in drop}
    rows = [s["rows"] for s in merged["shards"]]
    assert rows[0][0] == 0 and rows[-1][1] == merged["count"]
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))


def test_merge_refuses_missing_shard(lm, settings, tmp_path):
    from trime.retrieval.build_datastore import extract, merge_shards

    extract(lm, "valid", settings, BATCH, tmp_path, num_shards=4, shard_id=3, show_progress=False)
    with pytest.raises(TrimeError, match="shard 0 of 4 is not finished"):
        merge_shards(tmp_path)


def test_auto_factory_sizes():
    from trime.retrieval.faiss_index import auto_factory, pq_subquantizers

    assert auto_factory(5000, 32) == "Flat"
    assert auto_factory(18345, 32) == "IVF256,PQ8np"
    assert auto_factory(103_224_461, 1024) == "IVF32768,PQ64np"
    assert pq_subquantizers(410) == 41 and pq_subquantizers(512) == 64


def test_ivfpq_index_build_search_and_determinism(reference, tmp_path):
    import shutil

    from trime.retrieval.build_datastore import build_index
    from trime.retrieval.datastore import Datastore

    copies = []
    for name in ("a", "b"):
        d = tmp_path / name
        shutil.copytree(reference, d)
        info = build_index(d, factory="IVF16,PQ4np", metric="ip", train_sample=3000, seed=1, show_progress=False)
        copies.append(d)
    assert info["factory"] == "IVF16,PQ4np" and info["train_sample"] == 3000
    assert (copies[0] / "index.faiss").read_bytes() == (copies[1] / "index.faiss").read_bytes()
    store = Datastore.open(copies[0], nprobe=4)
    assert store.meta["index"]["metric"] == "ip"
    queries = np.asarray(store.keys[:5], dtype=np.float32)
    knn = store.search(queries, 10)
    assert knn.scores.shape == (5, 10) and bool(knn.valid.all())
    assert torch.all(knn.scores[:, :-1] >= knn.scores[:, 1:])  # best first
    # exact scores: inner products with the stored keys of the same neighbours
    exact = store.search(queries, 10, exact=True)
    ids = store.index.search(queries, 10)[1]
    np.testing.assert_array_equal(exact.labels.numpy(), store.vals[ids])
    stored = np.asarray(store.keys, dtype=np.float32)[ids]  # (5, 10, d)
    np.testing.assert_allclose(exact.scores.numpy(), np.einsum("qd,qkd->qk", queries, stored), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- loader errors


@pytest.fixture()
def flat_copy(reference, tmp_path):
    import shutil

    from trime.retrieval.build_datastore import build_index

    d = tmp_path / "flat"
    shutil.copytree(reference, d)
    build_index(d, factory="Flat", show_progress=False)
    return d


def expect_error(needle, **kwargs):
    from trime.retrieval.datastore import Datastore

    def check(directory):
        with pytest.raises(TrimeError) as err:
            Datastore.open(directory, **kwargs)
        message = str(err.value)
        assert message.startswith("trime: error: ") and "\n" not in message
        assert needle in message, message
        return message

    return check


def test_loader_refuses_mismatches(flat_copy, lm):
    from trime.retrieval.datastore import Datastore

    Datastore.open(flat_copy, dim=lm.dim, dict_sha256=lm.dict_sha256)  # the good case
    expect_error("64-d", dim=64)(flat_copy)
    expect_error("another dictionary", dict_sha256="0" * 64)(flat_copy)

    index = flat_copy / "index.faiss"
    good = index.read_bytes()
    index.write_bytes(b"\0" * len(good))  # same size, garbage content
    msg = expect_error("corrupt")(flat_copy)
    assert "--build-index" in msg
    index.write_bytes(good[:-10])
    expect_error("records")(flat_copy)
    index.unlink()
    expect_error("index.faiss is missing")(flat_copy)
    Datastore.open(flat_copy, need_index=False)

    keys = flat_copy / "keys.npy"
    keys.write_bytes(keys.read_bytes()[:-64])
    expect_error("truncated")(flat_copy)

    meta_path = flat_copy / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["count"] += 1
    meta_path.write_text(json.dumps(meta))
    expect_error("says")(flat_copy)
    meta_path.unlink()
    expect_error("meta.json is missing")(flat_copy)


@pytest.mark.slow  # end-to-end CLI run
def test_eval_cli_refuses_a_foreign_datastore(flat_copy, lm, wt2_sample_bin, tmp_path):
    """End to end: a datastore whose keys have another size than the model's -> one line, no traceback."""
    from trime.retrieval.datastore import record_checksums

    meta_path = flat_copy / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["dim"] = 16  # a consistent 16-d datastore (keys.npy, meta.json and checksums agree)
    np.save(flat_copy / "keys.npy", np.zeros((meta["count"], 16), dtype=meta["key_dtype"]))
    record_checksums(flat_copy, meta)
    meta_path.write_text(json.dumps(meta))
    proc = run_cli(
        "trime-eval",
        wt2_sample_bin,
        "--path",
        lm.path,
        "--memory",
        "external",
        "--mem-size",
        "16",
        "--datastore",
        flat_copy,
        "--context-window",
        CONTEXT,
        "--cpu",
    )
    assert_one_line_error(proc, "16-d keys", "32-d")
