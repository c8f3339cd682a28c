"""trime-eval's continuous cache (``--cache interp``), the datastore's metric, window defaults, tuning notes,
``--cache-dir`` timings and progress lines without a bar.

The cache is checked against an independent float64 reference: windows rebuilt from the raw token
stream, keys from a hook on ``final_layer_norm`` (trime hooks fc1's input), and python sums over every
cached entry and every neighbour of an exact L2 search written with numpy. Tuning is checked on text
that repeats (where a cache must help) and on synthetic memories that can only hurt.
"""

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tests.hf_helpers as H
from tests.eval_helpers import CONTEXT, TPS, Reference, tiny_checkpoints
from trime.errors import TrimeError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per module


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, wt2_sample_bin):
    return tiny_checkpoints(tmp_path_factory, wt2_sample_bin)


@pytest.fixture(scope="module")
def l2_store(ckpts, wt2_sample_bin, tmp_path_factory) -> Path:
    """The CE model's datastore over the valid split, built by the CLI with ``--no-index --metric l2``."""
    from trime.retrieval.build_datastore import main

    out = tmp_path_factory.mktemp("l2_store")
    main([str(wt2_sample_bin), "--path", str(ckpts["ce"]), "--gen-subset", "valid", "--output", str(out),
          "--context-window", str(CONTEXT), "--key-dtype", "fp32", "--no-index", "--metric", "l2", "--cpu",
          "--no-progress-bar"])  # fmt: skip
    return out


def interp_reference(ref: Reference, windows, cache_temp: float, cache_lmbda: float, ext=None, lmbda: float = 0.0,
                     interp_temp: float = 1.0) -> list[float]:
    """log P of every scored token: (1 - lmbda - cache_lmbda) p_model + lmbda p_knn + cache_lmbda p_cache.

    p_cache(y) = sum over cached entries labelled y of softmax(q . k / cache_temp) over the entries a token
    sees (earlier window positions, minus context tokens held in the FIFO, plus the FIFO of the last
    ``ref.mem_size`` scored tokens); no entry: p_model. p_knn: the top-k of an exact L2 search of ``ext``.
    """
    out = []
    for w in windows:
        keys, feats, lo = ref.run(w)
        _, _, ctx = ref.window(w)
        start = w * ref.n
        fifo = set(range(max(0, start - ref.mem_size), start)) if ref.mem_size else set()
        for t in range(ctx, keys.shape[0]):
            y = int(ref.tgt[lo + t])
            q = keys[t].double()
            entries = [(float(q @ keys[j].double()), int(ref.tgt[lo + j])) for j in range(t) if lo + j not in fifo]
            entries += [(float(q @ ref.keys[p].double()), int(ref.tgt[p])) for p in sorted(fifo)]
            vocab, z = ref.vocab_terms(feats[t])
            p_model = vocab[y] / z
            p_cache = p_model
            if entries:
                top = max(s for s, _ in entries)
                den = math.fsum(math.exp((s - top) / cache_temp) for s, _ in entries)
                p_cache = math.fsum(math.exp((s - top) / cache_temp) for s, v in entries if v == y) / den
            p_knn = 0.0
            if ext is not None:
                ext_keys, ext_vals, k = ext
                sims = -((ext_keys - q.numpy()) ** 2).sum(axis=1)
                nearest = np.argsort(-sims, kind="stable")[:k]
                top = max(float(sims[i]) for i in nearest)
                den = math.fsum(math.exp((sims[i] - top) / interp_temp) for i in nearest)
                p_knn = math.fsum(math.exp((sims[i] - top) / interp_temp) for i in nearest if ext_vals[i] == y) / den
            out.append(math.log((1 - lmbda - cache_lmbda) * p_model + lmbda * p_knn + cache_lmbda * p_cache))
        for t in range(ctx, keys.shape[0]):
            ref.keys[lo + t] = keys[t]
    return out


