"""Up-front checks of fairseq data-bins, and their ``trime_meta.json``, shared by every trime entry point.

fairseq opens a data-bin lazily and fails deep inside with a traceback (a missing
directory is a ``FileNotFoundError`` on ``dict.txt``, an empty split is ``ValueError:
cannot mmap an empty file`` followed by an ``AttributeError`` in ``__del__``). These
checks run before fairseq touches the files and fail with one line naming the
directory, the split and the fix. ``trime-prepare`` records the data's level (``word`` or
``byte``) in ``trime_meta.json`` (:func:`read_data_meta`); byte-level data reports bits per
character (:func:`is_byte_level`). Nothing here imports torch or fairseq.
"""

import os
from collections.abc import Iterable
from pathlib import Path

from trime.errors import fail
from trime.io_utils import read_json, sha256_file

BINARIZE_HINT = "create it with trime-prepare or fairseq-preprocess"
# the meta file trime-prepare writes into a data-bin, and the data levels it records
META_NAME = "trime_meta.json"
WORD = "word"
BYTE = "byte"


def split_parts(data_dir: Path, split: str) -> list[str]:
    """``split``, ``split1``, ``split2`` ... as fairseq's ``load_indexed_dataset(combine=True)`` finds them."""
    parts = []
    while True:
        name = split + (str(len(parts)) if parts else "")
        if not ((data_dir / f"{name}.idx").is_file() and (data_dir / f"{name}.bin").is_file()):
            return parts
        parts.append(name)


def check_data_bin(data_dir: os.PathLike, splits: Iterable[str] = ()) -> dict[str, list[str]]:
    """Fail with one line unless ``data_dir`` is a fairseq data-bin whose ``splits`` exist and are non-empty.

    Returns the binarized files (``train``, ``train1`` ...) of each split.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        fail(f"data directory {data_dir} does not exist; {BINARIZE_HINT}")
    if not (data_dir / "dict.txt").is_file():
        fail(f"data directory {data_dir} has no dict.txt; it is not a fairseq data-bin ({BINARIZE_HINT})")
    found = {}
    for split in splits:
        parts = split_parts(data_dir, split)
        if not parts:
            fail(f"data directory {data_dir} has no {split} split ({split}.idx/{split}.bin); binarize it with fairseq-preprocess")
        if all((data_dir / f"{name}.bin").stat().st_size == 0 for name in parts):
            fail(
                f"the {split} split of {data_dir} is empty ({split}.bin has 0 bytes); "
                f"binarize a non-empty {split} text with fairseq-preprocess"
            )
        found[split] = parts
    return found


def check_data_paths(data: str, splits: Iterable[str] = (), first_dir_splits: Iterable[str] = ()) -> None:
    """:func:`check_data_bin` for each directory of fairseq's ``:``-separated data argument.

    fairseq trains epoch ``e`` on directory ``(e - 1) % n`` but loads the other splits
    (validation) from the first directory only: ``splits`` are required in every
    directory, ``first_dir_splits`` in the first.
    """
    first_dir_splits = list(first_dir_splits)
    splits = list(splits)
    for i, path in enumerate(str(data).split(os.pathsep)):
        check_data_bin(path, splits + (first_dir_splits if i == 0 else []))


def dataset_identity(data_dir: os.PathLike) -> dict[str, object]:
    """Cheap identity of a data-bin's training data: sha256 of dict.txt and of each ``train*.idx``, and ``.bin`` sizes."""
    data_dir = Path(data_dir)
    parts = check_data_bin(data_dir, ["train"])["train"]
    ident: dict[str, object] = {"dict_sha256": sha256_file(data_dir / "dict.txt")}
    for name in parts:
        ident[f"{name}_idx_sha256"] = sha256_file(data_dir / f"{name}.idx")
        ident[f"{name}_bin_bytes"] = (data_dir / f"{name}.bin").stat().st_size
    return ident


def read_data_meta(data_dir: os.PathLike) -> dict:
    """The ``trime_meta.json`` of a data-bin written by ``trime-prepare``; ``{}`` if it has none."""
    data_dir = str(data_dir)
    if not os.path.isdir(data_dir) and os.pathsep in data_dir:  # fairseq's "shard1:shard2" data paths
        data_dir = data_dir.split(os.pathsep)[0]
    path = Path(data_dir) / META_NAME
    if not path.is_file():
        return {}
    meta = read_json(path, what="data-bin meta file")
    if not isinstance(meta, dict):
        fail(f"data-bin meta file {path} is not a JSON object; delete it and re-run trime-prepare")
    return meta


def is_byte_level(data_dir: os.PathLike) -> bool:
    """True if ``data_dir`` holds byte-level data (each token is one byte; report bits per character)."""
    return read_data_meta(data_dir).get("level") == BYTE
