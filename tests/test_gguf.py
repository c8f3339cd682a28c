"""GGUF files as models: ``--model x.gguf`` / ``--path x.gguf``, or a dir with ``--gguf-file NAME``.

A tiny random Llama (``tests.hf_helpers``) is written to GGUF with the ``gguf`` package's own
writer, as llama.cpp's converter writes it: F32 tensors named by ``gguf.get_tensor_name_map``,
``llama.*`` metadata, q/k projections permuted into llama.cpp's rotary layout (transformers
un-permutes them on load), and the test tokenizer as a ``gpt2``-type GGUF tokenizer (its
byte-level vocabulary and merges; the test tokenizer is GPT-2's byte-level BPE with GPT-2's
pre-tokenizer, so the same ids come back). References are the original model's own logits and
trime-eval on the ``save_pretrained`` dir of the same model; nothing is downloaded.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import tests.hf_helpers as H
from trime.errors import TrimeError
from trime.io_utils import sha256_file

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = ["--context-window", "16", "--tokens-per-sample", "48", "--gen-subset", "valid", "--cpu", "--no-progress-bar"]


def llama_cpp_permute(weight, heads: int):
    """llama.cpp's convert_hf_to_gguf permutation of a q/k projection (rotary halves -> interleaved pairs)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model, tokenizer, path: Path, architecture: str = "llama") -> Path:
    """``model`` (a Llama) and ``tokenizer`` (byte-level BPE) as an F32 GGUF file, the way llama.cpp writes them."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("trime-test-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get)
    assert [spec["vocab"][t] for t in tokens] == list(range(len(tokens)))
    special = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings
        weight = tensor.detach().float().numpy().copy()
        if name.endswith("q_proj.weight"):
            weight = llama_cpp_permute(weight, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = llama_cpp_permute(weight, cfg.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf_text")
    for split, source, chars in (("train", H.SAMPLE_TRAIN, 6000), ("valid", H.SAMPLE_VALID, 3000),
                                 ("test", H.SAMPLE_TEST, 3000)):
        H.text_head(source, out / f"{split}.txt", chars)
    return out


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    """``tiny.gguf`` (the Llama of ``H.model_dir('llama')``), ``other.gguf`` (seed 1) and ``tied.gguf``."""
    out = tmp_path_factory.mktemp("gguf")
    tokenizer = H.load_test_tokenizer()
    write_gguf(H.build_model("llama"), tokenizer, out / "tiny.gguf")
    write_gguf(H.build_model("llama", seed=1), tokenizer, out / "other.gguf")
    write_gguf(H.build_model("llama", tie_word_embeddings=True), tokenizer, out / "tied.gguf")
    return out


def message(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and text.startswith("trime: error: ")
    return text


# ----------------------------------------------------------------------------- the same model


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_model_gives_the_original_logits_and_ids(gguf_dir, tmp_path, tied):
    from trime.hf.model import load_model_and_tokenizer

    original = H.build_model("llama", tie_word_embeddings=tied).eval()
    name = "tied.gguf" if tied else "tiny.gguf"
    text = H.SAMPLE_VALID.read_text(encoding="utf-8")[:4000]
    expected_ids = H.load_test_tokenizer()(text, add_special_tokens=False)["input_ids"]
    for model, tokenizer in (load_model_and_tokenizer(gguf_dir / name),
                             load_model_and_tokenizer(gguf_dir, gguf_file=name)):
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected_ids
        ids = torch.tensor([expected_ids[:64], expected_ids[64:128]])
        with torch.no_grad():
            got, want = model(input_ids=ids).logits, original(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
        assert model.dtype == torch.float32 and getattr(model, "hf_quantizer", None) is None
        head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
        assert (head is embed) == tied
    model.save_pretrained(tmp_path / "plain")  # an ordinary model: transformers refuses to save a GGUF-loaded one
    assert not hasattr(model.config, "quantization_config")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_trime_eval_of_the_gguf_file_equals_the_model_dir(gguf_dir, text_dir, tmp_path):
    from trime.eval.evaluate import run

    reference = run([str(text_dir), "--path", str(H.model_dir("llama")), "--memory", "local", *WINDOW])
    by_file = run([str(text_dir), "--path", str(gguf_dir / "tiny.gguf"), "--memory", "local", *WINDOW,
                   "--results-json", str(tmp_path / "r.json")])  # fmt: skip
    by_dir = run([str(text_dir), "--path", str(gguf_dir), "--gguf-file", "tiny.gguf", "--memory", "local", *WINDOW])
    want = reference["results"][-1]
    for record in (by_file, by_dir):
        row = record["results"][-1]
        assert row["tokens"] == want["tokens"]
        assert abs(row["ppl"] - want["ppl"]) <= 1e-5 * want["ppl"]
        assert record["checkpoint"]["sha256"] == sha256_file(gguf_dir / "tiny.gguf")
        assert record["checkpoint"]["format"] == "gguf"
    assert json.loads((tmp_path / "r.json").read_text())["checkpoint"] == by_file["checkpoint"]


def test_datastore_of_one_gguf_file_is_refused_with_another(gguf_dir, text_dir, tmp_path):
    from trime.eval.evaluate import run
    from trime.retrieval.build_datastore import main as build_datastore

    store = tmp_path / "ds"
    build_datastore([str(text_dir), "--path", str(gguf_dir / "tiny.gguf"), "--output", str(store), "--key-dtype",
                     "fp32", "--index-factory", "Flat", *WINDOW[:4], "--cpu", "--no-progress-bar"])  # fmt: skip
    meta = json.loads((store / "meta.json").read_text())
    assert meta["checkpoint"]["sha256"] == sha256_file(gguf_dir / "tiny.gguf")
    external = ["--memory", "external", "--datastore", str(store), "--k", "8", "--mem-size", "32", *WINDOW]
    record = run([str(text_dir), "--path", str(gguf_dir), "--gguf-file", "tiny.gguf", *external])
    assert record["datastore"]["checkpoint"]["sha256"] == record["checkpoint"]["sha256"]
    with pytest.raises(TrimeError) as excinfo:
        run([str(text_dir), "--path", str(gguf_dir / "other.gguf"), *external])
    assert "was built with another checkpoint" in message(excinfo)


def test_bm25_plan_records_the_gguf_tokenizer(gguf_dir, text_dir, tmp_path):
    from trime.hf.model import load_tokenizer
    from trime.hf.text import tokenizer_identity
    from trime.retrieval.bm25_batches import main as bm25_batches

    plan = tmp_path / "plan.json"
    bm25_batches([str(text_dir / "train.txt"), "--model", str(gguf_dir), "--gguf-file", "tiny.gguf",
                  "--tokens-per-sample", "32", "--output", str(plan), "--no-progress-bar"])  # fmt: skip
    meta = json.loads(plan.read_text())["meta"]
    assert meta["tokenizer"] == tokenizer_identity(load_tokenizer(gguf_dir / "tiny.gguf"))
    with pytest.raises(TrimeError, match="--gguf-file names a file inside --model DIR"):
        bm25_batches([str(text_dir / "train.txt"), "--gguf-file", "tiny.gguf", "--tokens-per-sample", "32",
                      "--output", str(plan)])  # fmt: skip


# ----------------------------------------------------------------------------- one-line errors


def test_gguf_faults_are_one_line(gguf_dir, tmp_path, monkeypatch):
    from trime.hf.model import load_model_and_tokenizer

    cases = []
    missing = tmp_path / "missing.gguf"
    cases.append(((missing,), f"--model {missing}: no such file; pass an existing .gguf file"))
    cases.append(((gguf_dir,), f"--model {gguf_dir} has no config.json but holds "))
    cases.append(((gguf_dir, "nope.gguf"), f"--gguf-file nope.gguf: no such file in --model {gguf_dir}"))
    cases.append(((gguf_dir / "tiny.gguf", "tiny.gguf"), "names a file inside --model DIR, but --model"))
    for cut in (0.5, 0.99, 64):
        damaged = tmp_path / f"damaged-{cut}.gguf"
        body = (gguf_dir / "tiny.gguf").read_bytes()
        damaged.write_bytes(body[: int(len(body) * cut) if cut < 1 else cut])
        cases.append(((damaged,), f"--model {damaged} is damaged or incomplete ("))
    foreign = write_gguf(H.build_model("llama"), H.load_test_tokenizer(), tmp_path / "foreign.gguf", "rwkv6")
    cases.append(((foreign,), f"--model {foreign} (architecture 'rwkv6'): transformers cannot load this GGUF model"))
    for args, expected in cases:
        with pytest.raises(TrimeError) as excinfo:
            load_model_and_tokenizer(args[0], gguf_file=args[1] if len(args) > 1 else None)
        assert expected in message(excinfo)
    monkeypatch.setitem(sys.modules, "gguf", None)  # what a missing package looks like to `import gguf`
    with pytest.raises(TrimeError) as excinfo:
        load_model_and_tokenizer(gguf_dir / "tiny.gguf")
    assert message(excinfo).endswith("is a GGUF model; reading it needs the gguf package: pip install gguf")


def test_gguf_fault_from_trime_eval(gguf_dir, text_dir, tmp_path):
    from trime.eval.evaluate import run

    damaged = tmp_path / "damaged.gguf"
    shutil.copy(gguf_dir / "tiny.gguf", damaged)
    damaged.write_bytes(damaged.read_bytes()[:-100])
    with pytest.raises(TrimeError) as excinfo:
        run([str(text_dir), "--path", str(damaged), "--memory", "none", *WINDOW])
    assert message(excinfo).startswith(f"trime: error: --path {damaged} is damaged or incomplete")
    with pytest.raises(TrimeError) as excinfo:
        run([str(text_dir), "--path", str(gguf_dir / "tiny.gguf"), "--gguf-file", "x.gguf", "--memory", "none", *WINDOW])
    assert "names a file inside --path DIR, but --path" in message(excinfo)
