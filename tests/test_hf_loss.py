"""``trime.hf.causal_lm_loss`` on tiny random GPT-2, Llama, GPT-NeoX and OPT models.

Values and parameter gradients are compared with the dense float64 reference of
``hf_helpers.dense_trime_nll`` (explicit N x N masks, keys from a forward hook on the
norm module's *output*), for every memory, with right padding; with no memory the loss
equals transformers' own ``model(..., labels=...).loss``.
"""

import pytest
import torch

from tests.hf_helpers import (
    ARCHS,
    assert_grads_close,
    build_model,
    dense_trime_nll,
    load_test_tokenizer,
    model_dir,
    param_grads,
    right_padding,
    sample_batch,
    tokenizer_dir,
)
from trime.errors import TrimeError
from trime.hf import (
    KeyCapture,
    causal_lm_loss,
    hf_key_module,
    load_model_and_tokenizer,
    tokenize_text,
    tokenizer_identity,
)

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH, SEQ_LEN = 3, 12
PADS = {1: 3, 2: 1}  # right padding: 3 pads in row 1, 1 in row 2
CASES = [("none", True), ("local", True), ("long", True), ("external", True), ("external", False)]
EXPECTED_KEY_MODULES = {
    "gpt2": "transformer.h.1.mlp",
    "llama": "model.layers.1.mlp",
    "gpt_neox": "gpt_neox.layers.1.mlp",
    "opt": "model.decoder.layers.1.fc1",
}


@pytest.fixture(scope="module")
def models():
    return {arch: build_model(arch, dtype=torch.float64) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_key_module_is_the_last_layers_mlp(models, arch):
    assert hf_key_module(models[arch])[0] == EXPECTED_KEY_MODULES[arch]


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("memory,external_local", CASES)
@pytest.mark.parametrize("arch", ARCHS)
def test_loss_and_gradients_match_dense_reference(models, arch, memory, external_local, padded):
    model = models[arch]
    ids = sample_batch(BATCH, SEQ_LEN, seed=ARCHS.index(arch))
    mask = right_padding(BATCH, SEQ_LEN, PADS) if padded else None
    out = causal_lm_loss(model, ids, memory, attention_mask=mask, external_local=external_local)
    grads = param_grads(model, out.loss)
    dense_sum, dense_count = dense_trime_nll(model, arch, ids, memory, mask, external_local=external_local)
    assert out.num_tokens == dense_count == BATCH * (SEQ_LEN - 1) - (sum(PADS.values()) if padded else 0)
    torch.testing.assert_close(out.loss.double(), dense_sum / dense_count, rtol=1e-6, atol=1e-6)
    assert_grads_close(grads, param_grads(model, dense_sum / dense_count))
    if memory != "none":  # the memory is really used: a different (lower, many positives) loss than CE
        assert out.loss.item() < out.ori_loss.item() - 1e-3


@pytest.mark.parametrize("memory", ["local", "long"])
def test_one_pass_gradient_and_non_uniform_fallback(models, monkeypatch, memory):
    """``loss`` (a mean) uses the gradient formed in forward; any other weighting of ``nll`` recomputes,
    with the same result (weights on unpredicted positions are irrelevant)."""
    import trime.loss as loss_module

    calls = {"_one_pass": 0, "_backward": 0}
    for name in calls:
        original = getattr(loss_module, name)
        monkeypatch.setattr(loss_module, name,
                            lambda *a, _n=name, _f=original: calls.__setitem__(_n, calls[_n] + 1) or _f(*a))
    model = models["gpt2"]
    ids = sample_batch(BATCH, SEQ_LEN, seed=5)
    mask = right_padding(BATCH, SEQ_LEN, PADS)
    out = causal_lm_loss(model, ids, memory, attention_mask=mask)
    grads = param_grads(model, out.loss)
    assert calls == {"_one_pass": 1, "_backward": 0}
    out = causal_lm_loss(model, ids, memory, attention_mask=mask)
    weights = torch.where(out.valid, 2.0, 5.0).to(out.nll.dtype)
    weighted = param_grads(model, (out.nll * weights).sum() / (2 * out.num_tokens))
    assert calls == {"_one_pass": 2, "_backward": 1}
    assert_grads_close(weighted, grads)


@pytest.mark.parametrize("arch", ARCHS)
def test_ori_loss_equals_transformers_loss(models, arch):
    model = models[arch]
    ids = sample_batch(BATCH, SEQ_LEN, seed=3)
    mask = right_padding(BATCH, SEQ_LEN, PADS)
    labels = ids.masked_fill(mask == 0, -100)
    hf_loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    for memory in ("none", "local", "external"):
        out = causal_lm_loss(model, ids, memory, attention_mask=mask)
        torch.testing.assert_close(out.ori_loss.double(), hf_loss.double(), rtol=1e-6, atol=1e-6)
    none = causal_lm_loss(model, ids, "none", attention_mask=mask, labels=labels)
    torch.testing.assert_close(none.loss.double(), hf_loss.double(), rtol=1e-6, atol=1e-6)


def test_per_position_terms_follow_hf_shift(models):
    """Position t predicts t+1; the last position and positions before a pad predict nothing."""
    ids = sample_batch(BATCH, SEQ_LEN, seed=4)
    mask = right_padding(BATCH, SEQ_LEN, PADS)
    out = causal_lm_loss(models["gpt2"], ids, "local", attention_mask=mask)
    assert not out.valid[:, -1].any()
    assert out.valid[1].sum() == SEQ_LEN - 1 - 3 and not out.valid[1, SEQ_LEN - 4:].any()
    assert torch.equal(out.targets[0, :-1], ids[0, 1:])
    assert (out.nll[~out.valid] == 0).all() and (out.ce[~out.valid] == 0).all()
    assert out.keys.shape == (BATCH, SEQ_LEN, 32) and out.logits.shape[:2] == (BATCH, SEQ_LEN)


@pytest.mark.parametrize("memory", ["local", "long", "external"])
def test_small_memory_blocks_give_the_same_loss(models, memory):
    model = models["llama"]
    ids = sample_batch(4, 10, seed=5)
    mask = right_padding(4, 10, {0: 2})
    whole = causal_lm_loss(model, ids, memory, attention_mask=mask)
    blocked = causal_lm_loss(model, ids, memory, attention_mask=mask, block_size=7)
    torch.testing.assert_close(blocked.loss, whole.loss, rtol=1e-7, atol=1e-7)


def test_temperature_divides_the_memory_scale(models):
    model = models["gpt2"]
    ids = sample_batch(2, 8, seed=6)
    hot = causal_lm_loss(model, ids, "long", temperature=2.0)
    dense_sum, count = dense_trime_nll(model, "gpt2", ids, "long", temperature=2.0)
    torch.testing.assert_close(hot.loss.double(), dense_sum / count, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_accumulate_in_fp32(dtype):
    model32 = build_model("gpt2", seed=1)
    model16 = build_model("gpt2", seed=1, dtype=dtype)
    ids = sample_batch(2, 16, seed=7)
    out32 = causal_lm_loss(model32, ids, "long")
    out16 = causal_lm_loss(model16, ids, "long")
    assert out16.loss.dtype == torch.float32 and torch.isfinite(out16.loss)
    torch.testing.assert_close(out16.loss, out32.loss, rtol=3e-2, atol=3e-2)
    out16.loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model16.parameters())


def test_capture_keeps_the_graph_and_removes_its_hook(models):
    model = models["gpt_neox"]
    ids = sample_batch(1, 6)
    capture = KeyCapture.hf(model)
    with capture:
        model(input_ids=ids)
    keys = capture.keys(ids.shape)
    assert keys.requires_grad and keys.shape == (1, 6, 32)
    assert not capture.module._forward_pre_hooks


def test_explicit_key_module_is_used(models):
    model = models["gpt2"]
    ids = sample_batch(2, 8, seed=8)
    default = causal_lm_loss(model, ids, "local")
    other = causal_lm_loss(model, ids, "local", key_module="transformer.h.0.mlp")
    assert not torch.allclose(default.keys, other.keys)
    with pytest.raises(TrimeError, match="key_module 'transformer.h.9.mlp' is not a submodule of GPT2LMHeadModel"):
        causal_lm_loss(model, ids, "local", key_module="transformer.h.9.mlp")


def test_unsupported_architecture_names_module_and_option():
    from transformers import AutoModelForCausalLM, MambaConfig

    model = AutoModelForCausalLM.from_config(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1))
    with pytest.raises(TrimeError) as err:
        causal_lm_loss(model, sample_batch(1, 4), "local")
    message = str(err.value)
    assert "\n" not in message and "MambaForCausalLM" in message and "key_module=" in message and "--key-module" in message


