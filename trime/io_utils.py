"""Small shared helpers for offline jobs: atomic writes, file hashes and identities, shard ranges, JSON,
and the CLIs' quiet logging set-up."""

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Iterator, Tuple, Union

from trime.errors import fail

PathLike = Union[str, os.PathLike]
# Files at most this large are hashed whole; bigger ones get size + mtime + partial hashes.
FULL_HASH_MAX_BYTES = 256 << 20
PARTIAL_HASH_BYTES = 16 << 20


@contextlib.contextmanager
def atomic_path(final_path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final_path``; rename it into place on success.

    On any exception the temporary file is removed and ``final_path`` is untouched,
    so readers never see a half-written file.
    An OSError raised inside (a full disk, a read-only folder) names ``final_path``, not the
    temporary file, so that :func:`trime.errors.file_faults_as_errors` reports the user's path.
    """
    final_path = Path(final_path)
    tmp_path = None
    try:
        try:
            final_path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # a file stands where a folder of the path should be
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(final_path.parent)) from None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{final_path.name}.", suffix=".tmp", dir=final_path.parent)
        except OSError as exc:  # it names its random temporary name: name the file being written instead
            raise OSError(exc.errno, exc.strerror, str(final_path)) from exc
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600 files; give the usual umask-based mode
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, final_path)
    except OSError as exc:
        if exc.errno is not None and exc.filename in (None, tmp_path and str(tmp_path)):
            raise OSError(exc.errno, exc.strerror, str(final_path)) from exc
        raise
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def write_json_atomic(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically.

    NaN and infinity are not JSON: a value holding one is refused (one line, nothing written).
    """
    try:
        text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False)
    except ValueError as exc:
        if "Out of range float" not in str(exc):
            raise
        fail(f"refusing to write {path}: a value is NaN or infinite, which JSON cannot hold ({exc})")
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text + "\n")


def read_json(path: PathLike, what: str = "file") -> Any:
    """Read JSON, failing with a one-line error that names the file."""
    path = Path(path)
    if not path.is_file():
        fail(f"{what} {path} does not exist")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fail(f"{what} {path} is not valid JSON ({e}); delete it and re-create it")


def sha256_file(path: PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def file_identity(path: PathLike) -> dict:
    """A stable identity for a file: sha256 for small files, else size/mtime/head+tail sha256."""
    path = Path(path)
    stat = path.stat()
    if stat.st_size <= FULL_HASH_MAX_BYTES:
        return {"path": str(path), "bytes": stat.st_size, "sha256": sha256_file(path)}
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(PARTIAL_HASH_BYTES))
        f.seek(-PARTIAL_HASH_BYTES, os.SEEK_END)
        digest.update(f.read(PARTIAL_HASH_BYTES))
    return {
        "path": str(path),
        "bytes": stat.st_size,
        "mtime": int(stat.st_mtime),
        "partial_sha256": digest.hexdigest(),
    }


def identity_key(identity: dict) -> str:
    """The hash part of :func:`file_identity` (what must match between two files)."""
    return identity.get("sha256") or f"{identity['bytes']}:{identity['partial_sha256']}"


def quiet_libraries() -> None:
    """For the CLIs: warnings and errors only (importing fairseq sets the root logger to DEBUG).

    Also keeps FAISS's loader chatter, matplotlib's font search, transformers' weight-loading
    bars and a known torch warning about fairseq's padding masks off the output.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is imported
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("fairseq", "faiss", "matplotlib", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")


def shard_range(num_items: int, num_shards: int, shard_id: int) -> Tuple[int, int]:
    """Contiguous ``[start, end)`` slice of ``num_items`` for ``--num-shards/--shard-id``."""
    if num_shards < 1:
        fail(f"--num-shards must be >= 1, got {num_shards}")
    if not 0 <= shard_id < num_shards:
        fail(f"--shard-id must be in [0, {num_shards}), got {shard_id}")
    per_shard, extra = divmod(num_items, num_shards)
    start = shard_id * per_shard + min(shard_id, extra)
    return start, start + per_shard + (1 if shard_id < extra else 0)


def require_free_disk(directory: PathLike, needed_bytes: int, flag: str = "the output directory") -> None:
    """Fail early if ``directory`` lacks ``needed_bytes`` of free space."""
    directory = Path(directory)
    probe = directory if directory.exists() else directory.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        fail(
            f"{flag} {directory} has {human_bytes(free)} free but {human_bytes(needed_bytes)} "
            "are needed; free space or choose another directory"
        )


def human_bytes(count: int) -> str:
    """``count`` bytes in the largest binary unit that keeps it >= 1 (e.g. ``1.5 GiB``, ``0 bytes``)."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift:
            return f"{count / (1 << shift):.1f} {unit}"
    return f"{count} bytes"


