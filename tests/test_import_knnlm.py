"""``--import-knnlm``: a knnlm/TRIME datastore (headerless memmaps) converted into trime's format.

The reference is a trime datastore extracted from the tiny CE checkpoint of ``eval_helpers`` over the
valid split of the shipped WikiText-2 sample. Its keys and values are written again exactly as knnlm's
``eval_lm.py --save-knnlm-dstore`` writes them (``np.memmap(..., mode='w+')``, values of shape (N, 1);
fp16 keys with int16 values, and fp32 keys with int64 values), imported, and compared with the
trime build: the same bytes, a meta that every loader check accepts, and the same ``trime-eval``
perplexity. Each bad input is one error line, and nothing is written.
"""

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.eval_helpers import CONTEXT, assert_one_line_error, run_cli, tiny_checkpoints
from trime.errors import TrimeError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per module

BATCH = 64
SAME_AS_BUILD = ("format", "key_type", "count", "dim", "val_dtype", "dictionary", "checkpoint", "model")


@pytest.fixture(scope="module")
def lm(tmp_path_factory, wt2_sample_bin):
    from trime.adapters import load_adapter

    return load_adapter(tiny_checkpoints(tmp_path_factory, wt2_sample_bin)["ce"], wt2_sample_bin, cpu=True)


@pytest.fixture(scope="module")
def built(lm, tmp_path_factory):
    """The trime build the knnlm files are made from (fp16 keys, no index)."""
    from trime.retrieval.build_datastore import extract

    out = tmp_path_factory.mktemp("trime_build")
    extract(lm, "valid", lm.window_settings(CONTEXT, None), BATCH, out, key_dtype="fp16", metric="l2",
            show_progress=False)
    return out


def write_knnlm(directory: Path, keys: np.ndarray, vals: np.ndarray, key_dtype, vals_dtype) -> tuple[Path, Path]:
    """Save a datastore as knnlm's eval_lm.py does: two np.memmap files (no header), values of shape (N, 1)."""
    n, d = keys.shape
    directory.mkdir(parents=True, exist_ok=True)
    keys_path, vals_path = directory / "dstore_keys.npy", directory / "dstore_vals.npy"
    dstore_keys = np.memmap(keys_path, dtype=key_dtype, mode="w+", shape=(n, d))
    dstore_vals = np.memmap(vals_path, dtype=vals_dtype, mode="w+", shape=(n, 1))
    for lo in range(0, n, 5000):  # batch by batch, like its evaluation loop
        dstore_keys[lo : lo + 5000] = keys[lo : lo + 5000].astype(key_dtype)
        dstore_vals[lo : lo + 5000] = vals[lo : lo + 5000].reshape(-1, 1).astype(vals_dtype)
    dstore_keys.flush()
    dstore_vals.flush()
    del dstore_keys, dstore_vals
    return keys_path, vals_path


