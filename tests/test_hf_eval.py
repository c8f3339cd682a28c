"""trime-eval / trime-build-datastore on Hugging Face model dirs: pinned windowing, parity, memories, mismatches.

Models are tiny random-initialised GPT-2, Llama and GPT-NeoX with a tokenizer trained on the
shipped sample (``hf_helpers``); nothing is downloaded. DATA is a folder of text splits cut
from the shipped WikiText-2 sample. References are independent of trime's windowing code:
plain transformers calls per window written from the HF front-end's visibility rules, keys from a hook on
the norm module's *output* (trime hooks the MLP's input), and explicit python sums.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import tests.hf_helpers as H
from trime.errors import TrimeError

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per module

TPS, CONTEXT = 64, 24  # 40 new tokens per window
SPLIT_BYTES = {"train": 40_000, "valid": 12_000, "test": 12_000}


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    """DATA: train.txt / valid.txt / test.txt, prefixes of the shipped sample's splits."""
    out = tmp_path_factory.mktemp("hf_text")
    sources = {"train": H.SAMPLE_TRAIN, "valid": H.SAMPLE_VALID, "test": H.SAMPLE_TEST}
    for split, source in sources.items():
        text = source.read_text(encoding="utf-8")[: SPLIT_BYTES[split]]
        (out / f"{split}.txt").write_text(text, encoding="utf-8")
    return out


def stream_of(model_dir: Path, path: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return torch.tensor(tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])


def window_spans(n: int, tps: int, context: int):
    """(lo, first, hi) per window, by the windowing rule: window b scores [b*S, (b+1)*S) after
    up to ``context`` earlier tokens (at least one); the stream's first token is not scored."""
    new = tps - context
    spans, b = [], 0
    while b * new < n:
        first, hi = b * new, min((b + 1) * new, n)
        lo = max(0, first - max(context, 1))
        spans.append((lo, max(first, 1), hi))
        b += 1
    return spans


def transformers_nll(model_dir: Path, path: Path, tps: int, context: int) -> tuple[float, int]:
    """(sum of NLL, tokens) of the model's own loss (``model(..., labels=...)``), window by window."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    stream = stream_of(model_dir, path)
    total, count = 0.0, 0
    with torch.no_grad():
        for lo, first, hi in window_spans(len(stream), tps, context):
            ids = stream[lo:hi][None]
            labels = ids.clone()
            labels[0, : first - lo] = -100  # context (and the stream's first token) is not scored
            scored = hi - first
            if scored == 0:
                continue
            total += float(model(input_ids=ids, labels=labels).loss.double()) * scored
            count += scored
    return total, count


def run_eval(*argv):
    from trime.eval.evaluate import run

    return run([str(a) for a in argv] + ["--cpu", "--no-progress-bar"])


@pytest.mark.parametrize("arch,context", [("gpt2", CONTEXT), ("gpt2", 0), ("llama", CONTEXT), ("gpt_neox", CONTEXT)])
def test_memory_none_equals_transformers_perplexity(text_dir, arch, context, tmp_path):
    model_dir = H.model_dir(arch)
    record = run_eval(
        text_dir, "--path", model_dir, "--gen-subset", "valid", "--memory", "none",
        "--context-window", context, "--tokens-per-sample", TPS, "--batch-size", 7,
        "--results-json", tmp_path / "r.json",
    )  # fmt: skip
    nll, count = transformers_nll(model_dir, text_dir / "valid.txt", TPS, context)
    row = record["results"][-1]
    assert row["tokens"] == count == len(stream_of(model_dir, text_dir / "valid.txt")) - 1
    ours = row["loss_base2"] * math.log(2)
    assert abs(row["ppl"] - math.exp(nll / count)) <= 1e-4 * row["ppl"]  # the bar: 1e-4 relative, in fp32
    assert abs(ours - nll / count) <= 1e-6 * (nll / count)  # measured: ~1e-8
    assert record["model"]["frontend"] == "hf" and record["model"]["architecture"] == arch
    assert (tmp_path / "r.json").is_file()


def test_window_defaults_half_context_of_the_positions(text_dir, tmp_path, capsys):
    """Neither window flag: windows of the model's positions (128 here, capped at 1024) with half as context."""
    model_dir = H.model_dir("gpt2")
    record = run_eval(text_dir, "--path", model_dir, "--gen-subset", "valid", "--memory", "none")
    nll, count = transformers_nll(model_dir, text_dir / "valid.txt", 128, 64)
    row = record["results"][-1]
    assert row["tokens"] == count
    assert abs(row["loss_base2"] * math.log(2) - nll / count) <= 1e-6 * (nll / count)
    first_line = capsys.readouterr().out.splitlines()[0]
    assert "windows of 128 tokens, 64 of them context" in first_line
    assert "default --tokens-per-sample and --context-window" in first_line


