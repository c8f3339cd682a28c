"""What memory did (``trime.eval.inspection``, ``trime-eval --dump-neighbors/--report-html``) against references.

- The numbers are trime-eval's: each record's ``log_prob`` equals the per-token log P the evaluator scores
  (its collected run, what ``--tune`` scores; and the streaming run's total over a whole split), its
  ``lm_log_prob`` the ``--memory none`` one, for local, long, the continuous cache, external memory with and
  without ``--lmbda`` and kNN-LM, on a tiny fairseq TrimeLM (adaptive softmax) and a tiny HF GPT-2.
- The parts add up: the levels sum to ``memory_prob``; with every entry kept, the weights of the entries
  whose value is the token sum to ``memory_prob`` and all weights to ``memory_mass``, so no entry is missing
  or extra. Entries point where they say: the evaluated stream holds the value token at a local or
  long-term entry's position; a datastore row's value and origin hold it; snippets are text of the raw files.
- Search: ``search_with_ids`` gives ``Datastore.search``'s hits (FAISS and torch, exact or not), and the rows.
- Datastores built before sources were recorded, or over other data: positions or notes instead of text.
- ``trime-eval``: results unchanged by the flags, one JSONL record per token, a page an HTML parser (and,
  where installed, headless Chromium) reads back: every token once, text escaped, nothing fetched.
"""

import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

import tests.hf_helpers as H
from tests.eval_helpers import tiny_checkpoints
from trime.errors import TrimeError

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per module

FS_TPS, FS_CONTEXT = 48, 16  # fairseq windows: 32 new tokens
HF_TPS, HF_CONTEXT = 64, 24  # HF windows: 40 new tokens
BATCH = 2  # windows per batch: FIFO entries come from earlier windows of the same batch and from earlier batches
ALL = 10**6  # --dump-top that keeps every entry

SETTINGS = {
    "local": dict(level="local", softmax_temp=0.7),
    "long": dict(level="long", mem_size=10, softmax_temp=0.7),  # the window's context rows partly in the FIFO
    "cache": dict(level="long", mem_size=40, cache="interp", cache_lmbda=0.3, cache_temp=3.0),
    "external": dict(level="external", mem_size=40, knn_in_joint=True, k=16, softmax_temp=1.3, external_temp=2.0),
    "external+lmbda": dict(level="external", mem_size=40, knn_in_joint=True, k=16, lmbda=0.3, interp_temp=2.5),
    "knnlm": dict(level="none", lmbda=0.25, k=16, interp_temp=3.0),
}
LEVELS = {
    "local": {"local"}, "long": {"local", "long"}, "cache": {"cache"}, "external": {"local", "long", "external"},
    "external+lmbda": {"local", "long", "external", "knn"}, "knnlm": {"knn"},
}  # fmt: skip
ENTRY_LEVELS = {  # where the entries are: the window, the FIFO, the datastore
    "local": {"local"}, "long": {"local", "long"}, "cache": {"local", "long"}, "external": {"local", "long", "external"},
    "external+lmbda": {"local", "long", "external"}, "knnlm": {"external"},
}  # fmt: skip


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, wt2_sample_bin):
    return tiny_checkpoints(tmp_path_factory, wt2_sample_bin)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    """DATA of the HF model: train, valid and test text, prefixes of the shipped sample's splits."""
    out = tmp_path_factory.mktemp("inspect_text")
    for split, source, chars in (("train", H.SAMPLE_TRAIN, 6000), ("valid", H.SAMPLE_VALID, 3000),
                                 ("test", H.SAMPLE_TEST, 4000)):
        H.text_head(source, out / f"{split}.txt", chars)
    return out


@pytest.fixture(scope="module")
def models(ckpts, wt2_sample_bin, text_dir):
    """name -> (adapter, windows)."""
    from trime.adapters import load_adapter

    fs = load_adapter(ckpts["trime"], wt2_sample_bin, cpu=True)
    hf = load_adapter(H.model_dir("gpt2"), text_dir, cpu=True)
    return {"trime": (fs, fs.window_settings(FS_CONTEXT, FS_TPS)), "gpt2": (hf, hf.window_settings(HF_CONTEXT, HF_TPS))}


