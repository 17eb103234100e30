"""The flat module paths of steerlab 0.1 (``steerlab.steer``, ``steerlab.vectors``, ...), kept
importable for one release: each is a stand-in module whose names come from where they live
now, with a ``DeprecationWarning`` naming the new path. Removed in steerlab 0.3."""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import Any

# old module -> the modules its names live in now (the first is where the module went).
MOVED: dict[str, tuple[str, ...]] = {
    "errors": ("base.errors",), "choice": ("base.choice",), "checks": ("base.checks",),
    "metadata": ("base.metadata",), "files": ("base.files",), "progress": ("base.progress",),
    "compat": ("base.compat",), "version": ("base.version",), "shards": ("base.shards",),
    "models": ("model.loading",), "placement": ("model.options", "model.provenance"),
    "layers": ("model.hooks",), "personas": ("model.personas",),
    "model_state": ("model.state",),
    "vectors": ("steering.vector",),
    "steer": ("steering.intervention", "steering.monitoring", "steering.operators"),
    "steps": ("steering.step_state",), "norms": ("steering.norms",),
    "sampling": ("generation.sampling", "model.inputs"),
    "engine": ("generation.engine", "generation.cache", "generation.graphs",
               "generation.host_syncs"),
    "decode": ("generation.decode",), "slots": ("generation.slots",),
    "generate": ("generation.generator", "generation.sampling", "model.inputs"),
    "metrics": ("generation.metrics",), "lens": ("generation.lens",),
    "detokenize": ("generation.detokenize",), "budget": ("generation.budget",),
    "viz": ("reporting.figures", "reporting.pages"),
    "report": ("inference.report", "reporting.pages"),
    "capture": ("extraction.capture",), "store": ("extraction.store",),
    "store_meta": ("extraction.attributes",), "extract": ("extraction.extractor",),
    "fitters": ("extraction.fitters",),
    "pairs": ("traits.pairs",), "scorers": ("traits.scorers",), "client": ("traits.client",),
    "responders": ("traits.responders", "model.templates"), "elicit": ("traits.elicit",),
    "collect": ("traits.collection",), "judge": ("traits.judging",),
    "infer": ("inference.infer",), "results": ("inference.results",),
    "runs": ("inference.runs",),
    "rating": ("evaluation.rating",), "calibrate": ("evaluation.calibrate",),
    "evaluate": ("evaluation.evaluate",), "validation": ("evaluation.verdict",),
    "serve": ("serving.server",), "http_edge": ("serving.http_edge",),
    "chat_request": ("serving.requests",), "batcher": ("serving.batcher",),
    "deadlines": ("serving.deadlines",), "vector_names": ("serving.shelf",),
    "chat_session": ("chat.session",), "widgets": ("chat.widget",),
}
# names that changed as well as moved: (old module, old name) -> new name
RENAMED = {("report", "write_report"): "write_run_report"}


def moved_attribute(old: str, name: str, homes: tuple[str, ...],
                    keep: dict[str, Any] | None = None) -> Any:
    """``name`` of the old module ``steerlab.<old>``, from its new home, with a warning (once:
    the value is then kept in ``keep``, the namespace it was looked up in)."""
    new_name = RENAMED.get((old, name), name)
    was = f"steerlab.{old}.{name}" if old else f"steerlab.{name}"
    for home in homes:
        module = importlib.import_module(f"steerlab.{home}")
        if hasattr(module, new_name):
            warnings.warn(f"{was} is now steerlab.{home}.{new_name}; the old "
                          "path goes in steerlab 0.3", DeprecationWarning, stacklevel=3)
            value = getattr(module, new_name)
            if keep is not None:
                keep[name] = value
            return value
    raise AttributeError(f"module 'steerlab.{old}' (moved to steerlab.{homes[0]}) has no "
                         f"attribute {name!r}")


def _stand_in(old: str, homes: tuple[str, ...]) -> types.ModuleType:
    module = types.ModuleType(f"steerlab.{old}", f"Moved to steerlab.{homes[0]}.")
    module.__getattr__ = lambda name: moved_attribute(  # type: ignore[method-assign]
        old, name, homes, vars(module))
    return module


def install() -> None:
    """Register a stand-in for each old module path (in ``sys.modules``, so that importing one
    never replaces a same-named function of the package root, like ``steerlab.generate``)."""
    for old, homes in MOVED.items():
        sys.modules.setdefault(f"steerlab.{old}", _stand_in(old, homes))
