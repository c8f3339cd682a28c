"""Shared pytest fixtures: the repo root, the optional ../shared/data, data-bins of the shipped samples and
the synthetic word dictionary of the criterion tests.

The sample data-bins are built once per test session with ``prepare_dataset`` (a few
seconds each) into a session temp folder; tests must treat them as read-only.
"""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLES_DIR = REPO_ROOT / "samples"
# Real datasets beside the checkout (not in a fresh clone); $TRIME_SHARED_DATA overrides.
SHARED_DATA_DIR = Path(os.environ.get("TRIME_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module (opt in with ``pytest.mark.usefixtures``).

    The test machine is shared: a single thread is faster there, and deterministic.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The root of the trime checkout."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """``../shared/data`` (real WikiText-2 and the enwik8 prefix); skips the test if absent."""
    if not SHARED_DATA_DIR.is_dir():
        pytest.skip(f"{SHARED_DATA_DIR} not found (real data lives beside the checkout only)")
    return SHARED_DATA_DIR


@pytest.fixture(scope="session")
def wt2_sample_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fairseq data-bin of the shipped WikiText-2 sample (word level). Read-only."""
    from trime.data_prep.prepare import prepare_dataset

    dest = tmp_path_factory.mktemp("wt2_sample") / "data-bin"
    return prepare_dataset("wikitext-2-sample", SAMPLES_DIR / "wikitext-2", dest)


@pytest.fixture(scope="session")
def enwik8_sample_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fairseq data-bin of the shipped 400,000-byte enwik8 sample (byte level). Read-only."""
    from trime.data_prep.prepare import prepare_dataset

    dest = tmp_path_factory.mktemp("enwik8_sample") / "data-bin"
    return prepare_dataset("enwik8-sample", SAMPLES_DIR / "enwik8", dest)


@pytest.fixture(scope="module")
def dict_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A folder with the ``dict.txt`` of ``tests._dist_worker.NUM_WORDS`` synthetic words (``w0`` most frequent)."""
    from fairseq.data import Dictionary

    from tests._dist_worker import NUM_WORDS

    path = tmp_path_factory.mktemp("word_dict")
    d = Dictionary()
    for i in range(NUM_WORDS):
        d.add_symbol(f"w{i}", n=1000 - i)
    d.save(str(path / "dict.txt"))
    return str(path)
