"""Datastores that change: ``--add``, ``--remove``, ``--remove-docs`` and ``--compact`` against fresh builds.

Each source is windowed as its own token stream, so a datastore that gained or lost a source must
search exactly like one built from the sources it holds now. References: fresh builds of the same
sources (compared through each neighbour's origin, source and position, since row numbers depend on
the order of additions), a brute-force numpy search over the live keys, and ``trime-eval``'s own
perplexity on each datastore. Model: a tiny random GPT-2 over the first articles of two shipped WikiText-2 samples
(the valid and test articles) as two sources; the queries are the model's keys over a third text.
"""

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

import tests.hf_helpers as H
from tests.eval_helpers import assert_one_line_error, run_cli
from trime.errors import TrimeError

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TPS, CONTEXT, BATCH, K = 64, 24, 32, 16
WINDOW_FLAGS = ["--tokens-per-sample", TPS, "--context-window", CONTEXT, "--batch-size", BATCH]


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message.startswith("trime: error: ") and "\n" not in message, message
    return message


def build_cli(*argv) -> None:
    from trime.retrieval.build_datastore import main

    assert main([str(a) for a in argv] + ["--cpu", "--no-progress-bar"]) == 0


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict:
    """Two sources (each a text folder with train.txt) and a third text to query and evaluate with (test.txt)."""
    root = tmp_path_factory.mktemp("updates_data")
    out = {}
    # whole articles: the valid sample's first four, the test sample's first three
    for name, sample, chars in (("wiki_a", H.SAMPLE_VALID, 35_769), ("wiki_b", H.SAMPLE_TEST, 41_583)):
        (root / name).mkdir()
        (root / name / "train.txt").write_text(sample.read_text(encoding="utf-8")[:chars], encoding="utf-8")
        out[name] = root / name
    (root / "held_out").mkdir()
    text = H.SAMPLE_TRAIN.read_text(encoding="utf-8")[:12_000]
    (root / "held_out" / "test.txt").write_text(text, encoding="utf-8")
    out["held_out"] = root / "held_out"
    return out


def build(data: Path, out: Path, source: str, *extra) -> Path:
    extra = extra or ("--index-factory", "Flat")
    build_cli(data, "--path", H.model_dir("gpt2"), "--output", out, "--source", source, "--metric", "l2",
              *WINDOW_FLAGS, *extra)
    return out


def add(out: Path, data: Path, source: str, *extra) -> Path:
    build_cli("--add", data, "--path", H.model_dir("gpt2"), "--output", out, "--source", source, *extra)
    return out


@pytest.fixture(scope="module")
def stores(corpora, tmp_path_factory) -> dict:
    """A alone, B alone, A then B, B then A (Flat indexes: exact search)."""
    root = tmp_path_factory.mktemp("updates_stores")
    a = build(corpora["wiki_a"], root / "a", "A")
    b = build(corpora["wiki_b"], root / "b", "B")
    ab = add(build(corpora["wiki_a"], root / "ab", "A"), corpora["wiki_b"], "B")
    ba = add(build(corpora["wiki_b"], root / "ba", "B"), corpora["wiki_a"], "A")
    return {"a": a, "b": b, "ab": ab, "ba": ba, "root": root}


@pytest.fixture(scope="module")
def queries(corpora) -> np.ndarray:
    """The tiny GPT-2's keys over the held-out text: real queries."""
    from trime.adapters import load_adapter

    lm = load_adapter(H.model_dir("gpt2"), corpora["held_out"], cpu=True)
    windows = lm.windows("test", lm.window_settings(CONTEXT, TPS))
    out = [lm.forward(sample, need_token_terms=False).queries.float().numpy() for sample in windows.batches(BATCH)]
    return np.concatenate(out)[:300]


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def neighbours(directory: Path, queries: np.ndarray, k: int = K, search: str = "faiss") -> list:
    """Each query's neighbours as (source, position, score rounded), independent of row numbers."""
    from trime.retrieval.datastore import Datastore

    store = Datastore.open(directory, search=search)
    found = store.search(queries, k)
    ids = found.ids.numpy()
    assert found.valid.all()
    origins = store.origins(ids.reshape(-1))
    named = [(o.source, o.position) for o in origins]
    scores = found.scores.numpy().reshape(-1)
    return [[(*named[i * k + j], round(float(scores[i * k + j]), 2)) for j in range(k)] for i in range(len(ids))]


