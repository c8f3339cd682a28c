"""Tests for BM25 batch plans: search backends, greedy chain, sharded resumable search, plan files, CLI."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from trime.errors import TrimeError
from trime.retrieval.bm25 import (
    LUCENE_PRESET,
    BM25Params,
    Bm25sSearcher,
    RankBM25Searcher,
    ScipySearcher,
    Segments,
    planted_topic_segments,
    select_top_k,
)
from trime.retrieval.bm25_batches import (
    check_plan_matches,
    dataset_identity,
    greedy_chain,
    load_batch_plan,
    load_train_segments,
    main,
    merge_shard_results,
    run_shard_search,
    search_all,
    search_config,
    write_batch_plan,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "wikitext-2"
TPS = 128  # tokens per sample for the WikiText-2 sample: ~1060 segments


@pytest.fixture(scope="module")
def wt2_plan(wt2_sample_bin, tmp_path_factory) -> Path:
    """A plan made by the CLI, in a subprocess, on the sample data-bin."""
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    proc = subprocess.run(
        [sys.executable, "-m", "trime.retrieval.bm25_batches", str(wt2_sample_bin),
         "--tokens-per-sample", str(TPS), "--output", str(out), "--no-progress-bar"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and "followed a BM25 neighbour" in proc.stdout
    assert not Path(f"{out}.work").exists()  # default work dir is cleaned up
    return out


def _sample_word_segments(length: int, count: int) -> Segments:
    """First ``count`` segments of ``length`` words of the sample, as ids of a local vocabulary."""
    words = (SAMPLE / "wiki.train.tokens").read_text().split()[: length * count]
    vocab = {w: i for i, w in enumerate(sorted(set(words)))}
    ids = np.array([vocab[w] for w in words])
    return Segments.from_arrays([ids[i : i + length] for i in range(0, len(ids), length)])


class LuceneIdfReference(BM25Okapi):
    """rank_bm25 scoring with Lucene's idf, written independently of trime."""

    def _calc_idf(self, nd):
        for word, freq in nd.items():
            self.idf[word] = math.log(1 + (self.corpus_size - freq + 0.5) / (freq + 0.5))


def _reference_model(segments: Segments, params: BM25Params):
    corpus = [segments[i].tolist() for i in range(len(segments))]
    cls = LuceneIdfReference if params.idf == "lucene" else BM25Okapi
    return cls(corpus, k1=params.k1, b=params.b, epsilon=params.epsilon), corpus


def _assert_valid_top_k(ids, scores, segments, params, k, rtol, scale=1.0):
    """Every row of (ids, scores) is a correct top-k under rank_bm25 (robust to exact ties)."""
    model, corpus = _reference_model(segments, params)
    exact_rows = 0
    for q in range(len(segments)):
        ref = np.asarray(model.get_scores(corpus[q])) / scale
        ref[q] = -np.inf
        best = np.lexsort((np.arange(len(ref)), -ref))[:k]
        best = best[ref[best] > 0]
        n_hits = len(best)
        assert np.all(ids[q, n_hits:] == -1)
        np.testing.assert_allclose(scores[q, :n_hits], ref[best], rtol=rtol)
        np.testing.assert_allclose(ref[ids[q, :n_hits]], ref[best], rtol=rtol)
        exact_rows += bool(np.array_equal(ids[q, :n_hits], best))
    assert exact_rows >= 0.98 * len(segments)


@pytest.mark.parametrize(
    "params", [BM25Params(k1=1.5, b=0.75, idf="okapi"), LUCENE_PRESET, BM25Params()], ids=["okapi", "lucene-preset", "default"]
)
def test_scipy_top_k_equals_rank_bm25(params):
    segments = _sample_word_segments(48, 160)
    for dtype, rtol in ((np.float64, 1e-9), (np.float32, 2e-5)):
        # a tiny dense fraction forces both the dense and the sparse product to be used
        searcher = ScipySearcher(segments, params, block_size=37, dtype=dtype, dense_df_fraction=0.05)
        assert searcher.num_dense_terms > 0 and searcher.num_sparse_terms > 0
        ids, scores = searcher.search(0, len(segments), 10)
        _assert_valid_top_k(ids, scores, segments, params, 10, rtol)


