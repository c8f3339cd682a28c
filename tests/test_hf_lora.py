"""``trime-hf-train --lora-r``: LoRA through peft, with TRIME keys from the last layer's MLP input.

Tiny random Llama and GPT-2 models (GPT-2's projections are transformers' ``Conv1D``) with the
tokenizer trained in ``hf_helpers``, a few CPU steps each. The references are independent:
peft's own ``PeftModel.from_pretrained`` over the base model, the float64 dense TRIME loss of
``hf_helpers`` (keys from the norm's output, not from the MLP pre-hook), and an uninterrupted run.
"""

import json
from pathlib import Path

import pytest
import torch

from tests.hf_helpers import (
    SAMPLE_TRAIN,
    assert_grads_close,
    build_model,
    dense_trime_nll,
    hf_train_argv,
    model_dir,
    text_head,
)
from trime.errors import TrimeError
from trime.hf.lora import LoraSettings, add_lora, default_target_modules
from trime.hf.train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = 32
BATCH = 4
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "opt": ["k_proj", "v_proj", "q_proj", "out_proj", "fc1", "fc2"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


@pytest.fixture(scope="module")
def train_text(tmp_path_factory):
    return text_head(SAMPLE_TRAIN, tmp_path_factory.mktemp("lora_text") / "train.txt", 24_000)


def lora_argv(arch, train_text, out, *extra, steps=3):
    return hf_train_argv(model_dir(arch), train_text, out, "local", "--lora-r", "4", *extra, block=BLOCK, batch=BATCH,
                         steps=steps, lr="1e-2")


@pytest.fixture(scope="module")
def lora_runs(train_text, tmp_path_factory):
    """{arch: output dir} of 3 LoRA steps (r 4) on a tiny Llama and a tiny GPT-2."""
    root = tmp_path_factory.mktemp("lora_runs")
    for arch in ("llama", "gpt2"):
        train_main(lora_argv(arch, train_text, root / arch))
    return {arch: root / arch for arch in ("llama", "gpt2")}


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def is_target(name: str, arch: str) -> bool:
    """Whether a weight of the model is an adapted projection's (biases are not adapted)."""
    return name.endswith(".weight") and name.split(".")[-2] in TARGETS[arch]


@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_default_targets_are_the_projections_inside_the_decoder_layers(arch):
    assert default_target_modules(build_model(arch)) == TARGETS[arch]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_only_the_adapted_projections_change(lora_runs, arch):
    """Outside the targets (embeddings, norms, biases, the head) the merged model is the base model bit for bit."""
    base, merged = weights(model_dir(arch)), weights(lora_runs[arch])
    assert base.keys() == merged.keys()
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    targets = {name for name in base if is_target(name, arch)}
    assert changed == targets and len(targets) == 2 * len(TARGETS[arch]) + (2 if arch == "gpt2" else 0)
    record = json.loads((lora_runs[arch] / "trime_hf_train.json").read_text())
    assert record["lora"]["r"] == 4 and record["lora"]["alpha"] == 8.0
    assert record["lora"]["target_modules"] == sorted(TARGETS[arch])
    assert record["settings"]["lora_r"] == 4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_model_equals_base_plus_adapter(lora_runs, arch):
    """The output dir loads with plain transformers and gives the logits of peft's base + adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = lora_runs[arch]
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir(arch)), out / "adapter").eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir(arch)).eval()
    ids = torch.as_tensor([AutoTokenizer.from_pretrained(out)(" The game began development in 2010 .")["input_ids"]])
    with torch.no_grad():
        expected, got, before = adapted(ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - before).abs().max() > 1e-3  # the adapter did something


def test_trime_loss_gradients_reach_the_lora_weights_through_the_keys():
    """LoRA gradients of causal_lm_loss on a peft model == the dense reference's; the keys' own path is non-zero."""
    from trime.hf import causal_lm_loss

    model = add_lora(build_model("llama", seed=5), LoraSettings(r=4, alpha=8.0)).double()
    with torch.no_grad():  # peft starts B at 0, where A has no gradient: give both a value
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    ids = torch.randint(5, 20, (2, 14), generator=torch.Generator().manual_seed(1))  # few types: many positives

    def lora_grads(loss):
        model.zero_grad()
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    ours = lora_grads(causal_lm_loss(model, ids, "local").loss_sum)
    base = model.get_base_model()
    full = lora_grads(dense_trime_nll(base, "llama", ids, "local")[0])
    keys_constant = lora_grads(dense_trime_nll(base, "llama", ids, "local", key_rows_detached=torch.ones(2, dtype=bool))[0])
    cross_entropy = lora_grads(causal_lm_loss(model, ids, "none").loss_sum)
    assert len(ours) == 2 * 7 * 2 and all("lora_" in name for name in ours)  # A and B of 7 projections, 2 layers
    assert_grads_close(ours, full)
    last_attention = [name for name in ours if ".layers.1.self_attn." in name]
    assert len(last_attention) == 8
    for name in last_attention:
        scale = float(full[name].abs().max())
        assert scale > 0
        assert float((full[name] - keys_constant[name]).abs().max()) > 1e-3 * scale, name  # through the keys
        assert float((full[name] - cross_entropy[name]).abs().max()) > 1e-3 * scale, name  # not CE's


def test_a_lora_run_resumes_exactly(train_text, tmp_path):
    """2 + 2 steps from checkpoint-2 (the adapter, its optimizer state) == 4 uninterrupted steps."""
    extra = ["--lr-scheduler-type", "constant", "--save-steps", "2", "--lora-dropout", "0.1"]
    train_main(lora_argv("llama", train_text, tmp_path / "whole", *extra, steps=4))
    train_main(lora_argv("llama", train_text, tmp_path / "split", *extra, steps=2))
    assert (tmp_path / "split" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    train_main(lora_argv("llama", train_text, tmp_path / "split", *extra, "--resume-from-checkpoint", steps=4))

    def losses(out):
        history = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
        return {e["step"]: e["loss"] for e in history if "loss" in e}

    assert losses(tmp_path / "split")[3] == pytest.approx(losses(tmp_path / "whole")[3], rel=1e-5)
    assert losses(tmp_path / "split")[4] == pytest.approx(losses(tmp_path / "whole")[4], rel=1e-5)
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "split")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
    record = json.loads((tmp_path / "split" / "trime_hf_train.json").read_text())
    assert record["resumes"] == [{"checkpoint": str(tmp_path / "split" / "checkpoint-2"), "global_step": 2}]


def test_a_resume_with_other_lora_settings_is_one_line(train_text, tmp_path):
    extra = ["--save-steps", "2"]
    train_main(lora_argv("llama", train_text, tmp_path / "o", *extra, steps=2))
    for other, named in ((["--lora-alpha", "4"], "--lora-alpha 8.0 (now 4.0)"),
                         (["--lora-target-modules", "q_proj,v_proj"], "--lora-target-modules none (now q_proj,v_proj)")):
        with pytest.raises(TrimeError) as err:
            train_main(lora_argv("llama", train_text, tmp_path / "o", *extra, *other, "--resume-from-checkpoint",
                                 steps=4))
        assert f"checkpoint-2 was trained with {named}" in str(err.value)
    plain = hf_train_argv(model_dir("llama"), train_text, tmp_path / "o", "local", *extra, "--resume-from-checkpoint",
                          block=BLOCK, batch=BATCH, steps=4)
    with pytest.raises(TrimeError) as err:
        train_main(plain)
    assert "was trained with --lora-r 4 (now none); --lora-alpha 8.0 (now none)" in str(err.value)
    assert not (tmp_path / "o" / "checkpoint-4").exists()
