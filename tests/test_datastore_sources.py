"""Datastores record where each key came from: source, token position and document (article).

Checked against references that share no code with trime's: a key's position against the raw
token stream (fairseq's own ``load_indexed_dataset``, or the tokenizer run on the whole text), and
its article against a scan of the raw WikiText lines (a regex), mapped to tokens by counting words
(fairseq) or by the tokenizer's own ``decode`` of stream prefixes (Hugging Face). Models: a tiny
random GPT-2 over the shipped WikiText-2 valid sample as a text split, and the tiny fairseq
checkpoint of ``eval_helpers`` over the sample's data-bin.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tests.hf_helpers as H
from tests.eval_helpers import CONTEXT, tiny_checkpoints
from trime.errors import TrimeError

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per module

HF_TPS, HF_CONTEXT, HF_BATCH = 64, 24, 32  # 40 new tokens per window
FAIRSEQ_BATCH = 64
HEADING = re.compile(r" = (?!= )(.+?)(?<! =) = ")  # a WikiText article heading line, whole


class Stopped(Exception):
    """A build stopped between two batches."""


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message.startswith("trime: error: ") and "\n" not in message, message
    return message


def article_headings(text: str) -> list[tuple[int, str]]:
    """(character offset, title) of each article heading line of raw WikiText."""
    out, offset = [], 0
    for line in text.split("\n"):
        match = HEADING.fullmatch(line)
        if match:
            out.append((offset, match.group(1)))
        offset += len(line) + 1
    return out


def expected_titles(starts: list[int], titles: list[str], preamble: str, file_name: str, n: int) -> list[str]:
    """The title of every stream position, from the positions where articles start.

    Text before the first article belongs to it when it is only whitespace, else to a document named after the file."""
    if preamble.strip():
        starts, titles = [0, *starts], [file_name, *titles]
    else:
        starts = [0, *starts[1:]]
    out = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else n
        out += [titles[i]] * (end - start)
    return out


def build(lm, split: str, settings, batch: int, out: Path, **kwargs) -> Path:
    from trime.retrieval.build_datastore import extract

    return extract(lm, split, settings, batch, out, show_progress=False, **kwargs)


def origins_table(store) -> tuple[np.ndarray, list[str]]:
    """(positions, titles) of every key, through the public API."""
    found = store.origins(range(store.count))
    return np.asarray([o.position for o in found]), [o.title for o in found]


# ----------------------------------------------------------------------------- Hugging Face: a text split


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    """DATA: the shipped WikiText-2 valid sample (5 articles, a blank line before the first) as train.txt."""
    out = tmp_path_factory.mktemp("sources_text")
    shutil.copyfile(H.SAMPLE_VALID, out / "train.txt")
    return out


@pytest.fixture(scope="module")
def hf_lm(text_dir):
    from trime.adapters import load_adapter

    return load_adapter(H.model_dir("gpt2"), text_dir, cpu=True)


@pytest.fixture(scope="module")
def hf_settings(hf_lm):
    return hf_lm.window_settings(HF_CONTEXT, HF_TPS)


@pytest.fixture(scope="module")
def hf_store(hf_lm, hf_settings, tmp_path_factory) -> Path:
    return build(hf_lm, "train", hf_settings, HF_BATCH, tmp_path_factory.mktemp("sources_hf") / "ds")


def hf_reference_titles(path: Path) -> tuple[np.ndarray, list[str]]:
    """(the whole text tokenized at once, the title of every token) by the tokenizer's own calls.

    An article starts at the first token whose decoded prefix reaches past its heading's first character."""
    tokenizer = H.load_test_tokenizer()
    text = path.read_text(encoding="utf-8")
    stream = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"])

    def first_token_past(char: int) -> int:
        lo, hi = 0, len(stream) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if len(tokenizer.decode(stream[: mid + 1].tolist(), clean_up_tokenization_spaces=False)) > char:
                hi = mid
            else:
                lo = mid + 1
        return lo

    headings = article_headings(text)
    starts = [first_token_past(char) for char, _ in headings]
    titles = expected_titles(starts, [t for _, t in headings], text[: headings[0][0]], path.name, len(stream))
    return stream, titles