@pytest.mark.parametrize("level,mem_size,knn", [("local", 0, False), ("long", 40, False), ("long", 40, True)])
def test_continuous_cache_matches_brute_force(ckpts, wt2_sample_bin, l2_store, level, mem_size, knn):
    from trime.adapters import load_adapter
    from trime.eval.engine import Evaluator
    from trime.eval.memory import MemorySettings
    from trime.retrieval.datastore import Datastore

    lm = load_adapter(ckpts["ce"], wt2_sample_bin, cpu=True)
    store = None
    if knn:  # no index: --knn-search torch searches the metric recorded without one (l2)
        store = Datastore.open(l2_store, dim=lm.dim, dict_sha256=lm.dict_sha256, search="torch", device=lm.device)
        assert store.metric == "l2"
    k, cache_temp, cache_lmbda, lmbda, interp_temp = 16, 3.0, 0.3, 0.2 if knn else 0.0, 40.0
    settings = MemorySettings(level=level, mem_size=mem_size, cache="interp", cache_lmbda=cache_lmbda,
                              cache_temp=cache_temp, lmbda=lmbda, interp_temp=interp_temp, k=k if knn else None)
    evaluator = Evaluator(lm, lm.window_settings(CONTEXT, None), batch_size=2, store=store, k=k, progress=False)
    cached = evaluator.collect("test", max_batches=3)  # 6 windows: the FIFO is carried inside and across batches
    ours = cached.log_probs(settings).tolist()
    ext = (np.asarray(store.keys, dtype=np.float64), store.vals, k) if knn else None
    expected = interp_reference(Reference(lm, "test", CONTEXT, mem_size), range(6), cache_temp, cache_lmbda, ext,
                                lmbda, interp_temp)
    assert len(ours) == len(expected) == 6 * (TPS - CONTEXT)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-4)
    # the joint softmax's memory does not count: without the cache the result is the plain LM (and kNN-LM)
    plain = cached.log_probs(MemorySettings(lmbda=lmbda, interp_temp=interp_temp, k=k if knn else None))
    torch.testing.assert_close(cached.log_probs(settings.with_(cache_lmbda=0.0)), plain)
    # streaming (the FIFO updated batch by batch) scores what the collected split scores
    streamed = Evaluator(lm, lm.window_settings(CONTEXT, None), batch_size=2, store=store, k=k, progress=False)
    nll, count, _, _ = streamed.run("test", settings)
    whole = evaluator.collect("test").log_probs(settings)
    assert count == whole.numel() and abs(nll + float(whole.double().sum())) <= 1e-6 * nll


def test_cache_flags_are_checked_in_one_line(ckpts, wt2_sample_bin, l2_store):
    from trime.eval.evaluate import run

    base = [str(wt2_sample_bin), "--path", str(ckpts["ce"]), "--cpu", "--no-progress-bar"]
    cases = [
        (["--cache", "interp"], "--memory long"),
        (["--memory", "long", "--mem-size", "8", "--cache-lmbda", "0.2"], "--cache interp"),
        (["--memory", "long", "--mem-size", "8", "--cache", "interp", "--knnlm", "--datastore", str(l2_store),
          "--lmbda", "0.6", "--cache-lmbda", "0.5"], "below 1"),
        (["--memory", "external", "--mem-size", "8", "--datastore", str(l2_store), "--cache", "interp"], "--knnlm"),
        (["--memory", "long", "--mem-size", "8", "--cache", "interp", "--sweep", "cache-lmbda=0.5,1.2"],
         "--sweep cache-lmbda"),
        (["--metric", "l2"], "--datastore"),
    ]
    for extra, needle in cases:
        with pytest.raises(TrimeError) as err:
            run([*base, *extra])
        assert needle in str(err.value) and "\n" not in str(err.value), (extra, str(err.value))


@pytest.mark.slow  # tuning runs of the continuous cache and of kNN-LM + cache
def test_tune_cache_alone_and_with_knnlm(ckpts, wt2_sample_bin, l2_store, tmp_path):
    """kNN-LM + cache: both weights and temperatures tuned (their sum below 1), recorded, and the reported tuning
    row is the best trial's loss."""
    from trime.eval.evaluate import run

    common = [str(wt2_sample_bin), "--path", str(ckpts["ce"]), "--context-window", str(CONTEXT), "--cpu",
              "--no-progress-bar", "--memory", "long", "--mem-size", "64", "--cache", "interp", "--tune",
              "--tune-subset", "test", "--tune-tokens", "800"]  # the store holds valid: tune elsewhere
    both = run([*common, "--knnlm", "--datastore", str(l2_store), "--knn-search", "torch", "--k", "16",
                "--results-json", str(tmp_path / "r.json")])
    chosen = both["tuning"]["chosen"]
    assert 0 <= chosen["lmbda"] and 0 <= chosen["cache_lmbda"] and chosen["lmbda"] + chosen["cache_lmbda"] < 1
    assert chosen["cache_temp"] > 0 and chosen["interp_temp"] > 0
    best = min(both["tuning"]["trials"], key=lambda t: t["nll"])
    assert abs(both["results"][0]["loss_base2"] * math.log(2) - best["nll"]) < 1e-5 * best["nll"]
    assert both["settings"]["cache"] == "interp" and both["settings"]["metric"] == "l2"
    assert both["results"][-1]["memory"] == "long/interp+knnlm"
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["settings"]["cache_lmbda"] == chosen["cache_lmbda"]
    cache_only = run(common)
    knn_free = min(t["nll"] for t in cache_only["tuning"]["trials"])
    assert best["nll"] <= knn_free + 1e-4  # adding kNN-LM never makes the tuned mixture worse (lmbda 0 is tried)


