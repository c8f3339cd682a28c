"""Generation with memory (``trime.eval.generation``, ``trime-generate``) against independent references.

- Teacher forcing: the log-probability generation gives each next token equals the one ``trime-eval``
  (the :class:`Evaluator`, scoring windows in one forward pass each) gives it in the same window, with the
  same memory and settings: local, long (the text before the window as the context stream), the
  continuous cache and external (a datastore; joint softmax, kNN-LM, both), on the tiny fairseq
  checkpoints (adaptive and full softmax) and tiny HF GPT-2 and Llama models.
- ``--memory none`` decoding equals the frameworks' own: ``model.generate`` (greedy, beam search with and
  without an early end-of-sequence, seeded sampling with temperature, top-k and top-p) and fairseq's
  ``SequenceGenerator`` (greedy).
- The KV cache is used: every input token is embedded once however many tokens are generated.
- Copy: a datastore over a text that holds a made-up sentence makes greedy generation reproduce the
  sentence from its first words (joint softmax or kNN-LM); without the datastore it does not.
- ``trime-generate``: each decoding mode on both front-ends, ``--jsonl``, ``--settings-from`` a real
  ``trime-eval --tune`` record, and one-line errors for bad input.
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tests.hf_helpers as H
from tests.eval_helpers import tiny_checkpoints
from trime.errors import TrimeError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per module

FS_TPS, FS_CONTEXT = 48, 16  # fairseq windows: 32 new tokens (the tiny checkpoints have 64 positions)
HF_TPS, HF_CONTEXT = 64, 24  # HF windows: 40 new tokens
WINDOW = 3  # the compared window: its context stream is the split's first WINDOW windows
PROMPT_TOKENS = 3
SENTENCE = "purple Valkyria quietly negotiated seventeen treaties beneath Madero underground fleet"
COPY_PROMPT = "purple Valkyria quietly"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, wt2_sample_bin):
    return tiny_checkpoints(tmp_path_factory, wt2_sample_bin)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    """DATA of the HF models: valid.txt and test.txt, prefixes of the shipped sample's splits."""
    out = tmp_path_factory.mktemp("gen_text")
    for split, source in {"valid": H.SAMPLE_VALID, "test": H.SAMPLE_TEST}.items():
        (out / f"{split}.txt").write_text(source.read_text(encoding="utf-8")[:8000], encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def fs_lms(ckpts, wt2_sample_bin):
    from trime.adapters import load_adapter

    return {name: load_adapter(ckpts[name], wt2_sample_bin, cpu=True) for name in ("trime", "ce")}


@pytest.fixture(scope="module")
def hf_lms(text_dir):
    from trime.adapters import load_adapter

    return {arch: load_adapter(H.model_dir(arch), text_dir, cpu=True) for arch in ("gpt2", "llama")}


def exact_store(lm, windows, split: str, folder: Path):
    """An fp32 datastore of ``lm`` over ``split``, searched exactly (--knn-search torch, l2)."""
    from trime.retrieval.build_datastore import extract
    from trime.retrieval.datastore import Datastore

    extract(lm, split, windows, 8, folder, key_dtype="fp32", show_progress=False, metric="l2")
    return Datastore.open(folder, dim=lm.dim, dict_sha256=lm.dict_sha256, search="torch", device=lm.device)


@pytest.fixture(scope="module")
def stores(fs_lms, hf_lms, tmp_path_factory):
    """(front-end model name) -> its exact datastore over the valid split."""
    out = {}
    for name, lm in fs_lms.items():
        out[name] = exact_store(lm, lm.window_settings(FS_CONTEXT, FS_TPS), "valid", tmp_path_factory.mktemp(name))
    for arch, lm in hf_lms.items():
        out[arch] = exact_store(lm, lm.window_settings(HF_CONTEXT, HF_TPS), "valid", tmp_path_factory.mktemp(arch))
    return out


def model_and_windows(name, fs_lms, hf_lms):
    if name in fs_lms:
        lm = fs_lms[name]
        return lm, lm.window_settings(FS_CONTEXT, FS_TPS)
    lm = hf_lms[name]
    return lm, lm.window_settings(HF_CONTEXT, HF_TPS)


# ----------------------------------------------------------------------------- the one distribution


def test_label_logsumexp_over_the_vocabulary_matches_brute_force_and_the_targets():
    """The scatter-logsumexp by label equals explicit sums; the vocabulary distribution sums to 1 and, read at the
    targets, equals the same function at the targets (evaluation's layout)."""
    from trime.eval.memory import label_logsumexp, memory_log_probs

    g = torch.Generator().manual_seed(0)
    rows, entries, vocab = 4, 9, 6
    scores = torch.randn(rows, entries, generator=g) * 3
    labels = torch.randint(0, vocab, (rows, entries), generator=g)
    valid = torch.rand(rows, entries, generator=g) > 0.3
    valid[3] = False  # a row with an empty memory
    terms = label_logsumexp(scores, labels, valid, vocab_size=vocab)
    for r in range(rows):
        seen = [(float(scores[r, j]), int(labels[r, j])) for j in range(entries) if valid[r, j]]
        total = math.fsum(math.exp(s) for s, _ in seen)
        assert float(terms.lse_all[r]) == pytest.approx(math.log(total) if seen else -math.inf, abs=1e-5)
        for w in range(vocab):
            part = math.fsum(math.exp(s) for s, y in seen if y == w)
            expected = math.log(part) if part > 0 else -math.inf
            assert float(terms.lse_label[r, w]) == pytest.approx(expected, abs=1e-5)

    logits = torch.randn(rows, vocab, generator=g)
    logz = logits.logsumexp(-1)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    at_targets = label_logsumexp(scores, labels, valid, targets=targets)
    knn = label_logsumexp(scores[:3] / 2, labels[:3], valid[:3], vocab_size=vocab)  # p_knn needs hits
    knn_at = label_logsumexp(scores[:3] / 2, labels[:3], valid[:3], targets=targets[:3])
    for mix in (dict(), dict(lmbda=0.3), dict(cache_lmbda=0.4), dict(lmbda=0.2, cache_lmbda=0.5)):
        n = 3 if "lmbda" in mix else rows
        joint = None if "cache_lmbda" in mix else terms
        joint_at = None if "cache_lmbda" in mix else at_targets
        full, token_part = memory_log_probs(
            logits[:n], logz[:n], _rows(joint, n), knn=knn, cache=_rows(terms, n), token_share=True, **mix
        )  # fmt: skip
        gathered = memory_log_probs(logits[:n].gather(1, targets[:n, None])[:, 0], logz[:n], _rows(joint_at, n),
                                    knn=knn_at, cache=_rows(at_targets, n), **mix)
        torch.testing.assert_close(full.logsumexp(-1), torch.zeros(n), atol=1e-5, rtol=0)
        torch.testing.assert_close(full.gather(1, targets[:n, None])[:, 0], gathered, atol=1e-6, rtol=0)
        assert bool((token_part <= full + 1e-6).all())
    assert float(terms.lse_all[3]) == -math.inf  # an empty memory leaves the model's distribution
    plain, _ = memory_log_probs(logits, logz, terms, token_share=True)
    torch.testing.assert_close(plain[3], logits[3] - logz[3])


def _rows(terms, n):
    from trime.eval.memory import LabelTerms

    return None if terms is None else LabelTerms(terms.lse_all[:n], terms.lse_label[:n])


# ----------------------------------------------------------------------------- teacher forcing = trime-eval

SETTINGS = {
    "local": dict(level="local", softmax_temp=0.7),
    "long": dict(level="long", mem_size=10, softmax_temp=0.7),  # the window's context rows partly in the FIFO
    "cache": dict(level="long", mem_size=40, cache="interp", cache_lmbda=0.3, cache_temp=3.0),
    "external": dict(level="external", mem_size=40, knn_in_joint=True, k=16, softmax_temp=1.3, external_temp=2.0),
    "external+lmbda": dict(level="external", mem_size=40, knn_in_joint=True, k=16, lmbda=0.3, interp_temp=2.5),
    "knnlm": dict(level="none", lmbda=0.25, k=16, interp_temp=3.0),
}


def eval_log_probs(lm, windows, settings, store=None):
    """trime-eval's log P of every scored token of window WINDOW of the test split (and of memory none)."""
    from trime.eval.engine import Evaluator
    from trime.eval.memory import MemorySettings

    evaluator = Evaluator(lm, windows, batch_size=1, store=store, k=settings.k or 1, progress=False)
    cached = evaluator.collect("test", max_batches=WINDOW + 1)
    counts = lm.windows("test", windows).scored_counts()
    first = int(counts[:WINDOW].sum())
    rows = slice(first, first + int(counts[WINDOW]))
    return cached.log_probs(settings)[rows], cached.log_probs(MemorySettings())[rows]


@pytest.mark.parametrize(
    "name,memory",
    [("trime", m) for m in SETTINGS]
    + [("ce", "long"), ("ce", "external+lmbda")]
    + [(arch, m) for arch in ("gpt2", "llama") for m in SETTINGS],
)
def test_teacher_forced_log_probs_equal_trime_eval(fs_lms, hf_lms, stores, name, memory):
    """Window WINDOW of the test split: its first tokens are the prompt, its other tokens are forced one at a
    time through the KV cache; everything before the window is the context stream (long-term memory)."""
    from trime.eval.generation import Generator
    from trime.eval.memory import MemorySettings

    lm, windows = model_and_windows(name, fs_lms, hf_lms)
    settings = MemorySettings(**SETTINGS[memory])
    store = stores[name] if settings.knn_in_joint or settings.lmbda > 0 else None
    expected, no_memory = eval_log_probs(lm, windows, settings, store)
    stream = np.asarray(lm.stream("test"), dtype=np.int64)
    start = WINDOW * windows.new_tokens
    end = start + len(expected)
    generator = Generator(lm, settings, windows, store=store, context=stream[:start])
    tokens = generator.score(stream[start : start + PROMPT_TOKENS], stream[start + PROMPT_TOKENS : end])
    ours = torch.tensor([t.log_prob for t in tokens])
    torch.testing.assert_close(ours, expected[PROMPT_TOKENS:], atol=1e-4, rtol=0)
    assert float((expected - no_memory).abs().max()) > 1e-2  # the memory changes the scores
    lm_probs = torch.tensor([t.lm_prob for t in tokens]).log()
    torch.testing.assert_close(lm_probs, no_memory[PROMPT_TOKENS:], atol=1e-4, rtol=0)
    assert all(0 <= t.memory_prob <= t.prob + 1e-9 for t in tokens)
    if settings.uses_long:
        assert generator.fifo_size == settings.mem_size


# ----------------------------------------------------------------------------- the frameworks' own decoding

PROMPTS = ("The game began development in", "It was released in January", " = Valkyria Chronicles III =")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_memory_none_greedy_equals_model_generate(text_dir, arch):
    from trime.adapters import load_adapter
    from trime.eval.generation import Decoding, Generator
    from trime.eval.memory import MemorySettings

    lm = load_adapter(H.model_dir(arch), text_dir, cpu=True)
    generator = Generator(lm, MemorySettings(), lm.window_settings(HF_CONTEXT, HF_TPS))
    for text in PROMPTS:
        prompt = lm.encode(text)
        ours = generator.generate(prompt, Decoding(max_new_tokens=12))
        theirs = lm.model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt) :]
        assert ours.ids == theirs.tolist()
        assert ours.text == lm.decode(ours.ids[:-1] if ours.stopped else ours.ids)