def test_reference_backends_agree():
    segments = _sample_word_segments(40, 80)
    params = LUCENE_PRESET
    ids, scores = RankBM25Searcher(segments, params, block_size=16).search(0, len(segments), 8)
    _assert_valid_top_k(ids, scores, segments, params, 8, 1e-9)
    # bm25s omits the constant (k1 + 1) factor
    ids, scores = Bm25sSearcher(segments, params).search(0, len(segments), 8)
    _assert_valid_top_k(ids, scores, segments, params, 8, 2e-5, scale=params.k1 + 1)
    with pytest.raises(TrimeError, match="bm25s supports only"):
        Bm25sSearcher(segments, BM25Params(idf="okapi"))


def test_select_top_k_self_ties_and_misses():
    scores = np.array(
        [[9.0, 1.0, 2.0, 2.0, 0.0], [2.0, 5.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0]]
    )
    ids, hit = select_top_k(scores.copy(), np.array([0, 1, 2]), 3)
    assert ids.tolist() == [[2, 3, 1], [0, 2, 3], [-1, -1, -1]]  # self excluded, ties to smaller id
    assert hit[0].tolist() == [2.0, 2.0, 1.0] and hit[2].tolist() == [0, 0, 0]
    ids, _ = select_top_k(scores[:1].copy(), np.array([0]), 10)  # k > N - 1: padded with -1
    assert ids.tolist() == [[2, 3, 1, -1, -1, -1, -1, -1, -1, -1]]


def test_planted_topics_batch_together():
    segments, topic = planted_topic_segments()
    ids, _ = search_all(segments, BM25Params(), k=20, block_size=64)
    assert np.mean(topic[ids[:, 0]] == topic) == 1.0
    order, followed = greedy_chain(ids, seed=1)
    assert sorted(order.tolist()) == list(range(len(segments)))
    batches = topic[order].reshape(-1, 4)
    same = np.mean(batches[:, 1:] == batches[:, :1])
    assert same > 0.8  # chance is 1/8
    assert followed > 0.85


def test_greedy_chain_rules_and_seed():
    # seed 8 shuffles 0..4 to [3, 0, 1, 2, 4]: start at 3; 3 -> 1 (best hit); 1 -> 2 (3 is used);
    # 2's hits are used: jump to 0 (next unused in the shuffled order); 0 has no hits: jump to 4
    assert np.random.default_rng(8).permutation(5).tolist() == [3, 0, 1, 2, 4]
    neighbours = np.array([[-1, -1], [3, 2], [3, 1], [1, 4], [0, 1]])
    order, followed = greedy_chain(neighbours, seed=8)
    assert order.tolist() == [3, 1, 2, 0, 4] and followed == 0.5
    rng = np.random.default_rng(0)
    big = rng.integers(0, 500, size=(500, 5))
    a, fa = greedy_chain(big, seed=1)
    b, fb = greedy_chain(big, seed=1)
    c, _ = greedy_chain(big, seed=2)
    assert np.array_equal(a, b) and fa == fb and not np.array_equal(a, c)
    assert np.array_equal(np.sort(a), np.arange(500))


def test_segments_are_fairseq_dataset_indices(wt2_sample_bin):
    from fairseq.data import Dictionary, TokenBlockDataset, data_utils

    d = Dictionary.load(str(wt2_sample_bin / "dict.txt"))
    ds = data_utils.load_indexed_dataset(str(wt2_sample_bin / "train"), d)
    blocks = TokenBlockDataset(ds, ds.sizes, TPS, pad=d.pad(), eos=d.eos(), break_mode="none", include_targets=False)
    segments = load_train_segments(wt2_sample_bin, TPS)
    assert len(segments) == len(blocks) == math.ceil(ds.sizes.sum() / TPS)
    for i in (0, 1, 500, len(blocks) - 1):
        raw = blocks[i].numpy()
        assert np.array_equal(segments[i], raw[raw >= 4])


