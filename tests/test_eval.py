"""trime-eval: parity with fairseq-eval-lm, memory semantics, external memory vs brute force, CLI errors.

Tiny checkpoints are trained once per session with the real ``fairseq-train`` (2 layers x
32 dims): a cross-entropy model with a full softmax and a TrimeLM (``trime_loss``) with
an adaptive softmax. The brute-force reference rebuilds the windows from the raw token
stream, takes keys from a hook on ``final_layer_norm`` (not the fc1 hook trime uses) and
sums probabilities with explicit python loops over the vocabulary and memory entries.
"""

import math
import re

import numpy as np
import pytest
import torch

from tests.eval_helpers import CONTEXT, TPS, Reference, assert_one_line_error, run_cli, tiny_checkpoints
from trime.errors import TrimeError


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, wt2_sample_bin):
    return tiny_checkpoints(tmp_path_factory, wt2_sample_bin)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per module


# ----------------------------------------------------------------------------- parity


@pytest.mark.slow  # end-to-end CLI runs
def test_memory_none_matches_fairseq_eval_lm(ckpts, wt2_sample_bin, tmp_path):
    from trime.eval.evaluate import run

    ckpt = ckpts["trime"]  # adaptive softmax: the less trivial token head
    proc = run_cli(
        "fairseq-eval-lm",
        wt2_sample_bin,
        "--path",
        ckpt,
        "--gen-subset",
        "test",
        "--context-window",
        CONTEXT,
        "--tokens-per-sample",
        TPS,
        "--cpu",
        "--num-workers",
        "0",
        "--max-tokens",
        "2048",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)", proc.stdout + proc.stderr)
    assert found, proc.stdout[-2000:]
    fairseq_loss, fairseq_ppl = map(float, found.groups())
    record = run(
        [
            str(wt2_sample_bin),
            "--path",
            str(ckpt),
            "--gen-subset",
            "test",
            "--context-window",
            str(CONTEXT),
            "--memory",
            "none",
            "--cpu",
            "--no-progress-bar",
            "--results-json",
            str(tmp_path / "r.json"),
        ]
    )
    ours = record["results"][-1]
    assert ours["tokens"] == 20142  # every token of the split is scored
    assert abs(ours["loss_base2"] - fairseq_loss) <= 1e-3 * fairseq_loss
    assert abs(ours["ppl"] - fairseq_ppl) <= 1e-3 * fairseq_ppl
    saved = (tmp_path / "r.json").read_text()
    assert '"sha256"' in saved and '"tokens_per_s"' in saved


# ----------------------------------------------------------------------------- brute force


@pytest.fixture(scope="module")
def flat_store(ckpts, wt2_sample_bin, tmp_path_factory):
    """Exact (Flat, inner product) datastores over the valid split, one per model."""
    from trime.adapters import load_adapter
    from trime.retrieval.build_datastore import build_index, extract

    out = {}
    for name in ("ce", "trime"):
        lm = load_adapter(ckpts[name], wt2_sample_bin, cpu=True)
        settings = lm.window_settings(CONTEXT, None)
        d = tmp_path_factory.mktemp(f"flat_{name}")
        extract(lm, "valid", settings, 64, d, key_dtype="fp32", show_progress=False)
        build_index(d, factory="Flat", metric="ip", show_progress=False)
        out[name] = d
    return out