@pytest.mark.parametrize("name", ["trime", "ce"])
def test_memory_none_greedy_equals_fairseq_sequence_generator(fs_lms, name):
    """fairseq's own LM generation (SequenceGenerator, beam 1, the prompt as prefix) ends with <eos>, chosen or
    forced at its maximum length."""
    from fairseq.sequence_generator import SequenceGenerator

    from trime.eval.generation import Decoding, Generator
    from trime.eval.memory import MemorySettings

    lm = fs_lms[name]
    generator = Generator(lm, MemorySettings(), lm.window_settings(FS_CONTEXT, FS_TPS))
    eos = lm.dictionary.eos()
    stopped = 0
    for text in PROMPTS + ("The Tower of London was", "In 1991 , the"):
        prompt = lm.encode(text)
        ours = generator.generate(prompt, Decoding(max_new_tokens=10))
        search = SequenceGenerator([lm.model], lm.task.target_dictionary, beam_size=1, max_len_a=0,
                                   max_len_b=len(prompt) + 10)
        sample = {"net_input": {"src_tokens": torch.tensor([prompt]), "src_lengths": torch.tensor([len(prompt)])},
                  "id": torch.tensor([0])}
        theirs = lm.task.inference_step(search, [lm.model], sample)[0][0]["tokens"].tolist()
        assert theirs[: len(prompt)] == prompt
        theirs = theirs[len(prompt) :]
        assert ours.ids == (theirs if ours.stopped else theirs[:-1]) and theirs[-1] == eos
        stopped += ours.stopped
    assert name != "trime" or stopped  # the trained head ends a line by itself


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_beam_search_and_sampling_equal_model_generate(hf_lms, arch, monkeypatch):
    """Beam search (also when beams end early: a frequent token made the end of sequence) and seeded sampling
    (temperature, top-k, top-p) pick HF's tokens."""
    from trime.eval.generation import Decoding, Generator
    from trime.eval.memory import MemorySettings

    lm = hf_lms[arch]
    model = lm.model
    windows = lm.window_settings(HF_CONTEXT, HF_TPS)
    early_stops = 0
    for text in PROMPTS:
        prompt = lm.encode(text)
        ids = torch.tensor([prompt])
        greedy = Generator(lm, MemorySettings(), windows).generate(prompt, Decoding(max_new_tokens=8)).ids
        for eos in (0, greedy[2]):
            monkeypatch.setattr(model.generation_config, "eos_token_id", eos)
            generator = Generator(lm, MemorySettings(), windows)
            for beams in (2, 4):
                ours = generator.generate(prompt, Decoding(max_new_tokens=8, num_beams=beams))
                theirs = model.generate(ids, max_new_tokens=8, num_beams=beams, do_sample=False)[0, len(prompt) :]
                theirs = theirs.tolist()
                assert ours.ids == theirs[: len(ours.ids)] and set(theirs[len(ours.ids) :]) <= {eos}  # HF pads
                early_stops += ours.stopped
        monkeypatch.setattr(model.generation_config, "eos_token_id", 0)
        generator = Generator(lm, MemorySettings(), windows)
        for seed, warps in ((0, {}), (1, dict(temperature=0.7, top_k=20, top_p=0.9)), (2, dict(top_k=0, top_p=0.5))):
            ours = generator.generate(prompt, Decoding(max_new_tokens=8, do_sample=True, seed=seed, **warps))
            torch.manual_seed(seed)
            theirs = model.generate(ids, max_new_tokens=8, do_sample=True, **warps)[0, len(prompt) :].tolist()
            assert ours.ids == theirs[: len(ours.ids)]
    assert early_stops  # the end-of-sequence path was taken


