"""The token cache (trime.hf.token_cache): chunked tokenization equals whole-string tokenization, and the cache
is keyed, atomic, resumable after a SIGKILL, safe for concurrent processes, and read by the callers as a memmap.

Every exactness test compares against the tokenizer's own call on the whole file as one string
(``tokenize_text``), under a GPT-2-style byte-level BPE (the tests' tokenizer) and two Llama-style
tokenizers trained here with the ``tokenizers`` library (sentencepiece-like BPE with byte fallback:
the legacy ``Prepend``/``Replace`` normalizer without a pre-tokenizer, and the ``Metaspace``
pre-tokenizer), with chunks of a few hundred bytes so that each file has hundreds of boundaries.
"""

from __future__ import annotations

import functools
import json
import lzma
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.hf_helpers import REPO_ROOT, SAMPLE_TRAIN, SAMPLE_VALID, load_test_tokenizer
from trime.errors import TrimeError
from trime.hf import token_cache
from trime.hf.text import text_file_identity, tokenize_text, tokenize_text_file, tokenizer_identity

ENWIK8_SAMPLE = REPO_ROOT / "samples" / "enwik8" / "enwik8.sample"
CHUNK, OVERLAP = 256, 64  # hundreds of boundaries per sample file


@functools.lru_cache(maxsize=None)
def llama_tokenizer(style: str):
    """A Llama-style BPE with byte fallback, trained on the shipped sample; ``legacy`` or ``metaspace``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=60,
                                  show_progress=False)
    tok.train([str(SAMPLE_TRAIN)], trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):  # sentencepiece's byte pieces: characters outside the vocabulary become bytes
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"].update(byte_fallback=True, unk_token=None)
    tok = Tokenizer.from_str(json.dumps(spec))
    if style == "legacy":  # Llama 2's converted tokenizer: no pre-tokenizer, one long "word" per text
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tokenizer_of(name: str):
    return load_test_tokenizer() if name == "gpt2" else llama_tokenizer(name)


TOKENIZERS = ("gpt2", "legacy", "metaspace")

# what chunk boundaries must survive: blank-line runs, leading spaces, headings, unicode, CRLF and lone CR,
# whitespace and a word longer than a window's overlap (those boundaries need an extended window)
HARD_TEXT = (
    " = Valkyria Chronicles III = \n\n\n\n \n Senjō no Valkyria 3 : Unrecorded Chronicles ( Japanese : 戦場のヴァルキュリア3 ) \n"
    + "\n" * 40
    + " = = Gameplay = = \n\n   leading spaces   and\ttabs \u00a0non-breaking\u3000ideographic space \n"
    + "emoji 😀🎉 combining e\u0301 ÅÄÖ ß Ωμέγα кириллица العربية \r\n windows line \r old mac line \r\n\r\n"
    + " " * 700 + "after a long run of spaces\n"
    + "x" * 900 + " after a long word\n"
    + "\n \n \n \n" * 60
    + " = = = Deep heading = = = \n" * 30
)


def whole(path: Path, tokenizer) -> np.ndarray:
    return tokenize_text(path.read_text(encoding="utf-8"), tokenizer)


def chunked(path: Path, tokenizer, cache_dir: Path, chunk: int = CHUNK, overlap: int = OVERLAP) -> np.ndarray:
    return token_cache.cached_tokens(path, tokenizer, cache_dir=cache_dir, chunk_bytes=chunk, overlap_bytes=overlap)


def entry_meta(cache_dir: Path) -> dict:
    (meta,) = [p for p in cache_dir.glob("*.json") if not p.name.endswith(".progress.json")]
    return json.loads(meta.read_text())


def write_hard_text(path: Path, repeats: int = 3) -> Path:
    path.write_bytes((HARD_TEXT * repeats).encode("utf-8"))  # bytes: keep the \r\n and \r as written
    return path


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("text", ["wikitext-valid", "enwik8-slice", "hard"])
def test_chunked_ids_equal_whole_file_ids(tmp_path, name, text):
    if text == "wikitext-valid":
        path = SAMPLE_VALID
    elif text == "enwik8-slice":  # XML markup, URLs and non-Latin scripts; cut at a character start
        raw = ENWIK8_SAMPLE.read_bytes()[:60_000]
        path = tmp_path / "enwik8.txt"
        path.write_bytes(raw[: len(raw.decode("utf-8", errors="ignore").encode("utf-8"))])
    else:
        path = write_hard_text(tmp_path / "hard.txt")
    tokenizer = tokenizer_of(name)
    ids = chunked(path, tokenizer, tmp_path / "cache")
    reference = whole(path, tokenizer)
    assert isinstance(ids, np.memmap) and not ids.flags.writeable
    assert ids.dtype == np.uint16
    np.testing.assert_array_equal(ids, reference)
    stats = entry_meta(tmp_path / "cache")["windows"]
    assert not stats["whole_file"]
    assert stats["joined"] >= path.stat().st_size // CHUNK // 2, stats  # hundreds of verified boundaries


@pytest.mark.parametrize("name", ["gpt2", "legacy"])
def test_windows_that_never_agree_are_extended_up_to_the_whole_file(tmp_path, monkeypatch, name):
    # runs longer than an overlap holds: no boundary can be verified, so each window grows over the next
    monkeypatch.setattr(token_cache, "RUN_TOKENS", 200)
    path = write_hard_text(tmp_path / "hard.txt", repeats=1)
    tokenizer = tokenizer_of(name)
    np.testing.assert_array_equal(chunked(path, tokenizer, tmp_path / "cache"), whole(path, tokenizer))
    stats = entry_meta(tmp_path / "cache")["windows"]
    assert stats["joined"] == 0 and stats["extended"] >= path.stat().st_size // CHUNK - 1, stats


@pytest.mark.slow
@pytest.mark.parametrize("name", TOKENIZERS)
def test_chunked_ids_equal_whole_file_ids_on_wikitext2_test(tmp_path, shared_data_dir, name):
    source = shared_data_dir / "wikitext-2" / "wiki.test.tokens.xz"
    if not source.is_file():
        pytest.skip(f"{source} is not present")
    path = tmp_path / "wiki.test.tokens"
    path.write_bytes(lzma.decompress(source.read_bytes()))
    tokenizer = tokenizer_of(name)
    ids = chunked(path, tokenizer, tmp_path / "cache", chunk=2048, overlap=256)
    np.testing.assert_array_equal(ids, whole(path, tokenizer))
    assert entry_meta(tmp_path / "cache")["windows"]["joined"] > 500


def test_cache_is_keyed_by_text_and_tokenizer_and_reused(tmp_path):
    cache = tmp_path / "cache"
    text = write_hard_text(tmp_path / "a.txt", repeats=1)
    gpt2, llama = tokenizer_of("gpt2"), tokenizer_of("legacy")
    first = chunked(text, gpt2, cache)
    (entry,) = cache.glob("*.npy")
    mtime = entry.stat().st_mtime_ns
    again = chunked(text, gpt2, cache)
    assert entry.stat().st_mtime_ns == mtime and np.array_equal(first, again)  # read, not re-tokenized
    meta = entry_meta(cache)
    assert meta["text"] == text_file_identity(text) and meta["tokenizer"] == tokenizer_identity(gpt2)
    chunked(text, llama, cache)  # another tokenizer: another entry
    text.write_text(text.read_text(encoding="utf-8") + "more\n", encoding="utf-8")
    changed = chunked(text, gpt2, cache)  # other text: another entry, with the new ids
    assert len(list(cache.glob("*.npy"))) == 3
    np.testing.assert_array_equal(changed, whole(text, gpt2))
    assert not list(cache.glob("*.partial")) and not list(cache.glob("*.progress.json"))


def test_damaged_entry_is_tokenized_again(tmp_path, capsys):
    cache = tmp_path / "cache"
    text = write_hard_text(tmp_path / "a.txt", repeats=1)
    tokenizer = tokenizer_of("gpt2")
    reference = chunked(text, tokenizer, cache).copy()
    (entry,) = cache.glob("*.npy")
    data = bytearray(entry.read_bytes())
    data[-1] ^= 0xFF  # one id flipped
    entry.write_bytes(bytes(data))
    np.testing.assert_array_equal(chunked(text, tokenizer, cache), reference)
    assert "is damaged (its ids do not match their sha256); tokenizing again" in capsys.readouterr().err


def test_default_location_and_override(tmp_path, monkeypatch):
    monkeypatch.delenv(token_cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert token_cache.cache_root() == tmp_path / "xdg" / "trime" / "tokens"
    monkeypatch.setenv(token_cache.CACHE_ENV, str(tmp_path / "env"))
    assert token_cache.cache_root() == tmp_path / "env"
    assert token_cache.cache_root(tmp_path / "given") == tmp_path / "given"
    ids = tokenize_text_file(SAMPLE_VALID, tokenizer_of("gpt2"))  # the public path uses the cache
    assert len(list((tmp_path / "env").glob("*.npy"))) == 1
    np.testing.assert_array_equal(ids, whole(SAMPLE_VALID, tokenizer_of("gpt2")))


def test_bad_files_fail_with_one_line(tmp_path):
    tokenizer = tokenizer_of("gpt2")
    cache = tmp_path / "cache"
    with pytest.raises(TrimeError, match=r"--train-file .*missing\.txt: no such file"):
        chunked(tmp_path / "missing.txt", tokenizer, cache)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(TrimeError, match=r"empty\.txt is empty"):
        chunked(tmp_path / "empty.txt", tokenizer, cache)
    (tmp_path / "blank.txt").write_text(" \n\n \t\n" * 300)
    with pytest.raises(TrimeError, match=r"blank\.txt is empty"):
        chunked(tmp_path / "blank.txt", tokenizer, cache)
    bad = b"fine text\n" * 100 + b"\xff\xfe bad" + b"more\n" * 100
    (tmp_path / "latin.txt").write_bytes(bad)
    with pytest.raises(TrimeError, match=r"latin\.txt is not UTF-8 text \(byte 1000\); convert it to UTF-8"):
        chunked(tmp_path / "latin.txt", tokenizer, cache)
    unwritable = tmp_path / "file-not-dir"
    unwritable.write_text("x")
    with pytest.raises(TrimeError, match=r"token cache .*file-not-dir/sub: .*set TRIME_TOKEN_CACHE"):
        chunked(SAMPLE_VALID, tokenizer, unwritable / "sub")
    assert not list(cache.glob("*.npy")) and not list(cache.glob("*.partial"))


# a child that tokenizes with tiny windows, slowed so that the parent can kill it mid-way
_CHILD = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {root!r})
    from tests.test_token_cache import tokenizer_of
    from trime.hf import token_cache
    slow = token_cache._Tokenization._save
    def save(self, state):
        slow(self, state)
        print("saved", self.tokens, flush=True)
        pause = sys.argv[4]
        if pause.startswith("gate:"):  # hold while the gate file exists
            while os.path.exists(pause[5:]):
                time.sleep(0.05)
        else:
            time.sleep(float(pause))
    token_cache._Tokenization._save = save
    token_cache.BATCH_WINDOWS = 4
    ids = token_cache.cached_tokens(sys.argv[1], tokenizer_of(sys.argv[3]), cache_dir=sys.argv[2],
                                    chunk_bytes={chunk}, overlap_bytes={overlap})
    print("done", len(ids), flush=True)
    """
)