def build_store(lm, windows, split: str, folder: Path) -> Path:
    from trime.retrieval.build_datastore import extract

    extract(lm, split, windows, 8, folder, key_dtype="fp32", show_progress=False, metric="l2")
    return folder


def open_store(folder: Path, lm, search: str = "torch"):
    from trime.retrieval.datastore import Datastore

    return Datastore.open(folder, dim=lm.dim, dict_sha256=lm.dict_sha256, search=search, device=lm.device,
                          need_index=search == "faiss")


@pytest.fixture(scope="module")
def store_dirs(models, tmp_path_factory):
    """name -> an fp32 datastore (l2, with sources) over the valid split (fairseq) or train split (HF)."""
    return {name: build_store(lm, windows, "valid" if name == "trime" else "train", tmp_path_factory.mktemp(name))
            for name, (lm, windows) in models.items()}


def evaluator_log_probs(lm, windows, settings, store, tokens: int):
    """trime-eval's log P of the first ``tokens`` scored tokens of test, and --memory none's."""
    from trime.eval.engine import Evaluator
    from trime.eval.memory import MemorySettings

    evaluator = Evaluator(lm, windows, BATCH, store, k=settings.k or 1, progress=False)
    cached = evaluator.collect("test", max_batches=evaluator.batches_for_tokens("test", tokens))
    return cached.log_probs(settings)[:tokens], cached.log_probs(MemorySettings())[:tokens]


# ----------------------------------------------------------------------------- the numbers are trime-eval's


@pytest.mark.parametrize("name,memory", [(n, m) for n in ("trime", "gpt2") for m in SETTINGS])
def test_records_equal_trime_eval_and_their_parts_add_up(models, store_dirs, name, memory):
    from trime.eval.inspection import inspect_tokens
    from trime.eval.memory import MemorySettings

    lm, windows = models[name]
    settings = MemorySettings(**SETTINGS[memory])
    store = open_store(store_dirs[name], lm) if settings.k else None
    tokens = 2 * BATCH * windows.new_tokens + 11  # three batches, the last one in part
    records = inspect_tokens(lm, "test", settings, store=store, windows=windows, batch_size=BATCH, limit=tokens,
                             top=ALL)
    assert [r.index for r in records] == list(range(tokens))
    expected, no_memory = evaluator_log_probs(lm, windows, settings, store, tokens)
    ours = torch.tensor([r.log_prob for r in records], dtype=torch.float64)
    torch.testing.assert_close(ours, expected.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor([r.lm_log_prob for r in records], dtype=torch.float64),
                               no_memory.double(), atol=1e-6, rtol=0)
    assert float((expected - no_memory).abs().max()) > 1e-2  # the memory changes the scores

    stream = np.asarray(lm.stream("test"))
    if store is not None:
        vals = np.asarray(store.vals)
        sources = {src["split"]: np.asarray(lm.stream(src["split"])) for src in store.meta["sources"]}
    for r in records:
        assert stream[r.position] == r.id and r.token == lm.decode([r.id])
        assert set(r.levels) == LEVELS[memory]
        assert math.fsum(r.levels.values()) == pytest.approx(r.memory_prob, abs=2e-6)
        assert r.prob == pytest.approx(math.exp(r.log_prob)) and r.lm_prob == pytest.approx(math.exp(r.lm_log_prob))
        # every entry kept: the weights of the token's entries are the memory's part, all weights its mass
        assert math.fsum(n.weight for n in r.neighbors if n.matches) == pytest.approx(r.memory_prob, abs=2e-6)
        assert math.fsum(n.weight for n in r.neighbors) == pytest.approx(r.memory_mass, abs=2e-6)
        weights = [n.weight for n in r.neighbors]
        assert weights == sorted(weights, reverse=True)
        if r.top_level is not None:
            assert r.levels[r.top_level] == max(r.levels.values()) > 0
        for n in r.neighbors:
            assert n.matches == (n.id == r.id) and n.token == lm.decode([n.id])
            if n.level in ("local", "long"):  # into the evaluated text, strictly before the token
                assert n.split == "test" and n.position < r.position and stream[n.position] == n.id
                assert n.key is None and n.before is not None and n.after is not None
            else:
                assert n.level == "external" and vals[n.key] == n.id
                assert sources[n.split][n.position] == n.id and n.document and n.note is None
    assert {n.level for r in records for n in r.neighbors} == ENTRY_LEVELS[memory]


