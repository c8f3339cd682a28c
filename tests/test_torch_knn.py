"""The exact torch top-k search (``--knn-search torch``) against FAISS's exact flat indexes.

Budget: about 2 s on 2 cores.
"""

import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss")

from trime.errors import TrimeError  # noqa: E402
from trime.retrieval.torch_knn import TorchExactSearch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(count=3000, dim=32, queries=50, seed=0):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((count, dim)).astype(np.float32)
    q = rng.standard_normal((queries, dim)).astype(np.float32)
    return keys, q


def _faiss_flat(keys, metric):
    index = faiss.IndexFlatIP(keys.shape[1]) if metric == "ip" else faiss.IndexFlatL2(keys.shape[1])
    index.add(keys)
    return index


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("key_chunk", [None, 257, 40])  # one chunk; several; chunks smaller than k
def test_matches_faiss_flat(metric, key_chunk):
    keys, q = _data()
    k = 64
    dist, ref_ids = _faiss_flat(keys, metric).search(q, k)
    ref_scores = dist if metric == "ip" else -dist
    search = TorchExactSearch(keys, metric=metric, key_chunk=key_chunk)
    scores, ids = search.search(q, k)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64 and scores.shape == (q.shape[0], k)
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-4, atol=1e-3)
    # random continuous data has no ties: the same neighbours in the same order
    assert (ids.numpy() == ref_ids).mean() > 0.999
    # and the scores really belong to the returned ids
    recomputed = np.einsum("qkd,qd->qk", keys[ids.numpy()], q) if metric == "ip" else -(
        (keys[ids.numpy()] - q[:, None, :]) ** 2
    ).sum(-1)
    np.testing.assert_allclose(scores.numpy(), recomputed, rtol=1e-4, atol=1e-3)


def test_fp16_memmap_keys_and_padding(tmp_path):
    """fp16 keys read from a .npy memmap (as in a datastore); k > count pads like FAISS (-1, -inf)."""
    keys, q = _data(count=100, dim=16, queries=7)
    path = tmp_path / "keys.npy"
    np.save(path, keys.astype(np.float16))
    mm = np.load(path, mmap_mode="r")
    search = TorchExactSearch(mm, metric="ip", key_chunk=33)
    assert search.dtype == torch.float32  # CPU computes in fp32
    scores, ids = search.search(q, 120)
    index = _faiss_flat(np.asarray(mm, dtype=np.float32), "ip")
    dist, ref_ids = index.search(q, 120)
    assert (ids[:, 100:].numpy() == ref_ids[:, 100:]).all()  # FAISS pads with -1 too
    assert all(set(a) == set(b) for a, b in zip(ids[:, :100].numpy(), ref_ids[:, :100]))
    assert (ids[:, 100:] == -1).all() and torch.isinf(scores[:, 100:]).all()
    np.testing.assert_allclose(scores[:, :100].numpy(), dist[:, :100], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_bf16_compute_recall(metric):
    """Half-precision products (the GPU path's rounding) still find nearly all exact neighbours."""
    keys, q = _data(count=2000, dim=64, queries=20, seed=1)
    _, ref_ids = _faiss_flat(keys, metric).search(q, 32)
    scores, ids = TorchExactSearch(keys, metric=metric, dtype=torch.bfloat16, key_chunk=300).search(q, 32)
    recall = np.mean([len(set(a) & set(b)) / 32 for a, b in zip(ids.numpy(), ref_ids)])
    assert recall > 0.9, recall
    assert torch.all(scores[:, :-1] >= scores[:, 1:])  # best first


def test_device_tensor_is_used_without_a_copy():
    keys, q = _data(count=500, dim=16, queries=4)
    tensor = torch.from_numpy(keys)
    search = TorchExactSearch(tensor, metric="l2", key_chunk=100)
    assert search.keys.data_ptr() == tensor.data_ptr()
    _, ref_ids = _faiss_flat(keys, "l2").search(q, 10)
    assert (search.search(torch.from_numpy(q), 10)[1].numpy() == ref_ids).all()


def test_bad_input_is_one_line_error():
    keys, q = _data(count=10, dim=8, queries=2)
    with pytest.raises(TrimeError, match="metric"):
        TorchExactSearch(keys, metric="cosine")
    search = TorchExactSearch(keys)
    with pytest.raises(TrimeError, match=r"queries must be \(n, 8\)"):
        search.search(q[:, :4], 3)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_datastore_search_torch_matches_faiss_flat(metric):
    """Datastore.search with --knn-search torch returns what the FAISS Flat index gives (labels, padding, exact)."""
    from trime.retrieval.datastore import Datastore

    keys, q = _data(count=300, dim=16, queries=9, seed=3)
    vals = np.random.default_rng(3).integers(0, 50, size=300).astype(np.int32)
    meta = {"count": 300, "dim": 16, "index": {"metric": metric}}
    with_faiss = Datastore(None, meta, vals, keys, index=_faiss_flat(keys, metric))
    with_torch = Datastore(None, meta, vals, keys, torch_search=TorchExactSearch(keys, metric=metric, key_chunk=64))
    for k, exact in ((20, False), (20, True), (310, False)):  # 310 > count: FAISS pads
        a = with_faiss.search(q, k, exact=exact)
        b = with_torch.search(torch.from_numpy(q), k, exact=exact)
        assert torch.equal(a.valid, b.valid) and int(a.valid.sum()) == 9 * min(k, 300)
        if k <= 300:
            assert torch.equal(a.labels, b.labels)
        else:  # all 300 keys come back; near ties may order them differently
            assert torch.equal(a.labels[a.valid].view(9, -1).sort(1).values, b.labels[b.valid].view(9, -1).sort(1).values)
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-3)
        assert (b.scores[~b.valid] == 0).all()


def test_trime_eval_knn_search_needs_a_datastore():
    from trime.eval.evaluate import run

    with pytest.raises(TrimeError, match="--knn-search torch searches a datastore"):
        run(["data-bin", "--path", "ckpt.pt", "--knn-search", "torch"])
