"""``trime-prepare``: verify raw WikiText / enwik8 files and binarize them into a fairseq data-bin.

Word-level datasets (WikiText-103, WikiText-2 and its shipped sample) go straight through
fairseq's own preprocessing (``--only-source``). Byte-level datasets (enwik8, its 1M-byte
prefix and the shipped 400k-byte sample) follow the Transformer-XL / fairseq convention:
every byte is a token, written as a decimal integer, and each newline byte becomes a line
break, i.e. fairseq's ``<eos>``. The byte dictionary lists every byte value that occurs in
the file (as Transformer-XL's enwik8 vocabulary does), so no byte ever becomes ``<unk>``
and every split decodes back to its original bytes.

The data-bin is built in a temporary folder beside ``--dest`` and renamed into place, and
carries ``trime_meta.json`` (dataset, ``level``, raw checksums, split, token counts, dict
checksum), read back by :func:`trime.databin.read_data_meta` / :func:`trime.databin.is_byte_level`
(e.g. to report bits per character for byte-level data).
"""

import contextlib
import gzip
import hashlib
import logging
import lzma
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from trime.cli import POSITIVE_INT, Parser, logger, silent
from trime.databin import META_NAME, read_data_meta
from trime.errors import TrimeError, fail, file_faults_as_errors
from trime.io_utils import (
    atomic_path,
    require_free_disk,
    sha256_file,
    write_json_atomic,
)
from trime.version import __version__

from .datasets import (
    BYTE,
    DATASETS,
    SPLITS,
    WORD,
    DatasetSpec,
    RawFile,
    byte_split_bounds,
    find_samples_dir,
    get_spec,
    identify_sha256,
)

PathLike = str | os.PathLike

META_FORMAT = 1
DICT_NAME = "dict.txt"
# Raw inputs at least this large make the run "long": print a line per step.
LONG_RUN_BYTES = 20_000_000
# Decimal spelling of every byte value, for the byte-level text files.
_BYTE_TOKENS = [str(i).encode("ascii") for i in range(256)]
_READ_ERRORS = (OSError, EOFError, lzma.LZMAError, zipfile.BadZipFile, zlib.error)


# --------------------------------------------------------------------------- meta helpers


def _output_files() -> list[str]:
    return [DICT_NAME] + [f"{split}.{ext}" for split in SPLITS for ext in ("bin", "idx")]


def _meta_identity(meta: dict) -> dict:
    """The part of the meta that fixes the output: same identity, same data-bin."""
    keys = ("format", "dataset", "level", "raw_sha256", "split")
    return {k: meta.get(k) for k in keys}


def _is_complete(data_dir: Path, meta: dict) -> bool:
    """All outputs present, dict.txt unchanged, and .bin sizes matching the token counts."""
    try:
        if any(not (data_dir / name).is_file() for name in _output_files()):
            return False
        if sha256_file(data_dir / DICT_NAME) != meta.get("dict_sha256"):
            return False
        # fairseq stores ids as uint16 below 65,500 types, else uint32
        itemsize = 2 if int(meta["dict_size"]) < 65500 else 4
        return all(
            (data_dir / f"{split}.bin").stat().st_size == int(meta["num_tokens"][split]) * itemsize
            for split in SPLITS
        )
    except (KeyError, TypeError, ValueError, OSError):
        return False


# --------------------------------------------------------------------------- output


class _Reporter:
    """Progress lines for long runs (or --verbose) and warnings, through ``log`` (the CLI's: stderr)."""

    def __init__(self, loud: bool, log: Callable[[str], None] = silent) -> None:
        self.loud = loud
        self.log = log

    def step(self, message: str) -> None:
        if self.loud:
            self.log(message)

    def warn(self, message: str) -> None:
        self.log(f"warning: {message}")


# --------------------------------------------------------------------------- raw files


def _candidates(spec: DatasetSpec, raw: RawFile) -> list[str]:
    return [raw.name] + [raw.name + suffix for suffix in spec.suffixes]