def test_a_whole_split_totals_what_the_streaming_evaluator_scores(models, store_dirs):
    """Evaluator.run (trime-eval's report) over a whole split: the sum of the records' log P."""
    from trime.eval.engine import Evaluator
    from trime.eval.inspection import Inspector
    from trime.eval.memory import MemorySettings

    lm, windows = models["gpt2"]
    settings = MemorySettings(**SETTINGS["external+lmbda"])
    evaluator = Evaluator(lm, windows, BATCH, open_store(store_dirs["gpt2"], lm), k=settings.k, progress=False)
    nll, count, _, _ = evaluator.run("valid", settings)
    records = list(Inspector(evaluator, settings, top=2).records("valid"))
    assert len(records) == count
    assert -math.fsum(r.log_prob for r in records) == pytest.approx(nll, rel=1e-6)
    assert all(len(r.neighbors) == 2 for r in records)


def test_snippets_are_text_of_the_files(models, store_dirs, text_dir):
    """HF: a neighbour's before + token + after is a stretch of the raw text file it points into (where no piece
    splits a character: each piece is decoded on its own, so a split one shows as U+FFFD)."""
    from trime.eval.inspection import inspect_tokens
    from trime.eval.memory import MemorySettings

    lm, windows = models["gpt2"]
    store = open_store(store_dirs["gpt2"], lm)
    records = inspect_tokens(lm, "test", MemorySettings(**SETTINGS["external"]), store=store, windows=windows,
                             batch_size=BATCH, limit=60, top=8)
    texts = {split: (text_dir / f"{split}.txt").read_text(encoding="utf-8") for split in ("test", "train")}
    seen, split_characters = set(), 0
    for r in records:
        for n in r.neighbors:
            seen.add(n.level)
            if "\ufffd" in n.snippet():
                split_characters += 1
                continue
            assert n.snippet("", "") in texts[n.split], (n.level, n.snippet())
            if n.level == "external":
                assert n.document == "Valkyria Chronicles III"  # the only article of the train prefix
    assert seen == {"local", "long", "external"} and split_characters < 0.1 * sum(len(r.neighbors) for r in records)


# ----------------------------------------------------------------------------- search and sources


@pytest.mark.parametrize("search", ["faiss", "torch"])
@pytest.mark.parametrize("exact", [False, True])
def test_search_with_ids_equals_datastore_search(models, store_dirs, tmp_path, search, exact):
    from trime.eval.inspection import search_with_ids
    from trime.retrieval.build_datastore import build_index

    lm, windows = models["gpt2"]
    folder = tmp_path / "ds"
    shutil.copytree(store_dirs["gpt2"], folder)
    if search == "faiss":
        build_index(folder, factory="Flat", show_progress=False)
    store = open_store(folder, lm, search)
    batch = next(iter(lm.windows("test", windows).batches(BATCH)))
    queries = lm.forward(batch).queries
    hits, ids = search_with_ids(store, queries, 12, exact)
    plain = store.search(queries, 12, exact=exact)
    torch.testing.assert_close(hits.scores, plain.scores.cpu(), atol=1e-4, rtol=0)
    assert torch.equal(hits.labels, plain.labels.cpu()) and torch.equal(hits.valid, plain.valid.cpu())
    keys = torch.from_numpy(np.array(store.keys, dtype=np.float32))
    q = queries.float()
    brute = -((q[:, None, :] - keys[ids]) ** 2).sum(-1)  # l2: minus the squared distance to each row
    torch.testing.assert_close(hits.scores, brute, atol=1e-3, rtol=1e-5)
    assert torch.equal(hits.labels, torch.from_numpy(np.asarray(store.vals, dtype=np.int64))[ids])


