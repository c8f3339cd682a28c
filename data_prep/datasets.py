"""What ``trime-prepare`` knows about each dataset: raw file names, checksums, sizes, splits, URLs.

Everything here is plain data plus a few look-ups; the pipeline lives in
:mod:`trime.data_prep.prepare`. Checksums are of the *decompressed* raw files.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from trime.databin import BYTE, WORD  # the data levels recorded in trime_meta.json
from trime.errors import fail

SPLITS = ("train", "valid", "test")

# Standard enwik8 split (Transformer-XL, fairseq): [0, 90M) train, [90M, 95M) valid, [95M, 100M) test.
ENWIK8_BYTES = 100_000_000
ENWIK8_STANDARD_BOUNDS = (90_000_000, 95_000_000)

# Environment variable that points at the shipped ``samples/`` folder (overrides the search).
SAMPLES_ENV = "TRIME_SAMPLES_DIR"


@dataclass(frozen=True)
class RawFile:
    """One raw input file, identified by its decompressed name and what it must contain."""

    name: str
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    # Word level: whitespace tokens plus one <eos> per line, and the number of lines.
    tokens: int | None = None
    lines: int | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset ``trime-prepare`` can build."""

    name: str
    title: str
    level: str  # WORD or BYTE
    files: tuple[RawFile, ...]
    # Compressed forms accepted besides the plain file, tried in this order.
    suffixes: tuple[str, ...] = (".xz",)
    # Folder under the repo's samples/ for shipped slices (raw-dir then defaults to it).
    sample_subdir: str | None = None
    # Public URLs, tried in order; download_extract: unzip the raw files (else keep the archive).
    download_urls: tuple[str, ...] = ()
    download_extract: bool = False
    # Byte level: True for the standard 90M/5M/5M enwik8 split, else 90%/5%/5% proportions.
    standard_split: bool = True

    @property
    def is_sample(self) -> bool:
        return self.sample_subdir is not None


def _wiki_files(
    shas: tuple[str | None, ...],
    tokens: tuple[int | None, ...] = (None, None, None),
    lines: tuple[int | None, ...] = (None, None, None),
) -> tuple[RawFile, ...]:
    return tuple(
        RawFile(name=f"wiki.{split}.tokens", sha256=sha, tokens=tok, lines=nl)
        for split, sha, tok, nl in zip(SPLITS, shas, tokens, lines)
    )


# WikiText-2 (v1, tokenized): checksums and counts from ../shared/data/README.md.
WT2_SHA256 = (
    "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
    "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
)
WT2_TOKENS = (2_088_628, 217_646, 245_569)
WT2_LINES = (36_718, 3_760, 4_358)

# The shipped slices in samples/ (see samples/README.md); hashes measured on the files.
WT2_SAMPLE_SHA256 = (
    "98e5794e385db3a5ffe15a22ac4dfe04589620b664e6fa50e4731505624e6acf",
    "ec9806d8e15b689960471745b256cb9c3bc19f9dcef4fba2a36d8b3b3e746469",
    "febd72130f3ac8181053059dab78b92f84ae07cfe259f0e71bc59c3482a8f995",
)
WT2_SAMPLE_TOKENS = (135_951, 18_345, 20_142)
WT2_SAMPLE_LINES = (2_270, 346, 322)

# WikiText-103 (v1, tokenized): the paper's token counts (incl. one <eos> per line). Its valid
# and test articles are WikiText-2's, with the same token and line counts, but WikiText-103's
# larger vocabulary replaces fewer words by <unk>, so the files are not byte-identical to
# WikiText-2's; they are checked by counts, and the train split by its 103,227,021 tokens.
WT103_TOKENS = (103_227_021, 217_646, 245_569)
WT103_LINES = (None, 3_760, 4_358)