@pytest.mark.parametrize("name,mem_size,search", [("ce", 20, "faiss"), ("trime", 80, "faiss"), ("trime", 80, "torch")])
def test_external_memory_matches_brute_force(ckpts, wt2_sample_bin, flat_store, name, mem_size, search):
    from trime.adapters import load_adapter
    from trime.eval.engine import Evaluator
    from trime.eval.memory import MemorySettings
    from trime.retrieval.datastore import Datastore

    lm = load_adapter(ckpts[name], wt2_sample_bin, cpu=True)
    windows = lm.window_settings(CONTEXT, None)
    # search "torch" (--knn-search torch): exact search over keys.npy without the FAISS index
    store = Datastore.open(flat_store[name], dim=lm.dim, dict_sha256=lm.dict_sha256, search=search, device=lm.device)
    assert (store.index is None) == (search == "torch")
    k, temp, lmbda, interp_temp = 16, 1.3, 0.3, 2.5
    evaluator = Evaluator(lm, windows, batch_size=2, store=store, k=k, progress=False)
    cached = evaluator.collect("test", max_batches=3)  # 6 windows: FIFO carried inside and across batches
    settings = MemorySettings(
        level="external",
        softmax_temp=temp,
        mem_size=mem_size,
        knn_in_joint=True,
        lmbda=lmbda,
        interp_temp=interp_temp,
        k=k,
    )
    ours = cached.log_probs(settings).tolist()

    ref = Reference(lm, "test", CONTEXT, mem_size)
    ext = (np.asarray(store.keys, dtype=np.float64), store.vals, k)
    expected = ref.log_probs(range(6), temp, ext=ext, lmbda=lmbda, interp_temp=interp_temp)
    assert len(ours) == len(expected) == 6 * (TPS - CONTEXT)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-4)

    # the same reference without the datastore is --memory long; without the FIFO, --memory local
    ref_long = Reference(lm, "test", CONTEXT, mem_size).log_probs(range(6), temp)
    long_ours = cached.log_probs(settings.with_(level="long", knn_in_joint=False, lmbda=0.0)).tolist()
    np.testing.assert_allclose(long_ours, ref_long, rtol=0, atol=2e-4)
    ref_local = Reference(lm, "test", CONTEXT, 0).log_probs(range(6), temp)
    local_ours = cached.log_probs(MemorySettings(level="local", softmax_temp=temp)).tolist()
    np.testing.assert_allclose(local_ours, ref_local, rtol=0, atol=2e-4)


def test_external_temperature_scales_only_the_datastore_neighbours(ckpts, wt2_sample_bin, flat_store):
    from trime.adapters import load_adapter
    from trime.eval.engine import Evaluator
    from trime.eval.memory import MemorySettings
    from trime.retrieval.datastore import Datastore

    lm = load_adapter(ckpts["trime"], wt2_sample_bin, cpu=True)
    store = Datastore.open(flat_store["trime"], dim=lm.dim, dict_sha256=lm.dict_sha256)
    evaluator = Evaluator(lm, lm.window_settings(CONTEXT, None), batch_size=2, store=store, k=16, progress=False)
    cached = evaluator.collect("test", max_batches=2)
    settings = MemorySettings(level="external", softmax_temp=1.3, mem_size=40, knn_in_joint=True, k=16,
                              external_temp=3.5)
    ours = cached.log_probs(settings).tolist()
    ref = Reference(lm, "test", CONTEXT, 40)
    ext = (np.asarray(store.keys, dtype=np.float64), store.vals, 16)
    np.testing.assert_allclose(ours, ref.log_probs(range(4), 1.3, ext=ext, ext_temp=3.5), rtol=0, atol=2e-4)
    tied = cached.log_probs(settings.with_(external_temp=None)).tolist()  # reuses the local + long terms
    np.testing.assert_allclose(tied, ref.log_probs(range(4), 1.3, ext=ext), rtol=0, atol=2e-4)
    assert max(abs(a - b) for a, b in zip(ours, tied)) > 1e-2  # the knob is not a no-op
    assert len(cached._context_memo) == 1


@pytest.mark.slow  # end-to-end CLI runs
def test_tune_external_temperature_and_fixed_lambda(ckpts, wt2_sample_bin, flat_store, tmp_path):
    """--tune tunes --external-temp after --softmax-temp (recorded in --results-json); a given --lmbda stays."""
    import json

    from trime.eval.evaluate import run

    ext = ["--memory", "external", "--mem-size", "40", "--datastore", flat_store["trime"], "--k", "16", "--tune",
           "--tune-subset", "test", "--tune-tokens", "600"]  # the store holds valid: tune elsewhere
    out = tmp_path / "r.json"
    record = run(_eval_args(wt2_sample_bin, ckpts["trime"], *ext, "--results-json", out))
    trials = record["tuning"]["trials"]
    best = min(trials, key=lambda t: t["nll"])
    chosen = json.loads(out.read_text())["tuning"]["chosen"]
    assert chosen["external_temp"] == record["settings"]["external_temp"] == (
        best["external_temp"] if best["external_temp"] is not None else best["softmax_temp"]
    )
    assert any(t["external_temp"] is not None for t in trials)  # the second coordinate was searched
    tied = min((t for t in trials if t["external_temp"] is None), key=lambda t: t["nll"])
    assert best["nll"] <= tied["nll"]
    assert record["settings"]["lmbda"] > 0  # tuned
    joint_only = run(_eval_args(wt2_sample_bin, ckpts["trime"], *ext, "--lmbda", "0", "--external-temp", "2"))
    assert joint_only["settings"]["lmbda"] == 0 and joint_only["settings"]["external_temp"] == 2
    assert {t["lmbda"] for t in joint_only["tuning"]["trials"]} == {0.0}
    assert {t["external_temp"] for t in joint_only["tuning"]["trials"]} == {2.0}


