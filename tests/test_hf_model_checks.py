"""Loading a Hugging Face model dir: what is refused, in one line, before any work.

- a tokenizer with more tokens than the model has embeddings;
- a model whose attention is not causal (BERT loaded as an LM), in training and evaluation,
  found by a probe: change later tokens, compare the earlier outputs;
- evaluation keys from another module than training's (``trime_hf_train.json``'s ``key_module``
  is used when ``--key-module`` is not given; a disagreeing ``--key-module`` is refused);
- damaged files: a training record, config.json, tokenizer files, weights (truncated,
  garbage, not matching the config) are named in one line, never a traceback;
- a model name that is no local dir: a path fails at once; a hub name is looked up once, without
  retries (there is no network here: what a user offline sees).

Models are tiny and random (``tests.hf_helpers``); damaged files are real damaged files.
"""

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

import tests.hf_helpers as H
from tests.reliability_helpers import run_command
from trime.errors import TrimeError

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

KEYS_H0 = "transformer.h.0.mlp"  # not the default keys of the tiny GPT-2 (transformer.h.1.mlp)
BERT_KEYS = "bert.encoder.layer.1.intermediate"


def copy_model(tmp_path: Path, name: str = "model", arch: str = "gpt2") -> Path:
    out = tmp_path / name
    shutil.copytree(H.model_dir(arch), out)
    return out


def bert_dir(tmp_path: Path, is_decoder: bool) -> Path:
    """A save_pretrained BERT LM-head dir with the test tokenizer; weights large enough that attention mixes."""
    from transformers import BertConfig, BertLMHeadModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=H.VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, is_decoder=is_decoder,
                        initializer_range=0.2)
    out = tmp_path / f"bert-decoder-{is_decoder}"
    BertLMHeadModel(config).save_pretrained(out)
    H.load_test_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf_text")
    for split, source in (("train", H.SAMPLE_TRAIN), ("valid", H.SAMPLE_VALID), ("test", H.SAMPLE_TEST)):
        (out / f"{split}.txt").write_text(source.read_text(encoding="utf-8")[:4000], encoding="utf-8")
    return out


