"""Tests for ``trime-prepare``: token counts, dictionaries, byte round trips, checksums, CLI errors.

Everything runs on the shipped samples; the checks against the real WikiText-2 and enwik8
prefix in ``../shared/data`` are skipped where that folder is absent.
"""

import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trime.data_prep.datasets import WT2_SHA256, byte_split_bounds, get_spec
from trime.data_prep.prepare import prepare_dataset, verify_dataset
from trime.databin import is_byte_level, read_data_meta
from trime.errors import TrimeError
from trime.io_utils import sha256_file

SPLITS = ("train", "valid", "test")
WIKI_FILES = {split: f"wiki.{split}.tokens" for split in SPLITS}
TRIME_PREPARE = Path(sys.executable).parent / "trime-prepare"
SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples"


# --------------------------------------------------------------------------- helpers


def raw_word_counts(path: Path) -> tuple:
    """(lines, whitespace tokens + one <eos> per line), read the way fairseq reads text."""
    lines = words = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            lines += 1
            words += len(line.split())
    return lines, words + lines


def load_split(data_dir: Path, split: str):
    """(fairseq Dictionary, list of per-line int64 arrays) of one binarized split."""
    from fairseq.data import Dictionary
    from fairseq.data.indexed_dataset import MMapIndexedDataset

    vocab = Dictionary.load(str(data_dir / "dict.txt"))
    dataset = MMapIndexedDataset(str(data_dir / split))
    items = [dataset[i].numpy().copy() for i in range(len(dataset))]
    del dataset
    return vocab, items


def copy_samples(subdir: str, tmp_path: Path) -> Path:
    """A writable copy of one shipped sample folder."""
    copy = tmp_path / f"raw-{subdir}"
    shutil.copytree(SAMPLES_DIR / subdir, copy)
    return copy


def leftovers(folder: Path) -> list:
    """Temporary build folders left beside a --dest."""
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [str(TRIME_PREPARE), *args], check=False, capture_output=True, text=True, timeout=120, env=env
    )


# --------------------------------------------------------------------------- word level


def test_word_token_counts_match_raw_text(wt2_sample_bin: Path) -> None:
    meta = read_data_meta(wt2_sample_bin)
    for split in SPLITS:
        lines, tokens = raw_word_counts(SAMPLES_DIR / "wikitext-2" / WIKI_FILES[split])
        _, items = load_split(wt2_sample_bin, split)
        assert len(items) == lines, split
        assert sum(len(item) for item in items) == tokens == meta["num_tokens"][split], split
    # the documented sample sizes (samples/README.md)
    assert meta["num_tokens"] == {"train": 135_951, "valid": 18_345, "test": 20_142}


def test_dictionary_covers_training_tokens(wt2_sample_bin: Path) -> None:
    vocab, items = load_split(wt2_sample_bin, "train")
    with open(SAMPLES_DIR / "wikitext-2" / WIKI_FILES["train"], encoding="utf-8") as f:
        raw_lines = f.read().splitlines()
    train_words = {word for line in raw_lines for word in line.split()}
    assert all(vocab.index(word) != vocab.unk() or word == "<unk>" for word in train_words)
    assert len(vocab) >= len(train_words) + 3  # + <s>, <pad>, </s> (<unk> is a word too)
    # every line decodes back to its words, ending in </s>
    for raw_line, item in zip(raw_lines, items):
        assert item[-1] == vocab.eos()
        assert [vocab[i] for i in item[:-1]] == raw_line.split()


def test_meta_and_level_helpers(wt2_sample_bin: Path, enwik8_sample_bin: Path, tmp_path: Path) -> None:
    word_meta = read_data_meta(wt2_sample_bin)
    assert word_meta["dataset"] == "wikitext-2-sample" and word_meta["level"] == "word"
    assert word_meta["dict_sha256"] == sha256_file(wt2_sample_bin / "dict.txt")
    assert word_meta["raw_sha256"]["wiki.train.tokens"] == sha256_file(SAMPLES_DIR / "wikitext-2/wiki.train.tokens")
    assert word_meta["split"] == WIKI_FILES
    assert not is_byte_level(wt2_sample_bin)
    byte_meta = read_data_meta(enwik8_sample_bin)
    assert byte_meta["level"] == "byte" and is_byte_level(enwik8_sample_bin)
    assert byte_meta["split"]["valid"] == [360_000, 380_000] and byte_meta["split"]["standard"] is False
    assert read_data_meta(tmp_path) == {} and not is_byte_level(tmp_path)


