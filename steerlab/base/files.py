"""Files, the one way steerlab writes them: atomic writes, JSON and JSONL, HDF5, locks, parts.

Every writer in the package goes through here, so a crash (even SIGKILL) never leaves a
half-written file under a final name:

* :func:`atomic_path` yields a temporary name beside the target and renames it over the
  target only when the block succeeds (``os.replace``: atomic on POSIX); the JSON, JSONL and
  text writers are built on it.
* :class:`PartsDir` is a folder of committed parts, the resume mechanism of long runs
  (inference batches, activation rows): a part is committed atomically or not at all, stale
  temporaries are swept, and the finished run removes the folder.
* :func:`flock` is the advisory lock that refuses a second writer.
* :func:`append_jsonl` / :func:`read_jsonl` are the append-only stage files (one record per
  line, flushed per record; a torn last line from a killed run is skipped on read).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from steerlab.base.checks import output_file
from steerlab.base.errors import SteerlabError

log = logging.getLogger(__name__)

__all__ = ["PartsDir", "append_jsonl", "atomic_path", "check_unlocked", "create_exclusive",
           "flock", "h5py", "lock_holder", "lock_path", "open_h5", "read_json", "read_json_list",
           "read_jsonl", "read_text", "sole_writer", "write_json_atomic", "write_jsonl_atomic",
           "write_text_atomic"]


def h5py() -> Any:
    """The ``h5py`` module, imported on first use (it is slow to import)."""
    import h5py as module  # deferred: h5py

    return module


def _temporary(target: Path) -> Path:
    """A unique hidden name beside ``target`` (several processes may write side by side),
    not created here, so the writer creates it with the usual permissions."""
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike, *, mkdir: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path``; renamed over ``path`` when the block succeeds.

    The file gets the permissions of a new file (``0666`` less the umask), whatever mode its
    writer created it with. On an exception the temporary file is removed and ``path`` is
    left as it was. A target that cannot be written (a folder, a path under a file, an
    unwritable folder) is refused first with one line (:func:`steerlab.base.checks.output_file`).

    Examples:
        >>> with atomic_path("out.h5") as tmp:
        ...     write_everything(tmp)
    """
    target = output_file(path)
    if mkdir:
        target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(target)
    try:
        yield tmp
        if tmp.is_file():  # writers that create 0600 files (safetensors) follow the umask too
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    """The process umask, read without setting it where Linux shows it (setting it to read it
    would race with threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _json(data: Any, indent: int | None, allow_nan: bool = True) -> str:
    return json.dumps(data, indent=indent, ensure_ascii=False, allow_nan=allow_nan)


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int = 1,
                      allow_nan: bool = True) -> Path:
    """Write ``data`` as JSON to ``path`` atomically; ``allow_nan=False`` refuses NaN and
    infinities (which Python writes as the non-JSON ``NaN``, ``Infinity``) with one line."""
    try:
        text = _json(data, indent, allow_nan)
    except ValueError as err:
        raise SteerlabError(f"cannot be written as strict JSON ({err})", source=str(path)) from None
    return write_text_atomic(path, text + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    """Write one JSON value per line to ``path`` atomically."""
    return write_text_atomic(path, "".join(_json(r, None) + "\n" for r in rows))


def create_exclusive(path: str | os.PathLike, text: str) -> bool:
    """Create ``path`` with ``text`` unless it exists; False if another process was first.

    Race-free between processes: the text is written to a temporary file that is then
    hard-linked to the final name, which fails when the name exists.
    """
    target = Path(path)
    tmp = _temporary(target)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.link(tmp, target)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def read_text(path: str | os.PathLike, what: str = "a text file") -> str:
    """A UTF-8 text file's content; a missing file, a folder, bytes that are not UTF-8 or
    any OS error raise one clear line naming the file and ``what`` was expected."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SteerlabError(f"no such file (expected {what})", source=str(p)) from None
    except IsADirectoryError:
        raise SteerlabError(f"is a folder; expected {what}", source=str(p)) from None
    except UnicodeDecodeError as err:
        raise SteerlabError(f"not UTF-8 text (byte {err.start}); expected {what}",
                            source=str(p)) from None
    except OSError as err:
        raise SteerlabError(f"cannot be read ({err.strerror or err}); expected {what}",
                            source=str(p)) from None