def test_every_input_token_is_embedded_once(fs_lms, hf_lms):
    """The KV cache is kept: generating N tokens after H + P input tokens embeds H + P + N - 1 tokens in all."""
    from trime.eval.generation import Decoding, Generator
    from trime.eval.memory import MemorySettings

    for name, embeddings in (("trime", lambda lm: lm.model.decoder.embed_tokens),
                             ("gpt2", lambda lm: lm.model.get_input_embeddings())):
        lm, windows = model_and_windows(name, fs_lms, hf_lms)
        context = np.asarray(lm.stream("test")[:100], dtype=np.int64)
        generator = Generator(lm, MemorySettings(level="long", mem_size=30), windows, context=context)
        seen = []
        handle = embeddings(lm).register_forward_hook(lambda module, args, out, seen=seen: seen.append(args[0].numel()))
        try:
            prompt = lm.encode("The game began development in")
            result = generator.generate(prompt, Decoding(max_new_tokens=12, num_beams=1))
        finally:
            handle.remove()
        assert sum(seen) == len(generator.head) + len(prompt) + len(result.ids) - 1
        assert len(generator.head) == windows.context_window + (1 if name == "trime" else 0)


@pytest.mark.parametrize("name", ["trime", "gpt2"])
def test_each_beam_keeps_its_own_memory(fs_lms, hf_lms, stores, name):
    """A beam's per-token log-probs (local memory of its own tokens, and the datastore) equal the teacher-forced
    scores of its tokens: its memory never held another beam's tokens."""
    from trime.eval.generation import Decoding, Generator
    from trime.eval.memory import MemorySettings

    lm, windows = model_and_windows(name, fs_lms, hf_lms)
    settings = MemorySettings(**SETTINGS["external+lmbda"])
    context = np.asarray(lm.stream("test")[:100], dtype=np.int64)
    generator = Generator(lm, settings, windows, store=stores[name], context=context)
    for text in PROMPTS[:2]:
        prompt = lm.encode(text)
        beam = generator.generate(prompt, Decoding(max_new_tokens=8, num_beams=3))
        forced = generator.score(prompt, beam.ids)
        np.testing.assert_allclose([t.log_prob for t in beam.tokens], [t.log_prob for t in forced], atol=1e-5, rtol=0)
        greedy = generator.generate(prompt, Decoding(max_new_tokens=8))
        assert generator.generate(prompt, Decoding(max_new_tokens=8, num_beams=1)).ids == greedy.ids