ENWIK8_MD5 = "a1fa5ffddb56f4953e226637dabbb36a"
ENWIK8_PREFIX_SHA256 = "369b688978f649681136198fb96db14c1616756260c55fb4b65e9bc049552cad"
ENWIK8_SAMPLE_SHA256 = "f68600d3e92c7450b77047ab4a793c25ffb6a010f92bdfb7e3a9d5ac5df5352e"

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="wikitext-103",
            title="WikiText-103",
            level=WORD,
            files=_wiki_files((None, None, None), WT103_TOKENS, WT103_LINES),
            download_urls=(
                "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip",
                "https://wikitext.smerity.com/wikitext-103-v1.zip",
            ),
            download_extract=True,
        ),
        DatasetSpec(
            name="wikitext-2",
            title="WikiText-2",
            level=WORD,
            files=_wiki_files(WT2_SHA256, WT2_TOKENS, WT2_LINES),
            download_urls=(
                "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",
                "https://wikitext.smerity.com/wikitext-2-v1.zip",
            ),
            download_extract=True,
        ),
        DatasetSpec(
            name="wikitext-2-sample",
            title="the shipped WikiText-2 sample",
            level=WORD,
            files=_wiki_files(WT2_SAMPLE_SHA256, WT2_SAMPLE_TOKENS, WT2_SAMPLE_LINES),
            sample_subdir="wikitext-2",
        ),
        DatasetSpec(
            name="enwik8",
            title="enwik8",
            level=BYTE,
            files=(RawFile(name="enwik8", md5=ENWIK8_MD5, size=ENWIK8_BYTES),),
            suffixes=(".zip", ".xz", ".gz"),
            download_urls=("http://mattmahoney.net/dc/enwik8.zip",),
        ),
        DatasetSpec(
            name="enwik8-prefix",
            title="the enwik8 prefix",
            level=BYTE,
            files=(RawFile(name="enwik8.prefix", sha256=ENWIK8_PREFIX_SHA256, size=1_000_000),),
            standard_split=False,
        ),
        DatasetSpec(
            name="enwik8-sample",
            title="the shipped enwik8 sample",
            level=BYTE,
            files=(RawFile(name="enwik8.sample", sha256=ENWIK8_SAMPLE_SHA256, size=400_000),),
            sample_subdir="enwik8",
            standard_split=False,
        ),
    )
}


def get_spec(name: str) -> DatasetSpec:
    """The spec of dataset ``name``; a one-line error listing the known names otherwise."""
    if name not in DATASETS:
        fail(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def identify_sha256(sha256: str) -> tuple[str, str] | None:
    """``(dataset, file name)`` of a known raw file with this sha256, or None."""
    for spec in DATASETS.values():
        for raw in spec.files:
            if raw.sha256 == sha256:
                return spec.name, raw.name
    return None


def byte_split_bounds(spec: DatasetSpec, num_bytes: int) -> list[tuple[int, int]]:
    """``[start, end)`` byte ranges of train/valid/test for a byte-level dataset."""
    if spec.standard_split:
        a, b = ENWIK8_STANDARD_BOUNDS
    else:  # same 90%/5%/5% proportions as the standard split
        a, b = num_bytes * 90 // 100, num_bytes * 95 // 100
    return [(0, a), (a, b), (b, num_bytes)]


def find_samples_dir() -> Path:
    """The repo's shipped ``samples/`` folder, found relative to the source checkout.

    Looks at ``$TRIME_SAMPLES_DIR``, then ``samples/`` next to the ``data_prep/`` source
    folder (an editable install or a checkout), then ``./samples``.
    """
    candidates = []
    if os.environ.get(SAMPLES_ENV):
        candidates.append(Path(os.environ[SAMPLES_ENV]))
    candidates.append(Path(__file__).resolve().parent.parent / "samples")
    candidates.append(Path.cwd() / "samples")
    for folder in candidates:
        if (folder / "README.md").is_file() and (folder / "wikitext-2").is_dir():
            return folder
    looked = ", ".join(str(c) for c in candidates)
    fail(
        f"the shipped samples folder was not found (looked in {looked}); run from a source "
        f"checkout of trime, set {SAMPLES_ENV}, or pass --raw-dir"
    )