def test_xz_inputs_and_two_workers_give_the_same_data_bin(wt2_sample_bin: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw-xz"
    raw.mkdir()
    for name in WIKI_FILES.values():
        with lzma.open(raw / f"{name}.xz", "wb") as out:
            out.write((SAMPLES_DIR / "wikitext-2" / name).read_bytes())
    dest = prepare_dataset("wikitext-2-sample", raw, tmp_path / "bin", workers=2)
    assert read_data_meta(dest) == read_data_meta(wt2_sample_bin)
    for name in ("dict.txt", "train.bin", "valid.bin", "test.bin"):
        assert (dest / name).read_bytes() == (wt2_sample_bin / name).read_bytes(), name


# --------------------------------------------------------------------------- byte level


def test_byte_splits_decode_to_the_original_bytes(enwik8_sample_bin: Path) -> None:
    data = (SAMPLES_DIR / "enwik8" / "enwik8.sample").read_bytes()
    bounds = byte_split_bounds(get_spec("enwik8-sample"), len(data))
    assert bounds == [(0, 360_000), (360_000, 380_000), (380_000, 400_000)]
    for split, (start, end) in zip(SPLITS, bounds):
        vocab, items = load_split(enwik8_sample_bin, split)
        # token id -> byte value; </s> is the newline byte; other specials must not occur
        table = np.full(len(vocab), -1, dtype=np.int64)
        table[vocab.eos()] = ord("\n")
        for i in range(vocab.nspecial, len(vocab)):
            if vocab[i].isdigit():
                table[i] = int(vocab[i])
        ids = np.concatenate(items)
        assert (table[ids] >= 0).all(), f"{split} holds <unk> or padding tokens"
        decoded = bytes(table[ids].astype(np.uint8))
        original = data[start:end]
        # a split that ends mid-line gets one closing </s>
        assert decoded == (original if original.endswith(b"\n") else original + b"\n"), split


def test_byte_dictionary_has_every_byte_of_the_file(enwik8_sample_bin: Path) -> None:
    data = (SAMPLES_DIR / "enwik8" / "enwik8.sample").read_bytes()
    vocab, _ = load_split(enwik8_sample_bin, "train")
    symbols = {vocab[i] for i in range(vocab.nspecial, len(vocab)) if vocab[i].isdigit()}
    assert symbols == {str(b) for b in set(data) - {ord("\n")}}
    assert 146 not in set(data[:360_000]) and "146" in symbols  # occurs only outside train


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("dataset", "subdir", "victim", "expected"),
    [
        ("wikitext-2-sample", "wikitext-2", "wiki.valid.tokens", "sha256"),
        ("enwik8-sample", "enwik8", "enwik8.sample", "sha256"),
    ],
)
def test_corrupted_sample_is_rejected(dataset, subdir, victim, expected, tmp_path: Path) -> None:
    raw = copy_samples(subdir, tmp_path)
    content = bytearray((raw / victim).read_bytes())
    content[1000] ^= 0x20  # flip the case of one letter
    (raw / victim).write_bytes(bytes(content))
    with pytest.raises(TrimeError) as err:
        prepare_dataset(dataset, raw, tmp_path / "bin")
    assert str(raw / victim) in err.value.message and expected in err.value.message
    assert not (tmp_path / "bin").exists() and not leftovers(tmp_path)


def test_truncated_enwik8_sample_names_the_size(tmp_path: Path) -> None:
    raw = copy_samples("enwik8", tmp_path)
    (raw / "enwik8.sample").write_bytes((SAMPLES_DIR / "enwik8/enwik8.sample").read_bytes()[:-10])
    with pytest.raises(TrimeError, match="399,990 bytes but .* expects 400,000"):
        prepare_dataset("enwik8-sample", raw, tmp_path / "bin")


def test_sample_passed_as_full_dataset_points_to_the_right_name(tmp_path: Path) -> None:
    with pytest.raises(TrimeError, match="use dataset wikitext-2-sample"):
        prepare_dataset("wikitext-2", SAMPLES_DIR / "wikitext-2", tmp_path / "bin")
    with pytest.raises(TrimeError, match="enwik8 expects 100,000,000"):
        (tmp_path / "e8").mkdir()
        shutil.copy(SAMPLES_DIR / "enwik8/enwik8.sample", tmp_path / "e8" / "enwik8")
        prepare_dataset("enwik8", tmp_path / "e8", tmp_path / "bin")


def test_empty_file_is_rejected(tmp_path: Path) -> None:
    raw = copy_samples("wikitext-2", tmp_path)
    (raw / "wiki.test.tokens").write_bytes(b"")
    with pytest.raises(TrimeError, match=r"wiki\.test\.tokens is empty"):
        prepare_dataset("wikitext-2-sample", raw, tmp_path / "bin")


def test_missing_dir_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TrimeError) as err:
        prepare_dataset("wikitext-2", tmp_path / "nowhere", tmp_path / "bin")
    assert "nowhere does not exist" in err.value.message and "--raw-dir" in err.value.message
    assert "--download" in err.value.message
    raw = copy_samples("wikitext-2", tmp_path)
    (raw / "wiki.valid.tokens").unlink()
    with pytest.raises(TrimeError) as err:
        prepare_dataset("wikitext-2-sample", raw, tmp_path / "bin")
    assert f"{raw / 'wiki.valid.tokens'} not found" in err.value.message and "--raw-dir" in err.value.message
    with pytest.raises(TrimeError, match="needs --raw-dir"):
        prepare_dataset("wikitext-103", None, tmp_path / "bin")


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trime.data_prep import prepare

    def broken(destdir, *args, **kwargs):
        (destdir / "train.bin").write_bytes(b"half")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(prepare, "_fairseq_preprocess", broken)
    with pytest.raises(RuntimeError):
        prepare_dataset("wikitext-2-sample", SAMPLES_DIR / "wikitext-2", tmp_path / "bin")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- --dest handling