def _within_batch_score(ids: np.ndarray, model: BM25Okapi, corpus, batch: int) -> float:
    total, pairs = 0.0, 0
    for lo in range(0, len(ids) - batch + 1, batch):
        members = ids[lo : lo + batch].tolist()
        for q in members:
            others = [d for d in members if d != q]
            total += sum(model.get_batch_scores(corpus[q], others))
            pairs += len(others)
    return total / pairs


@pytest.mark.slow  # end-to-end CLI run
def test_cli_plan_beats_random_on_wt2_sample(wt2_plan, wt2_sample_bin):
    ids, meta = load_batch_plan(wt2_plan)
    assert meta["path"] == str(wt2_plan) and meta["tokens_per_sample"] == TPS
    assert meta["backend"] == "scipy" and meta["k"] == 20 and meta["seed"] == 1 and meta["idf"] == "lucene"
    assert meta["dataset"] == dataset_identity(wt2_sample_bin)
    assert np.array_equal(np.sort(ids), np.arange(meta["num_segments"]))
    check_plan_matches(meta, wt2_sample_bin, TPS, meta["num_segments"])
    # independent scoring: rank_bm25's own defaults over fairseq's blocks
    segments = load_train_segments(wt2_sample_bin, TPS)
    corpus = [segments[i].tolist() for i in range(len(segments))]
    model = BM25Okapi(corpus)
    plan_score = _within_batch_score(ids, model, corpus, 4)
    random_score = _within_batch_score(np.random.default_rng(123).permutation(len(ids)), model, corpus, 4)
    assert plan_score > 1.3 * random_score, (plan_score, random_score)  # measured: ~1.6x


def test_plan_meta_mismatch_names_the_file(wt2_plan, wt2_sample_bin, tmp_path):
    _, meta = load_batch_plan(wt2_plan)
    n = meta["num_segments"]
    with pytest.raises(TrimeError, match=f"batch plan {wt2_plan} was built with --tokens-per-sample {TPS}"):
        check_plan_matches(meta, wt2_sample_bin, 256, n)
    with pytest.raises(TrimeError, match=f"{wt2_plan} has {n} segments"):
        check_plan_matches(meta, wt2_sample_bin, TPS, n + 1)
    other = tmp_path / "other-bin"
    shutil.copytree(wt2_sample_bin, other)
    with open(other / "dict.txt", "a") as f:
        f.write("zzzextraword 1\n")
    with pytest.raises(TrimeError, match=f"{wt2_plan} was built from different data.*dict_sha256") as err:
        check_plan_matches(meta, other, TPS, n)
    assert "\n" not in str(err.value)


def test_load_batch_plan_rejects_bad_files(tmp_path):
    path = tmp_path / "p.json"
    write_batch_plan(path, np.array([2, 0, 1]), {"num_segments": 3, "tokens_per_sample": 8})
    ids, meta = load_batch_plan(path)
    assert ids.tolist() == [2, 0, 1] and meta["path"] == str(path)
    path.write_text(json.dumps({"format": "trime-batch-plan", "version": 1, "ids": [0, 0, 1], "meta": {"num_segments": 3}}))
    with pytest.raises(TrimeError, match="not a permutation"):
        load_batch_plan(path)
    path.write_text(json.dumps([0, 1, 2]))  # the original's bare id list
    with pytest.raises(TrimeError, match=f"batch plan {path} is not a trime-batch-plan"):
        load_batch_plan(path)