def test_a_datastore_without_sources_says_so_with_the_same_numbers(models, store_dirs, tmp_path):
    from trime.eval.inspection import inspect_tokens
    from trime.eval.memory import MemorySettings
    from trime.retrieval.datastore import NO_SOURCES

    lm, windows = models["gpt2"]
    old = tmp_path / "old"
    shutil.copytree(store_dirs["gpt2"], old)
    (old / "origins.npy").unlink()
    (old / "documents.json").unlink()
    meta = json.loads((old / "meta.json").read_text())
    del meta["sources"], meta["checksums"]["origins_sha256"], meta["checksums"]["documents_sha256"]
    (old / "meta.json").write_text(json.dumps(meta))
    settings = MemorySettings(**SETTINGS["external+lmbda"])
    kwargs = dict(windows=windows, batch_size=BATCH, limit=50, top=4)
    new_records = inspect_tokens(lm, "test", settings, store=open_store(store_dirs["gpt2"], lm), **kwargs)
    old_records = inspect_tokens(lm, "test", settings, store=open_store(old, lm), **kwargs)
    assert [r.log_prob for r in old_records] == [r.log_prob for r in new_records]
    external = [n for r in old_records for n in r.neighbors if n.level == "external"]
    assert external
    for n in external:
        assert n.note == f"the datastore {NO_SOURCES}" and n.split is None and n.position is None
        assert n.before is None and n.snippet() is None and n.key is not None


def test_a_datastore_over_other_data_gives_positions_and_a_note(models, store_dirs, text_dir, tmp_path):
    """DATA's train file is not the one the datastore was built from: origins, no text, the reason."""
    from trime.adapters import load_adapter
    from trime.eval.inspection import inspect_tokens
    from trime.eval.memory import MemorySettings

    _, windows = models["gpt2"]
    other = tmp_path / "other"
    shutil.copytree(text_dir, other)
    (other / "train.txt").write_text("other text\n" * 50, encoding="utf-8")
    lm = load_adapter(H.model_dir("gpt2"), other, cpu=True)
    records = inspect_tokens(lm, "test", MemorySettings(**SETTINGS["knnlm"]), store=open_store(store_dirs["gpt2"], lm),
                             windows=windows, batch_size=BATCH, limit=20, top=3)
    for n in (n for r in records for n in r.neighbors):
        assert n.split == "train" and n.position is not None and n.document == "Valkyria Chronicles III"
        assert n.before is None and "differs from the file" in n.note and str(other / "train.txt") in n.note


# ----------------------------------------------------------------------------- the page