def _child(path: Path, cache: Path, name: str, pause) -> subprocess.Popen:
    code = _CHILD.format(root=str(REPO_ROOT), chunk=CHUNK, overlap=OVERLAP)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-c", code, str(path), str(cache), name, str(pause)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "legacy"])
def test_sigkill_resumes_from_last_saved_chunk(tmp_path, name):
    path = write_hard_text(tmp_path / "hard.txt", repeats=4)
    cache = tmp_path / "cache"
    child = _child(path, cache, name, pause=0.2)
    saved = []
    for line in child.stdout:  # kill it after a few saved batches, in its pause or while it tokenizes
        saved.append(int(line.split()[1]))
        if len(saved) == 3:
            time.sleep(0.1)
            child.send_signal(signal.SIGKILL)
            break
    child.wait()
    assert child.returncode == -signal.SIGKILL
    (progress,) = cache.glob("*.progress.json")
    done = json.loads(progress.read_text())["tokens"]
    assert done >= saved[-1] > 0 and not list(cache.glob("*.npy"))
    resumed = _child(path, cache, name, pause=0.0)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert out.split()[1] != "0" and "done" in out  # it saved after the ids kept from the killed run
    first_saved = int(out.split()[1])
    assert first_saved > done
    ids = np.load(next(cache.glob("*.npy")), mmap_mode="r")
    np.testing.assert_array_equal(ids, whole(path, tokenizer_of(name)))
    assert not list(cache.glob("*.partial")) and not list(cache.glob("*.progress.json"))


