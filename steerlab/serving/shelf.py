"""The vectors ``steerlab serve`` may steer with, by name: a folder the operator chose.

A request names a vector (``"pirate"``), never a path: :class:`VectorShelf` maps the name to
``<dir>/<name>.safetensors`` (and its ``.json`` sidecar) only when the name is plain (letters,
digits, ``.``, ``_``, ``-``; no separator, no ``..``) and both files resolve inside the folder
(a symlink out of it is refused). Every refusal is the same message, whether a file of that
name exists, is unreadable, is corrupt or lies outside, so a client learns nothing about the
server's files; the reason goes to the server's log. Loaded vectors are kept (keyed by the
files' size and modification time, so a replaced file is read again).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

from steerlab.base.errors import SteerlabError
from steerlab.steering.vector import SteeringVector, vector_paths

__all__ = ["VectorShelf"]

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
KEPT = 32  # vectors held in memory (least recently used dropped)


class VectorShelf:
    """The named vectors of one folder.

    Args:
        folder: the folder holding ``<name>.safetensors`` + ``<name>.json`` pairs.

    Examples:
        >>> shelf = VectorShelf("vectors/")
        >>> shelf.names()
        ['pirate']
        >>> shelf.get("pirate").layers
        (10, 12)
    """

    def __init__(self, folder: str | os.PathLike):
        root = Path(folder)
        if not root.is_dir():
            raise SteerlabError("is not a folder; expected the folder of the vectors a "
                                "server may steer with", source=str(root), field="vectors_dir")
        self.root = root.resolve()
        self._kept: OrderedDict[str, tuple[tuple, SteeringVector]] = OrderedDict()
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """The vector names the folder offers (a ``.safetensors`` with its sidecar)."""
        return sorted(p.stem for p in self.root.glob("*.safetensors")
                      if NAME.fullmatch(p.stem) and p.with_suffix(".json").is_file())

    def get(self, name: object) -> SteeringVector:
        """The vector called ``name``.

        Raises:
            SteerlabError: one generic line for every reason (the reason is logged).
        """
        try:
            files = self._files(name)
            stamp = tuple((s.st_size, s.st_mtime_ns) for s in map(os.stat, files))
            with self._lock:
                found = self._kept.get(str(name))
                if found is not None and found[0] == stamp:
                    self._kept.move_to_end(str(name))
                    return found[1]
            vector = SteeringVector.load(files[0])
        except (SteerlabError, OSError, ValueError, TypeError) as err:
            log.info("steering vector %r refused: %s", f"{name!s:.80}", err)
            raise SteerlabError(f"no usable vector named {name!r:.80} on this server (names: "
                                "see GET /v1/vectors)", field="steering.vector") from None
        with self._lock:
            self._kept[str(name)] = (stamp, vector)
            while len(self._kept) > KEPT:
                self._kept.popitem(last=False)
        return vector

    def _files(self, name: object) -> tuple[Path, Path]:
        if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
            raise SteerlabError("not a plain vector name")
        files = vector_paths(self.root / name)
        for f in files:
            if f.resolve().parent != self.root or not f.is_file():
                raise SteerlabError(f"{f} is not a file inside {self.root}")
        return files