# ----------------------------------------------------------------------------- copy from the datastore


@pytest.fixture(scope="module")
def copy_data(ckpts, wt2_sample_bin, tmp_path_factory):
    """A data-bin whose split ``memo`` is valid text with SENTENCE (words found nowhere else in it) as one line, and
    the TrimeLM checkpoint's datastore over it (no index: searched exactly)."""
    from fairseq.data import Dictionary, indexed_dataset

    from trime.retrieval.build_datastore import main as build_datastore

    out = tmp_path_factory.mktemp("copy")
    data = out / "data-bin"
    data.mkdir()
    for name in ("dict.txt", "trime_meta.json"):
        shutil.copy(wt2_sample_bin / name, data / name)
    dictionary = Dictionary.load(str(data / "dict.txt"))
    filler = H.SAMPLE_VALID.read_text(encoding="utf-8").splitlines()[:120]
    words = {w for line in filler for w in line.split()}
    assert all(w in dictionary.indices and w not in words for w in SENTENCE.split())
    builder = indexed_dataset.make_builder(str(data / "memo.bin"), impl="mmap", vocab_size=len(dictionary))
    for line in filler[:60] + [f" {SENTENCE} "] + filler[60:]:
        builder.add_item(dictionary.encode_line(line, add_if_not_exist=False))
    builder.finalize(str(data / "memo.idx"))
    store = out / "ds"
    build_datastore([str(data), "--path", str(ckpts["trime"]), "--gen-subset", "memo", "--output", str(store),
                     "--context-window", str(FS_CONTEXT), "--tokens-per-sample", str(FS_TPS), "--key-dtype", "fp32",
                     "--no-index", "--metric", "l2", "--cpu", "--no-progress-bar"])
    return data, store