def read_json(path: str | os.PathLike, what: str = "JSON") -> Any:
    """Parse a JSON file; a missing, unreadable or invalid file raises one clear line."""
    p = Path(path)
    text = read_text(p, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SteerlabError(f"not valid JSON ({err}); expected {what}", source=str(p)) from None


def read_json_list(path: str | os.PathLike) -> list:
    """A JSON file holding a non-empty list (prompts, personae); anything else raises one line."""
    data = read_json(path, "a JSON list")
    if not isinstance(data, list) or not data:
        raise SteerlabError("expected a non-empty JSON list", source=str(path))
    return data


@contextmanager
def open_h5(path: str | os.PathLike, what: str = "an HDF5 file") -> Iterator[Any]:
    """An HDF5 file opened for reading; a missing, foreign or damaged file raises one line.

    Examples:
        >>> with open_h5("run/per_token.h5", "a run's per-token file") as f:
        ...     f["tokens"]
    """
    p = Path(path)
    if p.is_dir():
        raise SteerlabError(f"is a folder; expected {what}", source=str(p))
    if not p.is_file():
        raise SteerlabError(f"no such file (expected {what})", source=str(p))
    try:
        f = h5py().File(p, "r")
    except OSError as err:
        raise SteerlabError(f"not an HDF5 file, or a damaged one ({err}); expected {what}",
                            source=str(p)) from None
    with f:
        yield f


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The object records of a JSONL file ([] if missing); a torn line is skipped with a
    warning (an interrupted append)."""
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for n, line in enumerate(read_text(p, "JSON lines").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: skipping an unreadable line (interrupted write?)", p, n)
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


@contextmanager
def append_jsonl(path: str | os.PathLike) -> Iterator[Callable[[dict], None]]:
    """Append JSON records to ``path`` one line at a time, flushed per record.

    A torn last line (a killed writer) is ended first, so it cannot swallow the next record.

    Examples:
        >>> with append_jsonl("out.jsonl") as write:
        ...     write({"id": "a", "score": 3})
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    torn = False
    if p.is_file() and p.stat().st_size:
        with p.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with p.open("a", encoding="utf-8") as f:
        if torn:
            f.write("\n")

        def write(rec: dict) -> None:
            f.write(_json(rec, None) + "\n")
            f.flush()

        yield write


@contextmanager
def flock(path: str | os.PathLike, *, shared: bool = False, wait: bool = False,
          busy: str = "another process is writing here") -> Iterator[None]:
    """Hold an advisory ``fcntl.flock`` on ``path`` (created if needed).

    Without ``wait`` a lock held elsewhere raises :class:`SteerlabError` with ``busy``; on a
    file system without flock support a warning is logged and nothing is locked.
    """
    import fcntl  # deferred: fcntl, POSIX only (import steerlab needs no POSIX)

    p = Path(path)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            raise SteerlabError(f"{busy} ({lock_holder(p)} holds {p.name})",
                                source=str(p.parent)) from None
        except OSError as err:  # e.g. a network file system mounted without flock
            log.warning("cannot lock %s (%s); nothing stops a second writer", p, err)
        if not shared:  # the holder's PID, for the message a second writer gets
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
        if not shared:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def lock_holder(path: str | os.PathLike) -> str:
    """Who holds the lock file ``path``: ``"pid N"`` as its exclusive holder wrote it, or
    ``"another process"`` (a shared holder, or an unreadable file)."""
    try:
        pid = Path(path).read_text(encoding="ascii").strip()
        os.kill(int(pid), 0)  # still alive (a killed holder's PID may be left behind)
    except (OSError, UnicodeDecodeError, ValueError):
        return "another process"
    return f"pid {pid}"


def check_unlocked(path: str | os.PathLike, busy: str, *, shared: bool = False) -> None:
    """Refuse now, with ``busy`` and the holder's PID, if the lock ``path`` could not be
    taken (exclusively, or ``shared``); nothing is created. For checks before a model loads:
    the writer takes the lock itself later (:func:`flock`)."""
    p = Path(path)
    if p.is_file():
        with flock(p, shared=shared, busy=busy):
            pass


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of the one writer of ``target``: ``.<name>.lock`` beside it."""
    t = Path(target)
    return t.with_name(f".{t.name}.lock")


@contextmanager
def sole_writer(target: str | os.PathLike, busy: str) -> Iterator[None]:
    """Be the one process writing ``target`` (a file built from parts), or refuse with
    ``busy`` and the holder's PID. Folders created for it are removed again if the block
    fails before anything was written into them (a failed start leaves nothing behind).
    """
    t = Path(target)
    created = [p for p in [t.parent, *t.parent.parents] if not p.exists()]
    t.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_path(t)
    fresh = not lock.exists()
    try:
        with flock(lock, busy=busy):
            yield
    except BaseException:
        if fresh:
            lock.unlink(missing_ok=True)
        for folder in created:  # deepest first; a folder holding anything stays
            try:
                folder.rmdir()
            except OSError:
                break
        raise


class PartsDir:
    """A folder of committed part files: how long runs write incrementally and resume.

    Parts are named ``{prefix}-{key}.{suffix}`` where ``key`` is one or more ``-``-joined
    integers (a batch index, a row range). :meth:`commit` writes one atomically; :meth:`keys`
    lists the committed ones; :meth:`sweep` clears what a crash left; :meth:`remove` deletes the
    folder once the parts have been joined into the final output.

    Examples:
        >>> parts = PartsDir("run/parts", "batch", "h5")
        >>> with parts.commit(3) as tmp:
        ...     write_part(tmp)
        >>> parts.keys()
        [(3,)]
    """

    def __init__(self, root: str | os.PathLike, prefix: str, suffix: str, width: int = 6):
        self.root = Path(root)
        self.prefix, self.suffix, self.width = prefix, suffix, width
        self._name = re.compile(rf"{re.escape(prefix)}((?:-\d+)+)\.{re.escape(suffix)}")

    def path(self, *key: int) -> Path:
        """The file of the part with this key."""
        digits = "-".join(f"{k:0{self.width}d}" for k in key)
        return self.root / f"{self.prefix}-{digits}.{self.suffix}"

    def exists(self) -> bool:
        return self.root.is_dir()

    def keys(self) -> list[tuple[int, ...]]:
        """Keys of the committed parts, sorted."""
        if not self.root.is_dir():
            return []
        found = (self._name.fullmatch(p.name) for p in self.root.iterdir())
        return sorted(tuple(int(x) for x in m[1][1:].split("-")) for m in found if m)

    def paths(self) -> list[Path]:
        """The committed part files in key order."""
        return [self.path(*k) for k in self.keys()]

    @contextmanager
    def commit(self, *key: int) -> Iterator[Path]:
        """A temporary path that becomes part ``key`` when the block succeeds."""
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path(*key)) as tmp:
            yield tmp

    def sweep(self) -> None:
        """Delete temporaries a crashed commit left (only a sole writer may call this)."""
        if self.root.is_dir():
            for stale in self.root.glob(".*.tmp"):
                stale.unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the folder and every part in it."""
        shutil.rmtree(self.root, ignore_errors=True)