def _locate(spec: DatasetSpec, raw_dir: Path, download_hint: str) -> dict[str, Path]:
    """Path of each raw file (plain or compressed) in ``raw_dir``; clear error when missing."""
    if not raw_dir.is_dir():
        fail(f"raw folder {raw_dir} does not exist; {download_hint}")
    found = {}
    for raw in spec.files:
        for candidate in _candidates(spec, raw):
            if (raw_dir / candidate).is_file():
                found[raw.name] = raw_dir / candidate
                break
        else:
            others = ", ".join(_candidates(spec, raw)[1:])
            fail(f"{raw_dir / raw.name} not found (nor {others}); {download_hint}")
    return found


@contextlib.contextmanager
def _open_raw(path: Path, member: str) -> Iterator[BinaryIO]:
    """Open a raw file for reading its decompressed bytes (.xz, .gz, .zip or plain)."""
    with contextlib.ExitStack() as stack:
        with _read_errors(path):  # errors while opening; readers guard their own reads
            if path.suffix == ".xz":
                stream = stack.enter_context(lzma.open(path, "rb"))
            elif path.suffix == ".gz":
                stream = stack.enter_context(gzip.open(path, "rb"))
            elif path.suffix == ".zip":
                archive = stack.enter_context(zipfile.ZipFile(path))
                names = [n for n in archive.namelist() if not n.endswith("/")]
                matches = [n for n in names if n.rsplit("/", 1)[-1] == member]
                if not matches:
                    fail(f"{path} holds no file named {member} (it holds: {', '.join(names[:5]) or 'nothing'})")
                stream = stack.enter_context(archive.open(matches[0]))
            else:
                stream = stack.enter_context(open(path, "rb"))
        yield stream


@contextlib.contextmanager
def _read_errors(path: Path) -> Iterator[None]:
    """Turn I/O and decompression errors while reading ``path`` into one-line errors."""
    try:
        yield
    except _READ_ERRORS as e:
        fail(f"{path} could not be read ({type(e).__name__}: {e}); it may be truncated or corrupt")


@dataclass
class _Digest:
    sha256: str
    md5: str
    size: int


def _digest(path: Path, member: str) -> _Digest:
    """sha256, md5 and size of the decompressed content of a raw file."""
    sha, md5, size = hashlib.sha256(), hashlib.md5(), 0
    with _open_raw(path, member) as stream, _read_errors(path):
        while chunk := stream.read(1 << 20):
            sha.update(chunk)
            md5.update(chunk)
            size += len(chunk)
    return _Digest(sha.hexdigest(), md5.hexdigest(), size)


def _mismatch_hint(spec: DatasetSpec, digest: _Digest) -> str:
    """What to do about a raw file whose checksum is wrong."""
    known = identify_sha256(digest.sha256)
    if known and known[0] != spec.name:
        other = DATASETS[known[0]]
        return f"it is {other.title}'s {known[1]}; use dataset {other.name}"
    if spec.is_sample:
        return "restore the shipped file from the repository, or pass the original file with --raw-dir"
    if spec.download_urls:
        return "pass the original, unmodified file (or fetch it with --download)"
    return "pass the original, unmodified file"


def _verify_digest(spec: DatasetSpec, raw: RawFile, path: Path, digest: _Digest) -> None:
    """Check emptiness, size and checksums of one raw file against the spec."""
    if digest.size == 0:
        fail(f"{path} is empty; {spec.title} expects {raw.name} with real content")
    if raw.size is not None and digest.size != raw.size:
        fail(
            f"{path} has {digest.size:,} bytes but {spec.title} expects {raw.size:,}; "
            f"{_mismatch_hint(spec, digest)}"
        )
    if raw.md5 is not None and digest.md5 != raw.md5:
        fail(f"{path} has md5 {digest.md5} but {spec.title} expects {raw.md5}; {_mismatch_hint(spec, digest)}")
    if raw.sha256 is not None and digest.sha256 != raw.sha256:
        fail(
            f"{path} has sha256 {digest.sha256} but {spec.title} expects {raw.sha256}; "
            f"{_mismatch_hint(spec, digest)}"
        )


