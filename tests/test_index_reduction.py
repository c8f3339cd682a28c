"""``--reduce-dim``: FAISS's PCA or OPQ in front of the index, stored with it and applied to every query.

Reference: the transform's own matrix (``A``, ``b``) read back from the written index and applied with
numpy, then a brute-force top-k in the reduced space. Keys: a tiny random GPT-2's keys over a prefix of
the shipped WikiText-2 sample (small enough for the exact ``Flat`` part that ``auto`` picks).
"""

import shutil
from pathlib import Path

import numpy as np
import pytest

import tests.hf_helpers as H
from trime.errors import TrimeError

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TPS, CONTEXT, BATCH, K, REDUCED = 64, 24, 32, 10, 8


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    from trime.adapters import load_adapter
    from trime.retrieval.build_datastore import extract

    data = tmp_path_factory.mktemp("reduction_data")
    (data / "train.txt").write_text(H.SAMPLE_VALID.read_text(encoding="utf-8")[:16_000], encoding="utf-8")
    lm = load_adapter(H.model_dir("gpt2"), data, cpu=True)
    out = tmp_path_factory.mktemp("reduction_store") / "ds"
    extract(lm, "train", lm.window_settings(CONTEXT, TPS), BATCH, out, show_progress=False, metric="l2")
    return out


def transform_of(index) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) of the index's first transform: x -> x A^T + b."""
    import faiss

    transform = faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0))
    a = faiss.vector_to_array(transform.A).reshape(transform.d_out, transform.d_in)
    b = faiss.vector_to_array(transform.b) if transform.have_bias else np.zeros(transform.d_out, dtype=np.float32)
    return a.astype(np.float64), b.astype(np.float64)


@pytest.mark.parametrize(("reduce_with", "metric", "factory"), [("pca", "l2", "PCA8,Flat"), ("pca", "ip", "PCA8,Flat"),
                                                                  ("opq", "l2", "OPQ2_8,Flat")])
def test_reduced_search_equals_brute_force_in_the_reduced_space(small_store, tmp_path, reduce_with, metric, factory):
    from trime.retrieval.build_datastore import build_index
    from trime.retrieval.datastore import Datastore

    store = tmp_path / "ds"
    shutil.copytree(small_store, store)
    info = build_index(store, factory="auto", metric=metric, reduce_dim=REDUCED, reduce_with=reduce_with,
                       show_progress=False)
    assert info["factory"] == factory and info["reduce_dim"] == REDUCED
    opened = Datastore.open(store)
    keys = np.asarray(opened.keys, dtype=np.float64)
    rng = np.random.default_rng(0)
    queries = (keys[::53] + rng.normal(0, 0.1, size=keys[::53].shape)).astype(np.float32)
    a, b = transform_of(opened.index)
    reduced_keys, reduced_queries = keys @ a.T + b, queries.astype(np.float64) @ a.T + b
    if metric == "ip":
        want_scores = reduced_queries @ reduced_keys.T
    else:
        want_scores = -(((reduced_queries[:, None, :] - reduced_keys[None, :, :]) ** 2).sum(-1))
    found = opened.search(queries, K)
    got_ids, got_scores = found.ids.numpy(), found.scores.numpy()
    want = np.sort(want_scores, axis=1)[:, ::-1][:, :K]
    np.testing.assert_allclose(got_scores, want, rtol=1e-4, atol=1e-3)
    chosen = np.take_along_axis(want_scores, got_ids, axis=1)  # the ids found score what FAISS says, in the numpy space
    np.testing.assert_allclose(chosen, got_scores, rtol=1e-4, atol=1e-3)
    assert a.shape == (REDUCED, keys.shape[1])  # a real reduction: the search saw 8 of the 32 dimensions
    exact = opened.search(queries, K, exact=True).scores.numpy()  # --knn-exact rescores with the full-size keys
    full = keys[got_ids]
    if metric == "ip":
        np.testing.assert_allclose(exact, np.einsum("qkd,qd->qk", full, queries), rtol=1e-4, atol=1e-3)
    else:
        np.testing.assert_allclose(exact, -((full - queries[:, None, :]) ** 2).sum(-1), rtol=1e-4, atol=1e-3)


def test_reduce_dim_needs_auto_and_fewer_dimensions(small_store, tmp_path):
    from trime.retrieval.build_datastore import build_index

    store = tmp_path / "ds"
    shutil.copytree(small_store, store)
    with pytest.raises(TrimeError, match="--reduce-dim goes with --index-factory auto"):
        build_index(store, factory="Flat", reduce_dim=REDUCED, show_progress=False)
    with pytest.raises(TrimeError, match="--reduce-dim must be between 1 and the keys' 31 dimensions, got 32"):
        build_index(store, factory="auto", reduce_dim=32, show_progress=False)


def test_auto_factory_with_a_reduction_sizes_the_index_to_the_reduced_keys():
    from trime.retrieval.faiss_index import auto_factory, index_bytes_estimate

    assert auto_factory(1_000_000, 1024, 256) == "PCA256,IVF4096,PQ64np"
    assert auto_factory(1_000_000, 1024, 128, "opq") == "OPQ32_128,IVF4096,PQ32np"
    assert auto_factory(1_000_000, 1024) == "IVF4096,PQ64np"
    assert index_bytes_estimate("OPQ32_128,IVF4096,PQ32np", 1000, 1024) == 1000 * 40 + (64 << 20)