def generate_cli(capsys, *argv) -> list[str]:
    from trime.eval.generate import run

    run([str(a) for a in argv] + ["--cpu", "--no-progress-bar"])
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("memory", [
    ["--memory", "external", "--mem-size", "64", "--k", "8", "--external-temp", "0.1", "--metric", "ip"],  # joint
    ["--knnlm", "--k", "8", "--lmbda", "0.9"],  # kNN-LM: interpolation only
])
def test_the_datastore_makes_greedy_generation_copy_a_sentence(ckpts, copy_data, capsys, memory):
    data, store = copy_data
    common = [data, "--path", ckpts["trime"], "--prompt", COPY_PROMPT, "--context-window", FS_CONTEXT,
              "--tokens-per-sample", FS_TPS, "--max-new-tokens", 7]
    with_store = [*common, "--datastore", store, "--knn-search", "torch", *memory]
    assert generate_cli(capsys, *with_store) == [SENTENCE]
    for without in (["--memory", "none"], ["--memory", "local"]):
        (line,) = generate_cli(capsys, *common, *without)
        assert line.startswith(COPY_PROMPT) and line != SENTENCE
    records = [json.loads(line) for line in generate_cli(capsys, *with_store, "--jsonl")]
    assert [r["token"] for r in records] == [" " + w for w in SENTENCE.split()[3:]]
    assert all(r["memory_prob"] > 0.5 > r["lm_prob"] and r["memory_prob"] <= r["prob"] for r in records)