@dataclass
class _TextCount:
    lines: int
    tokens: int  # whitespace tokens plus one <eos> per line


def _count_text(path: Path, member: str, copy_to: Path | None) -> _TextCount:
    """Count lines and tokens exactly as fairseq reads them (UTF-8, universal newlines).

    Streams the decompressed content; if ``copy_to`` is given, also writes it there (for
    compressed inputs, which fairseq cannot read).
    """
    lines = words = 0
    with contextlib.ExitStack() as stack:
        stream = stack.enter_context(_open_raw(path, member))
        out = stack.enter_context(open(copy_to, "wb")) if copy_to else None
        stack.enter_context(_read_errors(path))
        for line_no, raw_line in enumerate(stream, 1):
            if out is not None:
                out.write(raw_line)
            try:
                text = raw_line.decode("utf-8")
            except UnicodeDecodeError:
                fail(f"{path} is not UTF-8 text (line {line_no}); pass the original tokenized file")
            if "\r" in text:  # text mode turns \r\n and lone \r into line breaks too
                pieces = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
                if pieces[-1] == "":
                    pieces.pop()
            else:
                pieces = [text]
            lines += len(pieces)
            words += sum(len(piece.split()) for piece in pieces)
    return _TextCount(lines=lines, tokens=words + lines)


def _verify_counts(spec: DatasetSpec, raw: RawFile, path: Path, count: _TextCount, sha256: str) -> None:
    """Check the token (and line) count of a word-level file against the spec."""
    if raw.tokens is not None and count.tokens != raw.tokens:
        problem = f"{count.tokens:,} tokens (incl. one <eos> per line) but {spec.title} expects {raw.tokens:,}"
    elif raw.lines is not None and count.lines != raw.lines:
        problem = f"{count.lines:,} lines but {spec.title} expects {raw.lines:,}"
    else:
        return
    fail(f"{path} has {problem}; {_mismatch_hint(spec, _Digest(sha256, '', 0))}")


def verify_dataset(name: str, raw_dir: PathLike | None) -> dict[str, dict]:
    """Check the raw files of ``name`` without building anything.

    Returns ``{file name: {"path", "sha256", "bytes", and for word level "lines", "tokens"}}``;
    raises :class:`~trime.errors.TrimeError` naming the file on any mismatch.
    """
    spec = get_spec(name)
    folder = _resolve_raw_dir(spec, raw_dir)
    sources = _locate(spec, folder, _download_hint(spec))
    report = {}
    for raw in spec.files:
        digest = _digest(sources[raw.name], raw.name)
        _verify_digest(spec, raw, sources[raw.name], digest)
        entry = {"path": str(sources[raw.name]), "sha256": digest.sha256, "bytes": digest.size}
        if spec.level == WORD:
            count = _count_text(sources[raw.name], raw.name, copy_to=None)
            _verify_counts(spec, raw, sources[raw.name], count, digest.sha256)
            entry.update(lines=count.lines, tokens=count.tokens)
        report[raw.name] = entry
    return report


# --------------------------------------------------------------------------- download


def _download_hint(spec: DatasetSpec) -> str:
    names = ", ".join(raw.name for raw in spec.files)
    if spec.is_sample:
        return f"restore the shipped sample from the repository or pass --raw-dir DIR holding {names}"
    where = f"pass --raw-dir DIR holding {names} (plain or {'/'.join(spec.suffixes)})"
    return f"{where}, or add --download to fetch {spec.title}" if spec.download_urls else where


def _fetch(url: str, target: Path, reporter: _Reporter) -> None:
    """Download ``url`` to ``target`` atomically, with coarse progress on stderr."""
    with urllib.request.urlopen(url, timeout=60) as response, atomic_path(target) as tmp:
        total = int(response.headers.get("Content-Length") or 0)
        done, next_report = 0, 0.1
        with open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                if total and done / total >= next_report:
                    reporter.step(f"downloaded {done / 2**20:.0f} of {total / 2**20:.0f} MiB")
                    next_report += 0.1