# ----------------------------------------------------------------------------- tuning on repeated text


@pytest.fixture(scope="module")
def repeated_text(tmp_path_factory) -> Path:
    """DATA whose valid and test splits repeat one paragraph each: what a cache must exploit."""
    out = tmp_path_factory.mktemp("repeated")
    for split, source, offset in (("train", H.SAMPLE_TRAIN, 0), ("valid", H.SAMPLE_VALID, 2000),
                                  ("test", H.SAMPLE_TEST, 2000)):
        text = source.read_text(encoding="utf-8")[offset : offset + 500]
        (out / f"{split}.txt").write_text(text[: text.rfind(" ")] + "\n" if split == "train" else text * 6,
                                          encoding="utf-8")
    return out


def run_eval(*argv):
    from trime.eval.evaluate import run

    return run([str(a) for a in argv] + ["--cpu", "--no-progress-bar"])


def test_tune_picks_a_strong_cache_on_repeated_text(repeated_text, capsys):
    window = ["--tokens-per-sample", 64, "--context-window", 32]
    model = H.model_dir("llama")
    none = run_eval(repeated_text, "--path", model, "--memory", "none", *window)["results"][-1]
    record = run_eval(repeated_text, "--path", model, "--memory", "long", "--mem-size", 512, "--cache", "interp",
                      "--tune", *window)  # fmt: skip
    tuning, test = record["tuning"], record["results"][-1]
    assert tuning["chosen"]["cache_lmbda"] > 0.5 and tuning["verdict"] == "helps"
    assert test["ppl"] < 0.25 * none["ppl"]  # a random model's perplexity, and the text it has already seen
    best = min(tuning["trials"], key=lambda t: t["nll"])
    assert tuning["chosen"]["cache_temp"] == best["cache_temp"]
    assert tuning["no_memory_nll"] > best["nll"] + 1.0
    assert "hurts" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- tuning notes and a flat curve


def one_window(dim: int = 4, context: int = 4, scored: int = 16, vocab: int = 50):
    """A window whose memory can only hurt: every key is the same vector and no memory label is a target.

    The model gives each target probability ~0.5 (logit 4 against 49 zeros).
    """
    from trime.adapters import WindowBatch

    length = context + scored
    labels = torch.cat([torch.arange(30, 30 + context), torch.arange(1, 1 + scored)])  # scored tokens: distinct
    targets = labels[context:]
    logits = torch.zeros(scored, vocab)
    logits[torch.arange(scored), targets] = 4.0
    return WindowBatch(
        ids=[0], reps=torch.ones(1, length, dim), key_labels=labels[None], key_valid=torch.ones(1, length, dtype=torch.bool),
        scored=(torch.arange(length) >= context)[None], starts=[context], targets=targets,
        token_score=logits.gather(1, targets[:, None])[:, 0], token_logz=torch.logsumexp(logits, 1),
    )  # fmt: skip


def test_a_memory_that_hurts_is_reported_and_the_cache_switched_off():
    from trime.eval.memory import MemorySettings
    from trime.eval.tuning import CachedRun, tune

    run = CachedRun([one_window()], [None], torch.device("cpu"), dim=4)
    lines: list[str] = []
    joint = tune(run, MemorySettings(level="local"), tune_temp=True, tune_interp=False, log=lines.append)
    assert joint.verdict == "hurts" and joint.nll > joint.no_memory_nll
    assert any("the memory hurts" in line and "--cache interp can" in line for line in lines)
    assert not any("barely" in line for line in lines)
    # every entry adds mass to a wrong token: the hotter the less, up to the search's limit
    assert joint.settings.softmax_temp == max(t["softmax_temp"] for t in joint.trials) == 1024
    lines.clear()
    interp = tune(run, MemorySettings(level="local", cache="interp"), tune_temp=False, tune_interp=False,
                  tune_cache=True, log=lines.append)
    assert interp.settings.cache_lmbda == 0 and interp.verdict == "does not help"
    assert abs(interp.nll - interp.no_memory_nll) < 1e-9
    assert any("--cache-lmbda 0 chosen" in line for line in lines)
    assert len(interp.trials) <= 8  # every temperature scores the same (weight 0): the curve is flat, not refined