def test_knnlm_interpolation_only(ckpts, wt2_sample_bin, flat_store):
    """--knnlm: the datastore is used by interpolation only; P_model is the plain LM."""
    from trime.adapters import load_adapter
    from trime.eval.engine import Evaluator
    from trime.eval.memory import MemorySettings
    from trime.retrieval.datastore import Datastore

    lm = load_adapter(ckpts["ce"], wt2_sample_bin, cpu=True)
    store = Datastore.open(flat_store["ce"], dim=lm.dim, dict_sha256=lm.dict_sha256)
    evaluator = Evaluator(lm, lm.window_settings(CONTEXT, None), batch_size=2, store=store, k=8, progress=False)
    cached = evaluator.collect("test", max_batches=1)
    ours = cached.log_probs(MemorySettings(level="none", lmbda=0.25, interp_temp=3.0, k=8)).tolist()
    ref = Reference(lm, "test", CONTEXT, 0)
    # Reference with no in-context memory: local entries are dropped by a context of 0 and FIFO 0,
    # so compare against the plain-LM mixture computed directly
    plain = cached.log_probs(MemorySettings(level="none")).tolist()
    ext_keys = np.asarray(store.keys, dtype=np.float64)
    expected = []
    for w in range(2):
        keys, _, lo = ref.run(w)
        _, _, ctx = ref.window(w)
        for t in range(ctx, keys.shape[0]):
            y = int(ref.tgt[lo + t])
            sims = ext_keys @ keys[t].double().numpy()
            top = np.argsort(-sims)[:8]
            den = math.fsum(math.exp(sims[i] / 3.0) for i in top)
            num = math.fsum(math.exp(sims[i] / 3.0) for i in top if store.vals[i] == y)
            expected.append(math.log(0.75 * math.exp(plain[len(expected)]) + 0.25 * num / den))
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------- semantics


def test_long_memory_fifo_contents_order_truncation_reset():
    from trime.eval.memory import MemorySettings, ScoreState, score_batch

    settings = MemorySettings(level="long", mem_size=5)
    state = ScoreState.fresh(settings)
    b1 = _synthetic_batch([0, 1], [0, 3], length=4, seed=3)  # 4 + 1 scored tokens
    score_batch(b1, settings, state)
    assert state.long.positions.tolist() == [0, 1, 2, 3, 4]
    assert state.long.labels.tolist() == b1.targets.tolist()
    assert torch.equal(state.long.keys, b1.queries)
    b2 = _synthetic_batch([2], [1], length=4, seed=4)  # 3 more: the oldest 3 fall out
    score_batch(b2, settings, state)
    assert state.long.positions.tolist() == [3, 4, 5, 6, 7]
    assert state.long.labels.tolist() == torch.cat([b1.targets, b2.targets])[-5:].tolist()
    assert torch.equal(state.long.keys, torch.cat([b1.queries, b2.queries])[-5:])
    b3 = _synthetic_batch([9], [0], length=3, seed=5)  # id jump: the FIFO restarts
    score_batch(b3, settings, state)
    assert state.long.resets == 1
    assert state.long.positions.tolist() == [8, 9, 10]
    assert state.long.labels.tolist() == b3.targets.tolist()

    # a jump inside a batch: windows after it see nothing from before it
    state = ScoreState.fresh(settings)
    batch = _synthetic_batch([3, 4, 10, 11], [0, 0, 0, 0], length=3, seed=6)
    lp = score_batch(batch, settings, state)
    tail = _synthetic_batch([10, 11], [0, 0], length=3, seed=6)
    tail = _replace(
        tail,
        reps=batch.reps[2:],
        key_labels=batch.key_labels[2:],
        targets=batch.targets[6:],
        token_score=batch.token_score[6:],
        token_logz=batch.token_logz[6:],
    )
    fresh_state = ScoreState.fresh(settings)
    torch.testing.assert_close(lp[6:], score_batch(tail, settings, fresh_state))
    assert state.long.labels.tolist() == batch.targets[-5:].tolist() and state.long.resets == 1
    assert len(fresh_state.long) == 5


