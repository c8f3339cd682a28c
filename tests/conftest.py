"""Shared pytest fixtures: the repo root, the optional ../shared/data, data-bins of the shipped samples and
the synthetic word dictionary of the criterion tests, and a real small disk (a tmpfs) for full-disk faults.

The sample data-bins are built once per test session with ``prepare_dataset`` (a few
seconds each) into a session temp folder; tests must treat them as read-only.
"""

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLES_DIR = REPO_ROOT / "samples"
# Real datasets beside the checkout (not in a fresh clone); $TRIME_SHARED_DATA overrides.
SHARED_DATA_DIR = Path(os.environ.get("TRIME_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def token_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tests and their CLI subprocesses keep their token cache in a session folder, not in ~/.cache."""
    folder = tmp_path_factory.mktemp("token_cache")
    os.environ["TRIME_TOKEN_CACHE"] = str(folder)
    return folder


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


def fill_disk(directory: Path, leave: int = 0) -> Path:
    """Take the free space of ``directory``'s file system but ``leave`` bytes; returns the filler file."""
    filler = directory / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            st = os.statvfs(directory)
            free = st.f_bavail * st.f_frsize - leave
            if free <= 0:
                break
            f.write(b"\0" * min(free, 1 << 20))
            f.flush()
    return filler


@pytest.fixture
def small_disk(tmp_path: Path):
    """``small_disk(size="256k", read_only=False, full=False) -> Path``: a real tmpfs folder (root only).

    ``full`` fills it to its last byte (the file ``filler``). Unmounted afterwards, lazily when a
    failed in-process write still holds a file there.
    """
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real full disk needs root to mount a small tmpfs")
    mounts: list[Path] = []

    def make(size: str = "256k", read_only: bool = False, full: bool = False) -> Path:
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
        mounts.append(path)
        if full:
            fill_disk(path)
        return path

    yield make
    for path in mounts:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)