# ----------------------------------------------------------------------------- external memory, brute force


class HFReference:
    """Independent per-token log P of the first windows of a split (explicit sums, float64)."""

    def __init__(self, model_dir: Path, arch: str, path: Path, context: int, mem_size: int):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.arch, self.mem_size = arch, mem_size
        self.stream = stream_of(model_dir, path)
        self.spans = window_spans(len(self.stream), TPS, context)
        self.keys = {}  # target index p -> key of the position predicting stream[p], from its own window

    def run(self, w):
        lo, first, hi = self.spans[w]
        ids = self.stream[lo:hi][None]
        with torch.no_grad(), H.NormOutputHook(self.model, self.arch) as hook:
            logits = self.model(input_ids=ids).logits[0].double()
        keys = hook.output.reshape(ids.shape[1], -1).double()
        return lo, first, hi, keys, logits

    def log_probs(self, windows, temp, ext, lmbda, interp_temp):
        ext_keys, ext_vals, k = ext
        out = []
        dim = self.model.config.hidden_size
        scale = 1.0 / math.sqrt(dim) / temp
        for w in windows:
            lo, first, hi, keys, logits = self.run(w)
            fifo = list(range(max(1, first - self.mem_size), first))  # target indices of earlier scored tokens
            for p in range(first, hi):  # target index p is predicted by position t = p - 1 - lo
                t = p - 1 - lo
                q = keys[t]
                y = int(self.stream[p])
                entries = []  # (scaled logit, label)
                for j in range(t):  # the window's earlier positions, minus those held in the FIFO
                    if lo + j + 1 in fifo:
                        continue
                    entries.append((float(q @ keys[j]) * scale, int(self.stream[lo + j + 1])))
                for pj in fifo:
                    entries.append((float(q @ self.keys[pj]) * scale, int(self.stream[pj])))
                sims = ext_keys @ q.numpy()
                top = np.argsort(-sims, kind="stable")[:k]
                knn = [(float(sims[i]), int(ext_vals[i])) for i in top]
                entries += [(s * scale, v) for s, v in knn]
                row = logits[t].tolist()
                z = math.fsum(math.exp(v) for v in row)
                num = math.exp(row[y]) + math.fsum(math.exp(s) for s, lab in entries if lab == y)
                den = z + math.fsum(math.exp(s) for s, _ in entries)
                prob = num / den
                knn_den = math.fsum(math.exp(s / interp_temp) for s, _ in knn)
                knn_num = math.fsum(math.exp(s / interp_temp) for s, v in knn if v == y)
                out.append(math.log((1 - lmbda) * prob + lmbda * knn_num / knn_den))
            for p in range(first, hi):
                self.keys[p] = keys[p - 1 - lo]
        return out


@pytest.fixture(scope="module")
def llama_store(text_dir, tmp_path_factory):
    """An exact (Flat, inner product) fp32 datastore over the train split of the tiny Llama."""
    from trime.adapters import load_adapter
    from trime.retrieval.build_datastore import build_index, extract

    lm = load_adapter(H.model_dir("llama"), text_dir, cpu=True)
    out = tmp_path_factory.mktemp("hf_flat")
    extract(lm, "train", lm.window_settings(CONTEXT, TPS), 16, out, key_dtype="fp32", show_progress=False)
    build_index(out, factory="Flat", metric="ip", show_progress=False)
    return out


def test_datastore_keeps_every_scored_token(text_dir, llama_store):
    import json

    meta = json.loads((llama_store / "meta.json").read_text())
    stream = stream_of(H.model_dir("llama"), text_dir / "train.txt")
    vals = np.load(llama_store / "vals.npy")
    assert meta["count"] == len(stream) - 1 == len(vals)
    np.testing.assert_array_equal(vals, stream[1:].numpy())  # values are the next tokens, in stream order
    assert meta["model"]["frontend"] == "hf" and meta["model"]["architecture"] == "llama"
    assert meta["dictionary"]["size"] == H.VOCAB_SIZE and len(meta["dictionary"]["sha256"]) == 64


def test_sharded_build_merges_to_the_unsharded_bytes(text_dir, llama_store, tmp_path):
    from trime.adapters import load_adapter
    from trime.retrieval.build_datastore import extract, merge_shards

    lm = load_adapter(H.model_dir("llama"), text_dir, cpu=True)
    for shard_id in (1, 0):  # shards are contiguous runs of whole batches; the token stream is cut the same way
        extract(lm, "train", lm.window_settings(CONTEXT, TPS), 16, tmp_path, key_dtype="fp32", num_shards=2,
                shard_id=shard_id, show_progress=False)  # fmt: skip
    merge_shards(tmp_path)
    for name in ("keys.npy", "vals.npy"):
        assert (tmp_path / name).read_bytes() == (llama_store / name).read_bytes(), name