# ----------------------------------------------------------------------------- trime-generate


def test_cli_decoding_modes_on_both_front_ends(ckpts, wt2_sample_bin, text_dir, stores, tmp_path, capsys):
    """Greedy, sampling and beam search with each memory: one stdout line per prompt (blank lines of the prompt
    file skipped), greedy equal to the API's; --jsonl one record per token; a seed repeats a sample."""
    from trime.eval.generation import Decoding, generate
    from trime.eval.memory import MemorySettings

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The game began development in\n\n  \nIt was released in\n", encoding="utf-8")
    context = tmp_path / "context.txt"
    context.write_text(H.SAMPLE_TEST.read_text(encoding="utf-8")[:1500], encoding="utf-8")
    models = {"trime": ([wt2_sample_bin, "--path", ckpts["trime"]], FS_CONTEXT, FS_TPS),
              "gpt2": (["--path", H.model_dir("gpt2")], HF_CONTEXT, HF_TPS)}
    for name, (model, cw, tps) in models.items():
        base = [*model, "--prompt-file", prompts, "--context-window", cw, "--tokens-per-sample", tps,
                "--max-new-tokens", 6, "--context-file", context]
        memories = (["--memory", "none"], ["--memory", "long", "--mem-size", 50],
                    ["--memory", "external", "--mem-size", 50, "--datastore", stores[name].directory, "--k", 8,
                     "--knn-search", "torch", "--lmbda", "0.2"])
        for memory in memories:
            for decoding in ([], ["--do-sample", "--seed", 3, "--top-p", "0.8"], ["--num-beams", 3]):
                lines = generate_cli(capsys, *base, *memory, *decoding)
                assert len(lines) == 2 and lines[0].startswith("The game began development in")
                assert lines[1].startswith("It was released in")
        sampled = generate_cli(capsys, *base, "--do-sample", "--seed", 5)
        assert generate_cli(capsys, *base, "--do-sample", "--seed", 5) == sampled
        records = [json.loads(line) for line in generate_cli(capsys, *base, "--memory", "local", "--jsonl")]
        assert {r["prompt"] for r in records} == {0, 1} and len(records) <= 12
        assert all(set(r) == {"prompt", "id", "token", "prob", "lm_prob", "memory_prob"} for r in records)
        assert all(0 <= r["memory_prob"] <= r["prob"] <= 1 for r in records)
    lm_gpt2 = generate_cli(capsys, "--path", H.model_dir("gpt2"), "--prompt", "It was released in",
                           "--context-window", HF_CONTEXT, "--tokens-per-sample", HF_TPS, "--memory", "local",
                           "--max-new-tokens", 6)
    from trime.adapters import load_adapter

    lm = load_adapter(H.model_dir("gpt2"), text_dir, cpu=True)
    (api,) = generate(lm, "It was released in", MemorySettings(level="local"), Decoding(max_new_tokens=6),
                      windows=lm.window_settings(HF_CONTEXT, HF_TPS))
    assert lm_gpt2 == [("It was released in" + api.text).replace("\n", "\\n")]