def test_a_flat_curve_is_not_refined_and_an_edge_optimum_widens_the_grid():
    from trime.eval.tuning import FLAT_NLL, TEMP_GRID, _grid_then_refine

    calls: list[list[float]] = []

    def flat(xs):
        calls.append(list(xs))
        return [1.0 + FLAT_NLL / 100 * x for x in xs]  # best at the low edge, but flat

    _grid_then_refine(flat, TEMP_GRID)
    assert len(calls) == 1  # the grid only: neither widened nor refined
    calls.clear()

    def steep(xs):
        calls.append(list(xs))
        return [(x - math.log(40.0)) ** 2 for x in xs]

    _grid_then_refine(steep, TEMP_GRID)
    tried = [math.exp(x) for c in calls for x in c]
    assert max(tried) >= 32 and min(tried, key=lambda t: abs(math.log(t / 40))) == pytest.approx(40, rel=0.02)


def test_best_mixture_matches_a_dense_grid():
    from trime.eval.tuning import best_mixture, mean_nll

    g = torch.Generator().manual_seed(0)
    model = torch.log(torch.rand(400, generator=g) * 0.5 + 0.01)
    knn = torch.log(torch.rand(400, generator=g))
    cache = torch.log(torch.rand(400, generator=g) ** 3)
    nll, lam, lam_c = best_mixture(model, knn, cache)
    grid = [(a / 100, b / 100) for a in range(100) for b in range(100) if a + b <= 99]

    def dense(a, b):
        return mean_nll(torch.log((1 - a - b) * model.exp() + a * knn.exp() + b * cache.exp()))

    best = min(grid, key=lambda ab: dense(*ab))
    assert nll <= dense(*best) + 1e-6 and abs(nll - dense(lam, lam_c)) < 1e-6
    fixed = best_mixture(model, knn, cache, lmbda=0.1)
    assert fixed[1] == 0.1 and fixed[0] >= nll - 1e-9
    assert best_mixture(model, None, None) == (mean_nll(model), 0.0, 0.0)


# ----------------------------------------------------------------------------- the datastore's metric


def test_no_index_l2_store_records_its_metric_and_the_torch_search_uses_it(l2_store):
    from trime.retrieval.datastore import Datastore

    meta = json.loads((l2_store / "meta.json").read_text())
    assert meta["metric"] == "l2" and meta["index"] is None
    store = Datastore.open(l2_store, search="torch")
    assert store.metric == "l2" and store.identity()["metric"] == "l2"
    keys = np.asarray(store.keys, dtype=np.float64)
    queries = keys[[3, 500, 1200]] + np.random.default_rng(0).normal(0, 0.1, (3, keys.shape[1]))
    hits = store.search(torch.tensor(queries, dtype=torch.float32), 5)
    for row, q in enumerate(queries):
        dist = ((keys - q) ** 2).sum(axis=1)
        nearest = np.argsort(dist, kind="stable")[:5]
        np.testing.assert_allclose(hits.scores[row].numpy(), -dist[nearest], rtol=0, atol=1e-4)  # fp32 expansion
        np.testing.assert_array_equal(hits.labels[row].numpy(), store.vals[nearest])
    with pytest.raises(TrimeError, match="index.faiss is missing"):
        Datastore.open(l2_store)  # faiss needs an index