@pytest.mark.slow
def test_concurrent_processes_wait_for_one_writer(tmp_path):
    path = write_hard_text(tmp_path / "hard.txt", repeats=4)
    cache = tmp_path / "cache"
    gate = tmp_path / "gate"
    gate.touch()
    writer = _child(path, cache, "gpt2", pause=f"gate:{gate}")
    assert writer.stdout.readline().startswith("saved")  # it holds the lock, and holds still
    reader = _child(path, cache, "gpt2", pause=0.0)
    waiting = reader.stderr.readline()
    assert waiting.startswith("trime: waiting for pid ") and f"to finish tokenizing {path}" in waiting
    gate.unlink()
    out_r, err_r = reader.communicate(timeout=120)
    out_w, _ = writer.communicate(timeout=120)
    assert reader.returncode == writer.returncode == 0, err_r
    assert "saved" not in out_r  # it tokenized nothing: it read the writer's entry
    assert out_r.split()[-1] == out_w.split()[-1] == str(len(whole(path, tokenizer_of("gpt2"))))


def test_progress_lines_without_a_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(token_cache, "PROGRESS_INTERVAL_S", 0.0)
    path = write_hard_text(tmp_path / "hard.txt", repeats=1)
    ids = token_cache.cached_tokens(path, tokenizer_of("gpt2"), cache_dir=tmp_path / "c", progress_bar=False,
                                    chunk_bytes=CHUNK, overlap_bytes=OVERLAP)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) > 5 and all(line.startswith("trime: tokenizing ") for line in lines[:-1])
    assert " MB/s" in lines[0] and " of " in lines[0]
    assert lines[-1].startswith(f"trime: tokenized {path}: {len(ids):,} tokens in ")