def trime_arrays(built: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.load(built / "keys.npy"), np.load(built / "vals.npy")


@pytest.fixture(scope="module")
def knnlm_fp16(built, tmp_path_factory):
    """knnlm's --dstore-fp16 layout: float16 keys, int16 values."""
    keys, vals = trime_arrays(built)
    return write_knnlm(tmp_path_factory.mktemp("knnlm_fp16"), keys, vals, np.float16, np.int16)


@pytest.fixture(scope="module")
def imported(lm, knnlm_fp16, tmp_path_factory):
    from trime.retrieval.import_knnlm import import_knnlm

    out = tmp_path_factory.mktemp("imported") / "ds"
    meta = import_knnlm(*knnlm_fp16, size=18345, dim=lm.dim, vals_dtype=None, lm=lm, output=out, show_progress=False)
    return out, meta


def test_fp16_int16_import_is_the_trime_build(lm, built, knnlm_fp16, imported):
    from trime.retrieval.datastore import Datastore, model_info, verify

    out, meta = imported
    assert (out / "keys.npy").read_bytes() == (built / "keys.npy").read_bytes()  # header and data, byte for byte
    assert (out / "vals.npy").read_bytes() == (built / "vals.npy").read_bytes()
    ref = json.loads((built / "meta.json").read_text())
    assert json.loads((out / "meta.json").read_text()) == meta
    assert {k: meta[k] for k in SAME_AS_BUILD} == {k: ref[k] for k in SAME_AS_BUILD}
    assert meta["key_dtype"] == "float16" and meta["metric"] == "l2" and meta["index"] is None
    assert [entry["op"] for entry in meta["history"]] == ["import"]
    assert meta["history"][0]["vals_sha256"] == meta["checksums"]["vals_sha256"]
    assert meta["split"] is None and meta["data"] is None and meta["windows"] is None and "sources" not in meta
    assert meta["checksums"]["vals_sha256"] == ref["checksums"]["vals_sha256"]
    assert meta["checksums"]["keys_chunk_sha256"] == ref["checksums"]["keys_chunk_sha256"]
    keys_path, vals_path = knnlm_fp16
    record = meta["imported"]
    assert record["from"] == "knnlm" and record["size"] == 18345 and record["dim"] == lm.dim
    assert record["key_dtype"] == "float16" and record["vals_dtype"] == "int16"  # read from the sizes
    for name, path in (("keys", keys_path), ("vals", vals_path)):
        data = path.read_bytes()
        assert record[name] == {"path": str(path.resolve()), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert vals_path.stat().st_size == 18345 * 2 and keys_path.stat().st_size == 18345 * lm.dim * 2  # no header
    store = Datastore.open(out, dim=lm.dim, dict_sha256=lm.dict_sha256, model=model_info(lm), checkpoint=lm.identity,
                           vocab_size=lm.vocab["size"], need_index=False)
    assert store.count == 18345 and not store.has_sources
    with pytest.raises(TrimeError, match="built before sources were recorded"):
        store.origins([0])
    summary = verify(out, show_progress=False)
    assert "OK" in summary and "all finite" in summary and "no sources" in summary
    assert sorted(p.name for p in out.iterdir()) == [".trime-build.lock", "keys.npy", "meta.json", "vals.npy"]


def test_fp32_int64_import_in_chunks(lm, built, tmp_path, monkeypatch):
    """float32 keys and int64 values, read 1,000 rows at a time; stored as float32, or as float16 (converted)."""
    from trime.retrieval import import_knnlm as module

    monkeypatch.setattr(module, "IMPORT_CHUNK_ROWS", 1000)
    keys, vals = trime_arrays(built)
    files = write_knnlm(tmp_path / "knnlm", keys, vals, np.float32, np.int64)
    meta = module.import_knnlm(*files, 18345, lm.dim, "int64", lm, tmp_path / "fp32", show_progress=False)
    assert meta["key_dtype"] == "float32" and meta["imported"]["vals_dtype"] == "int64"
    got = np.load(tmp_path / "fp32" / "keys.npy")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, keys.astype(np.float32))
    np.testing.assert_array_equal(np.load(tmp_path / "fp32" / "vals.npy"), vals)
    module.import_knnlm(*files, 18345, lm.dim, None, lm, tmp_path / "fp16", key_dtype="fp16", show_progress=False)
    assert (tmp_path / "fp16" / "keys.npy").read_bytes() == (built / "keys.npy").read_bytes()


@pytest.fixture(scope="module")
def indexed(built, imported, tmp_path_factory):
    """Copies of the trime build and of the import, each with an exact (Flat) index."""
    from trime.retrieval.build_datastore import build_index

    out = {}
    for name, source in (("build", built), ("import", imported[0])):
        d = tmp_path_factory.mktemp(f"indexed_{name}") / "ds"
        shutil.copytree(source, d)
        build_index(d, factory="Flat", show_progress=False)
        out[name] = d
    return out


def test_search_and_scores_on_the_import_equal_the_builds(lm, indexed):
    """The same neighbours, labels and per-token log-probabilities (external memory and kNN-LM mixture)."""
    from trime.eval.engine import Evaluator
    from trime.eval.memory import MemorySettings
    from trime.retrieval.datastore import Datastore

    settings = MemorySettings(level="external", mem_size=16, knn_in_joint=True, k=8, lmbda=0.25)
    runs = []
    for name in ("build", "import"):
        store = Datastore.open(indexed[name], dim=lm.dim, dict_sha256=lm.dict_sha256, checkpoint=lm.identity)
        evaluator = Evaluator(lm, lm.window_settings(CONTEXT, None), batch_size=4, store=store, k=8, progress=False)
        cached = evaluator.collect("test", max_batches=2)
        runs.append((cached.log_probs(settings).numpy(), [(h.ids.numpy(), h.labels.numpy()) for h in cached.knn]))
    (build_lp, build_hits), (import_lp, import_hits) = runs
    assert build_lp.size > 100
    np.testing.assert_array_equal(import_lp, build_lp)
    for (ids_a, labels_a), (ids_b, labels_b) in zip(build_hits, import_hits):
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(labels_a, labels_b)
    plain = cached.log_probs(MemorySettings(level="long", mem_size=16)).numpy()
    assert np.abs(plain - import_lp).max() > 1e-3  # the datastore took part


@pytest.mark.slow  # two whole trime-eval runs
def test_trime_eval_on_the_import_equals_the_builds(lm, indexed, wt2_sample_bin):
    from trime.eval.evaluate import run

    results = []
    for name in ("build", "import"):
        record = run([str(wt2_sample_bin), "--path", str(lm.path), "--gen-subset", "test", "--memory", "external",
                      "--mem-size", "16", "--datastore", str(indexed[name]), "--k", "8", "--lmbda", "0.25",
                      "--context-window", str(CONTEXT), "--cpu", "--no-progress-bar"])
        assert record["datastore"]["count"] == 18345 and record["settings"]["lmbda"] == 0.25
        results.append([{k: row[k] for k in ("subset", "memory", "tokens", "loss_base2", "ppl")}
                        for row in record["results"]])
    assert results[0] == results[1]


# ----------------------------------------------------------------------------- bad input


def import_error(lm, keys, vals, output, *needles, size=18345, dim=None, vals_dtype=None, model=None):
    """Import and expect one error line holding every needle; nothing may be written."""
    from trime.retrieval.import_knnlm import import_knnlm

    before = sorted(p.name for p in output.iterdir()) if output.is_dir() else None
    with pytest.raises(TrimeError) as err:
        import_knnlm(keys, vals, size, lm.dim if dim is None else dim, vals_dtype, model or lm, output,
                     show_progress=False)
    message = str(err.value)
    assert message.startswith("trime: error: ") and "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    after = sorted(p.name for p in output.iterdir() if p.name != ".trime-build.lock") if output.is_dir() else None
    expected = [None, []] if before is None else [[n for n in before if n != ".trime-build.lock"]]
    assert after in expected, after  # at most the lock file is new
    return message


def test_missing_files_and_sizes(lm, knnlm_fp16, tmp_path):
    keys, vals = knnlm_fp16
    out = tmp_path / "ds"
    import_error(lm, tmp_path / "nope_keys.npy", vals, out, "nope_keys.npy", "does not exist")
    import_error(lm, keys, tmp_path / "nope_vals.npy", out, "nope_vals.npy", "does not exist")
    # --size one short: the keys file is then no whole N x D; the message says what N its size means
    import_error(lm, keys, vals, out, "--size 18,344", "18,345 32-d float16 keys (--size)", size=18344)
    truncated = tmp_path / "truncated_keys.npy"
    truncated.write_bytes(keys.read_bytes()[:-3])
    import_error(lm, truncated, vals, out, "truncated")
    short_vals = tmp_path / "short_vals.npy"
    short_vals.write_bytes(vals.read_bytes()[:-2])
    import_error(lm, keys, short_vals, out, "short_vals.npy", "18,344 int16 values", "--size")
    import_error(lm, keys, vals, out, "--vals-dtype int64", "int16", vals_dtype="int64")
    headered = tmp_path / "saved_keys.npy"
    np.save(headered, np.zeros((4, 4), dtype=np.float16))  # np.save's file, not a memmap
    import_error(lm, headered, vals, out, "starts with a .npy header")
    assert not out.exists()  # every check above runs before the output folder is made


def test_dim_other_than_the_models(lm, tmp_path):
    n = 100
    files = write_knnlm(tmp_path / "k", np.zeros((n, 16)), np.arange(n), np.float16, np.int64)
    import_error(lm, *files, tmp_path / "ds", "--dim 16", f"{lm.dim}-d", "--path", size=n, dim=16)


def test_int16_values_with_a_large_dictionary(lm, knnlm_fp16, tmp_path):
    """knnlm's int16 values cannot hold WikiText-103's 267,744 types: refused before anything is read."""
    big = resized(lm, 267_744)  # WikiText-103's dictionary
    message = import_error(lm, *knnlm_fp16, tmp_path / "ds", "int16", "267,744", "overflow", "int64", model=big)
    assert "32,767" in message
    import_error(lm, *knnlm_fp16, tmp_path / "ds", "32,768", model=resized(lm, 32_768))
    from trime.retrieval.import_knnlm import check_against_model, check_files

    files = check_files(*knnlm_fp16, 18345, lm.dim)
    check_against_model(files, resized(lm, 32_767))  # the largest dictionary int16 holds
    int64 = check_files(*write_knnlm(tmp_path / "k", np.zeros((10, lm.dim)), np.arange(10), np.float16, np.int64),
                        10, lm.dim)
    check_against_model(int64, big)  # int64 values hold any dictionary


def resized(lm, size: int):
    """The same model, with a dictionary of ``size`` types."""
    other = copy.copy(lm)
    other.vocab = {**lm.vocab, "size": size}
    return other


def test_bad_values_and_keys(lm, built, tmp_path, monkeypatch):
    from trime.retrieval import import_knnlm as module

    monkeypatch.setattr(module, "IMPORT_CHUNK_ROWS", 1000)  # rows are counted across chunks
    keys, vals = trime_arrays(built)
    n = 3000
    negative = vals[:n].astype(np.int64)
    negative[1234] = -7
    files = write_knnlm(tmp_path / "neg", keys[:n], negative, np.float16, np.int64)
    import_error(lm, *files, tmp_path / "ds", "row 1,234", "-7", "negative", size=n)
    # int16 wrap-around of an id above 32,767 (what knnlm's overflow writes) is negative too
    wrapped = vals[:n].astype(np.int64)
    wrapped[5] = 40_000
    files = write_knnlm(tmp_path / "wrap", keys[:n], wrapped.astype(np.int16), np.float16, np.int16)
    import_error(lm, *files, tmp_path / "ds", "row 5", "-25,536", "negative", size=n)
    beyond = vals[:n].astype(np.int64)
    beyond[2999] = lm.vocab["size"]
    files = write_knnlm(tmp_path / "beyond", keys[:n], beyond, np.float16, np.int64)
    import_error(lm, *files, tmp_path / "ds", "row 2,999", f"{lm.vocab['size']:,}", "another dictionary", size=n)
    nan = keys[:n].astype(np.float32)
    nan[2500, 3] = np.nan
    files = write_knnlm(tmp_path / "nan", nan, vals[:n], np.float32, np.int64)
    import_error(lm, *files, tmp_path / "ds", "row 2,500", "NaN or inf", size=n)
    huge = keys[:n].astype(np.float32)
    huge[77, 0] = 1e6  # finite in float32, inf in float16
    files = write_knnlm(tmp_path / "huge", huge, vals[:n], np.float32, np.int64)
    with pytest.raises(TrimeError, match=r"row 77 holds a key beyond float16's range"):
        module.import_knnlm(*files, n, lm.dim, None, lm, tmp_path / "ds16", key_dtype="fp16", show_progress=False)
    assert not (tmp_path / "ds16" / "meta.json").exists() and not (tmp_path / "ds16" / "keys.npy").exists()


def test_an_output_holding_a_datastore_is_never_overwritten(lm, built, knnlm_fp16, imported, tmp_path):
    out, _ = imported
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    import_error(lm, *knnlm_fp16, out, "already holds a datastore", "never overwrites")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    import_error(lm, *knnlm_fp16, built, "already holds a datastore")  # a trime build too
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "keys.partial.npy").write_bytes(b"")
    import_error(lm, *knnlm_fp16, partial, "build in progress")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    import_error(lm, *knnlm_fp16, a_file, "is a file")