def _download(spec: DatasetSpec, raw_dir: Path, reporter: _Reporter) -> None:
    """Fetch the raw files of ``spec`` into ``raw_dir`` unless they are already there."""
    if spec.is_sample:
        reporter.warn(f"{spec.name} ships with the repository; --download is not needed")
        return
    if not spec.download_urls:
        fail(f"{spec.name} has no public download; {_download_hint(spec)}")
    present = all(any((raw_dir / c).is_file() for c in _candidates(spec, raw)) for raw in spec.files)
    if present:
        reporter.step(f"raw files already in {raw_dir}; not downloading")
        return
    try:
        raw_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot create --raw-dir {raw_dir}: {e.strerror}")
    errors = []
    for url in spec.download_urls:
        archive = raw_dir / url.rsplit("/", 1)[-1]
        reporter.log(f"downloading {url} to {raw_dir} ...")
        try:
            _fetch(url, archive, _Reporter(loud=True, log=reporter.log))
            break
        except (urllib.error.URLError, OSError, ValueError) as e:
            errors.append(f"{url}: {getattr(e, 'reason', None) or e}")
    else:
        fail(
            f"could not download {spec.title} ({'; '.join(errors)}); download it by hand and "
            f"pass --raw-dir DIR holding {', '.join(raw.name for raw in spec.files)}"
        )
    if spec.download_extract:  # WikiText zips: pull out the three token files
        for raw in spec.files:
            with (
                _open_raw(archive, raw.name) as src,
                atomic_path(raw_dir / raw.name) as tmp,
                open(tmp, "wb") as out,
                _read_errors(archive),
            ):
                shutil.copyfileobj(src, out, 1 << 20)
        archive.unlink()


# --------------------------------------------------------------------------- fairseq


@contextlib.contextmanager
def _fairseq_logging(verbose: bool) -> Iterator[None]:
    """Silence fairseq's INFO logging unless ``verbose``; restore the previous state after."""
    previous = logging.root.manager.disable
    if not verbose:
        logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(previous)


def _fairseq_preprocess(
    destdir: Path, prefixes: dict[str, Path], workers: int, srcdict: Path | None, verbose: bool
) -> None:
    """Run ``fairseq-preprocess --only-source`` in-process into ``destdir``."""
    argv = ["--only-source", "--destdir", str(destdir), "--workers", str(workers)]
    for split in SPLITS:
        argv += [f"--{split}pref", str(prefixes[split])]
    if srcdict is not None:
        argv += ["--srcdict", str(srcdict)]
    with _fairseq_logging(verbose):
        from fairseq import options
        from fairseq_cli import preprocess

        args = options.get_preprocessing_parser().parse_args(argv)
        handlers_before = list(preprocess.logger.handlers)
        try:
            preprocess.main(args)
        finally:  # main() adds a FileHandler into destdir on every call: detach it
            for handler in preprocess.logger.handlers:
                if handler not in handlers_before:
                    preprocess.logger.removeHandler(handler)
                    handler.close()
    log = destdir / "preprocess.log"
    if log.is_file() and log.stat().st_size == 0:
        log.unlink()


def _binarized_tokens(data_dir: Path) -> dict[str, int]:
    """Number of tokens (incl. <eos>) in each binarized split."""
    from fairseq.data.indexed_dataset import MMapIndexedDataset

    counts = {}
    for split in SPLITS:
        dataset = MMapIndexedDataset(str(data_dir / split))  # keep it alive: sizes views its mmap
        counts[split] = int(dataset.sizes.sum())
        del dataset
    return counts


def _dict_size(dict_path: Path) -> int:
    """Types in a fairseq dict.txt, including the 4 special symbols."""
    with open(dict_path, encoding="utf-8") as f:
        return 4 + sum(1 for line in f if line.strip())


# --------------------------------------------------------------------------- builders