def test_external_memory_matches_brute_force(text_dir, llama_store):
    from trime.adapters import load_adapter
    from trime.eval.engine import Evaluator
    from trime.eval.memory import MemorySettings
    from trime.retrieval.datastore import Datastore, model_info

    lm = load_adapter(H.model_dir("llama"), text_dir, cpu=True)
    store = Datastore.open(llama_store, dim=lm.dim, dict_sha256=lm.dict_sha256, model=model_info(lm))
    k, temp, lmbda, interp_temp, mem_size = 8, 1.3, 0.3, 2.5, 50
    evaluator = Evaluator(lm, lm.window_settings(CONTEXT, TPS), batch_size=3, store=store, k=k, progress=False)
    cached = evaluator.collect("test", max_batches=2)  # 6 windows: the FIFO is carried inside and across batches
    settings = MemorySettings(
        level="external", softmax_temp=temp, mem_size=mem_size, knn_in_joint=True, lmbda=lmbda,
        interp_temp=interp_temp, k=k,
    )  # fmt: skip
    ours = cached.log_probs(settings).tolist()
    ref = HFReference(H.model_dir("llama"), "llama", text_dir / "test.txt", CONTEXT, mem_size)
    ext = (np.asarray(store.keys, dtype=np.float64), store.vals, k)
    expected = ref.log_probs(range(6), temp, ext, lmbda, interp_temp)
    assert len(ours) == len(expected) == 6 * (TPS - CONTEXT) - 1  # the stream's first token is not scored
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-4)


def test_tune_sweep_and_knnlm_flags_on_hf(text_dir, llama_store, tmp_path):
    window = ["--context-window", CONTEXT, "--tokens-per-sample", TPS]
    prefix = tmp_path / "sweep"
    record = run_eval(
        text_dir, "--path", H.model_dir("llama"), "--memory", "long", "--mem-size", 32, "--tune",
        "--sweep", "mem-size=8,32", "--sweep-prefix", prefix, *window,
    )  # fmt: skip
    assert [r["subset"] for r in record["results"]] == ["valid", "test"]
    best = min(record["tuning"]["trials"], key=lambda t: t["nll"])
    assert record["settings"]["softmax_temp"] == best["softmax_temp"]
    assert len(record["sweep"]["points"]) == 2 and prefix.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    knnlm = run_eval(
        text_dir, "--path", H.model_dir("llama"), "--memory", "none", "--knnlm", "--datastore", llama_store,
        "--k", 8, *window,
    )  # fmt: skip
    none = run_eval(text_dir, "--path", H.model_dir("llama"), "--memory", "none", *window)
    assert knnlm["settings"]["lmbda"] == 0.25 and knnlm["datastore"]["count"] > 0
    assert knnlm["results"][-1]["tokens"] == none["results"][-1]["tokens"]
    assert knnlm["results"][-1]["ppl"] != none["results"][-1]["ppl"]


# ----------------------------------------------------------------------------- mismatches and bad input


def test_foreign_datastores_are_refused(text_dir, llama_store, tmp_path):
    import shutil

    base = ["--memory", "external", "--mem-size", 16, "--datastore", llama_store, "--context-window", CONTEXT,
            "--tokens-per-sample", TPS]  # fmt: skip
    # another model (same key size, same tokenizer)
    with pytest.raises(TrimeError, match="built with a hf llama model") as err:
        run_eval(text_dir, "--path", H.model_dir("gpt2"), *base)
    assert "\n" not in str(err.value)
    # the same model with another tokenizer saved beside it
    other = tmp_path / "llama-other-tokenizer"
    shutil.copytree(H.model_dir("llama"), other)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (other / name).unlink(missing_ok=True)
    H.load_test_tokenizer(300).save_pretrained(other)
    with pytest.raises(TrimeError, match="another dictionary"):
        run_eval(text_dir, "--path", other, *base)


