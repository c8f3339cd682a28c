"""A datastore's (key, value) pairs are exactly what trime-eval computes for the same token in the same context.

Build a datastore over a split, then evaluate that same split with exact L2 kNN, kNN-LM
interpolation at lambda = 0.999 and a sharp kNN temperature: every scored token finds its own
key (distance ~0) with its own next token as value, so P ~= 0.999 and the perplexity is
~1/0.999. Any misalignment between extraction and evaluation (keys from another position or
context, values shifted by one, tokens skipped or duplicated) breaks it. Checked on a tiny
full-softmax and a tiny adaptive-softmax fairseq model (FAISS Flat + --knn-exact, and
--knn-search torch) and a tiny Hugging Face GPT-2 dir; a negative control with the values
rolled by one position shows the check can fail.

Budget: about 25 s on 2 shared cores (the tiny fairseq checkpoints are shared with test_eval).
"""

import math
from pathlib import Path

import numpy as np
import pytest

from tests.eval_helpers import tiny_checkpoints

# conftest: one intra-op thread per module; slow: datastores built and evaluated end to end
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

CONTEXT = 32  # evaluation context, the same for the datastore build
LMBDA, SHARP_TEMP, K = 0.999, 1e-3, 8
# aligned: P = LMBDA + (1 - LMBDA) x P_model, a ppl just under 1 / LMBDA = 1.001;
# values rolled by one: ~3e6 (tiny model); a datastore built with another context window: ~480
MAX_PPL = 1.01


def build(data, model_path, split: str, out: Path, *extra, context: int = CONTEXT) -> Path:
    """trime-build-datastore (default fp16 keys) with an exact Flat L2 index."""
    from trime.retrieval.build_datastore import main

    main([str(data), "--path", str(model_path), "--output", str(out), "--gen-subset", split,
              "--context-window", str(context), "--index-factory", "Flat", "--metric", "l2", "--cpu",
              "--no-progress-bar", *extra])  # fmt: skip
    return out


def self_retrieval_eval(data, model_path, split: str, store: Path, *extra, context: int = CONTEXT) -> dict:
    """trime-eval of ``split`` against its own datastore: kNN-LM, lambda ~1, sharp exact L2."""
    from trime.eval.evaluate import run

    record = run([str(data), "--path", str(model_path), "--gen-subset", split, "--context-window", str(context),
                   "--memory", "none", "--knnlm", "--datastore", str(store), "--k", str(K), "--lmbda", str(LMBDA),
                   "--interp-temp", str(SHARP_TEMP), "--cpu", "--no-progress-bar", *extra])  # fmt: skip
    return record["results"][-1]


@pytest.fixture(scope="module")
def fairseq_ckpts(tmp_path_factory, wt2_sample_bin):
    return tiny_checkpoints(tmp_path_factory, wt2_sample_bin)


@pytest.mark.parametrize(
    "name,search",
    [("ce", ["--knn-exact"]), ("trime", ["--knn-exact"]), ("trime", ["--knn-search", "torch"])],
    ids=["full-softmax-faiss-flat", "adaptive-softmax-faiss-flat", "adaptive-softmax-torch"],
)
def test_fairseq_datastore_is_aligned_with_eval(fairseq_ckpts, wt2_sample_bin, tmp_path_factory, name, search):
    store = tmp_path_factory.getbasetemp() / f"alignment_store_{name}"
    if not (store / "index.faiss").exists():
        build(wt2_sample_bin, fairseq_ckpts[name], "valid", store)
    row = self_retrieval_eval(wt2_sample_bin, fairseq_ckpts[name], "valid", store, *search)
    assert row["tokens"] == 18345  # every token of the split, each with its own key
    assert 1.0 <= row["ppl"] < MAX_PPL, row