def _synthetic_batch(ids, starts, length=6, dim=4, vocab=5, seed=0, key_valid=None):
    from trime.adapters import WindowBatch

    g = torch.Generator().manual_seed(seed)
    bsz = len(ids)
    reps = torch.randn(bsz, length, dim, generator=g)
    labels = torch.randint(0, vocab, (bsz, length), generator=g)
    pos = torch.arange(length)[None, :]
    scored = pos >= torch.tensor(starts)[:, None]
    targets = labels[scored]
    logits = torch.randn(int(scored.sum()), vocab, generator=g)
    return WindowBatch(
        ids=list(ids),
        reps=reps,
        key_labels=labels,
        key_valid=torch.ones(bsz, length, dtype=torch.bool) if key_valid is None else key_valid,
        scored=scored,
        starts=list(starts),
        targets=targets,
        token_score=logits.gather(1, targets[:, None])[:, 0],
        token_logz=torch.logsumexp(logits, 1),
    )


def test_long_memory_resets_on_non_consecutive_ids_and_skips_cached_context():
    from trime.eval.memory import MemorySettings, ScoreState, score_batch

    settings = MemorySettings(level="long", mem_size=100)
    first = _synthetic_batch([0, 1], [0, 2], seed=1)
    # window 1's 2 context tokens are the last 2 scored tokens of window 0, also in the FIFO:
    # with the FIFO they count once, so scoring equals a batch whose context is invisible
    state = ScoreState.fresh(settings)
    lp = score_batch(first, settings, state)
    hidden = first.key_valid.clone()
    hidden[1, :2] = False
    state_b = ScoreState.fresh(settings)
    lp_hidden = score_batch(_replace(first, key_valid=hidden), settings, state_b)
    torch.testing.assert_close(lp, lp_hidden)
    assert len(state.long) == 6 + 4

    # consecutive next batch sees the FIFO; a jump in ids resets it (same as a fresh state)
    nxt = _synthetic_batch([2], [0], seed=2)
    with_mem = score_batch(nxt, settings, state)
    jump = _synthetic_batch([7], [0], seed=2)
    after_jump = score_batch(jump, settings, state)
    fresh = score_batch(jump, settings, ScoreState.fresh(settings))
    assert not torch.allclose(with_mem, fresh)
    torch.testing.assert_close(after_jump, fresh)
    assert state.long.resets == 1


def _replace(batch, **changes):
    from trime.adapters import WindowBatch

    return WindowBatch(**{**batch.__dict__, **changes})


def test_temperature_scales_memory_logits_only(ckpts, wt2_sample_bin):
    from trime.eval.memory import MemorySettings, ScoreState, score_batch

    # no visible memory: the result is the plain token distribution for every temperature
    batch = _synthetic_batch([0], [0], key_valid=torch.zeros(1, 6, dtype=torch.bool))
    plain = batch.token_score - batch.token_logz
    for temp in (0.1, 1.0, 7.0):
        settings = MemorySettings(level="long", mem_size=10, softmax_temp=temp)
        torch.testing.assert_close(score_batch(batch, settings, ScoreState.fresh(settings)), plain)
    # with memory, T changes the result but never the token terms
    batch = _synthetic_batch([0], [2])
    before = (batch.token_score.clone(), batch.token_logz.clone())
    a = score_batch(batch, MemorySettings(level="local", softmax_temp=0.5), ScoreState())
    b = score_batch(batch, MemorySettings(level="local", softmax_temp=2.0), ScoreState())
    assert not torch.allclose(a, b)
    torch.testing.assert_close((batch.token_score, batch.token_logz), before)

    # on a real model: the first window's first token has no memory, so T does not matter
    from trime.adapters import load_adapter
    from trime.eval.engine import Evaluator

    lm = load_adapter(ckpts["trime"], wt2_sample_bin, cpu=True)
    cached = Evaluator(lm, lm.window_settings(CONTEXT, None), batch_size=1, progress=False).collect(
        "valid", max_batches=1
    )
    none = cached.log_probs(MemorySettings(level="none"))
    hot = cached.log_probs(MemorySettings(level="local", softmax_temp=5.0))
    cold = cached.log_probs(MemorySettings(level="local", softmax_temp=0.2))
    assert hot[0] == cold[0] == none[0]
    assert not torch.allclose(hot[1:], cold[1:])


