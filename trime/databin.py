"""Up-front checks of fairseq data-bins, shared by every trime entry point.

fairseq opens a data-bin lazily and fails deep inside with a traceback (a missing
directory is a ``FileNotFoundError`` on ``dict.txt``, an empty split is ``ValueError:
cannot mmap an empty file`` followed by an ``AttributeError`` in ``__del__``). These
checks run before fairseq touches the files and fail with one line naming the
directory, the split and the fix. Nothing here imports torch or fairseq.
"""

import os
from collections.abc import Iterable
from pathlib import Path

from trime.errors import fail

BINARIZE_HINT = "create it with trime-prepare or fairseq-preprocess"


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
    from trime.io_utils import sha256_file

    data_dir = Path(data_dir)
    parts = check_data_bin(data_dir, ["train"])["train"]
    ident: dict[str, object] = {"dict_sha256": sha256_file(data_dir / "dict.txt")}
    for name in parts:
        ident[f"{name}_idx_sha256"] = sha256_file(data_dir / f"{name}.idx")
        ident[f"{name}_bin_bytes"] = (data_dir / f"{name}.bin").stat().st_size
    return ident