def test_existing_dest_is_skipped_then_forced(wt2_sample_bin: Path, tmp_path: Path, capsys) -> None:
    dest = tmp_path / "bin"
    shutil.copytree(wt2_sample_bin, dest)
    before = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    assert prepare_dataset("wikitext-2-sample", SAMPLES_DIR / "wikitext-2", dest) == dest
    assert "already up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == before

    # another dataset at that dest: refused without --force
    with pytest.raises(TrimeError, match="--force"):
        prepare_dataset("enwik8-sample", SAMPLES_DIR / "enwik8", dest)
    # an incomplete data-bin is not "up to date"
    (dest / "valid.bin").unlink()
    with pytest.raises(TrimeError, match="not a complete wikitext-2-sample"):
        prepare_dataset("wikitext-2-sample", SAMPLES_DIR / "wikitext-2", dest)

    prepare_dataset("wikitext-2-sample", SAMPLES_DIR / "wikitext-2", dest, force=True)
    assert "wrote" in capsys.readouterr().out
    assert (dest / "valid.bin").read_bytes() == (wt2_sample_bin / "valid.bin").read_bytes()
    assert read_data_meta(dest) == read_data_meta(wt2_sample_bin)
    assert not leftovers(tmp_path)


def test_foreign_dest_is_never_replaced(tmp_path: Path) -> None:
    dest = tmp_path / "notes"
    dest.mkdir()
    (dest / "thesis.tex").write_text("precious")
    with pytest.raises(TrimeError, match="not a data-bin"):
        prepare_dataset("wikitext-2-sample", SAMPLES_DIR / "wikitext-2", dest, force=True)
    assert (dest / "thesis.tex").read_text() == "precious"


# --------------------------------------------------------------------------- CLI


@pytest.mark.slow  # end-to-end CLI run
def test_cli_builds_and_prints_a_summary(tmp_path: Path) -> None:
    result = run_cli("enwik8-sample", "--dest", str(tmp_path / "bin"))
    assert result.returncode == 0, result.stderr
    summary = (
        f"enwik8-sample: wrote {tmp_path / 'bin'} (byte level, 192 types; "
        "tokens: train 360,001, valid 20,001, test 20,001)"
    )
    assert result.stdout.strip().splitlines() == [summary]
    assert "not comparable" in result.stderr and "Traceback" not in result.stderr
    assert is_byte_level(tmp_path / "bin")


@pytest.mark.parametrize(
    "args, status",
    [  # usage errors (argparse) exit with 2, bad input found later with 1
        (["wikitext-3", "--dest", "{tmp}/bin"], 2),
        (["wikitext-2-sample"], 2),
        (["wikitext-2-sample", "--dest", "{tmp}/bin", "--workers", "0"], 2),
        (["wikitext-2", "--raw-dir", "{tmp}/nowhere", "--dest", "{tmp}/bin"], 1),
        (["wikitext-2-sample", "--raw-dir", "{tmp}/corrupt", "--dest", "{tmp}/bin"], 1),
        (["enwik8-prefix", "--raw-dir", "{tmp}", "--dest", "{tmp}/bin", "--download"], 1),
    ],
    ids=["unknown-dataset", "no-dest", "zero-workers", "missing-dir", "bad-checksum", "no-download-url"],
)
def test_cli_bad_input_prints_one_line(args, status, tmp_path: Path) -> None:
    corrupt = copy_samples("wikitext-2", tmp_path)
    corrupt.rename(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "wiki.train.tokens").write_text("not wikitext\n")
    result = run_cli(*(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert result.returncode == status
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trime: error: "), result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "bin").exists()


# --------------------------------------------------------------------------- real data (../shared)


def test_real_wikitext2_checksums_and_counts(shared_data_dir: Path) -> None:
    raw = shared_data_dir / "wikitext-2"
    report = verify_dataset("wikitext-2", raw)
    assert [report[name]["sha256"] for name in WIKI_FILES.values()] == list(WT2_SHA256)
    # token counts incl. one <eos> per line, as in ../shared/data/README.md
    assert [report[name]["tokens"] for name in WIKI_FILES.values()] == [2_088_628, 217_646, 245_569]
    # the WikiText-2 files are not WikiText-103: the train count tells them apart
    with pytest.raises(TrimeError, match="103,227,021.*use dataset wikitext-2"):
        verify_dataset("wikitext-103", raw)


def test_real_enwik8_prefix_checksum(shared_data_dir: Path, tmp_path: Path) -> None:
    report = verify_dataset("enwik8-prefix", shared_data_dir / "enwik8")
    assert report["enwik8.prefix"]["bytes"] == 1_000_000
    # the first 400,000 bytes of the prefix are the shipped sample
    with lzma.open(shared_data_dir / "enwik8" / "enwik8.prefix.xz") as f:
        head = f.read(400_000)
    assert head == (SAMPLES_DIR / "enwik8" / "enwik8.sample").read_bytes()