def test_killed_shard_resumes_byte_identical(tmp_path):
    segments, _ = planted_topic_segments(per_topic=30)
    config = search_config({"dict_sha256": "x"}, 120, len(segments), "scipy", BM25Params(), 7, 2)
    kwargs = {"chunk_size": 25, "block_size": 10, "show_progress": False}
    full = run_shard_search(segments, config, tmp_path / "a", 1, **kwargs)
    assert run_shard_search(segments, config, tmp_path / "b", 1, max_chunks=2, **kwargs) is None  # "killed"
    assert len(list((tmp_path / "b").glob("*.chunk*.npy"))) == 2
    with pytest.raises(TrimeError, match=r"shard 0 of 2 is missing .*--shard-id 0"):
        merge_shard_results(tmp_path / "b", config)
    run_shard_search(segments, config, tmp_path / "b", 0, **kwargs)
    with pytest.raises(TrimeError, match=r"shard 1 of 2 .* is incomplete \(2 of 5 chunks done\)"):
        merge_shard_results(tmp_path / "b", config)
    resumed = run_shard_search(segments, config, tmp_path / "b", 1, **kwargs)
    assert resumed.read_bytes() == full.read_bytes()
    assert not list((tmp_path / "b").glob("*.chunk*")) and not list((tmp_path / "b").glob("*progress*"))
    merged = merge_shard_results(tmp_path / "b", config)
    assert np.array_equal(merged, search_all(segments, BM25Params(), k=7, block_size=10)[0])
    with pytest.raises(TrimeError, match="other settings .*k"):
        run_shard_search(segments, {**config, "k": 5}, tmp_path / "b", 0, **kwargs)


def test_cli_shards_then_merge_equals_one_go(wt2_sample_bin, wt2_plan, tmp_path):
    work = tmp_path / "work"
    out = tmp_path / "sharded.json"
    common = [str(wt2_sample_bin), "--tokens-per-sample", str(TPS), "--no-progress-bar"]
    with pytest.raises(TrimeError, match="shard 0 of 2 is missing"):
        main(common + ["--num-shards", "2", "--work-dir", str(work), "--output", str(out)])
    for shard in (1, 0):
        assert main(common + ["--num-shards", "2", "--shard-id", str(shard), "--work-dir", str(work), "--chunk-size", "300"]) == 0
    assert main(common + ["--num-shards", "2", "--work-dir", str(work), "--output", str(out)]) == 0
    sharded_ids, sharded_meta = load_batch_plan(out)
    one_go_ids, one_go_meta = load_batch_plan(wt2_plan)
    assert np.array_equal(sharded_ids, one_go_ids)
    assert {**sharded_meta, "path": ""} == {**one_go_meta, "path": ""}
    with pytest.raises(TrimeError, match="other settings"):
        main(common + ["--num-shards", "2", "--work-dir", str(work), "--output", str(out), "--lucene"])


def test_cli_bad_input(wt2_sample_bin, tmp_path):
    out = str(tmp_path / "p.json")
    with pytest.raises(TrimeError, match="does not exist"):
        main([str(tmp_path / "nope"), "--tokens-per-sample", "8", "--output", out])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "dict.txt").write_text("a 1\n")
    with pytest.raises(TrimeError, match="no train split"):
        main([str(tmp_path / "empty"), "--tokens-per-sample", "8", "--output", out])
    with pytest.raises(TrimeError, match="leaves 1 training segment"):
        main([str(wt2_sample_bin), "--tokens-per-sample", "10000000", "--output", out])
    with pytest.raises(TrimeError, match="do not combine"):
        main([str(wt2_sample_bin), "--tokens-per-sample", "8", "--output", out, "--lucene", "--k1", "2"])
    with pytest.raises(TrimeError, match="--shard-id needs --work-dir"):
        main([str(wt2_sample_bin), "--tokens-per-sample", "8", "--num-shards", "2", "--shard-id", "0"])
    proc = subprocess.run(
        [sys.executable, "-m", "trime.retrieval.bm25_batches", str(tmp_path / "nope"), "--tokens-per-sample", "8", "--output", out],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("trime: error: data directory")
