"""The one validation layer: the checks every CLI option, config field, data file and
request field goes through before anything loads.

Each check returns the value it accepts (normalised) or raises :class:`SteerlabError` with
one line naming the file or field, the value and what was expected, so a command rejects bad
input with exit code 2 before a model loads, a folder is created or generation starts.

* :func:`number` and :func:`integer`: finite numbers in a range (NaN, infinities and bools
  are refused; ``integer`` also refuses floats with a fraction).
* :func:`seed`: a sampling seed (an integer in ``[0, 2**62]``).
* :func:`url`: an ``http(s)://host[:port][/path]`` base URL.
* :func:`input_file`: an existing, readable file (not a folder).
* :func:`output_file` and :func:`output_dir`: a target that can be written: not a folder where
  a file goes (or the reverse), under no file, in a folder this process can write to (probed
  with a temporary file that is removed at once; nothing else is created), and, given the
  command's ``inputs``, aliasing none of them (:func:`aliased`: the same file by path,
  symlink or hard link, or a path inside or around an input's folder).
* :func:`finite_values`: data (activations, vectors) with no NaN or infinity.
* :func:`text`: a string that can be written as UTF-8 (no lone surrogate), with no NUL
  character, within a length limit.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from steerlab.base.errors import SteerlabError

__all__ = ["MAX_SEED", "Inputs", "aliased", "finite_values", "input_file", "integer", "number",
           "output_dir", "output_file", "seed", "text", "url"]

PathLike = str | os.PathLike
# a command's inputs for the aliasing check: field name -> its path, or every path it owns
Inputs = Mapping[str, "PathLike | Iterable[PathLike] | None"]


def _range(lo: int | float | None, hi: int | float | None, lo_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    return f"<= {hi:g}" if hi is not None else ""


def number(value: Any, field: str, *, lo: int | float | None = None, hi: int | float | None = None,
           lo_open: bool = False, source: str | None = None) -> float:
    """``value`` as a finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``).

    Examples:
        >>> number(0.7, "temperature", lo=0)
        0.7
    """
    expected = " ".join(filter(None, ("a finite number", _range(lo, hi, lo_open))))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SteerlabError(f"got {value!r:.60}; expected {expected}", source=source,
                            field=field)
    x = float(value)
    if not math.isfinite(x) or (lo is not None and (x <= lo if lo_open else x < lo)) or (
            hi is not None and x > hi):
        raise SteerlabError(f"got {value!r}; expected {expected}", source=source, field=field)
    return x


def integer(value: Any, field: str, *, lo: int | None = None, hi: int | None = None,
            source: str | None = None, hint: str = "") -> int:
    """``value`` as an int in ``[lo, hi]`` (a float is accepted only when whole).

    ``hint`` is appended to the expectation (e.g. ``"(the vocabulary size)"``).

    Examples:
        >>> integer(4, "batch_size", lo=1)
        4
    """
    expected = " ".join(filter(None, ("an integer", _range(lo, hi, False), hint)))
    ok = not isinstance(value, bool) and (isinstance(value, int) or (
        isinstance(value, float) and value.is_integer()))
    if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise SteerlabError(f"got {value!r:.60}; expected {expected}", source=source,
                            field=field)
    return int(value)


MAX_SEED = 2**62  # seeds live in int64 tensors, with room for seed + task index


def seed(value: Any, field: str = "seed", *, source: str | None = None) -> int:
    """A sampling seed: an integer in ``[0, 2**62]`` (seeds are int64 on the device, and a
    run adds the task index).

    Examples:
        >>> seed(7)
        7
    """
    return integer(value, field, lo=0, hi=MAX_SEED, source=source)


def url(value: Any, field: str, *, source: str | None = None) -> str:
    """``value`` as an ``http://`` or ``https://`` URL with a host (a trailing ``/`` dropped).

    Examples:
        >>> url("http://localhost:8000/v1/", "base_url")
        'http://localhost:8000/v1'
    """
    expected = "an http:// or https:// URL such as http://localhost:8000/v1"
    if not isinstance(value, str):
        raise SteerlabError(f"got {value!r:.60}; expected {expected}", source=source,
                            field=field)
    try:
        parts = urlsplit(value.strip())
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        parts, port_ok = None, False
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname \
            or not port_ok or any(c.isspace() for c in value.strip()):
        raise SteerlabError(f"got {value!r:.80}; expected {expected}", source=source,
                            field=field)
    return value.strip().rstrip("/")


def input_file(path: str | os.PathLike, field: str | None = None, *,
               what: str = "a file") -> Path:
    """``path`` as an existing, readable file (``what`` names the expected content).

    Examples:
        >>> input_file("prompts.json", "prompts_json", what="a JSON list of prompts")
        PosixPath('prompts.json')
    """
    p = Path(path)
    if p.is_dir():
        raise SteerlabError(f"is a folder; expected {what}", source=str(p), field=field)
    if not p.exists():
        raise SteerlabError(f"no such file (expected {what})", source=str(p), field=field)
    if not os.access(p, os.R_OK):
        raise SteerlabError(f"cannot be read (permission denied); expected {what}",
                            source=str(p), field=field)
    return p


def _nearest_existing(p: Path) -> Path:
    """The deepest existing path on the way to ``p``; a file on the way is an error."""
    here = p.absolute()
    while not here.exists():
        here = here.parent
    return here


def _probe(folder: Path, target: Path, field: str | None) -> None:
    """Refuse ``target`` unless this process can create a file in ``folder``."""
    try:
        fd, name = tempfile.mkstemp(prefix=".steerlab-probe-", dir=folder)
    except OSError as err:
        raise SteerlabError(f"cannot write in {folder} ({err.strerror or err}); expected a "
                            "writable location", source=str(target), field=field) from None
    os.close(fd)
    os.unlink(name)


def _resolved(p: Path) -> Path:
    try:
        return p.resolve()
    except (OSError, RuntimeError):  # a symlink loop: compare the path as written
        return p.absolute()


def _same_inode(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _flatten(value: Any) -> list[Path]:
    if value is None or value == "":
        return []
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    return [p for v in value for p in _flatten(v)]


def aliased(output: PathLike, inputs: Inputs, *, holds: bool = True) -> str | None:
    """How writing ``output`` would touch one of ``inputs``, as a phrase naming the input's
    path and field, or None when it touches none.

    ``output`` aliases an input when both are the same file: the same path once ``..`` and
    symlinks are resolved (:meth:`Path.resolve`), or the same inode (a hard link); when it
    lies inside an input that is a folder (a run's ``parts/``); or, with ``holds``, when it is
    a folder holding an input (a folder that is written whole or removed).

    Args:
        output: a path the command will write (it may not exist yet).
        inputs: each input's field name mapped to its path, or to every path it owns (a run
            folder's ``config.json``, ``results.json``, …; see ``results.run_files``).
        holds: also refuse an ``output`` folder that holds an input.

    Examples:
        >>> aliased("run/../run/results.json", {"results_dir": ["run/results.json"]})
        "is run/results.json (input 'results_dir')"
    """
    out = Path(output)
    r_out = _resolved(out)
    for name, value in inputs.items():
        for inp in _flatten(value):
            r_in = _resolved(inp)
            where = f"{inp} (input {name!r})"
            if r_out == r_in:
                return f"{'is' if out.absolute() == inp.absolute() else 'resolves to'} {where}"
            if _same_inode(out, inp):
                return f"is a hard link to {where}"
            if r_in in r_out.parents and not inp.is_file():
                return f"is inside {where}"
            if holds and r_out in r_in.parents:
                return f"holds {where}"
    return None


def _refuse_alias(target: Path, field: str | None, inputs: Inputs | None,
                  owns: Iterable[PathLike], root_holds: bool) -> None:
    """Refuse ``target``, or a path that comes with it (``owns``), aliasing an input."""
    if not inputs:
        return
    for path, holds in ((target, root_holds), *((Path(p), True) for p in owns)):
        how = aliased(path, inputs, holds=holds)
        if how is not None:
            what = "" if path == target else f"would write {path}, which "
            raise SteerlabError(f"{what}{how}; expected an output that is not one of the "
                                "command's inputs", source=str(target), field=field)


def output_file(path: str | os.PathLike, field: str | None = None, *,
                inputs: Inputs | None = None,
                owns: Iterable[PathLike] = ()) -> Path:
    """``path`` as a file this process can create or replace (its folder may not exist yet),
    aliasing none of the command's ``inputs`` (see :func:`aliased`).

    Refused: an input of the command (also through a symlink, a hard link or ``..``), an
    existing folder, a path under a file, a folder that cannot be written. Nothing is created.

    Args:
        path: the file to write.
        field: the option or config field that named it.
        inputs: the command's inputs, field name to path(s): none may be overwritten.
        owns: paths that come with the output (its parts folder, lock, sidecar), checked
            against ``inputs`` too.

    Examples:
        >>> output_file("out/report.html", "output", inputs={"results_dir": run_files("run")})
        PosixPath('out/report.html')
    """
    p = Path(path)
    _refuse_alias(p, field, inputs, owns, True)
    if p.is_dir():
        raise SteerlabError("is a folder; expected a file to write", source=str(p), field=field)
    base = _nearest_existing(p.parent)
    if not base.is_dir():
        raise SteerlabError(f"{base} is a file, so nothing can be written under it",
                            source=str(p), field=field)
    _probe(base, p, field)
    return p


def output_dir(path: str | os.PathLike, field: str | None = None, *,
               inputs: Inputs | None = None,
               owns: Iterable[PathLike] = ()) -> Path:
    """``path`` as a folder this process can create or write into. Nothing is created.

    With ``inputs``, the folder may not be an input or lie inside one, and none of the paths
    the command writes in it (``owns``: a run's ``config.json``, ``results.json``, ``parts/``,
    …) may alias an input (see :func:`aliased`); the folder may hold inputs elsewhere.

    Args:
        path: the folder to write into.
        field: the option or config field that named it.
        inputs: the command's inputs, field name to path(s).
        owns: the files and folders the command writes in ``path``.

    Examples:
        >>> output_dir("logs/run-1", "output_dir", inputs={"prompts_json": "prompts.json"},
        ...            owns=run_files("logs/run-1"))
        PosixPath('logs/run-1')
    """
    p = Path(path)
    _refuse_alias(p, field, inputs, owns, False)
    base = _nearest_existing(p)
    if not base.is_dir():
        what = "is a file" if base == p.absolute() else f"is under {base}, a file"
        raise SteerlabError(f"{what}; expected a folder", source=str(p), field=field)
    _probe(base, p, field)
    return p


def finite_values(values: Any, what: str, *, source: str | None = None,
                  field: str | None = None) -> None:
    """Refuse data (a tensor or array) holding NaN or an infinity.

    Examples:
        >>> finite_values(torch.zeros(3), "the vector")
    """
    if hasattr(values, "detach"):  # a torch tensor, checked where it lives
        if values.device.type == "meta" or not values.is_floating_point():
            return
        size, good = values.numel(), int(values.isfinite().sum())
    else:
        arr = np.asarray(values)
        size, good = arr.size, int(np.isfinite(arr).sum())
    if good != size:
        raise SteerlabError(f"{what} has {size - good} NaN or infinite value(s) of {size}; "
                            "expected finite numbers", source=source, field=field)


_UNWRITABLE = re.compile("[\x00\ud800-\udfff]")


def text(value: Any, field: str, *, max_chars: int | None = None, empty: bool = True,
         source: str | None = None) -> str:
    """``value`` as a string every later stage can handle: encodable as UTF-8 (a lone
    surrogate such as ``"\\ud800"``, which JSON can carry, is not), no NUL character (C
    libraries and tokenizers cut there), at most ``max_chars`` characters, and non-blank
    unless ``empty``.

    Examples:
        >>> text("pirate", "persona", max_chars=256)
        'pirate'
    """
    if not isinstance(value, str):
        raise SteerlabError(f"got {value!r:.60}; expected a string", source=source,
                            field=field)
    if max_chars is not None and len(value) > max_chars:
        raise SteerlabError(f"is {len(value)} characters long; at most {max_chars} are "
                            "allowed", source=source, field=field)
    if not empty and not value.strip():
        raise SteerlabError("is empty; expected some text", source=source, field=field)
    found = _UNWRITABLE.search(value)
    if found is not None:
        bad = found.start()
        what = "a NUL character" if value[bad] == "\x00" else \
            f"a lone surrogate (U+{ord(value[bad]):04X})"
        raise SteerlabError(f"holds {what} at character {bad}; expected text that can be "
                            "written as UTF-8", source=source, field=field)
    return value