def test_bad_memory_and_shapes_are_refused(models):
    ids = sample_batch(2, 8)
    with pytest.raises(TrimeError, match="memory must be one of none, local, long, external"):
        causal_lm_loss(models["gpt2"], ids, "global")
    with pytest.raises(TrimeError, match=r"input_ids must be \(batch, time\)"):
        causal_lm_loss(models["gpt2"], ids[0], "local")


def test_tokenizer_identity_survives_save_and_differs_between_tokenizers(tmp_path):
    tokenizer = load_test_tokenizer()
    tokenizer.save_pretrained(tmp_path / "copy")
    _, reloaded = load_model_and_tokenizer(model_dir("gpt2"))
    assert tokenizer_identity(reloaded) == tokenizer_identity(tokenizer)
    assert tokenizer_identity(load_test_tokenizer(300)) != tokenizer_identity(tokenizer)
    assert tokenizer_dir() != tokenizer_dir(300)
    ids = tokenize_text("Hello world.\n\n = Heading = \n", tokenizer)
    assert ids.dtype.name == "int64" and tokenizer.decode(ids.tolist()) == "Hello world.\n\n = Heading = \n"


@pytest.mark.slow  # a fresh interpreter importing fairseq
def test_the_fairseq_path_never_imports_transformers():
    import subprocess
    import sys

    code = (
        "import sys, trime.plugin as p; p.register(); "
        "import trime.criterions.trime_ext_loss, trime.tasks.trime_lm, trime.retrieval.bm25_batches, "
        "trime.retrieval.datastore, trime.retrieval.build_datastore, trime.eval.evaluate, trime.train_cli; "
        "print('transformers' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"