def test_tokenizers_without_a_matching_backend_are_tokenized_whole(tmp_path):
    class Slow:  # no tokenizers backend: the whole file goes through the tokenizer's own call
        def __init__(self, fast):
            self.fast = fast

        def __len__(self):
            return len(self.fast)

        def __call__(self, text, **kwargs):
            return self.fast(text, **kwargs)

        def get_vocab(self):
            return self.fast.get_vocab()

    class Lowering(Slow):  # a fast backend, but a call that changes the text first: the backend is not used
        def __init__(self, fast):
            super().__init__(fast)
            self.backend_tokenizer = fast.backend_tokenizer

        def __call__(self, text, **kwargs):
            return self.fast(text.lower(), **kwargs)

    fast = tokenizer_of("gpt2")
    for odd, cache in ((Slow(fast), tmp_path / "slow"), (Lowering(fast), tmp_path / "lowering")):
        ids = chunked(SAMPLE_VALID, odd, cache)
        np.testing.assert_array_equal(ids, whole(SAMPLE_VALID, odd))
        assert entry_meta(cache)["windows"]["whole_file"]
    assert not np.array_equal(whole(SAMPLE_VALID, Lowering(fast)), whole(SAMPLE_VALID, fast))


def test_text_blocks_and_windows_read_the_memmap_without_copying_it(tmp_path, monkeypatch):
    import torch

    from trime.adapters.base import WindowSettings
    from trime.adapters.hf_lm import TextWindows
    from trime.hf.data import BlockDataset, text_blocks

    monkeypatch.setenv(token_cache.CACHE_ENV, str(tmp_path / "cache"))
    tokenizer = tokenizer_of("gpt2")
    blocks = text_blocks(str(SAMPLE_VALID), tokenizer, 64)
    stream = whole(SAMPLE_VALID, tokenizer)
    assert isinstance(blocks.base, np.memmap) or isinstance(blocks, np.memmap)
    np.testing.assert_array_equal(blocks, stream[: len(blocks) * 64].reshape(-1, 64))
    item = BlockDataset(blocks)[3]
    assert item["input_ids"].dtype == torch.long
    assert torch.equal(item["input_ids"], torch.from_numpy(stream[3 * 64 : 4 * 64]))
    windows = TextWindows(tokenize_text_file(SAMPLE_VALID, tokenizer), WindowSettings(64, 16))
    batch = next(windows.batches(2))
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    for row in range(2):
        lo, _, hi = windows.span(row)
        assert torch.equal(batch["input_ids"][row, : hi - 1 - lo], torch.from_numpy(stream[lo : hi - 1]))
        assert torch.equal(batch["labels"][row, : hi - 1 - lo], torch.from_numpy(stream[lo + 1 : hi]))