# ----------------------------------------------------------------------------- import_step and the CLI


def step_parser():
    """The flags import_step reads, as trime-build-datastore declares them."""
    from trime.cli import Parser
    from trime.cli.model_args import add_model_args
    from trime.retrieval.import_knnlm import add_import_args

    p = Parser(prog="trime-build-datastore")
    add_model_args(p, gen_subset="train", gen_subset_help="split", required=False)
    p.add_argument("--output", required=True, help="datastore directory")
    add_import_args(p)
    return p


def test_import_step(lm, built, knnlm_fp16, wt2_sample_bin, tmp_path):
    from trime.retrieval.import_knnlm import import_step

    keys, vals = map(str, knnlm_fp16)
    out = tmp_path / "ds"
    args = step_parser().parse_args([str(wt2_sample_bin), "--path", str(lm.path), "--import-knnlm", keys, vals,
                                     "--size", "18345", "--dim", str(lm.dim), "--vals-dtype", "int16",
                                     "--output", str(out), "--cpu", "--no-progress-bar"])
    meta = import_step(args, out)
    assert meta["imported"]["vals_dtype"] == "int16" and meta["metric"] == "l2"
    assert (out / "keys.npy").read_bytes() == (built / "keys.npy").read_bytes()
    no_data = step_parser().parse_args(["--path", str(lm.path), "--import-knnlm", keys, vals, "--size", "18345",
                                        "--dim", str(lm.dim), "--output", str(tmp_path / "ds2")])
    with pytest.raises(TrimeError, match="needs DATA: the data-bin whose dict.txt"):
        import_step(no_data, tmp_path / "ds2")
    no_size = step_parser().parse_args(["--path", str(lm.path), "--import-knnlm", keys, vals, "--dim", "32",
                                        "--output", str(tmp_path / "ds3")])
    with pytest.raises(TrimeError, match="needs --size N and --dim D"):
        import_step(no_size, tmp_path / "ds3")
    assert not (tmp_path / "ds2").exists() and not (tmp_path / "ds3").exists()


