"""Steering evaluation: rate unsteered, prompted and steered answers on held-out questions,
search the strength per layer group, choose the best coherent setting, run the controls.

How answers are rated (trait score, coherence) is :mod:`steerlab.evaluation.rating`; how strengths
are
searched is :mod:`steerlab.evaluation.calibrate`; the report with confidence intervals is
:mod:`steerlab.evaluation.verdict`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from steerlab.base.errors import SteerlabError
from steerlab.base.files import append_jsonl, flock, read_json, read_jsonl, write_json_atomic
from steerlab.base.progress import progress_bar
from steerlab.evaluation.calibrate import Candidate, Search, search_strengths
from steerlab.evaluation.rating import AnswerRater, Setting
from steerlab.generation.engine import Engine
from steerlab.generation.generator import NonFiniteError, generate
from steerlab.model.loading import model_id
from steerlab.steering.intervention import DEFAULT_UNITS, Positions, Steering, Units
from steerlab.steering.vector import SteeringVector, random_like
from steerlab.traits.scorers import Scorer

log = logging.getLogger(__name__)

__all__ = ["EvalConfig", "SteeringEval", "evaluate_steering", "spread_groups"]


@dataclass(frozen=True)
class EvalConfig:
    """How :func:`evaluate_steering` steers, generates and judges.

    Args:
        units: strength units (``"norm"``: fractions of the residual norm; ``"raw"``).
        positions: where to steer (see :class:`steerlab.steering.intervention.Positions`).
        preserve_norm: keep each steered residual's norm (see :meth:`Steering.create`).
        search: the automatic strength search (used when no fixed strengths are given).
        max_new_tokens: answer length.
        min_coherence: coherence floor of the best setting, relative to unsteered.
        min_distinct: distinct-2 below which an answer counts as a repetition loop.
        nll_margin: nats above the unsteered mean NLL beyond which an answer is gibberish.
        seed: seed of the random control vector.
        batch_size: most rows per generation batch.
    """

    units: Units | str = DEFAULT_UNITS
    positions: Positions | str = Positions.ALL
    preserve_norm: bool = False
    search: Search = Search()
    max_new_tokens: int = 40
    min_coherence: float = 0.8
    min_distinct: float = 0.5
    nll_margin: float = 1.0
    seed: int = 0
    batch_size: int = 256
    engine: str = "auto"  # how generation runs (see steerlab.generation.engine.Engine)

    def __post_init__(self) -> None:
        object.__setattr__(self, "units", Units.parse(self.units, field="units"))
        object.__setattr__(self, "positions", Positions.parse(self.positions,
                                                              field="positions"))
        Engine.parse(self.engine, field="engine")
        for name, lo in (("max_new_tokens", 1), ("batch_size", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise SteerlabError(f"got {v!r}; expected an integer >= {lo}", field=name)
        for name in ("min_coherence", "min_distinct"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise SteerlabError(f"got {v!r}; expected a number in [0, 1]", field=name)


@dataclass(frozen=True)
class SteeringEval:
    """Result of :func:`evaluate_steering`: baselines, every rated setting, the chosen one and
    the controls (a random vector of equal norm and, when given, a shuffled-label vector), all
    on the same held-out questions. ``units`` is what the strengths are in."""

    unsteered: Setting
    prompted: Setting
    sweep: tuple[Setting, ...]
    best: Setting
    random: Setting
    min_coherence: float
    shuffled: Setting | None = None
    units: str = Units.NORM.value
    questions: tuple[str, ...] = field(default=(), repr=False)
    config: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def floor(self) -> float:
        """The coherence a setting needs to be chosen (``min_coherence`` x unsteered)."""
        return self.min_coherence * self.unsteered.coherence

    def gap_closed(self, s: Setting) -> float:
        """Share of the coherent-trait gap (unsteered -> prompted with the trait instruction)
        that ``s`` closes."""
        gap = self.prompted.coherent_trait - self.unsteered.coherent_trait
        return (s.coherent_trait - self.unsteered.coherent_trait) / gap if gap else float("nan")

    def save(self, path: str | os.PathLike) -> None:
        """Write the whole evaluation as JSON (atomically)."""
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> SteeringEval:
        """Read an evaluation written by :meth:`save`."""
        d = read_json(path, "steering evaluation")
        try:
            settings = {k: Setting.from_dict(d[k]) for k in ("unsteered", "prompted", "best",
                                                             "random")}
            return cls(**settings, sweep=tuple(Setting.from_dict(x) for x in d["sweep"]),
                       min_coherence=float(d["min_coherence"]),
                       shuffled=Setting.from_dict(d["shuffled"]) if d.get("shuffled") else None,
                       units=str(d.get("units", Units.RAW.value)),
                       questions=tuple(d.get("questions", ())), config=d.get("config", {}))
        except (KeyError, TypeError) as err:
            raise SteerlabError(f"not a steering evaluation ({err})", source=str(path)) from None


def evaluate_steering(
    model: Any,
    vector: SteeringVector,
    questions: Sequence[str],
    scorer: Scorer,
    *,
    trait_instruction: str,
    layers: Sequence[int | Sequence[int]] | None = None,
    strengths: Sequence[float] | None = None,
    config: EvalConfig = EvalConfig(),
    shuffled: SteeringVector | None = None,
    resume: str | os.PathLike | None = None,
    progress: bool = True,
) -> SteeringEval:
    """Rate unsteered, prompted and steered answers on held-out questions; choose the best
    setting; run the controls at it.

    Without ``strengths`` the strength of every layer group is searched automatically
    (:func:`steerlab.evaluation.calibrate.search_strengths`: raised until coherence falls below the
    floor, then refined); with them, every group x strength is rated (a fixed sweep). The best
    setting has the highest coherent trait among settings whose coherence is at least
    ``min_coherence`` x unsteered. All candidates of a round run as one batch of greedy
    generations (per-row strengths; groups steer their own rows only).

    Args:
        model: a bridge.
        vector: the steering vector.
        questions: held-out questions.
        scorer: trait score 0..100 of an answer.
        trait_instruction: system prompt of the "prompted" reference answers.
        layers: layer groups: ``12`` steers layer 12, ``(10, 12, 14)`` those three together at
            one strength each (default: :func:`spread_groups` of the vector's layers, every
            run of three adjacent layers, which kept coherence best in docs/validation.md).
        strengths: a fixed list of strengths instead of the search (in ``config.units``).
        config: units, positions, search, coherence thresholds, answer length.
        shuffled: a shuffled-label vector (``fit_vector(..., shuffle_seed=0)``), the second
            control.
        resume: a JSONL file of rated settings: appended to as they finish; a rerun with the
            same inputs skips what it holds (another evaluation's file is refused).
        progress: show a progress bar.

    Examples:
        >>> ev = sl.evaluate_steering(model, vec, trait.held_out_questions, trait.build_scorer(),
        ...                           trait_instruction=trait.trait_instruction,
        ...                           layers=[10, 12])  # doctest: +SKIP
        >>> ev.best.label, ev.best.alpha, ev.gap_closed(ev.best)  # doctest: +SKIP
    """
    if not questions:
        raise SteerlabError("no held-out questions to evaluate on", field="questions")
    groups = _groups(spread_groups(vector.layers) if layers is None else layers)
    fixed = None if strengths is None else [float(a) for a in strengths]
    if fixed is not None and not fixed:
        raise SteerlabError("give at least one strength, or none to search", field="strengths")
    # one checked steering per layer (width, layers, units, finite strengths) before generating
    base = {layer: Steering.create(model, vector, 0.0, layers=[layer],
                                   positions=config.positions, units=config.units,
                                   preserve_norm=config.preserve_norm)
            for layer in sorted({x for g in groups for x in g})}
    if fixed is not None:
        next(iter(base.values())).with_alpha(fixed)  # finite numbers
    rater = AnswerRater.for_questions(model, questions, scorer, trait_instruction,
                                      min_distinct=config.min_distinct,
                                      nll_margin=config.nll_margin)
    run = _Run(model, config, base, rater, _Points(resume, _fingerprint(
        model, vector, questions, trait_instruction, config, shuffled)))
    points = len(groups) * len(fixed) if fixed else config.search.most_points(len(groups))
    with run.store, progress_bar(2 + points + 2, "steering eval", enabled=progress) as bar:
        run.calibrate()
        unsteered = run.baseline("unsteered", run.prompts)
        prompted = run.baseline("prompted", run.prompted_in)
        bar.update(2)
        floor = config.min_coherence * unsteered.coherence
        sweep = run.sweep(groups, fixed, floor, bar.update)
        best = _best(sweep, floor)
        controls = {"random": random_like(vector, config.seed), "shuffled": shuffled}
        done = {kind: run.control(kind, vec, best, bar.update) for kind, vec in controls.items()}
    return SteeringEval(unsteered, prompted, tuple(sweep), best, done["random"],
                        config.min_coherence, done["shuffled"], config.units.value,
                        tuple(questions), _config_dict(config))


def _best(sweep: list[Setting], floor: float) -> Setting:
    """The highest coherent trait among settings at or above ``floor``, else the most coherent."""
    ok = [s for s in sweep if s.coherence >= floor]
    return (max(ok, key=lambda s: (s.coherent_trait, -abs(s.alpha))) if ok
            else max(sweep, key=lambda s: s.coherence))


class _Run:
    """The steps of one :func:`evaluate_steering` run (each reuses the points stored)."""

    def __init__(self, model: Any, config: EvalConfig, base: dict[int, Steering],
                 rater: AnswerRater, store: _Points):
        self.model, self.config, self.base = model, config, base
        self.rater, self.store = rater, store
        self.prompts, self.prompted_in = rater.contexts
        self.n = len(self.prompts)
        self.rows_per_batch = max(1, config.batch_size // self.n)

    def answers(self, rows: list[list[int]], per_layer: dict[int, Steering]
                ) -> tuple[list[list[int]], list[str]]:
        """Greedy answers (tokens and texts) to ``rows`` with ``per_layer`` in force."""
        with ExitStack() as stack:
            for s in per_layer.values():
                stack.enter_context(s.apply(self.model))
            try:
                tokens = generate(self.model, rows, max_new_tokens=self.config.max_new_tokens,
                                  engine=self.config.engine).tokens
            except NonFiniteError as err:  # a strength past the model's range: rated as is
                log.warning("%d replies went non-finite; rated on what came before", len(err.rows))
                tokens = err.tokens
        return tokens, [self.model.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]

    def calibrate(self) -> None:
        """Set the rater's reference NLL from unsteered answers (stored: a resume reuses them)."""
        tokens = self.store.get("reference-tokens")
        if tokens is None:
            tokens = self.answers(self.prompts, {})[0]
            self.store.put("reference-tokens", tokens)
        self.rater = self.rater.calibrate(tokens)

    def baseline(self, kind: str, rows: list[list[int]]) -> Setting:
        """The unsteered answers to ``rows`` rated as ``kind``."""
        return self.store.get(kind) or self.store.put(kind, self.rater(*self.answers(rows, {})))

    def rate(self, cands: list[Candidate]) -> list[Setting]:
        """Rate (layer group, strength) candidates, each row at its own group and strength."""
        out: dict[Candidate, Setting] = {c: got for c in cands
                                         if (got := self.store.get(_key(c))) is not None}
        todo = [c for c in cands if c not in out]
        for at in range(0, len(todo), self.rows_per_batch):
            chunk = todo[at : at + self.rows_per_batch]
            per_layer = {layer: self.base[layer].with_alpha(
                [a if layer in g else 0.0 for g, a in chunk for _ in range(self.n)])
                for layer in {x for g, _ in chunk for x in g}}
            toks, texts = self.answers(self.prompts * len(chunk), per_layer)
            for i, c in enumerate(chunk):
                part = slice(i * self.n, (i + 1) * self.n)
                out[c] = self.store.put(_key(c), self.rater(toks[part], texts[part], *c))
        return [out[c] for c in cands]

    def sweep(self, groups: list[tuple[int, ...]], fixed: list[float] | None, floor: float,
              on_round: Callable[[int], Any]) -> list[Setting]:
        """Every group at every ``fixed`` strength, else at those the strength search tries."""
        search = self.config.search
        if fixed is not None:
            sweep = self.rate([(g, a) for g in groups for a in fixed])
            on_round(len(sweep))
        else:
            sweep = [r for _, r in search_strengths(self.rate, groups, floor, search,
                                                    cost=self.n, on_round=on_round)]
        if not sweep:
            raise SteerlabError(f"the budget ({search.budget} generations) does not cover one "
                                f"strength per layer group ({self.n * len(groups)})",
                                field="search.budget")
        return sorted(sweep, key=lambda s: (s.layers, s.alpha))

    def control(self, kind: str, vec: SteeringVector | None, best: Setting,
                on_done: Callable[[], Any]) -> Setting | None:
        """The control vector ``vec`` (``None``: none) rated at ``best``'s layers and strength."""
        if vec is None:
            return None
        got = self.store.get(kind)
        if got is None:
            c = self.config
            steer_with = {x: Steering.create(
                self.model, vec, best.alpha, layers=[x], positions=c.positions,
                units=c.units, preserve_norm=c.preserve_norm) for x in best.layers}
            got = self.store.put(kind, self.rater(*self.answers(self.prompts, steer_with),
                                                  best.layers, best.alpha))
        on_done()
        return got


def spread_groups(layers: Sequence[int], width: int = 3) -> list[tuple[int, ...]]:
    """Every run of ``width`` adjacent layers (in sorted order), e.g. ``[8, 10, 12, 14]`` gives
    ``[(8, 10, 12), (10, 12, 14)]``; fewer layers than ``width`` give one group of them all.

    Examples:
        >>> spread_groups([6, 8, 10, 12])
        [(6, 8, 10), (8, 10, 12)]
    """
    ordered = sorted(int(x) for x in layers)
    if len(ordered) <= width:
        return [tuple(ordered)]
    return [tuple(ordered[i : i + width]) for i in range(len(ordered) - width + 1)]


def _groups(layers: Sequence[int | Sequence[int]]) -> list[tuple[int, ...]]:
    out = []
    for item in layers:
        g = (item,) if isinstance(item, int) else tuple(item)
        if not g or any(isinstance(x, bool) or not isinstance(x, int) for x in g):
            raise SteerlabError(f"got {item!r}; expected a layer or a group of layers",
                                field="layers")
        out.append(tuple(g))
    if not out or len(set(out)) != len(out):
        raise SteerlabError(f"expected distinct layer groups; got {out}", field="layers")
    return out


def _key(c: Candidate) -> str:
    return f"{'+'.join(map(str, c[0]))}@{c[1]!r}"


def _config_dict(config: EvalConfig) -> dict[str, Any]:
    d = asdict(config)
    d["units"], d["positions"] = config.units.value, config.positions.value
    return d


def _fingerprint(model: Any, vector: SteeringVector, questions: Sequence[str],
                 instruction: str, config: EvalConfig, shuffled: SteeringVector | None) -> str:
    h = hashlib.sha256()
    for v in (vector, shuffled):
        if v is not None:
            h.update(v.directions.detach().float().cpu().numpy().tobytes())
            h.update(repr(v.layers).encode())
    rest = {k: v for k, v in _config_dict(config).items()
            if k not in ("batch_size", "search", "engine")}
    h.update(json.dumps([model_id(model), list(questions), instruction, rest]).encode())
    return h.hexdigest()[:16]


POINTS_BUSY = "another evaluation writes these points"


def points_lock(path: str | os.PathLike) -> Path:
    """The lock file of an evaluation's resumable points file."""
    p = Path(path)
    return p.with_name(p.name + ".lock")


class _Points:
    """Rated settings of one evaluation in a JSONL file (``None``: in memory only)."""

    def __init__(self, path: str | os.PathLike | None, key: str):
        self.path, self.key = (None if path is None else Path(path)), key
        self.items: dict[str, Any] = {}
        self._stack = ExitStack()
        self._write: Any = None

    def __enter__(self) -> _Points:
        if self.path is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stack.enter_context(flock(points_lock(self.path), busy=POINTS_BUSY))
        for n, rec in enumerate(read_jsonl(self.path), 1):
            if rec.get("key") != self.key:
                raise SteerlabError(
                    "holds the points of another evaluation (another vector, questions, model "
                    "or settings); delete it or choose another output",
                    source=f"{self.path}:{n}", field="key")
            self.items[rec["name"]] = rec["value"]
        self._write = self._stack.enter_context(append_jsonl(self.path))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def get(self, name: str) -> Any:
        v = self.items.get(name)
        return Setting.from_dict(v) if isinstance(v, dict) else v

    def put(self, name: str, value: Any) -> Any:
        stored = asdict(value) if isinstance(value, Setting) else value
        self.items[name] = stored
        if self._write is not None:
            self._write({"key": self.key, "name": name, "value": stored})
        return value