def test_default_metric_is_l2_for_every_model_and_old_datastores_keep_ip(ckpts, wt2_sample_bin, l2_store, tmp_path,
                                                                      capsys):
    from trime.retrieval.build_datastore import build_index, main
    from trime.retrieval.datastore import Datastore

    out = tmp_path / "trime-ds"
    main([str(wt2_sample_bin), "--path", str(ckpts["trime"]), "--gen-subset", "valid", "--output", str(out),
          "--context-window", str(CONTEXT), "--key-dtype", "fp32", "--index-factory", "Flat", "--cpu",
          "--no-progress-bar"])  # fmt: skip
    assert "metric l2 (the default: measured better" in capsys.readouterr().out  # a TRIME model's too
    meta = json.loads((out / "meta.json").read_text())
    assert meta["metric"] == meta["index"]["metric"] == "l2"
    # a datastore from before the metric was recorded is read as ip, the old default
    old = tmp_path / "old"
    shutil.copytree(l2_store, old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["metric"]
    (old / "meta.json").write_text(json.dumps(meta))
    assert Datastore.open(old, search="torch").metric == "ip"
    # --build-index keeps the recorded metric; --metric at evaluation must match an index's
    indexed = tmp_path / "indexed"
    shutil.copytree(l2_store, indexed)
    build_index(indexed, factory="Flat", show_progress=False)
    assert json.loads((indexed / "meta.json").read_text())["index"]["metric"] == "l2"
    assert Datastore.open(indexed).metric == "l2"
    with pytest.raises(TrimeError) as err:
        Datastore.open(indexed, metric="ip")
    assert "--metric ip" in str(err.value) and "built for l2" in str(err.value) and "--knn-search torch" in str(err.value)
    assert Datastore.open(indexed, metric="ip", search="torch").metric == "ip"


def test_trime_eval_records_and_prints_the_metric(ckpts, wt2_sample_bin, l2_store, capsys):
    from trime.eval.evaluate import run

    record = run([str(wt2_sample_bin), "--path", str(ckpts["ce"]), "--context-window", str(CONTEXT), "--cpu",
                  "--no-progress-bar", "--knnlm", "--datastore", str(l2_store), "--knn-search", "torch", "--k", "8"])
    assert record["settings"]["metric"] == "l2" and record["datastore"]["metric"] == "l2"
    assert re.search(r"trime-eval: subset test, memory none\+knnlm, k 8, metric l2", capsys.readouterr().out)


# ----------------------------------------------------------------------------- windows, timings, progress


def test_window_defaults_are_cpu_sane_and_overlap(ckpts, wt2_sample_bin, tmp_path):
    from transformers import AutoTokenizer

    from trime.adapters import load_adapter
    from trime.adapters.hf_lm import HFLM

    lm = load_adapter(ckpts["ce"], wt2_sample_bin, cpu=True)
    assert lm.window_settings(None, None).as_dict() == {"tokens_per_sample": TPS, "context_window": TPS // 2,
                                                        "new_tokens_per_window": TPS // 2}  # the checkpoint's window
    assert lm.window_settings(0, None).context_window == 0  # explicit settings are kept
    model = H.build_model("llama", max_positions=8192).eval()  # SmolLM2's positions
    long = HFLM(model, AutoTokenizer.from_pretrained(H.tokenizer_dir()), tmp_path, tmp_path, torch.device("cpu"),
                torch.float32)
    windows = long.window_settings(None, None)
    assert (windows.tokens_per_sample, windows.context_window) == (1024, 512)
    assert long.window_settings(None, 256).context_window == 128
    assert windows.describe() == "windows of 1,024 tokens, 512 of them context (512 new)"


def test_cache_dir_results_say_they_were_read_and_have_no_speed(repeated_text, tmp_path, capsys):
    args = ["--path", H.model_dir("gpt2"), "--memory", "local", "--tokens-per-sample", 64, "--context-window", 16,
            "--cache-dir", tmp_path / "cache"]
    first = run_eval(repeated_text, *args)["results"][-1]
    assert first["tokens_per_s"] > 0 and "cached_seconds" not in first
    capsys.readouterr()
    again = run_eval(repeated_text, *args)["results"][-1]
    captured = capsys.readouterr()
    assert again["tokens_per_s"] is None and again["cached_seconds"] > 0 and again["ppl"] == first["ppl"]
    assert "forward passes (which took" in captured.err and "read from --cache-dir" in captured.err
    assert re.search(r"\| test \| local \| [0-9.]+ \| [0-9,]+ \| cached \|", captured.out)


def test_no_progress_bar_prints_progress_lines(repeated_text, tmp_path, monkeypatch, capsys):
    import trime.io_utils as io_utils
    from trime.retrieval.build_datastore import main

    monkeypatch.setattr(io_utils, "PROGRESS_LINE_SECONDS", 0.0)  # a line per update instead of every 30 s
    main([str(repeated_text), "--path", str(H.model_dir("gpt2")), "--gen-subset", "valid", "--output",
          str(tmp_path / "ds"), "--tokens-per-sample", "64", "--context-window", "16", "--batch-size", "4",
          "--index-factory", "Flat", "--cpu", "--no-progress-bar"])  # fmt: skip
    err = capsys.readouterr().err
    lines = re.findall(r"trime-build-datastore: datastore ds: [0-9,]+/[0-9,]+ tok \(\d+%\)", err)
    assert len(lines) >= 2 and "(100%)" in lines[-1], err
    assert re.search(r"trime-build-datastore: index add: [0-9,]+/[0-9,]+ key", err)
    run_eval(repeated_text, "--path", H.model_dir("gpt2"), "--tokens-per-sample", 64, "--context-window", 16,
             "--batch-size", 4)
    assert re.search(r"trime-eval: test: \d+/\d+ batch \(\d+%\)", capsys.readouterr().err)