def test_import_step_for_a_hugging_face_model_needs_no_data(tmp_path):
    """A Hugging Face model carries its tokenizer: DATA may be left out, and the meta names the HF model."""
    from tests.hf_helpers import model_dir
    from trime.adapters import load_adapter
    from trime.retrieval.datastore import Datastore, model_info
    from trime.retrieval.import_knnlm import import_step

    path = model_dir("gpt2")
    lm = load_adapter(path, path, cpu=True)
    rng = np.random.default_rng(0)
    n = 500
    keys = rng.standard_normal((n, lm.dim)).astype(np.float32)
    vals = rng.integers(0, lm.vocab["size"], n)
    files = write_knnlm(tmp_path / "knnlm", keys, vals, np.float32, np.int64)
    out = tmp_path / "ds"
    args = step_parser().parse_args(["--path", str(path), "--import-knnlm", *map(str, files), "--size", str(n),
                                     "--dim", str(lm.dim), "--output", str(out), "--cpu", "--no-progress-bar"])
    meta = import_step(args, out)
    assert meta["model"] == model_info(lm) and meta["model"]["frontend"] == "hf"
    assert meta["dictionary"] == lm.vocab and meta["checkpoint"] == lm.identity
    store = Datastore.open(out, dim=lm.dim, dict_sha256=lm.dict_sha256, model=model_info(lm), checkpoint=lm.identity,
                           vocab_size=lm.vocab["size"], need_index=False)
    np.testing.assert_array_equal(np.asarray(store.keys), keys)
    np.testing.assert_array_equal(store.vals, vals)