def message(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and text.startswith("trime: error: ")
    return text


# ----------------------------------------------------------------------------- tokenizer vs embeddings


def test_tokenizer_larger_than_the_embeddings_is_refused(tmp_path):
    from trime.hf.model import check_tokenizer_fits, load_model_and_tokenizer

    small = tmp_path / "small-vocab"
    H.build_model("gpt2", vocab_size=100).save_pretrained(small)
    H.load_test_tokenizer().save_pretrained(small)  # 512 tokens
    with pytest.raises(TrimeError) as excinfo:
        load_model_and_tokenizer(small)
    assert f"--model {small} has 512 tokens but the model has 100 input embeddings" in message(excinfo)
    model, tokenizer = load_model_and_tokenizer(H.model_dir("gpt2"))
    check_tokenizer_fits(model, tokenizer)  # equal sizes are fine


# ----------------------------------------------------------------------------- causality


@pytest.mark.parametrize("arch", H.ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_causal_models_pass_the_probe(arch, dtype):
    from trime.hf.model import check_causal

    model = H.build_model(arch, dtype=dtype)
    check_causal(model)
    check_causal(model, keys=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_barely_trained_bidirectional_model_is_refused_in_every_precision(dtype):
    """At BERT's own init scale the look-ahead effect is below bf16/fp16 rounding; the probe computes in
    float32 and then puts the model's own tensors back, bit for bit."""
    from transformers import BertConfig, BertLMHeadModel

    from trime.hf.model import check_causal

    torch.manual_seed(0)
    config = BertConfig(vocab_size=H.VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, is_decoder=False, initializer_range=0.002)
    model = BertLMHeadModel(config).to(dtype)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(TrimeError, match=r"\(BertLMHeadModel\) is not causal"):
        check_causal(model)
    after = model.state_dict()
    assert all(after[name].dtype == tensor.dtype and torch.equal(after[name], tensor) for name, tensor in before.items())


def test_non_causal_model_is_refused_by_training_and_evaluation(tmp_path, text_dir):
    from trime.adapters.hf_lm import HFLM
    from trime.hf.model import load_model

    bert = bert_dir(tmp_path, is_decoder=False)
    with pytest.raises(TrimeError) as excinfo:  # trime-hf-train's loader, even with a key module
        load_model(bert, key_module=BERT_KEYS)
    assert f"--model {bert} (BertLMHeadModel) is not causal" in message(excinfo)
    for precision in ("fp32", "bf16"):  # trime-eval / trime-build-datastore
        with pytest.raises(TrimeError) as excinfo:
            HFLM.load(bert, text_dir, cpu=True, precision=precision, key_module=BERT_KEYS)
        assert f"--path {bert} (BertLMHeadModel) is not causal" in message(excinfo)
    # without --key-module too: causality is the first complaint, not the missing layer list
    with pytest.raises(TrimeError, match="is not causal"):
        HFLM.load(bert, text_dir, cpu=True)
    # the same architecture as a decoder (causal self-attention) loads
    lm = HFLM.load(bert_dir(tmp_path, is_decoder=True), text_dir, cpu=True, key_module=BERT_KEYS)
    assert lm.key_source == BERT_KEYS


# ----------------------------------------------------------------------------- the training record's key module


def with_record(tmp_path: Path, name: str, body, file: str = "trime_hf_train.json") -> Path:
    model = copy_model(tmp_path, name)
    (model / file).write_text(body if isinstance(body, str) else json.dumps(body))
    return model


def test_evaluation_uses_the_trained_key_module(tmp_path, text_dir):
    from trime.adapters.hf_lm import HFLM

    trained_h0 = with_record(tmp_path, "h0", {"block_size": 32, "key_module": KEYS_H0})
    lm = HFLM.load(trained_h0, text_dir, cpu=True)
    assert lm.key_source == KEYS_H0 and lm.window_settings(0, None).tokens_per_sample == 32
    assert HFLM.load(trained_h0, text_dir, cpu=True, key_module=KEYS_H0).key_source == KEYS_H0
    # a checkpoint of a run (no final record yet) carries the same settings
    checkpoint = with_record(tmp_path, "ckpt", {"settings": {"block_size": 16, "key_module": KEYS_H0}},
                             file="trime_hf_checkpoint.json")
    lm = HFLM.load(checkpoint, text_dir, cpu=True)
    assert lm.key_source == KEYS_H0 and lm.trained_block_size == 16
    # trained with the default keys: the default, also when named explicitly
    default = with_record(tmp_path, "default", {"block_size": 32, "key_module": None})
    assert HFLM.load(default, text_dir, cpu=True).key_source == "transformer.h.1.mlp"
    assert HFLM.load(default, text_dir, cpu=True, key_module="transformer.h.1.mlp").key_source == "transformer.h.1.mlp"


@pytest.mark.parametrize("record,file,given,trained", [
    ({"key_module": KEYS_H0}, "trime_hf_train.json", "transformer.h.1.mlp", KEYS_H0),
    ({"key_module": None}, "trime_hf_train.json", KEYS_H0, "transformer.h.1.mlp"),
    ({"settings": {"key_module": KEYS_H0}}, "trime_hf_checkpoint.json", "transformer.h.1.mlp", KEYS_H0),
])  # fmt: skip
def test_key_module_disagreeing_with_the_record_is_refused(tmp_path, text_dir, record, file, given, trained):
    from trime.adapters.hf_lm import HFLM

    model = with_record(tmp_path, "model", record, file=file)
    with pytest.raises(TrimeError) as excinfo:
        HFLM.load(model, text_dir, cpu=True, key_module=given)
    assert message(excinfo) == (
        f"trime: error: --key-module {given} disagrees with training record {model / file}: the model was "
        f"trained with keys from {trained}; drop --key-module to use them"
    )


@pytest.mark.parametrize("body,complaint", [
    ("[1, 2]", "is damaged (not a JSON object)"),
    ('{"settings": 3}', "is damaged (not a JSON object)"),
    ('{"block_size": "abc"}', "has block_size 'abc', not a positive integer"),
    ('{"block_size": NaN}', "has block_size nan, not a positive integer"),
    ('{"block_size": 31.5}', "has block_size 31.5, not a positive integer"),
    ('{"block_size": -4}', "has block_size -4, not a positive integer"),
    ('{"key_module": 5}', "has key_module 5, not a module name"),
    ('{"key_module": "transformer.h.9.mlp"}', "'transformer.h.9.mlp' is not a submodule of GPT2LMHeadModel"),
])  # fmt: skip
def test_damaged_training_record_is_named(tmp_path, text_dir, body, complaint):
    from trime.adapters.hf_lm import HFLM

    model = with_record(tmp_path, "model", body)
    with pytest.raises(TrimeError) as excinfo:
        HFLM.load(model, text_dir, cpu=True)
    assert str(model / "trime_hf_train.json") in message(excinfo) and complaint in message(excinfo)


# ----------------------------------------------------------------------------- damaged model dirs


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def as_torch_bin(model: Path) -> Path:
    from safetensors.torch import load_file

    weights = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    torch.save(weights, model / "pytorch_model.bin")
    return model / "pytorch_model.bin"


@pytest.mark.parametrize("damage,file,complaint", [
    (lambda m: truncate(m / "model.safetensors"), "model.safetensors", "is damaged or incomplete"),
    (lambda m: (m / "model.safetensors").write_bytes(b""), "model.safetensors", "is damaged or incomplete"),
    (lambda m: (m / "model.safetensors").write_bytes(bytes(64) + b"\x01" * 900), "model.safetensors",
     "is damaged or incomplete"),
    (lambda m: truncate(as_torch_bin(m)), "pytorch_model.bin", "is damaged or incomplete"),
    (lambda m: (m / "config.json").write_text(json.dumps({**json.loads((m / "config.json").read_text()),
                                                          "n_embd": 64})),
     "", "its weights do not match its config.json"),
    (lambda m: (m / "config.json").write_text("{not json"), "config.json", "is not valid JSON"),
    (lambda m: (m / "config.json").write_text(""), "config.json", "is not valid JSON"),
    (lambda m: (m / "config.json").write_text("[]"), "config.json", "is not a JSON object"),
    (lambda m: (m / "tokenizer.json").write_text("{}"), "", "has no usable tokenizer"),
    (lambda m: (m / "tokenizer.json").write_text("{broken"), "", "has no usable tokenizer"),
])  # fmt: skip
def test_damaged_model_dir_is_one_line(tmp_path, damage, file, complaint):
    from trime.hf.model import load_model_and_tokenizer

    model = copy_model(tmp_path)
    damage(model)
    with pytest.raises(TrimeError) as excinfo:
        load_model_and_tokenizer(model)
    assert f"--model {model / file if file else model}" in message(excinfo) and complaint in message(excinfo)


def test_non_finite_weights_are_refused_at_load(tmp_path):
    from trime.hf.model import load_model

    model = H.build_model("gpt2")
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    with pytest.raises(TrimeError) as excinfo:
        load_model(tmp_path / "nan")
    assert message(excinfo).startswith(f"trime: error: --model {tmp_path / 'nan'} gives non-finite logits (NaN/inf)")


def test_missing_model_dir_fails_at_once(tmp_path, monkeypatch):
    """A path fails at once; a name that may be on the hub is looked up once (no retries), and says both."""
    from huggingface_hub import constants

    from trime.hf import model as hf_model

    (tmp_path / "hf").mkdir()
    monkeypatch.chdir(tmp_path)
    for name in ("hf/nonexistent", "./nonexistent", "a/b/c", str(tmp_path / "nonexistent")):
        with pytest.raises(TrimeError) as excinfo:
            hf_model.load_tokenizer(name)
        assert message(excinfo) == f"trime: error: --model {name}: no such directory; pass a save_pretrained dir or a hub name"
    hf_model._hub_model.cache_clear()
    start = time.monotonic()
    with pytest.raises(TrimeError) as excinfo:  # no network here: the lookup fails (online: the hub has no such model)
        hf_model.load_model_and_tokenizer("trime-tests/nonexistent-model")
    assert time.monotonic() - start < 15  # was about a minute of retries
    assert message(excinfo).startswith("trime: error: --model trime-tests/nonexistent-model: no such local directory, and the hub")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    hf_model._hub_model.cache_clear()
    with pytest.raises(TrimeError) as excinfo:
        hf_model.load_model("nonexistent-model")
    assert message(excinfo) == (
        "trime: error: --model nonexistent-model: no such local directory, and HF_HUB_OFFLINE is set and the hub "
        "cache has no nonexistent-model; pass a save_pretrained dir"
    )
    hf_model._hub_model.cache_clear()


@pytest.mark.slow
def test_truncated_weights_from_the_command_line(tmp_path, text_dir):
    """trime-hf-train and trime-eval print one line naming the damaged file, exit 1."""
    model = copy_model(tmp_path)
    truncate(model / "model.safetensors")
    train = run_command(["trime-hf-train", *H.hf_train_argv(model, text_dir / "train.txt", tmp_path / "out", "local")], check=False)
    evaluate = run_command(["trime-eval", text_dir, "--path", model, "--cpu", "--memory", "none"], check=False)
    for proc, flag in ((train, "--model"), (evaluate, "--path")):
        lines = [line for line in proc.stderr.splitlines() if line.startswith("trime: error:")]
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert len(lines) == 1 and lines[0].startswith(f"trime: error: {flag} {model / 'model.safetensors'} is damaged")
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert os.listdir(model)  # the model dir is left as it was


# ----------------------------------------------------------------------------- the output head's input as keys


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lm_head_keys_are_the_final_normed_hidden_state(arch):
    """``key_module='lm_head'``: the head's input (after the final norm), also when only the base model runs.

    References: a forward pre-hook on the head during a full forward, and transformers' own last hidden state.
    """
    from trime.hf.loss import causal_lm_loss
    from trime.hf.model import check_causal
    from trime.hooks import KeyCapture

    model = H.build_model(arch).eval()
    ids = H.sample_batch()
    seen = {}
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: seen.setdefault("input", args[0]))
    with torch.no_grad():
        output = model(input_ids=ids, output_hidden_states=True)
    handle.remove()
    reference = seen["input"]
    torch.testing.assert_close(output.hidden_states[-1], reference, rtol=0, atol=0)
    for stop in (False, True):  # evaluation and datastores run the base model only
        with torch.no_grad(), KeyCapture.hf(model, "lm_head", stop=stop) as capture:
            model.base_model(input_ids=ids, use_cache=False)
        torch.testing.assert_close(capture.keys(tuple(ids.shape)), reference, rtol=0, atol=0)
    loss = causal_lm_loss(model, ids, "local", key_module="lm_head")  # training runs the whole model
    torch.testing.assert_close(loss.keys.detach(), reference, rtol=0, atol=0)
    assert loss.keys.requires_grad
    check_causal(model, "lm_head", keys=True)


def test_trime_eval_with_lm_head_keys(text_dir, tmp_path):
    from trime.eval.evaluate import run

    window = ["--memory", "local", "--context-window", "16", "--tokens-per-sample", "48", "--cpu", "--no-progress-bar"]
    default = run([str(text_dir), "--path", str(H.model_dir("llama")), *window])
    head = run([str(text_dir), "--path", str(H.model_dir("llama")), "--key-module", "lm_head", *window])
    assert head["model"]["key_source"] == "lm_head"
    assert head["results"][-1]["tokens"] == default["results"][-1]["tokens"]
    assert head["results"][-1]["ppl"] != default["results"][-1]["ppl"]  # other keys, other local memory