def _build_word(
    spec: DatasetSpec, sources: dict[str, Path], digests: dict[str, _Digest], work: Path,
    workers: int, verbose: bool, reporter: _Reporter,
) -> dict[str, int]:
    """Word level: count/verify tokens, then fairseq-preprocess. Returns the expected token counts."""
    prefixes, expected = {}, {}
    for split, raw in zip(SPLITS, spec.files):
        path = sources[raw.name]
        plain = path if path.name == raw.name else work / "_raw" / raw.name
        if plain != path:
            plain.parent.mkdir(exist_ok=True)
        reporter.step(f"counting tokens in {path} ...")
        count = _count_text(path, raw.name, copy_to=None if plain == path else plain)
        _verify_counts(spec, raw, path, count, digests[raw.name].sha256)
        prefixes[split], expected[split] = plain, count.tokens
    reporter.step(f"binarizing with fairseq-preprocess ({workers} worker{'s' * (workers > 1)}) ...")
    _fairseq_preprocess(work, prefixes, workers, srcdict=None, verbose=verbose)
    shutil.rmtree(work / "_raw", ignore_errors=True)
    return expected


def _write_byte_text(part: bytes, out_path: Path) -> int:
    """Write bytes as space-separated decimal tokens, one line per newline; return the token count."""
    lines = part.split(b"\n")
    tail = lines.pop()  # bytes after the last newline ('' if ``part`` ends with one)
    if tail:
        lines.append(tail)  # fairseq ends it with <eos> too
    with open(out_path, "wb") as out:
        for line in lines:
            out.write(b" ".join(map(_BYTE_TOKENS.__getitem__, line)))
            out.write(b"\n")
    return len(part) + (1 if tail else 0)


def _write_byte_dict(parts: list[bytes], dict_path: Path) -> None:
    """fairseq dictionary of every byte value in the file, ordered by training frequency.

    Bytes that occur only in valid/test get count 0, so they are tokens, not <unk>.
    """
    with _fairseq_logging(verbose=False):
        from fairseq.data import Dictionary

    histograms = [_byte_histogram(part) for part in parts]
    train_counts = histograms[0]
    seen = {value for hist in histograms for value, count in enumerate(hist) if count}
    seen.discard(ord("\n"))  # newline is <eos>
    vocab = Dictionary()
    for byte_value in sorted(seen):
        vocab.add_symbol(str(byte_value), n=train_counts[byte_value])
    vocab.finalize(padding_factor=8)
    vocab.save(str(dict_path))


def _byte_histogram(data: bytes) -> list[int]:
    """Occurrences of each byte value."""
    return np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256).tolist()


def _build_byte(
    spec: DatasetSpec, sources: dict[str, Path], work: Path, workers: int, verbose: bool, reporter: _Reporter,
) -> dict[str, int]:
    """Byte level: split the bytes, write them as decimal tokens, fairseq-preprocess with a byte dict.

    Returns the expected token counts (one per byte, plus a closing <eos> for a split ending mid-line).
    """
    raw = spec.files[0]
    path = sources[raw.name]
    with _open_raw(path, raw.name) as stream, _read_errors(path):
        data = stream.read()
    bounds = byte_split_bounds(spec, len(data))
    if not spec.standard_split:
        reporter.warn(
            f"{spec.name} is split 90%/5%/5% of its {len(data):,} bytes, not the standard 90M/5M/5M "
            "enwik8 split; its numbers are not comparable with published enwik8 results"
        )
    text_dir = work / "_text"
    text_dir.mkdir()
    parts = [data[start:end] for start, end in bounds]
    del data
    reporter.step(f"writing {len(parts[0]):,} + {len(parts[1]):,} + {len(parts[2]):,} bytes as byte tokens ...")
    expected, prefixes = {}, {}
    for split, part in zip(SPLITS, parts):
        prefixes[split] = text_dir / f"{split}.txt"
        expected[split] = _write_byte_text(part, prefixes[split])
    _write_byte_dict(parts, text_dir / DICT_NAME)
    del parts
    reporter.step(f"binarizing with fairseq-preprocess ({workers} worker{'s' * (workers > 1)}) ...")
    _fairseq_preprocess(work, prefixes, workers, srcdict=text_dir / DICT_NAME, verbose=verbose)
    shutil.rmtree(text_dir)
    return expected


