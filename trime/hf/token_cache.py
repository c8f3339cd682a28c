"""The token cache: a text file tokenized once, in chunks, into a memory-mapped ``.npy``.

:func:`cached_tokens` (what :func:`trime.hf.text.tokenize_text_file` calls) returns the token
ids of a whole text file tokenized as **one string** without special tokens, as a read-only
``np.memmap`` (``uint16`` when the vocabulary fits, else ``uint32``). The first call tokenizes
the file and stores it; later calls, in any process, map the stored array.

Format. A plain NumPy ``.npy`` file per entry, with a JSON sidecar (identities, dtype, length,
sha256 of the ids). A flat memory-mapped array is what blocks and windows need (a slice or
a reshape is a view; nothing is loaded); the ``datasets`` library's Arrow cache would add a
dependency and store rows of lists, not one stream.

Key and place. An entry is keyed by the sha256 of the text file
(:func:`trime.hf.text.text_file_identity`) and by :func:`trime.hf.text.tokenizer_identity`.
It lives in ``$TRIME_TOKEN_CACHE``, else ``$XDG_CACHE_HOME/trime/tokens``, else
``~/.cache/trime/tokens`` (``cache_dir`` overrides). One writer per entry holds its lock
(:func:`trime.io_utils.exclusive_lock`); other processes wait for it, then map the result.
A finished entry is renamed into place, so a reader never sees half of one.

Exactness. The file is cut into windows of ``chunk_bytes`` that overlap their neighbours by
``overlap_bytes`` on each side; each window is tokenized on its own (``encode_batch``, so
several windows use several cores). Two neighbours are joined only where they agree on a
run of :data:`RUN_TOKENS` tokens with the same ids and the same character offsets in the
file: the earlier window's tokens are taken up to the run, the later one's from it. Where
they do not agree (a very long word or whitespace run across the overlap), the earlier
window is extended over the next one and tokenized again, so at worst the file is tokenized
whole. Text is read as :func:`trime.hf.text.read_text_file` reads it (UTF-8, universal
newlines); a cut never splits a character or a ``\\r\\n``. Tokenizers without a fast
(``tokenizers``) backend, or whose Python call differs from their backend, are tokenized
whole, as before.

Resume. Ids are appended to ``KEY.partial`` (an ``.npy`` whose header is rewritten at the end);
``KEY.progress.json`` records, every few windows, how many ids are final and where the next
window starts (with the run of tokens it must reproduce). A killed run resumes there.

Progress. On a terminal, a tqdm bar; otherwise (or with ``progress_bar=False``) a line on
stderr every :data:`PROGRESS_INTERVAL_S` seconds, and one at the end if any was printed.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np

from trime.errors import TrimeError, fail
from trime.hf.text import read_text_file, text_file_identity, tokenize_text, tokenizer_identity
from trime.io_utils import human_bytes, naming_file, read_json, write_json_atomic

FORMAT = 1
CACHE_ENV = "TRIME_TOKEN_CACHE"
# a window's encoding takes a few hundred bytes of memory per byte of text (tokens, offsets, alignments):
# 256 KiB windows keep a batch of 8 under 1 GiB; the 4 KiB overlaps cost ~3% more tokenization
CHUNK_BYTES = 256 << 10
OVERLAP_BYTES = 4 << 10
# two windows are joined only where they agree on this many tokens (ids and offsets)
RUN_TOKENS = 8
# windows tokenized together (encode_batch spreads them over cores); progress is saved after each batch
BATCH_WINDOWS = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
PROGRESS_INTERVAL_S = 30.0
LOCK_POLL_S = 0.5
HEADER_BYTES = 128  # fixed .npy header, rewritten in place with the final length
_NPY_MAGIC = b"\x93NUMPY\x01\x00"


# ----------------------------------------------------------------------------- where and what


def cache_root(cache_dir: Union[str, os.PathLike, None] = None) -> Path:
    """The token cache folder: ``cache_dir``, else ``$TRIME_TOKEN_CACHE``, else ``$XDG_CACHE_HOME/trime/tokens``."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trime" / "tokens"