# lock files held by this process: path -> [fd, depth] (re-entrant: a build's index step runs under its lock)
_HELD_LOCKS: dict[str, list] = {}


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, what: str, fix: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` for the block; if another process holds it, fail at once.

    The file names its holder (pid, host, command) for that one-line error, which says ``what`` is
    in use and ends with ``fix``. The kernel releases the lock when the holder exits or is killed,
    so a stale file never blocks a later run. Re-entrant within one process.
    """
    key = os.path.realpath(lock_path)
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key][1] += 1
        try:
            yield
        finally:
            _HELD_LOCKS[key][1] -= 1
        return
    Path(lock_path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process that is still starting"
            fail(f"{what} is in use by another run ({holder}); wait for it to finish, or {fix}")
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}: {command}\n".encode(), 0)
        _HELD_LOCKS[key] = [fd, 1]
        try:
            yield
        finally:
            del _HELD_LOCKS[key]
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def naming_file(path: Path) -> Iterator[None]:
    """Inside, an OSError that names no file (a failed write, fallocate or flush) is re-raised naming ``path``,
    so that :func:`trime.errors.file_faults_as_errors` can say which file met the full disk."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


PROGRESS_LINE_SECONDS = 30.0  # without a progress bar: one progress line this often


def _silent(message: str) -> None:
    """The default ``log``: library calls print nothing."""


class ProgressLines:
    """A counter that ``log``s one line every ``every_seconds`` (default PROGRESS_LINE_SECONDS) and a last one
    when closed (if it logged any):
    what a progress bar shows, for logs and ``--no-progress-bar``. Used like tqdm (iterate, ``update``, ``close``)."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
                 log: Callable[[str], None] = _silent, every_seconds: float | None = None,
                 initial: int = 0) -> None:
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.log = log
        self.every_seconds = PROGRESS_LINE_SECONDS if every_seconds is None else every_seconds
        self.n = self.initial = initial
        self.started = self.last = time.monotonic()
        self.lines = 0
        self.logged_n: int | None = None  # the count of the last line logged

    def line(self) -> str:
        """``desc: n/total unit (p%), elapsed, rate, time left``."""
        elapsed = time.monotonic() - self.started
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        text = f"{self.desc}: {self.n:,}" + (f"/{self.total:,}" if self.total else "") + f" {self.unit}"
        if self.total:
            text += f" ({100 * self.n / self.total:.0f}%)"
        text += f", {elapsed:.0f} s, {rate:,.1f} {self.unit}/s"
        if self.total and rate > 0 and self.n < self.total:
            text += f", about {(self.total - self.n) / rate:.0f} s left"
        return text

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_seconds:
            self.last = now
            self._log_line()

    def _log_line(self) -> None:
        self.lines += 1
        self.logged_n = self.n
        self.log(self.line())

    def close(self) -> None:
        """Log the last count, unless no line was logged yet or the last line already showed it."""
        if self.lines and self.logged_n != self.n:
            self._log_line()
        self.lines = 0

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "ProgressLines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_meter(iterable: Iterable | None = None, *, total: int | None, desc: str, unit: str, bar: bool,
             log: Callable[[str], None] = _silent, initial: int = 0, unit_scale: bool = False):
    """The tools' one progress display: tqdm's bar on stderr (``bar``), else :class:`ProgressLines`
    (a line to ``log`` every PROGRESS_LINE_SECONDS), so that ``--no-progress-bar`` is never silent for long."""
    if bar:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, unit_scale=unit_scale,
                    file=sys.stderr)
    return ProgressLines(iterable, total=total, desc=desc, unit=unit, log=log, initial=initial)