# --------------------------------------------------------------------------- main entry


def _resolve_raw_dir(spec: DatasetSpec, raw_dir: PathLike | None) -> Path:
    if raw_dir is not None:
        return Path(raw_dir)
    if spec.is_sample:
        return find_samples_dir() / spec.sample_subdir
    names = ", ".join(r.name for r in spec.files)
    fail(f"{spec.name} needs --raw-dir DIR (the folder holding {names}; add --download to fetch them there)")


def _dest_state(dest: Path, identity: dict) -> str:
    """'absent', 'empty', 'same' (complete, identical data-bin), 'data-bin' (another one) or 'other'."""
    if not dest.exists() and not dest.is_symlink():
        return "absent"
    if not dest.is_dir():
        return "other"
    if not any(dest.iterdir()):
        return "empty"
    try:
        meta = read_data_meta(dest)
    except TrimeError:
        meta = {}
    if meta and _meta_identity(meta) == identity and _is_complete(dest, meta):
        return "same"
    if meta or (dest / DICT_NAME).is_file():
        return "data-bin"
    return "other"


def _apply_umask(folder: Path) -> None:
    """Give the data-bin ordinary permissions: mkdtemp/mkstemp create it private (0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def _swap_into_place(work: Path, dest: Path) -> None:
    """Rename the finished ``work`` folder to ``dest``, replacing what is there."""
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    if not dest.exists():
        os.rename(work, dest)
        return
    old = dest.parent / f".{dest.name}.old-{os.getpid()}-{time.time_ns()}"
    os.rename(dest, old)
    try:
        os.rename(work, dest)
    except OSError:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def prepare_dataset(
    name: str,
    raw_dir: PathLike | None,
    dest: PathLike,
    workers: int = 1,
    download: bool = False,
    force: bool = False,
    *,
    verbose: bool = False,
    log_progress: Callable[[str], None] = silent,
) -> Path:
    """Verify the raw files of dataset ``name`` and write a fairseq data-bin to ``dest``.

    ``raw_dir`` may be None for the shipped samples. Returns the data-bin folder. Skips the
    work if ``dest`` already holds a complete data-bin of the same raw files; refuses to
    replace anything else unless ``force``. Raises :class:`~trime.errors.TrimeError` (one
    line) on bad input; nothing is left half-written. The one-line summary goes to stdout;
    progress (long runs or ``verbose``) and warnings go to ``log_progress``.
    """
    spec = get_spec(name)
    POSITIVE_INT.check("--workers", workers)
    dest = Path(dest)
    folder = _resolve_raw_dir(spec, raw_dir)
    reporter = _Reporter(loud=verbose, log=log_progress)
    if download:
        _download(spec, folder, reporter)
    sources = _locate(spec, folder, _download_hint(spec))
    total_bytes = sum(p.stat().st_size for p in sources.values())
    reporter.loud = verbose or total_bytes >= LONG_RUN_BYTES

    # 1. checksums first: cheap, and they fail fast on the wrong files
    reporter.step(f"verifying checksums of {', '.join(str(p) for p in sources.values())} ...")
    digests = {}
    for raw in spec.files:
        digests[raw.name] = _digest(sources[raw.name], raw.name)
        _verify_digest(spec, raw, sources[raw.name], digests[raw.name])
    raw_sha256 = {raw.name: digests[raw.name].sha256 for raw in spec.files}
    if spec.level == BYTE:
        bounds = byte_split_bounds(spec, digests[spec.files[0].name].size)
        split_id = {s: list(b) for s, b in zip(SPLITS, bounds)}
        split_id.update(unit="bytes", standard=spec.standard_split)
    else:
        split_id = {split: raw.name for split, raw in zip(SPLITS, spec.files)}
    identity = {"format": META_FORMAT, "dataset": spec.name, "level": spec.level,
                "raw_sha256": raw_sha256, "split": split_id}

    # 2. what is at --dest already
    state = _dest_state(dest, identity)
    if state == "same" and not force:
        print(f"{spec.name}: {dest} is already up to date (same raw files); nothing to do (--force rebuilds)")
        return dest
    if state == "other":
        what = "a file" if not dest.is_dir() else "a non-empty folder that is not a data-bin (no dict.txt)"
        fail(f"--dest {dest} is {what}; refusing to replace it, even with --force; choose another --dest")
    if state == "data-bin" and not force:
        fail(
            f"--dest {dest} already holds a data-bin that is not a complete {spec.name} built from "
            "these raw files; pass --force to replace it or choose another --dest"
        )

    # 3. build beside --dest, then rename into place
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot create the parent folder of --dest {dest}: {e.strerror}")
    raw_total = sum(d.size for d in digests.values())
    require_free_disk(dest.parent, raw_total * (6 if spec.level == BYTE else 3), flag="the folder of --dest")
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    except OSError as e:
        fail(f"cannot write beside --dest {dest}: {e.strerror}")
    try:
        if spec.level == WORD:
            expected = _build_word(spec, sources, digests, work, workers, verbose, reporter)
        else:
            expected = _build_byte(spec, sources, work, workers, verbose, reporter)
        num_tokens = _binarized_tokens(work)
        if num_tokens != expected:
            fail(f"internal error: binarized token counts {num_tokens} differ from the raw text's {expected}")
        meta = dict(identity)
        meta.update(
            num_tokens=num_tokens,
            dict_sha256=sha256_file(work / DICT_NAME),
            dict_size=_dict_size(work / DICT_NAME),
            comparable=not spec.is_sample and spec.standard_split,
            created_by=f"trime-prepare {__version__}",
        )
        write_json_atomic(work / META_NAME, meta)
        _apply_umask(work)
        try:
            _swap_into_place(work, dest)
        except OSError as e:
            fail(f"could not move the new data-bin into --dest {dest}: {e}")
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)

    counts = ", ".join(f"{split} {meta['num_tokens'][split]:,}" for split in SPLITS)
    print(f"{spec.name}: wrote {dest} ({spec.level} level, {meta['dict_size']:,} types; tokens: {counts})")
    return dest


def build_parser() -> Parser:
    """The ``trime-prepare`` command-line parser."""
    parser = Parser(
        prog="trime-prepare",
        description="Verify raw WikiText / enwik8 files and binarize them into a fairseq data-bin.",
        epilog="example: trime-prepare wikitext-2-sample --dest data-bin/wikitext-2-sample",
    )
    parser.add_argument("dataset", metavar="DATASET", choices=list(DATASETS),
                        help=f"one of: {', '.join(DATASETS)}")
    parser.add_argument("--raw-dir", metavar="DIR",
                        help="folder holding the raw files (plain or .xz); defaults to samples/ for *-sample")
    parser.add_argument("--dest", metavar="DIR", required=True, help="data-bin folder to write")
    parser.add_argument("--workers", metavar="N", type=POSITIVE_INT, default=1, help="fairseq-preprocess workers")
    parser.add_argument("--download", action="store_true", help="fetch the raw files into --raw-dir first")
    parser.add_argument("--force", action="store_true", help="replace an existing, different data-bin at --dest")
    parser.add_argument("--verbose", action="store_true", help="show every step and fairseq's own log")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trime-prepare``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        with file_faults_as_errors():  # a full disk or read-only folder: one line (the build folder is removed)
            prepare_dataset(args.dataset, args.raw_dir, args.dest, workers=args.workers, download=args.download,
                            force=args.force, verbose=args.verbose,
                            log_progress=logger("trime-prepare", stderr=True))
    except KeyboardInterrupt:
        fail("interrupted; nothing was written to --dest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