def brute_force(directories: list[Path], queries: np.ndarray, skip=lambda source, position: False) -> list:
    """The exact top-k over the keys of fresh builds, by numpy, as (source, position, score)."""
    from trime.retrieval.datastore import Datastore

    keys, names = [], []
    for d in directories:
        store = Datastore.open(d, need_index=False)
        origins = store.origins(range(store.count))
        rows = [row for row, o in enumerate(origins) if not skip(o.source, o.position)]
        keys.append(np.asarray(store.keys[np.asarray(rows)], dtype=np.float64))
        names += [(origins[row].source, origins[row].position) for row in rows]
    keys, q = np.concatenate(keys), queries.astype(np.float64)
    scores = -((q**2).sum(1)[:, None] - 2 * q @ keys.T + (keys**2).sum(1)[None, :])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    return [[(*names[j], round(float(scores[i, j]), 2)) for j in row] for i, row in enumerate(top)]


def same_neighbours(got: list, want: list) -> None:
    """Equal up to the order of exact ties."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert sorted(g, key=lambda t: (-t[2], t[0], t[1])) == sorted(w, key=lambda t: (-t[2], t[0], t[1]))


def eval_ppl(corpora: Path, directory: Path, capsys, search: str = "faiss") -> float:
    from trime.eval.evaluate import run

    record = run([str(a) for a in [corpora["held_out"], "--path", H.model_dir("gpt2"), "--gen-subset", "test",
                                   "--memory", "external", "--mem-size", 40, "--datastore", directory, "--k", K,
                                   "--knn-search", search, *WINDOW_FLAGS, "--cpu", "--no-progress-bar"]])
    capsys.readouterr()
    return record["results"][0]["ppl"]


def test_additions_in_either_order_equal_the_union(stores, queries, corpora, capsys):
    ab, ba = neighbours(stores["ab"], queries), neighbours(stores["ba"], queries)
    same_neighbours(ab, ba)
    same_neighbours(ab, brute_force([stores["a"], stores["b"]], queries))
    assert {s for row in ab for s, _, _ in row} == {"A", "B"}  # both sources are searched
    ppl = {name: eval_ppl(corpora, stores[name], capsys) for name in ("ab", "ba", "a")}
    assert ppl["ab"] == pytest.approx(ppl["ba"], rel=1e-6)
    assert ppl["ab"] != pytest.approx(ppl["a"], rel=1e-4)  # B's keys count
    meta = json.loads((stores["ab"] / "meta.json").read_text())
    assert [h["op"] for h in meta["history"]] == ["build", "add"]
    assert [s["name"] for s in meta["sources"]] == ["A", "B"]
    from trime.retrieval.datastore import verify

    assert "OK" in verify(stores["ab"], show_progress=False)


def test_added_keys_equal_a_fresh_build_of_the_source(stores):
    from trime.retrieval.datastore import Datastore

    ab, b = Datastore.open(stores["ab"], need_index=False), Datastore.open(stores["b"], need_index=False)
    lo = ab.count - b.count
    np.testing.assert_array_equal(np.asarray(ab.keys[lo : ab.count]), np.asarray(b.keys))
    np.testing.assert_array_equal(ab.vals[lo:], b.vals)


@pytest.mark.parametrize("search", ["faiss", pytest.param("torch", marks=pytest.mark.slow)])
def test_removing_a_source_equals_never_adding_it(stores, queries, corpora, capsys, tmp_path, search):
    store = copy_store(stores["ab"], tmp_path / "ab")
    build_cli("--output", store, "--remove", "B")
    a_only = neighbours(stores["a"], queries, search=search)
    same_neighbours(neighbours(store, queries, search=search), a_only)
    ppl_a = eval_ppl(corpora, stores["a"], capsys, search)
    assert eval_ppl(corpora, store, capsys, search) == pytest.approx(ppl_a, rel=1e-6)
    build_cli("--output", store, "--compact")
    same_neighbours(neighbours(store, queries, search=search), a_only)
    assert eval_ppl(corpora, store, capsys, search) == pytest.approx(ppl_a, rel=1e-6)
    meta = json.loads((store / "meta.json").read_text())
    assert [h["op"] for h in meta["history"]] == ["build", "add", "remove", "compact"]
    assert [s["name"] for s in meta["sources"]] == ["A"] and "deleted" not in meta
    assert not (store / "keys.npy").exists() and len(list((store / "segments").iterdir())) == 1  # old files gone


def article_titles(directory: Path, source: str) -> list[str]:
    documents = json.loads((directory / "documents.json").read_text())
    return next(s["titles"] for s in documents["sources"] if s["name"] == source)


@pytest.mark.parametrize("factory", ["Flat", pytest.param("IVF8,PQ4x4np", marks=pytest.mark.slow)])
def test_a_removed_document_is_never_a_neighbour(stores, corpora, tmp_path, factory):
    from trime.retrieval.datastore import Datastore

    store = copy_store(stores["ab"], tmp_path / "ab")
    if factory != "Flat":
        build_cli("--output", store, "--build-index", "--index-factory", factory, "--train-sample", 5000)
    title = article_titles(stores["a"], "A")[2]
    opened = Datastore.open(store, nprobe=8)
    rows = [i for i, o in enumerate(opened.origins(range(opened.count))) if o.title == title and o.source == "A"]
    own_keys = np.asarray(opened.keys[rows], dtype=np.float32)  # each retrieves itself first while it exists

    def hits(directory: Path) -> int:
        s = Datastore.open(directory, nprobe=8)
        found = s.search(own_keys, K)
        assert found.valid.all()
        return sum(o.title == title and o.source == "A" for o in s.origins(found.ids.numpy().reshape(-1)))

    assert hits(store) > len(rows)  # the test can fail: before removal the document is its own neighbour
    before = (store / "meta.json").read_text()
    listing = tmp_path / "remove.txt"
    listing.write_text(f"\n{title}\n", encoding="utf-8")
    build_cli("--output", store, "--remove-docs", listing)
    assert hits(store) == 0
    meta = json.loads((store / "meta.json").read_text())
    assert meta["history"][-1]["op"] == "remove-docs" and meta["history"][-1]["keys"] == len(rows)
    assert json.loads(before)["count"] == meta["count"]  # tombstones only: the files are not rewritten
    build_cli("--output", store, "--compact")
    assert hits(store) == 0
    assert Datastore.open(store, need_index=False).count == opened.count - len(rows)


def test_compaction_keeps_the_trained_codes(stores, queries, tmp_path):
    """IVF-PQ: the compacted index finds the same neighbours with the same scores as the tombstoned one."""
    store = copy_store(stores["ab"], tmp_path / "ab")
    build_cli("--output", store, "--build-index", "--index-factory", "IVF8,PQ4x4np", "--train-sample", 5000)
    listing = tmp_path / "remove.txt"
    listing.write_text("\n".join(f"A#{d}" for d in (1, 3)) + "\n", encoding="utf-8")
    build_cli("--output", store, "--remove-docs", listing)
    tombstoned = neighbours(store, queries)
    build_cli("--output", store, "--compact")
    assert neighbours(store, queries) == tombstoned
    meta = json.loads((store / "meta.json").read_text())
    assert meta["index"]["factory"] == "IVF8,PQ4x4np" and meta["index"]["ntotal"] == meta["count"]
    assert [p.name for p in store.glob("index*.faiss")] == [meta["index"]["file"]]


@pytest.mark.slow
def test_addition_into_a_trained_index_reports_drift(stores, corpora, tmp_path, capsys):
    store = build(corpora["wiki_a"], tmp_path / "ivf", "A", "--index-factory", "IVF8,PQ4x4np", "--train-sample",
                  5000)
    capsys.readouterr()
    add(store, corpora["wiki_b"], "B")
    out = capsys.readouterr().out
    assert "index drift: the new keys' quantization error is" in out
    meta = json.loads((store / "meta.json").read_text())
    drift = meta["history"][-1]["drift"]
    assert drift["ratio"] > 0 and meta["index"]["ntotal"] == meta["count"]
    assert drift["retrain_advised"] == (drift["ratio"] > 1.5)


@pytest.mark.slow
def test_a_killed_addition_leaves_the_datastore_whole_and_resumes(stores, corpora, queries, tmp_path):
    store = copy_store(stores["a"], tmp_path / "a")
    before = (store / "meta.json").read_bytes()
    proc = run_cli("trime-build-datastore", "--add", corpora["wiki_b"], "--path", H.model_dir("gpt2"), "--output",
                   store, "--source", "B", "--cpu", "--no-progress-bar", "--kill-after-batches", 1)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (store / "meta.json").read_bytes() == before
    same_neighbours(neighbours(store, queries), neighbours(stores["a"], queries))
    assert (store / "segments").is_dir()  # the partial extraction waits for a re-run
    add(store, corpora["wiki_b"], "B")
    same_neighbours(neighbours(store, queries), neighbours(stores["ab"], queries))


def test_a_failed_index_write_changes_nothing(stores, corpora, tmp_path, monkeypatch):
    from trime.retrieval import faiss_index

    store = copy_store(stores["a"], tmp_path / "a")
    before = {p.name: p.read_bytes() for p in store.iterdir() if p.is_file()}

    def full_disk(index, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(faiss_index, "write_index", full_disk)
    with pytest.raises(TrimeError) as err:
        add(store, corpora["wiki_b"], "B")
    assert "No space left on device" in one_line(err)
    assert {p.name: p.read_bytes() for p in store.iterdir() if p.is_file() and p.name != ".trime-build.lock"} == \
        {k: v for k, v in before.items() if k != ".trime-build.lock"}


def test_a_failed_compaction_leaves_the_tombstoned_datastore_and_a_rerun_finishes(stores, queries, tmp_path,
                                                                                   monkeypatch):
    from trime.retrieval import faiss_index

    store = copy_store(stores["ab"], tmp_path / "ab")
    build_cli("--output", store, "--remove", "B")
    before = (store / "meta.json").read_bytes()
    tombstoned = neighbours(store, queries)
    real_write = faiss_index.write_index

    def full_disk(index, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(faiss_index, "write_index", full_disk)
    with pytest.raises(TrimeError) as err:
        build_cli("--output", store, "--compact")
    assert "No space left on device" in one_line(err)
    assert (store / "meta.json").read_bytes() == before
    assert neighbours(store, queries) == tombstoned  # the half-written segment is not read
    monkeypatch.setattr(faiss_index, "write_index", real_write)
    build_cli("--output", store, "--compact")
    same_neighbours(neighbours(store, queries), tombstoned)
    assert len(list((store / "segments").iterdir())) == 1  # the failed attempt's segment was cleared


@pytest.mark.slow
def test_bad_updates_are_one_line_each(stores, corpora, tmp_path):
    store = copy_store(stores["ab"], tmp_path / "ab")
    before = (store / "meta.json").read_bytes()
    gpt2 = str(H.model_dir("gpt2"))
    cases = [
        (["--add", corpora["wiki_b"], "--path", gpt2, "--output", store, "--source", "B"], "--source 'B' is already"),
        (["--add", corpora["wiki_b"], "--path", gpt2, "--output", store, "--source", "C", "--tokens-per-sample", 48,
          "--context-window", 16], "windows of 64 tokens"),
        (["--add", corpora["wiki_b"], "--path", H.model_dir("llama"), "--output", store, "--source", "C"],
         "--add"),
        (["--add", corpora["wiki_b"], "--path", gpt2, "--output", store, "--source", "C", "--key-dtype", "fp32"],
         "--key-dtype fp32"),
        (["--add", corpora["wiki_b"], "--path", gpt2, "--output", store, "--source", "C", "--key-module", "lm_head"],
         "(another model or --key-module)"),
        (["--output", store, "--remove", "nope"], "no source of that name (sources: A, B)"),
        (["--output", store, "--remove", "A", "--compact"], "--remove and --compact are separate operations"),
    ]
    listing = tmp_path / "titles.txt"
    listing.write_text("No Such Article\n", encoding="utf-8")
    cases.append((["--output", store, "--remove-docs", listing], f"{listing} line 1: no document"))
    for argv, needle in cases:
        with pytest.raises(TrimeError) as err:
            build_cli(*argv)
        assert needle in one_line(err)
    proc = run_cli("trime-build-datastore", *cases[0][0], "--cpu", "--no-progress-bar")  # the real command's stderr
    assert_one_line_error(proc, cases[0][1])
    assert (store / "meta.json").read_bytes() == before


def test_the_neighbour_dump_names_each_source_and_shows_the_text_of_those_in_data(stores, corpora, tmp_path):
    """DATA holds source A's file (and the text evaluated), not B's: A's neighbours come with their text, B's with
    a note saying why they have none; every datastore neighbour names its source."""
    from trime.adapters import load_adapter
    from trime.eval.inspection import inspect_tokens
    from trime.eval.memory import MemorySettings
    from trime.retrieval.datastore import Datastore

    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(corpora["wiki_a"] / "train.txt", data / "train.txt")
    shutil.copyfile(corpora["held_out"] / "test.txt", data / "test.txt")
    lm = load_adapter(H.model_dir("gpt2"), data, cpu=True)
    settings = MemorySettings(level="external", mem_size=40, knn_in_joint=True, k=K, lmbda=0.3, interp_temp=2.5)
    records = inspect_tokens(lm, "test", settings, store=Datastore.open(stores["ab"]),
                             windows=lm.window_settings(CONTEXT, TPS), batch_size=BATCH, limit=80, top=K)
    external = [n for r in records for n in r.neighbors if n.level == "external"]
    assert {n.source for n in external} == {"A", "B"}
    assert all(n.before is not None and n.note is None for n in external if n.source == "A")
    assert all(n.before is None and "train.txt differs from the file" in n.note for n in external if n.source == "B")