def test_hf_keys_name_their_token_and_article(hf_lm, hf_store, text_dir):
    from trime.retrieval.datastore import Datastore

    stream, titles = hf_reference_titles(text_dir / "train.txt")
    store = Datastore.open(hf_store, need_index=False)
    meta = store.meta
    assert store.has_sources and len(meta["sources"]) == 1
    source = meta["sources"][0]
    assert source["name"] == source["split"] == "train" and source["file"] == "train.txt"
    assert source["files"] == meta["data"]["files"] and source["tokens"] == len(stream)
    assert source["document_rule"] == "heading" and source["documents"] == 5
    positions, got_titles = origins_table(store)
    np.testing.assert_array_equal(positions, np.arange(1, len(stream)))  # every token but the first is a target
    np.testing.assert_array_equal(store.vals, stream[positions])
    assert got_titles == [titles[p] for p in positions]
    assert {o.file for o in store.origins([0, store.count - 1])} == {"train.txt"}


def test_hf_text_before_the_first_article_is_its_own_document(tmp_path):
    """A file that does not start with a heading: its first lines are a document named after the file."""
    from trime.adapters import load_adapter

    text = "An introduction .\n = Alpha = \n \n Alpha text .\n = = Section = = \n More .\n = Beta = \n Beta text .\n"
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    lm = load_adapter(H.model_dir("gpt2"), tmp_path, cpu=True)
    stream, titles = hf_reference_titles(tmp_path / "train.txt")
    docs = lm.documents("train")
    assert docs.by == "heading" and docs.titles == ["train.txt", "Alpha", "Beta"]
    np.testing.assert_array_equal(lm.stream("train"), stream)
    assert [titles[p] for p in docs.starts] == docs.titles
    assert all(titles[p - 1] != titles[p] for p in docs.starts[1:])
    (tmp_path / "train.txt").write_text("No heading here .\n = = Only a section = = \n", encoding="utf-8")
    assert load_adapter(H.model_dir("gpt2"), tmp_path, cpu=True).documents("train").titles == ["train.txt"]


def test_sharded_and_resumed_builds_write_the_same_origins(hf_lm, hf_settings, hf_store, tmp_path, monkeypatch):
    from trime.retrieval.build_datastore import merge_shards

    names = ("keys.npy", "vals.npy", "origins.npy", "documents.json")
    sharded = tmp_path / "sharded"
    for shard_id in (2, 0, 1):
        build(hf_lm, "train", hf_settings, HF_BATCH, sharded, num_shards=3, shard_id=shard_id)
    merge_shards(sharded, delete_shards=True)
    for name in names:
        assert (sharded / name).read_bytes() == (hf_store / name).read_bytes(), name
    merged, whole = (json.loads((d / "meta.json").read_text()) for d in (sharded, hf_store))
    assert merged["sources"] == whole["sources"] and merged["checksums"] == whole["checksums"]

    real_forward = hf_lm.forward

    def interrupted(out: Path, batches: int) -> None:
        calls = []

        def forward(sample, need_token_terms=True):
            calls.append(1)
            if len(calls) > batches:
                raise Stopped  # mid-build: partial files and progress.json stay behind
            return real_forward(sample, need_token_terms)

        monkeypatch.setattr(hf_lm, "forward", forward)
        with pytest.raises(Stopped):
            build(hf_lm, "train", hf_settings, HF_BATCH, out, progress_seconds=0)
        monkeypatch.setattr(hf_lm, "forward", real_forward)
        assert json.loads((out / "progress.json").read_text())["batches_done"] == batches

    resumed = tmp_path / "resumed"
    interrupted(resumed, 5)
    build(hf_lm, "train", hf_settings, HF_BATCH, resumed)
    # a partial build started by a trime that wrote no origins: they are filled in, then it resumes
    legacy = tmp_path / "legacy"
    interrupted(legacy, 7)
    (legacy / "origins.partial.npy").unlink()
    build(hf_lm, "train", hf_settings, HF_BATCH, legacy)
    for out in (resumed, legacy):
        for name in (*names, "meta.json"):
            assert (out / name).read_bytes() == (hf_store / name).read_bytes(), (out.name, name)