class Page(HTMLParser):
    """The tokens (text of ``span.t``), the scripts and every attribute that could fetch something."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: list[str] = []
        self.scripts: list[tuple[dict, str]] = []
        self.fetching: list[tuple[str, str, str]] = []
        self._in: str | None = None
        self._attrs: dict = {}
        self._depth = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href", "action", "srcset"):
            if name in attrs:
                self.fetching.append((tag, name, attrs[name]))
        if tag == "link":
            self.fetching.append((tag, "link", str(attrs)))
        if tag == "span" and "t" in (attrs.get("class") or "").split():
            self._in, self._depth = "token", 1
            self.tokens.append("")
        elif tag == "span" and self._in == "token":
            self._depth += 1
        elif tag == "script":
            self._in, self._attrs = "script", attrs
            self.scripts.append((attrs, ""))

    def handle_endtag(self, tag):
        if self._in == "token" and tag == "span":
            self._depth -= 1
            if self._depth == 0:
                self._in = None
        elif self._in == "script" and tag == "script":
            self._in = None

    def handle_data(self, data):
        if self._in == "token":
            self.tokens[-1] += data
        elif self._in == "script":
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)


def hostile_records():
    """Records whose texts hold markup, entities, quotes, a script end tag and newlines."""
    from trime.eval.inspection import Neighbor, TokenRecord

    texts = [" <b>bold</b>", " &amp; &", ' "quoted" \'x\'', "</script><script>alert(1)</script>", " \n", " <!--",
             " \u2028line"]
    records = []
    for i, text in enumerate(texts):
        neighbor = Neighbor(level="external", weight=0.25, score=-1.5, id=7, token="</script>", matches=False,
                            split="train", position=3, key=2, document="<i>T</i>", before="a<b", after="c>&d")
        records.append(TokenRecord(index=i, split="test", position=i + 1, id=i, token=text, log_prob=-1.0 + 0.1 * i,
                                   lm_log_prob=-2.0, prob=math.exp(-1.0 + 0.1 * i), lm_prob=math.exp(-2.0),
                                   memory_prob=0.1, memory_mass=0.2, levels={"external": 0.1}, top_level="external",
                                   neighbors=[neighbor]))
    return records


def page_of(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    return page


def test_the_page_escapes_every_text_and_fetches_nothing():
    from trime.eval.inspection import report_html

    records = hostile_records()
    text = report_html(records, title="<title>", lines=["model </script> & co"], prefix="<pre>")
    page = page_of(text)
    assert page.tokens == [r.token.replace("\n", "\u21b5\n") for r in records]  # each token once, as text
    assert page.fetching == []
    assert [a.get("type") for a, _ in page.scripts] == ["application/json", None]  # the data and the inline script
    data = json.loads(page.scripts[0][1])
    assert [t[2] for t in data["tokens"]] == [r.token for r in records]
    neighbor = data["tokens"][0][11][0]
    assert neighbor[3] == "</script>" and neighbor[7] == "<i>T</i>" and neighbor[9:11] == ["a<b", "c>&d"]
    assert "<" not in page.scripts[0][1] and "alert(1)</script>" not in text
    assert "<b>bold" not in text and "&lt;b&gt;bold&lt;/b&gt;" in text


def test_the_page_runs_in_headless_chromium(tmp_path):
    """Where Debian's chromium is installed: the page's script fills the panel with the first token's numbers,
    and page.html#N opens with token N kept."""
    from trime.eval.inspection import report_html

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium here (apt-get install chromium)")
    page = tmp_path / "page.html"
    page.write_text(report_html(hostile_records()), encoding="utf-8")
    for suffix, shown in (("", "scored token 0,"), ("#3", "scored token 3,")):
        proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                               page.as_uri() + suffix], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        dom = proc.stdout
        assert shown in dom and "P with memory" in dom and "top 1 memory entries by weight" in dom
        assert "a&lt;b" in dom and "<script>alert(1)" not in dom  # the hostile text stays text


# ----------------------------------------------------------------------------- trime-eval


def eval_cli(capsys, *argv) -> tuple[dict, str]:
    from trime.eval.evaluate import run

    record = run([str(a) for a in argv] + ["--cpu", "--no-progress-bar"])
    return record, capsys.readouterr().out