def test_rolled_values_fail_the_alignment_check(fairseq_ckpts, wt2_sample_bin, tmp_path_factory):
    """Negative control: the same datastore with values shifted by one position is far from ppl 1."""
    from trime.adapters import load_adapter
    from trime.eval.engine import Evaluator
    from trime.eval.memory import MemorySettings
    from trime.retrieval.datastore import Datastore

    store_dir = tmp_path_factory.getbasetemp() / "alignment_store_ce"
    if not (store_dir / "index.faiss").exists():
        build(wt2_sample_bin, fairseq_ckpts["ce"], "valid", store_dir)
    lm = load_adapter(fairseq_ckpts["ce"], wt2_sample_bin, cpu=True)
    store = Datastore.open(store_dir, dim=lm.dim, dict_sha256=lm.dict_sha256)
    settings = MemorySettings(level="none", lmbda=LMBDA, interp_temp=SHARP_TEMP, k=K)
    windows = lm.window_settings(CONTEXT, None)

    store.vals = np.roll(store.vals, 1)  # the value of token t stored with the key of token t+1
    evaluator = Evaluator(lm, windows, batch_size=64, store=store, k=K, exact=True, progress=False)
    log_probs = evaluator.collect("valid", max_batches=3).log_probs(settings).double()  # 6,144 tokens
    assert math.exp(-float(log_probs.mean())) > 50 * MAX_PPL


def test_hf_datastore_is_aligned_with_eval(tmp_path):
    pytest.importorskip("transformers")
    import tests.hf_helpers as H

    data = tmp_path / "text"
    data.mkdir()
    (data / "valid.txt").write_text(H.SAMPLE_VALID.read_text(encoding="utf-8")[:6_000], encoding="utf-8")
    model = H.model_dir("gpt2")
    store = build(data, model, "valid", tmp_path / "ds", "--tokens-per-sample", "64", context=16)
    row = self_retrieval_eval(data, model, "valid", store, "--knn-exact", "--tokens-per-sample", "64", context=16)
    assert row["tokens"] > 1000
    assert 1.0 <= row["ppl"] < MAX_PPL, row


def _keys_only_forward_check(lm, sample, after_key) -> None:
    """Keys of a keys-only forward equal the full forward's, and ``after_key`` (a module past the key) never runs."""
    calls = []
    handle = after_key.register_forward_hook(lambda *_: calls.append(1))
    try:
        full = lm.forward(sample)
        assert calls, "the full forward runs the module after the key"
        calls.clear()
        keys_only = lm.forward(sample, need_token_terms=False)
        assert not calls, "the keys-only forward (datastore extraction) should stop at the key"
        again = lm.forward(sample)  # the capture is reusable after a stopped pass
        assert calls and again.token_score.numel() == full.token_score.numel()
    finally:
        handle.remove()
    assert keys_only.token_score.numel() == 0
    assert np.array_equal(keys_only.reps.numpy(), full.reps.numpy())
    assert np.array_equal(keys_only.key_labels.numpy(), full.key_labels.numpy())


def test_keys_only_forward_stops_at_the_key(fairseq_ckpts, wt2_sample_bin, tmp_path):
    from trime.adapters import load_adapter

    lm = load_adapter(fairseq_ckpts["trime"], wt2_sample_bin, cpu=True)
    sample = next(lm.windows("valid", lm.window_settings(CONTEXT, None)).batches(4))
    _keys_only_forward_check(lm, sample, lm.model.decoder.layers[-1].fc2)

    pytest.importorskip("transformers")
    import tests.hf_helpers as H

    data = tmp_path / "text"
    data.mkdir()
    (data / "valid.txt").write_text(H.SAMPLE_VALID.read_text(encoding="utf-8")[:3_000], encoding="utf-8")
    hf = load_adapter(H.model_dir("gpt2"), data, cpu=True)
    sample = next(hf.windows("valid", hf.window_settings(16, 64)).batches(4))
    _keys_only_forward_check(hf, sample, hf.model.base_model.ln_f)