@pytest.mark.slow  # a full sweep and its plot
def test_tune_finds_the_grid_optimum_and_sweep_writes_plot(ckpts, wt2_sample_bin, tmp_path):
    from trime.eval.evaluate import run

    out = tmp_path / "tuned.json"
    prefix = tmp_path / "sweep"
    record = run(
        [
            str(wt2_sample_bin),
            "--path",
            str(ckpts["trime"]),
            "--memory",
            "long",
            "--mem-size",
            "64",
            "--context-window",
            str(CONTEXT),
            "--tune",
            "--sweep",
            "softmax-temp=0.5,1,2",
            "--sweep-prefix",
            str(prefix),
            "--cpu",
            "--no-progress-bar",
            "--results-json",
            str(out),
        ]
    )
    trials = record["tuning"]["trials"]
    best = min(trials, key=lambda t: t["nll"])
    assert record["settings"]["softmax_temp"] == best["softmax_temp"]
    assert [r["subset"] for r in record["results"]] == ["valid", "test"]
    assert prefix.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert len(record["sweep"]["points"]) == 3


def _eval_args(data, ckpt, *extra):
    return [str(data), "--path", str(ckpt), "--context-window", str(CONTEXT), "--cpu", "--no-progress-bar",
            *map(str, extra)]


@pytest.mark.slow  # end-to-end CLI runs
def test_cache_dir_reuses_forward_passes_and_hits_with_the_same_results(
    ckpts, wt2_sample_bin, flat_store, tmp_path, monkeypatch
):
    """--cache-dir: the same numbers as without it; later runs of any level forward and search nothing."""
    from trime.adapters.fairseq_lm import FairseqLM
    from trime.eval.evaluate import run

    ext = ["--memory", "external", "--mem-size", "80", "--datastore", flat_store["trime"], "--softmax-temp", "1.3",
           "--lmbda", "0.3", "--interp-temp", "2.5"]
    long_tuned = ["--memory", "long", "--mem-size", "80", "--tune", "--tune-tokens", "500"]
    cache = tmp_path / "cache"
    plain = run(_eval_args(wt2_sample_bin, ckpts["trime"], *ext, "--k", "16"))
    first = run(_eval_args(wt2_sample_bin, ckpts["trime"], *ext, "--k", "16", "--cache-dir", cache))
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["forward", "knn"]  # the test split
    (a,), (b,) = plain["results"], first["results"]
    assert a["tokens"] == b["tokens"] == 20142
    assert abs(a["loss_base2"] - b["loss_base2"]) <= 1e-6 * a["loss_base2"]
    long_first = run(_eval_args(wt2_sample_bin, ckpts["trime"], *long_tuned, "--cache-dir", cache))
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["forward", "forward", "knn"]  # + valid prefix

    def no_forward(*args, **kwargs):
        raise AssertionError("forward pass despite a cached one")

    monkeypatch.setattr(FairseqLM, "forward", no_forward)

    def metrics(record):
        return [(r["subset"], r["tokens"], r["loss_base2"]) for r in record["results"]]

    assert metrics(run(_eval_args(wt2_sample_bin, ckpts["trime"], *ext, "--k", "16", "--cache-dir", cache))) == (
        metrics(first)
    )
    again = run(_eval_args(wt2_sample_bin, ckpts["trime"], *long_tuned, "--cache-dir", cache))
    assert metrics(again) == metrics(long_first) and again["tuning"]["trials"] == long_first["tuning"]["trials"]
    run(_eval_args(wt2_sample_bin, ckpts["trime"], *ext, "--k", "8", "--cache-dir", cache))  # another k: a search
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["forward", "forward", "knn", "knn"]
    with pytest.raises(AssertionError, match="forward pass"):  # another checkpoint misses the cache
        run(_eval_args(wt2_sample_bin, ckpts["ce"], "--memory", "local", "--cache-dir", cache))