STEP_MAIN = """
import sys
from pathlib import Path
from tests.test_import_knnlm import step_parser
from trime.errors import file_faults_as_errors
from trime.retrieval.import_knnlm import import_step
args = step_parser().parse_args(sys.argv[1:])
with file_faults_as_errors():
    import_step(args, Path(args.output))
"""


def test_import_step_exit_status_and_one_line(lm, knnlm_fp16, wt2_sample_bin, tmp_path, repo_root):
    """As a command: a size mismatch is exit status 1 and one stderr line (found before the model loads)."""
    keys, vals = map(str, knnlm_fp16)
    proc = subprocess.run([sys.executable, "-c", STEP_MAIN, str(wt2_sample_bin), "--path", str(lm.path),
                           "--import-knnlm", keys, vals, "--size", "18346", "--dim", str(lm.dim),
                           "--output", str(tmp_path / "ds")],
                          capture_output=True, text=True, timeout=300, cwd=repo_root,
                          env={**os.environ, "PYTHONPATH": str(repo_root)})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith("trime: error: --import-knnlm KEYS VALS: ") and "--size 18,346" in proc.stderr
    assert not (tmp_path / "ds").exists()


def _cli_has_import() -> bool:
    from trime.retrieval.build_datastore import build_parser

    return any("--import-knnlm" in a.option_strings for a in build_parser()._actions)