def test_trime_eval_dump_and_page(models, store_dirs, text_dir, tmp_path, capsys):
    from trime.eval.inspection import inspect_tokens
    from trime.eval.memory import MemorySettings

    lm, windows = models["gpt2"]
    common = [text_dir, "--path", H.model_dir("gpt2"), "--memory", "external", "--mem-size", 40, "--datastore",
              store_dirs["gpt2"], "--knn-search", "torch", "--k", 16, "--lmbda", 0.3, "--interp-temp", 2.5,
              "--softmax-temp", 1.3, "--external-temp", 2.0, "--context-window", HF_CONTEXT, "--tokens-per-sample",
              HF_TPS, "--batch-size", BATCH]
    plain, plain_out = eval_cli(capsys, *common)
    dump, page = tmp_path / "out" / "dump.jsonl", tmp_path / "out" / "page.html"
    record, out = eval_cli(capsys, *common, "--dump-neighbors", dump, "--report-html", page, "--dump-limit", 50,
                           "--dump-top", 3)
    timing = ("seconds", "tokens_per_s")
    assert [{k: v for k, v in row.items() if k not in timing} for row in record["results"]] == \
        [{k: v for k, v in row.items() if k not in timing} for row in plain["results"]]  # the flags change no result
    assert out.startswith(plain_out.splitlines()[0])
    assert f"wrote 50 token records to {dump}" in out and f"wrote {page}: 50 tokens" in out
    lines = dump.read_text(encoding="utf-8").splitlines()
    dumped = [json.loads(line) for line in lines]
    settings = MemorySettings(**SETTINGS["external+lmbda"], softmax_temp=1.3, external_temp=2.0)
    api = inspect_tokens(lm, "test", settings, store=open_store(store_dirs["gpt2"], lm), windows=windows,
                         batch_size=BATCH, limit=50, top=3)
    assert dumped == [r.as_dict() for r in api]
    assert all(len(d["neighbors"]) == 3 for d in dumped)
    parsed = page_of(page.read_text(encoding="utf-8"))
    assert parsed.tokens == [d["token"].replace("\n", "\u21b5\n") for d in dumped] and parsed.fetching == []
    assert [t[0] for t in json.loads(parsed.scripts[0][1])["tokens"]] == list(range(50))
    assert sorted(p.name for p in dump.parent.iterdir()) == ["dump.jsonl", "page.html"]  # no temporary files left


def test_trime_eval_page_alone_and_a_failed_write_leaves_nothing(models, store_dirs, text_dir, tmp_path, capsys):
    """--report-html alone shows --dump-limit tokens; a write that fails names the file and writes no part."""
    common = [text_dir, "--path", H.model_dir("gpt2"), "--memory", "local", "--context-window", HF_CONTEXT,
              "--tokens-per-sample", HF_TPS, "--dump-limit", 30]
    page = tmp_path / "page.html"
    _, out = eval_cli(capsys, *common, "--report-html", page)
    assert f"wrote {page}: 30 tokens" in out and len(page_of(page.read_text()).tokens) == 30
    blocker = tmp_path / "file"
    blocker.write_text("x")
    dump = tmp_path / "dump.jsonl"
    with pytest.raises(TrimeError) as err:
        eval_cli(capsys, *common, "--dump-neighbors", dump, "--report-html", blocker / "page.html")
    message = str(err.value)
    assert "\n" not in message and f"{blocker}: check the path" in message
    assert not dump.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["file", "page.html"]


@pytest.mark.parametrize("argv,needle", [
    (["--dump-limit", "5"], "--dump-limit sets what --dump-neighbors and --report-html show"),
    (["--dump-top", "5"], "--dump-top sets what --dump-neighbors and --report-html show"),
    (["--memory", "long", "--sweep", "mem-size=8,16", "--report-html", "p.html"], "give --mem-size M"),
    (["--dump-neighbors", "same.out", "--report-html", "same.out"], "give them different files"),
])
def test_bad_dump_flags_are_one_line(text_dir, argv, needle):
    from trime.eval.evaluate import build_parser, check_args, check_dump_args

    args = build_parser().parse_args([str(text_dir), "--path", "m", *argv])
    with pytest.raises(TrimeError) as err:
        check_args(args)
        check_dump_args(args)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_dump_top_zero_is_a_usage_error(text_dir):
    from tests.eval_helpers import run_cli

    proc = run_cli("trime-eval", text_dir, "--path", "m", "--report-html", "p.html", "--dump-top", "0")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--dump-top" in proc.stderr