# ----------------------------------------------------------------------------- datastores built before sources


@pytest.fixture()
def old_and_new(hf_store, tmp_path) -> tuple[Path, Path]:
    """The HF datastore with a Flat index, and a copy as trime wrote it before sources were recorded."""
    from trime.retrieval.build_datastore import build_index

    new, old = tmp_path / "new", tmp_path / "old"
    shutil.copytree(hf_store, new)
    build_index(new, factory="Flat", show_progress=False)
    shutil.copytree(new, old)
    (old / "origins.npy").unlink()
    (old / "documents.json").unlink()
    meta = json.loads((old / "meta.json").read_text())
    del meta["sources"], meta["checksums"]["origins_sha256"], meta["checksums"]["documents_sha256"]
    (old / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return old, new


def test_a_datastore_without_sources_opens_searches_and_says_it_cannot_show_them(old_and_new, hf_lm, hf_settings):
    from trime.retrieval.datastore import Datastore, snippets, verify

    old_dir, new_dir = old_and_new
    old, new = Datastore.open(old_dir), Datastore.open(new_dir)
    assert not old.has_sources and new.has_sources
    queries = np.asarray(new.keys[::97], dtype=np.float32)
    for exact in (False, True):
        a, b = old.search(queries, 8, exact=exact), new.search(queries, 8, exact=exact)
        assert torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels) and torch.equal(a.valid, b.valid)
    fix = "was built before sources were recorded; rebuild it with trime-build-datastore to show them"
    for ask in (lambda: old.origins([0]), lambda: snippets(old, hf_lm, [0])):
        with pytest.raises(TrimeError) as err:
            ask()
        assert one_line(err) == f"trime: error: --datastore {old_dir} {fix}"
    assert verify(old_dir, show_progress=False).endswith("; no sources (built before they were recorded))")
    assert "origins verified (1 source, 5 documents)" in verify(new_dir, show_progress=False)
    said = []
    build(hf_lm, "train", hf_settings, HF_BATCH, old_dir, log=said.append)  # the same build: complete, as before
    assert said == [f"{old_dir} is already complete ({old.count:,} keys) (built before sources were recorded: "
                    "rebuild it into a new --output to record them)"]
    assert not (old_dir / "origins.npy").exists()


def test_damaged_origins_or_documents_are_refused_by_origins_and_verify(hf_store, tmp_path):
    from trime.retrieval.datastore import Datastore, verify

    for name, offset in (("origins.npy", 200), ("documents.json", 20)):
        store = tmp_path / name
        shutil.copytree(hf_store, store)
        with open(store / name, "r+b") as f:  # same size, one byte changed
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 1]))
        with pytest.raises(TrimeError) as err:
            Datastore.open(store, need_index=False).origins([0])
        assert f"{store / name} does not match the sha256 recorded in meta.json" in one_line(err)
        with pytest.raises(TrimeError) as err:
            verify(store, show_progress=False)
        assert f"{store / name} does not match the sha256 recorded in meta.json" in one_line(err)
        Datastore.open(store, need_index=False)  # opening (to search or evaluate) does not read them
    with pytest.raises(TrimeError) as err:
        Datastore.open(hf_store, need_index=False).origins([0, 10**9])
    assert "key 1,000,000,000 is not in --datastore" in one_line(err)


# ----------------------------------------------------------------------------- snippets