needs_cli = pytest.mark.skipif(not _cli_has_import(), reason="trime-build-datastore has no --import-knnlm yet")


@needs_cli
@pytest.mark.slow  # end-to-end CLI runs
def test_cli_imports_and_indexes(lm, built, knnlm_fp16, wt2_sample_bin, tmp_path):
    out = tmp_path / "ds"
    proc = run_cli("trime-build-datastore", wt2_sample_bin, "--import-knnlm", *knnlm_fp16, "--size", 18345,
                   "--dim", lm.dim, "--path", lm.path, "--output", out, "--index-factory", "Flat", "--cpu",
                   "--no-progress-bar")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "keys.npy").read_bytes() == (built / "keys.npy").read_bytes()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["imported"]["vals_dtype"] == "int16" and meta["index"]["factory"] == "Flat"
    again = run_cli("trime-build-datastore", wt2_sample_bin, "--import-knnlm", *knnlm_fp16, "--size", 18345,
                    "--dim", lm.dim, "--path", lm.path, "--output", out, "--cpu")
    assert_one_line_error(again, "already holds a datastore")


@needs_cli
@pytest.mark.slow  # end-to-end CLI runs
@pytest.mark.parametrize("flags,needle", [
    (["--size", "18344"], "--size 18,344"),
    (["--dim", "16"], "--dim 16"),
    (["--vals-dtype", "int64"], "--vals-dtype int64"),
])
def test_cli_bad_input_is_one_line(lm, knnlm_fp16, wt2_sample_bin, tmp_path, flags, needle):
    given = {"--size": "18345", "--dim": str(lm.dim), **dict(zip(flags[::2], flags[1::2]))}
    proc = run_cli("trime-build-datastore", wt2_sample_bin, "--import-knnlm", *knnlm_fp16,
                   *[x for flag, value in given.items() for x in (flag, value)], "--path", lm.path,
                   "--output", tmp_path / "ds", "--cpu")
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "ds" / "meta.json").exists()