def test_missing_split_and_text_data_errors(text_dir, tmp_path):
    with pytest.raises(TrimeError, match=r"no split 'nosuch' \(looked for nosuch.txt and wiki.nosuch.tokens\)"):
        run_eval(text_dir, "--path", H.model_dir("gpt2"), "--gen-subset", "nosuch", "--tokens-per-sample", TPS)
    wiki = tmp_path / "wiki"
    wiki.mkdir()
    (wiki / "wiki.valid.tokens").write_text((text_dir / "valid.txt").read_text()[:2000])
    record = run_eval(wiki, "--path", H.model_dir("gpt2"), "--gen-subset", "valid", "--tokens-per-sample", TPS)
    assert record["results"][-1]["tokens"] == len(stream_of(H.model_dir("gpt2"), wiki / "wiki.valid.tokens")) - 1
    with pytest.raises(TrimeError, match="--tokens-per-sample 4096 exceeds the model's 128 positions"):
        run_eval(text_dir, "--path", H.model_dir("gpt2"), "--tokens-per-sample", 4096)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow  # HF training chain and CLI runs
def test_chain_train_datastore_eval_and_plain_transformers(text_dir, tmp_path):
    """trime-hf-train (local, long, external with a BM25 plan) -> trime-build-datastore -> trime-eval
    --memory external; every trained dir loads in plain transformers and scores as trime-eval says."""
    import json
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trime.hf.train import main as hf_train
    from trime.retrieval.bm25_batches import main as bm25_batches

    base, train = H.model_dir("gpt2"), text_dir / "train.txt"
    plan = tmp_path / "plan.json"
    bm25_batches([str(train), "--model", str(base), "--tokens-per-sample", str(TPS), "--output", str(plan),
                  "--no-progress-bar"])  # fmt: skip
    outs = {}
    for memory in ("local", "long", "external"):
        outs[memory] = tmp_path / f"hf-{memory}"
        extra = ["--bm25-plan", str(plan)] if memory == "external" else []
        hf_train(H.hf_train_argv(base, train, outs[memory], memory, "--save-steps", "100", *extra, block=TPS,
                                 lr="3e-3"))

    bin_dir = Path(sys.executable).parent
    store, results = tmp_path / "ds", tmp_path / "r.json"
    common = ["--context-window", "16", "--cpu", "--no-progress-bar"]  # window: the training block size (64)
    build = subprocess.run(
        [str(bin_dir / "trime-build-datastore"), str(text_dir), "--path", str(outs["external"]), "--output",
         str(store), "--key-dtype", "fp32", "--index-factory", "Flat", *common],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    count = len(stream_of(base, train)) - 1
    assert f"wrote {count:,} keys (32-d float32)" in build.stdout
    evaluate = subprocess.run(
        [str(bin_dir / "trime-eval"), str(text_dir), "--path", str(outs["external"]), "--memory", "external",
         "--mem-size", "64", "--datastore", str(store), "--k", "16", "--gen-subset", "test", "--results-json",
         str(results), *common],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    assert "Traceback" not in evaluate.stderr and "another checkpoint" not in evaluate.stderr
    record = json.loads(results.read_text())
    row = record["results"][-1]
    assert row["memory"] == "external" and row["tokens"] == len(stream_of(base, text_dir / "test.txt")) - 1
    assert record["settings"]["tokens_per_sample"] == TPS and math.isfinite(row["ppl"])
    assert record["datastore"]["checkpoint"]["sha256"] == record["checkpoint"]["sha256"]

    base_nll = transformers_nll(base, text_dir / "test.txt", TPS, 16)[0]
    for out in outs.values():
        AutoTokenizer.from_pretrained(out)
        assert isinstance(AutoModelForCausalLM.from_pretrained(out), torch.nn.Module)
        nll, tokens = transformers_nll(out, text_dir / "test.txt", TPS, 16)
        assert nll != base_nll  # training changed the weights
        mine = run_eval(text_dir, "--path", out, "--memory", "none", "--gen-subset", "test", "--context-window", 16)
        assert mine["results"][-1]["tokens"] == tokens
        assert abs(mine["results"][-1]["loss_base2"] * math.log(2) - nll / tokens) <= 1e-6 * nll / tokens


def test_key_module_option(text_dir):
    window = ["--memory", "local", "--context-window", CONTEXT, "--tokens-per-sample", TPS, "--gen-subset", "valid"]
    default = run_eval(text_dir, "--path", H.model_dir("gpt2"), *window)
    first = run_eval(text_dir, "--path", H.model_dir("gpt2"), "--key-module", "transformer.h.0.mlp", *window)
    assert default["model"]["key_source"] == "transformer.h.1.mlp"
    assert first["model"]["key_source"] == "transformer.h.0.mlp"
    assert first["results"][-1]["tokens"] == default["results"][-1]["tokens"]
    assert first["results"][-1]["ppl"] != default["results"][-1]["ppl"]  # other keys, other local memory
    with pytest.raises(TrimeError, match="is not a submodule"):
        run_eval(text_dir, "--path", H.model_dir("gpt2"), "--key-module", "transformer.h.9.mlp", *window)