def test_tune_tokens_tunes_on_a_prefix_of_the_tune_subset(ckpts, wt2_sample_bin):
    from trime.adapters import load_adapter
    from trime.eval.engine import Evaluator
    from trime.eval.evaluate import run
    from trime.eval.memory import MemorySettings

    record = run(_eval_args(wt2_sample_bin, ckpts["trime"], "--memory", "long", "--mem-size", "64", "--tune",
                             "--tune-tokens", "1000", "--batch-size", "4"))
    tokens = record["tuning"]["tokens"]
    per_batch = 4 * (TPS - CONTEXT)  # full windows of the sample's valid split
    assert 1000 <= tokens < 1000 + per_batch and record["results"][0]["tokens"] == tokens
    # the prefix is scored exactly as the head of the whole split (the FIFO sees the same stream)
    lm = load_adapter(ckpts["trime"], wt2_sample_bin, cpu=True)
    evaluator = Evaluator(lm, lm.window_settings(CONTEXT, None), batch_size=4, progress=False)
    settings = MemorySettings(level="long", mem_size=64, softmax_temp=1.3)
    head = evaluator.collect("valid", evaluator.batches_for_tokens("valid", 1000)).log_probs(settings)
    whole = evaluator.collect("valid").log_probs(settings)
    assert head.numel() == tokens < whole.numel()
    torch.testing.assert_close(head, whole[:tokens], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- errors


@pytest.mark.slow  # end-to-end CLI runs
def test_cli_external_without_datastore_and_unknown_level(wt2_sample_bin):
    proc = run_cli("trime-eval", wt2_sample_bin, "--path", "x.pt", "--memory", "external", "--mem-size", "8")
    assert_one_line_error(proc, "--datastore")
    proc = run_cli("trime-eval", wt2_sample_bin, "--path", "x.pt", "--memory", "huge")
    assert_one_line_error(proc, "--memory")


def test_library_errors_are_one_line(ckpts, wt2_sample_bin, tmp_path):
    from trime.eval.evaluate import run

    cases = [
        (["--memory", "long"], "--mem-size"),
        (["--knnlm"], "--datastore"),
        (["--memory", "local", "--datastore", str(tmp_path)], "--datastore is only used"),
        (["--context-window", str(TPS)], "--context-window"),
        (["--gen-subset", "nosuch"], "nosuch"),
    ]
    for extra, needle in cases:
        with pytest.raises(TrimeError) as err:
            run([str(wt2_sample_bin), "--path", str(ckpts["ce"]), "--cpu", "--no-progress-bar", *extra])
        assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(TrimeError) as err:
        run([str(tmp_path), "--path", str(ckpts["ce"])])
    assert "dict.txt" in str(err.value)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(TrimeError) as err:
        run([str(wt2_sample_bin), "--path", str(bad)])
    assert "could not be read" in str(err.value)


def test_grid_refinement_finds_the_optimum_in_few_rounds():
    """Rounds of candidates scored together: the optimum to TEMP_TOLERANCE (in log T) in 1 + 3 rounds from
    the default grid, and the grid is extended when the optimum lies beyond it."""
    import math

    from trime.eval.tuning import TEMP_GRID, TEMP_TOLERANCE, _grid_then_refine

    for optimum, rounds in ((1.7, 4), (40.0, 3 + 4)):
        calls = []

        def objective(xs, optimum=optimum, calls=calls):
            calls.append(list(xs))
            return [(x - math.log(optimum)) ** 2 for x in xs]

        _grid_then_refine(objective, TEMP_GRID)
        tried = [x for c in calls for x in c]
        assert abs(min(tried, key=lambda x: abs(x - math.log(optimum))) - math.log(optimum)) < TEMP_TOLERANCE / 2
        assert len(calls) == rounds and len(tried) > 2 * len(calls)


def test_tuning_scores_each_round_in_one_pass_with_single_pass_results(ckpts, wt2_sample_bin, monkeypatch):
    """The context terms of a round's temperatures come from one pass over the batches, and equal what a
    single-temperature scoring gives (the tuned record's best trial is reproduced by a fresh run)."""
    import trime.eval.tuning as tuning
    from trime.adapters import load_adapter
    from trime.eval.engine import Evaluator
    from trime.eval.memory import MemorySettings

    lm = load_adapter(ckpts["trime"], wt2_sample_bin, cpu=True)
    evaluator = Evaluator(lm, lm.window_settings(CONTEXT, None), batch_size=8, progress=False)
    run = evaluator.collect("valid", evaluator.batches_for_tokens("valid", 2000))
    passes = []
    multi = tuning.context_memory_terms_at_temps

    def counting(batch, settings, temps, state, dim=None):
        passes.append(len(temps))
        return multi(batch, settings, temps, state, dim)

    monkeypatch.setattr(tuning, "context_memory_terms_at_temps", counting)
    base = MemorySettings(level="long", mem_size=64)
    result = tuning.tune(run, base, tune_temp=True, tune_interp=False, log=lambda line: None)
    assert len(result.trials) >= 3 * len(passes) / len(run.batches)  # several temperatures per pass
    best = min(result.trials, key=lambda t: t["nll"])
    assert result.settings.softmax_temp == best["softmax_temp"]
    fresh = evaluator.collect("valid", evaluator.batches_for_tokens("valid", 2000))
    nll = tuning.mean_nll(fresh.log_probs(base.with_(softmax_temp=best["softmax_temp"])))
    assert abs(nll - best["nll"]) < 1e-5 * best["nll"]


def test_golden_section_and_interpolation_search():
    from trime.eval.tuning import best_interpolation, golden_section

    x, fx = golden_section(lambda v: (v - 0.37) ** 2, 0.0, 1.0, tol=1e-4)
    assert abs(x - 0.37) < 1e-3 and fx < 1e-6
    # a kNN distribution that is right where the model is wrong: the best mixture is inside (0, 1)
    joint = torch.log(torch.tensor([0.9, 0.9, 0.01, 0.01]))
    knn = {1.0: torch.log(torch.tensor([0.01, 0.01, 0.9, 0.9])), 2.0: torch.log(torch.tensor([0.001] * 4))}
    nll, lam, temp = best_interpolation(joint, knn)
    assert temp == 1.0 and abs(lam - 0.5) < 0.01
    assert nll < float(-joint.mean())


def test_byte_level_data_reports_bits_per_character(ckpts, wt2_sample_bin, tmp_path, capsys):
    import json
    import shutil

    from trime.eval.evaluate import run

    data = tmp_path / "bytes-bin"
    shutil.copytree(wt2_sample_bin, data)
    meta = json.loads((data / "trime_meta.json").read_text())
    meta["level"] = "byte"
    (data / "trime_meta.json").write_text(json.dumps(meta))
    record = run(
        [
            str(data),
            "--path",
            str(ckpts["ce"]),
            "--gen-subset",
            "test",
            "--context-window",
            str(CONTEXT),
            "--cpu",
            "--no-progress-bar",
        ]
    )
    row = record["results"][-1]
    assert "bpc" in row and "ppl" not in row and row["bpc"] == row["loss_base2"]
    out = capsys.readouterr().out
    assert "| subset | memory | bpc | tokens | tokens/s |" in out


def test_dictionary_mismatch_is_refused(ckpts, wt2_sample_bin, tmp_path):
    import shutil

    from trime.eval.evaluate import run

    data = tmp_path / "other-dict"
    shutil.copytree(wt2_sample_bin, data)
    lines = (data / "dict.txt").read_text().splitlines()
    lines[5], lines[6] = lines[6], lines[5]  # same size, different ids
    (data / "dict.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(TrimeError) as err:
        run([str(data), "--path", str(ckpts["ce"]), "--cpu"])
    assert "differs from the dictionary the checkpoint was trained with" in str(err.value)
    assert "--srcdict" in str(err.value)