def test_snippets_show_the_target_token_in_its_text(hf_lm, hf_store, text_dir, tmp_path):
    from trime.adapters import load_adapter
    from trime.retrieval.datastore import Datastore, snippets

    store = Datastore.open(hf_store, need_index=False)
    stream = hf_lm.stream("train")
    text = (text_dir / "train.txt").read_text(encoding="utf-8")
    keys = [0, 1234, store.count - 1]
    for key, snip in zip(keys, snippets(store, hf_lm, keys, before=6, after=4)):
        p = snip.origin.position
        assert snip.target == hf_lm.decode([int(store.vals[key])]) == hf_lm.decode(stream[p : p + 1])
        assert snip.before == hf_lm.decode(stream[max(0, p - 6) : p]) and snip.after == hf_lm.decode(stream[p + 1 : p + 5])
        assert snip.before + snip.target + snip.after in text
        core = snip.target.strip() or snip.target.encode("unicode_escape").decode()
        assert f"[[{core}]]" in str(snip)

    edited = tmp_path / "data"
    shutil.copytree(text_dir, edited)
    lines = (edited / "train.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    lines[3], lines[7] = lines[7], lines[3]
    (edited / "train.txt").write_text("".join(lines), encoding="utf-8")
    with pytest.raises(TrimeError) as err:
        snippets(store, load_adapter(H.model_dir("gpt2"), edited, cpu=True), [5])
    message = one_line(err)
    assert f"{edited / 'train.txt'} differs from the file --datastore {hf_store} was built from" in message
    assert "pass the data it was built from" in message


# ----------------------------------------------------------------------------- fairseq: a data-bin


@pytest.fixture(scope="module")
def fairseq_lm(tmp_path_factory, wt2_sample_bin):
    from trime.adapters import load_adapter

    return load_adapter(tiny_checkpoints(tmp_path_factory, wt2_sample_bin)["ce"], wt2_sample_bin, cpu=True)


def test_fairseq_keys_name_their_token_and_article(fairseq_lm, tmp_path):
    from fairseq.data import data_utils

    from trime.retrieval.datastore import Datastore, snippets

    out = build(fairseq_lm, "valid", fairseq_lm.window_settings(CONTEXT, None), FAIRSEQ_BATCH, tmp_path / "ds")
    lines = data_utils.load_indexed_dataset(str(fairseq_lm.data_dir / "valid"), fairseq_lm.dictionary)
    stream = torch.cat([lines[i] for i in range(len(lines))]).numpy()
    # the raw text's articles, at the stream position of their heading's first word (a line is its words + <eos>)
    text = H.SAMPLE_VALID.read_text(encoding="utf-8")
    raw_lines = text.split("\n")[:-1]
    line_starts = np.cumsum([0] + [len(line.split()) + 1 for line in raw_lines])
    assert line_starts[-1] == len(stream)
    known = fairseq_lm.dictionary.indices  # the data-bin spells words outside its dictionary <unk>
    headings = [(i, " ".join(w if w in known else "<unk>" for w in HEADING.fullmatch(line).group(1).split()))
                for i, line in enumerate(raw_lines) if HEADING.fullmatch(line)]
    assert headings[0][1] == "<unk> <unk>" and headings[2][1] == "M @-@ 82 ( Michigan highway )"
    first_line = headings[0][0]
    titles = expected_titles([int(line_starts[i]) for i, _ in headings], [t for _, t in headings],
                             "\n".join(raw_lines[:first_line]), "valid.bin", len(stream))

    store = Datastore.open(out, need_index=False)
    source = store.meta["sources"][0]
    assert (source["name"], source["file"], source["tokens"], source["documents"]) == ("valid", "valid.bin", len(stream), 5)
    assert set(source["files"]) == {"valid.bin", "valid.idx", "dict.txt"}
    positions, got_titles = origins_table(store)
    np.testing.assert_array_equal(positions, np.arange(len(stream)))
    np.testing.assert_array_equal(store.vals, stream[positions])
    assert got_titles == [titles[p] for p in positions]
    assert [h for _, h in headings] == json.loads((out / "documents.json").read_text())["sources"][0]["titles"]

    key = int(line_starts[headings[2][0]]) + 1  # the first word of the third article's title
    (snip,) = snippets(store, fairseq_lm, [key], before=3, after=2)
    words = raw_lines[headings[2][0]].split()
    assert snip.target == " " + words[1] and snip.before == "\n\n =" and snip.after == "".join(" " + w for w in words[2:4])
    assert str(snip) == f"\n\n = [[{words[1]}]]{snip.after}"