def test_settings_from_a_tuned_results_file(text_dir, tmp_path, capsys):
    """--settings-from takes trime-eval --tune's chosen temperatures and its memory settings; a flag wins; a
    record without tuned values, or tuned with other memory, is refused."""
    from trime.eval.evaluate import run as trime_eval
    from trime.eval.generate import build_parser, resolve_args

    model = H.model_dir("gpt2")
    tuned = tmp_path / "tuned.json"
    record = trime_eval([str(text_dir), "--path", str(model), "--memory", "long", "--mem-size", "60", "--tune",
                         "--tune-tokens", "200", "--context-window", str(HF_CONTEXT), "--tokens-per-sample",
                         str(HF_TPS), "--cpu", "--no-progress-bar", "--results-json", str(tuned)])
    capsys.readouterr()
    base = ["--path", str(model), "--prompt", "It was", "--settings-from", str(tuned)]
    args = build_parser().parse_args(base)
    resolve_args(args)
    assert (args.memory, args.mem_size) == ("long", 60)
    assert args.softmax_temp == record["tuning"]["chosen"]["softmax_temp"] == record["settings"]["softmax_temp"]
    args = build_parser().parse_args([*base, "--softmax-temp", "3.5", "--mem-size", "20"])
    resolve_args(args)
    assert (args.softmax_temp, args.mem_size) == (3.5, 20)
    lines = generate_cli(capsys, *base, "--context-window", HF_CONTEXT, "--tokens-per-sample", HF_TPS)
    assert len(lines) == 1 and lines[0].startswith("It was")
    with pytest.raises(TrimeError, match="disagrees with --settings-from .* tuned with --memory long"):
        resolve_args(build_parser().parse_args([*base, "--memory", "local"]))
    untuned = tmp_path / "untuned.json"
    untuned.write_text(json.dumps({**record, "tuning": None}))
    with pytest.raises(TrimeError, match="holds no tuned values"):
        resolve_args(build_parser().parse_args([*base[:-1], str(untuned)]))


def test_settings_from_another_checkpoint_is_refused(ckpts, wt2_sample_bin, fs_lms, tmp_path):
    from trime.eval.generate import run

    record = {"checkpoint": fs_lms["ce"].identity, "settings": {"memory": "local", "knnlm": False, "cache": "joint"},
              "tuning": {"chosen": {"softmax_temp": 2.0, "lmbda": 0.0, "interp_temp": 1.0}}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record))
    with pytest.raises(TrimeError, match="was tuned with another checkpoint"):
        run([str(wt2_sample_bin), "--path", str(ckpts["trime"]), "--prompt", "The", "--settings-from", str(path),
             "--cpu"])


def test_bad_input_is_one_line(ckpts, wt2_sample_bin, stores, tmp_path):
    from trime.eval.generate import run

    fs = [str(wt2_sample_bin), "--path", str(ckpts["ce"]), "--cpu", "--no-progress-bar"]
    hf = ["--path", str(H.model_dir("gpt2")), "--cpu", "--no-progress-bar"]
    cases = [
        ([*fs, "--prompt-file", str(tmp_path / "missing.txt")], "--prompt-file .*missing.txt: no such file"),
        ([*fs, "--prompt", "The", "--context-file", str(tmp_path / "none.txt")], "--context-file .*: no such file"),
        ([*fs, "--prompt", "The", "--do-sample", "--num-beams", "2"], "beam sampling.*is not offered"),
        (["--path", str(ckpts["ce"]), "--prompt", "The", "--cpu"], "is a fairseq checkpoint: give DATA"),
        ([*fs, "--prompt", "The", "--memory", "external", "--mem-size", "8", "--datastore",
          str(stores["trime"].directory), "--k", "4"], "was built with another checkpoint"),
        ([*fs, "--prompt", "The", "--memory", "long"], "--memory long needs --mem-size"),
        ([*fs, "--prompt", "The", "--max-new-tokens", "80"], "more than the model's 64"),
        ([*hf, "--prompt", ""], "an empty prompt gives the model nothing to continue"),
    ]
    for argv, message in cases:
        with pytest.raises(TrimeError, match=message):
            run(argv)
    with pytest.raises(SystemExit) as usage:  # no prompt: a usage error
        run(fs)
    assert usage.value.code == 2


def test_cli_error_is_one_stderr_line(ckpts, wt2_sample_bin, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "trime.eval.generate", str(wt2_sample_bin), "--path", str(ckpts["ce"]),
         "--prompt-file", str(tmp_path / "missing.txt"), "--cpu"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].startswith("trime: error: --prompt-file ")
    assert "Traceback" not in proc.stderr