def entry_key(text_sha256: str, tokenizer_sha256: str) -> str:
    """The entry's name: a hash of the format, the text's sha256 and the tokenizer's identity."""
    body = json.dumps({"format": FORMAT, "text_sha256": text_sha256, "tokenizer": tokenizer_sha256}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def token_dtype(tokenizer: Any) -> np.dtype:
    """``uint16`` when every id of the tokenizer fits, else ``uint32``."""
    size = len(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        size = max(size, backend.get_vocab_size(with_added_tokens=True))
    return np.dtype(np.uint16) if size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class Entry:
    """The files of one cache entry."""

    root: Path
    key: str

    @property
    def array(self) -> Path:
        return self.root / f"{self.key}.npy"

    @property
    def meta(self) -> Path:
        return self.root / f"{self.key}.json"

    @property
    def partial(self) -> Path:
        return self.root / f"{self.key}.partial"

    @property
    def progress(self) -> Path:
        return self.root / f"{self.key}.progress.json"

    @property
    def lock(self) -> Path:
        return self.root / f"{self.key}.lock"

    def load(self) -> Optional[np.ndarray]:
        """The stored ids as a read-only memmap, or None when absent or damaged (then it says why, once)."""
        if not self.array.is_file():
            return None
        problem = None
        try:
            meta = json.loads(self.meta.read_text(encoding="utf-8"))
            ids = np.load(self.array, mmap_mode="r", allow_pickle=False)
            if meta.get("format") != FORMAT or meta.get("key") != self.key:
                problem = "its record is of another entry"
            elif ids.ndim != 1 or len(ids) != meta.get("tokens") or str(ids.dtype) != meta.get("dtype"):
                problem = f"it holds {ids.shape} {ids.dtype}, its record says ({meta.get('tokens')},) {meta.get('dtype')}"
            elif _sha256_of(self.array, ids.offset) != meta.get("tokens_sha256"):
                problem = "its ids do not match their sha256"
        except (OSError, ValueError) as err:  # a missing or unreadable record, a truncated array
            problem = str(err)
        if problem is None:
            return ids
        print(f"trime: token cache {self.array} is damaged ({problem}); tokenizing again", file=sys.stderr)
        return None


def _sha256_of(path: Path, offset: int, block: int = 1 << 24) -> str:
    """sha256 of a file's bytes from ``offset`` on, read in blocks (mapping them would count them as resident)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while data := f.read(block):
            digest.update(data)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- the public entry point


def cached_tokens(
    path: Union[str, os.PathLike],
    tokenizer: Any,
    option: str = "--train-file",
    cache_dir: Union[str, os.PathLike, None] = None,
    progress_bar: Optional[bool] = None,
    chunk_bytes: int = CHUNK_BYTES,
    overlap_bytes: int = OVERLAP_BYTES,
) -> np.ndarray:
    """Token ids of the whole file tokenized as one string, without special tokens: a read-only memmap.

    Tokenized once per (text, tokenizer) into the cache (see the module docstring); ``option``
    names the file in errors; ``progress_bar`` None means a bar on a terminal, lines otherwise.
    """
    path = Path(path)
    if not path.is_file():
        fail(f"{option} {path}: no such file")
    if path.stat().st_size == 0:
        fail(f"{option} {path} is empty")
    if not 0 < 2 * overlap_bytes <= chunk_bytes:
        raise ValueError(f"overlap_bytes ({overlap_bytes}) must be in (0, chunk_bytes / 2] ({chunk_bytes})")
    text = text_file_identity(path)
    tok_sha = tokenizer_identity(tokenizer)
    root = cache_root(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        fail(f"token cache {root}: {err.strerror}; set {CACHE_ENV} to a writable folder")
    entry = Entry(root, entry_key(text["text_sha256"], tok_sha))
    ids = entry.load()
    if ids is None:
        with _entry_lock(entry, path):
            ids = entry.load()  # another process may have finished it while this one waited
            if ids is None:
                meta = {"format": FORMAT, "key": entry.key, "text": text, "tokenizer": tok_sha, "source": str(path)}
                _Tokenization(entry, path, option, tokenizer, meta, progress_bar, chunk_bytes, overlap_bytes).run()
                ids = np.load(entry.array, mmap_mode="r", allow_pickle=False)
    if len(ids) == 0:
        fail(f"{option} {path} has no tokens under this tokenizer")
    return ids


@contextlib.contextmanager
def _entry_lock(entry: Entry, path: Path) -> Iterator[None]:
    """Hold the entry's lock; while another process holds it, wait (saying so once)."""
    from trime.io_utils import exclusive_lock

    said = False
    while True:
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(exclusive_lock(entry.lock, f"token cache entry {entry.array}", "wait for it"))
        except TrimeError:
            if not said:
                holder = entry.lock.read_text(errors="replace").strip() or "another process"
                print(f"trime: waiting for {holder} to finish tokenizing {path} into {entry.array}", file=sys.stderr)
                said = True
            time.sleep(LOCK_POLL_S)
            continue
        with stack:
            yield
        return


# ----------------------------------------------------------------------------- reading the text


def _newlines(text: str) -> str:
    """Universal newlines, as ``Path.read_text`` reads a file."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


class _Text:
    """Byte ranges of a UTF-8 file, decoded as :func:`trime.hf.text.read_text_file` decodes the whole."""

    def __init__(self, path: Path, option: str) -> None:
        self.path, self.option = path, option
        self.file = open(path, "rb")
        self.size = os.fstat(self.file.fileno()).st_size

    def close(self) -> None:
        self.file.close()

    def align(self, pos: int) -> int:
        """The first position >= ``pos`` that starts a character and does not split a ``\\r\\n``."""
        if pos <= 0:
            return 0
        while pos < self.size:
            self.file.seek(pos - 1)
            head = self.file.read(65)
            k = 1
            while k < len(head) and ((head[k] & 0xC0) == 0x80 or head[k - 1 : k + 1] == b"\r\n"):
                k += 1
            pos += k - 1
            if k < len(head):
                break
        return min(pos, self.size)

    def read(self, lo: int, hi: int) -> bytes:
        self.file.seek(lo)
        return self.file.read(hi - lo)

    def decode(self, raw: bytes, lo: int) -> str:
        try:
            return _newlines(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            fail(f"{self.option} {self.path} is not UTF-8 text (byte {lo + err.start}); convert it to UTF-8")


@dataclass
class _Window:
    """Bytes [lo, hi) of the file, tokenized on their own."""

    lo: int
    hi: int
    raw: bytes
    text: str
    enc: Any  # tokenizers.Encoding
    ids: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.enc.ids, dtype=np.uint32)
        self.starts = _Starts(self.enc)

    def chars_before(self, pos: int) -> int:
        """Characters of this window's text before file byte ``pos`` (an aligned position inside it)."""
        return len(_newlines(self.raw[: pos - self.lo].decode("utf-8")))

    def span(self, i: int) -> tuple:
        return tuple(self.enc.token_to_chars(i))


class _Starts:
    """Character start of each token, read lazily from the encoding (a sequence for ``bisect``)."""

    def __init__(self, enc: Any) -> None:
        self.enc, self.n = enc, len(enc.ids)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return self.enc.token_to_chars(i)[0]


def _first_at(window: _Window, char: int) -> int:
    """Index of the first token of ``window`` starting at or after ``char``."""
    return bisect.bisect_left(window.starts, char)


def _new_char(window: _Window, i: int) -> bool:
    """Token ``i`` starts a character (not the second byte token of one)."""
    return i == 0 or window.starts[i - 1] != window.starts[i]


def _agree(x: _Window, i: int, y: _Window, j: int, delta: int) -> bool:
    """x's tokens from ``i`` and y's from ``j`` agree on a run: same ids, same offsets (y's shifted by ``delta``)."""
    if i + RUN_TOKENS > len(x.ids) or j + RUN_TOKENS > len(y.ids):
        return False
    if not np.array_equal(x.ids[i : i + RUN_TOKENS], y.ids[j : j + RUN_TOKENS]):
        return False
    for t in range(RUN_TOKENS):
        ys, ye = y.span(j + t)
        if x.span(i + t) != (ys + delta, ye + delta):
            return False
    return True


def _join(x: _Window, y: _Window, cut: int, after: int) -> Optional[tuple]:
    """(i, j): x's tokens before ``i`` and y's from ``j`` on make one stream, or None where they do not agree.

    ``cut`` is the file byte between the windows' centres (y starts before it, x ends after it).
    The run is looked for from halfway between y's start and ``cut``, after x's token ``after``,
    and must end before x's last token (which the end of x may have cut short).
    """
    delta = x.chars_before(y.lo)
    j = _first_at(y, y.chars_before(cut) // 2)
    while j + RUN_TOKENS <= len(y.ids):
        start = y.starts[j]
        i = _first_at(x, start + delta)
        if i + RUN_TOKENS >= len(x.ids):
            return None
        if i > after and _new_char(y, j) and x.starts[i] == start + delta and _agree(x, i, y, j, delta):
            return i, j
        j += 1
    return None


def _locate(window: _Window, run: dict) -> Optional[int]:
    """Index where ``window`` reproduces ``run`` (ids and offsets relative to ``window.lo``), or None."""
    spans = [tuple(s) for s in run["spans"]]
    for i in (run["index"], _first_at(window, spans[0][0])):
        if i + len(spans) <= len(window.ids) and window.ids[i : i + len(spans)].tolist() == run["ids"]:
            if all(window.span(i + t) == spans[t] for t in range(len(spans))):
                return i
    return None


def _run_at(window: _Window, i: int) -> dict:
    """The run of tokens from ``i`` that a re-tokenized window must reproduce to continue at ``i``."""
    end = min(i + RUN_TOKENS, len(window.ids))
    return {"index": i, "ids": window.ids[i:end].tolist(), "spans": [list(window.span(t)) for t in range(i, end)]}


# ----------------------------------------------------------------------------- writing an entry


def _npy_header(dtype: np.dtype, length: int) -> bytes:
    """A version 1.0 ``.npy`` header of exactly :data:`HEADER_BYTES` bytes for a 1-d array."""
    body = "{'descr': '%s', 'fortran_order': False, 'shape': (%d,), }" % (dtype.str, length)
    size = HEADER_BYTES - len(_NPY_MAGIC) - 2
    return _NPY_MAGIC + struct.pack("<H", size) + (body.ljust(size - 1) + "\n").encode("latin1")


class _Progress:
    """A tqdm bar on a terminal, else a line every :data:`PROGRESS_INTERVAL_S` seconds."""

    def __init__(self, path: Path, total: int, done: int, bar: Optional[bool]) -> None:
        self.path, self.total, self.start_done = path, total, done
        self.t0 = self.last = time.monotonic()
        self.lines = 0
        self.bar = None
        if bar if bar is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=f"tokenizing {path.name}", file=sys.stderr, dynamic_ncols=True)

    def update(self, done: int, tokens: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            return
        now = time.monotonic()
        if now - self.last < PROGRESS_INTERVAL_S:
            return
        self.last = now
        rate = (done - self.start_done) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        print(f"trime: tokenizing {self.path}: {human_bytes(done)} of {human_bytes(self.total)} "
              f"({100 * done / self.total:.0f}%), {tokens:,} tokens, {rate / 1e6:.1f} MB/s, "
              f"{_duration(eta)} left", file=sys.stderr, flush=True)
        self.lines += 1

    def close(self, tokens: int, array: Path) -> None:
        if self.bar is not None:
            self.bar.close()
        elapsed = time.monotonic() - self.t0
        if self.bar is not None or self.lines:
            print(f"trime: tokenized {self.path}: {tokens:,} tokens in {_duration(elapsed)} "
                  f"({(self.total - self.start_done) / max(elapsed, 1e-9) / 1e6:.1f} MB/s), cached in {array}",
                  file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


class _NotChunkable(Exception):
    """The tokenizer cannot be run window by window here: tokenize the whole file instead."""


class _Tokenization:
    """One entry being written: windows tokenized, joined, appended, with progress saved for a resume."""

    def __init__(self, entry: Entry, path: Path, option: str, tokenizer: Any, meta: dict,
                 progress_bar: Optional[bool], chunk_bytes: int, overlap_bytes: int) -> None:
        self.entry, self.path, self.option, self.tokenizer, self.meta = entry, path, option, tokenizer, meta
        self.progress_bar, self.chunk, self.overlap = progress_bar, chunk_bytes, overlap_bytes
        self.dtype = token_dtype(tokenizer)
        self.limit = int(np.iinfo(self.dtype).max)
        # resume settings: ids already final are valid only under the same windows
        self.stats = {"chunk_bytes": chunk_bytes, "overlap_bytes": overlap_bytes, "joined": 0, "extended": 0,
                      "whole_file": False}
        self.plan = {"key": entry.key, "format": FORMAT, "chunk_bytes": chunk_bytes, "overlap_bytes": overlap_bytes}

    def run(self) -> None:
        t0 = time.time()
        text = _Text(self.path, self.option)
        try:
            with naming_file(self.entry.partial):
                backend = _backend(self.tokenizer)
                try:
                    if backend is None:
                        raise _NotChunkable
                    self._chunked(text, backend)
                except _NotChunkable:
                    self._whole(text)
        except TrimeError:  # bad input (not UTF-8, blank): nothing to resume
            self._discard()
            raise
        finally:
            text.close()
        write_json_atomic(self.entry.meta, {**self.meta, "dtype": str(self.dtype), "tokens": self.tokens,
                                            "tokens_sha256": self.digest.hexdigest(), "windows": self.stats,
                                            "seconds": round(time.time() - t0, 3)})
        os.replace(self.entry.partial, self.entry.array)
        self.entry.progress.unlink(missing_ok=True)

    # -- the output file

    def _open(self, resume: bool) -> None:
        """Open ``KEY.partial``: from scratch, or keeping the ids the progress file calls final."""
        self.digest = hashlib.sha256()
        self.tokens = 0
        if resume:
            out = open(self.entry.partial, "r+b")
            keep = HEADER_BYTES + self.state["tokens"] * self.dtype.itemsize
            if out.read(len(_NPY_MAGIC)) == _NPY_MAGIC and os.fstat(out.fileno()).st_size >= keep:
                out.truncate(keep)
                out.seek(HEADER_BYTES)
                while block := out.read(min(1 << 24, keep - out.tell())):
                    self.digest.update(block)
                self.tokens = self.state["tokens"]
                self.out = out
                return
            out.close()
        self.out = open(self.entry.partial, "wb")
        self.out.write(_npy_header(self.dtype, 0))

    def _append(self, ids: np.ndarray) -> None:
        if len(ids) == 0:
            return
        if int(ids.max()) > self.limit:
            raise RuntimeError(f"token id {int(ids.max())} exceeds {self.dtype} although the vocabulary fits it")
        data = ids.astype(self.dtype).tobytes()
        self.out.write(data)
        self.digest.update(data)
        self.tokens += len(ids)

    def _save(self, state: dict) -> None:
        """Make the ids so far durable, then record where to resume."""
        self.out.flush()
        os.fsync(self.out.fileno())
        write_json_atomic(self.entry.progress, {**self.plan, **state, "tokens": self.tokens})

    def _discard(self) -> None:
        if getattr(self, "out", None) is not None:
            self.out.close()
        self.entry.partial.unlink(missing_ok=True)
        self.entry.progress.unlink(missing_ok=True)

    def _finish(self, seen_text: bool) -> None:
        if not seen_text:
            fail(f"{self.option} {self.path} is empty")
        self.out.seek(0)
        self.out.write(_npy_header(self.dtype, self.tokens))
        self.out.flush()
        os.fsync(self.out.fileno())
        self.out.close()

    # -- whole-file tokenization (slow tokenizers, or a backend that differs from the tokenizer's call)

    def _whole(self, text: _Text) -> None:
        if getattr(self, "out", None) is not None:
            self.out.close()
        self._open(resume=False)
        self.stats["whole_file"] = True
        ids = tokenize_text(read_text_file(self.path, self.option), self.tokenizer)
        self._append(ids)
        self._finish(seen_text=True)  # read_text_file refuses a blank file

    # -- windows

    def _bounds(self, m: int, size: int) -> tuple:
        """Bytes (lo, hi) of window ``m`` before alignment: chunk m widened by the overlap on both sides."""
        lo = max(0, m * self.chunk - self.overlap) if m else 0
        return lo, min(size, (m + 1) * self.chunk + self.overlap)

    def _windows(self, text: _Text, backend: Any, ranges: list) -> list:
        raws = [text.read(lo, hi) for lo, hi in ranges]
        strings = [text.decode(raw, lo) for raw, (lo, _) in zip(raws, ranges)]
        encs = backend.encode_batch(strings, add_special_tokens=False) if len(strings) > 1 else [
            backend.encode(strings[0], add_special_tokens=False)]
        windows = [_Window(lo, hi, raw, s, enc) for (lo, hi), raw, s, enc in zip(ranges, raws, strings, encs)]
        if not self.probed:  # the backend must give what the tokenizer's own call gives
            self.probed = True
            if not np.array_equal(windows[0].ids, tokenize_text(windows[0].text, self.tokenizer)):
                raise _NotChunkable
        return windows

    def _chunked(self, text: _Text, backend: Any) -> None:
        size = text.size
        self.probed = False
        self.state = None
        if self.entry.progress.is_file():
            saved = read_json(self.entry.progress, "token cache progress file")
            if all(saved.get(k) == v for k, v in self.plan.items()):
                self.state = saved
        self._open(resume=self.state is not None)
        num_windows = -(-size // self.chunk)

        def window_range(m: int) -> tuple:
            lo, hi = self._bounds(m, size)
            return text.align(lo), text.align(hi)

        pending: dict = {}

        def fetch(m: int) -> _Window:
            if m not in pending:
                pending.clear()
                batch = [window_range(k) for k in range(m, min(m + BATCH_WINDOWS, num_windows))]
                pending.update(zip(range(m, m + len(batch)), self._windows(text, backend, batch)))
            return pending.pop(m)

        m = self.state["window"] if self.state else 0
        cur = fetch(m)
        skip = 0
        if self.state:
            skip = _locate(cur, self.state["run"])
            if skip is None:  # the saved place is not reproduced: start over
                self.out.close()
                self.state = None
                self._open(resume=False)
                m, cur, skip = 0, fetch(0), 0
        run = _run_at(cur, skip)
        seen_text = bool(self.state.get("seen_text")) if self.state else False
        seen_text = seen_text or bool(cur.text.strip())
        progress = _Progress(self.path, size, cur.lo, self.progress_bar)
        nxt = m + 1
        while cur.hi < size:
            y = fetch(nxt)
            seen_text = seen_text or bool(y.text.strip())
            cut = text.align(nxt * self.chunk)
            found = _join(cur, y, cut, skip)
            if found is None:  # no agreement around the cut: extend cur over y and try the next cut
                cur = self._windows(text, backend, [(cur.lo, y.hi)])[0]
                skip = _locate(cur, run)
                if skip is None:
                    raise _NotChunkable
                nxt += 1
                self.stats["extended"] += 1
                continue
            i, j = found
            self._append(cur.ids[skip:i])
            cur, skip, m = y, j, nxt
            self.stats["joined"] += 1
            run = _run_at(cur, skip)
            nxt += 1
            if nxt not in pending:  # a batch is done: the next window starts a new one
                self._save({"window": m, "run": run, "seen_text": seen_text})
            progress.update(cur.lo, self.tokens)
        self._append(cur.ids[skip:])
        self._finish(seen_text)
        progress.close(self.tokens, self.entry.array)


def _backend(tokenizer: Any) -> Any:
    """A private copy of the tokenizer's ``tokenizers`` backend, set up as its call uses it; None for slow ones."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    copy.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return copy
