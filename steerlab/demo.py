"""The end-to-end demo: trait pairs -> HDF5 capture -> vectors -> steering sweep -> report.

:func:`run_demo` runs the whole pipeline on one model (the embedded one by default) into a
folder, stage by stage, each stage resuming from what an interrupted run left:

1. ``pairs/``: collect several answers per question with the trait's positive vs negative
   instruction (the first greedy, the rest sampled), judge them with the trait's scorer, keep
   each question's best-separated loop-free pair with a score difference >= ``threshold``;
2. ``activations.h5``: capture both answers at the divergence token and their response means;
3. ``vector.safetensors``: difference of the response means; ``probe``: held-out accuracy of a
   logistic probe per layer;
4. ``steering-eval.json|.html``: the automatic strength search per layer (norm units) on the
   held-out questions, random and shuffled-label controls, the validation report;
5. ``personae/``: a small persona-entropy run (prompts x personae of every category);
6. ``report.html`` and ``summary.json``.
"""

from __future__ import annotations

import html
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

from steerlab.base.checks import output_dir
from steerlab.base.errors import SteerlabError
from steerlab.base.files import read_jsonl, write_json_atomic
from steerlab.evaluation.calibrate import Search
from steerlab.evaluation.evaluate import EvalConfig, evaluate_steering, points_lock
from steerlab.evaluation.verdict import write_validation
from steerlab.extraction.extractor import extract
from steerlab.extraction.fitters import fit_vector, shuffled_control
from steerlab.extraction.store import activation_files
from steerlab.generation.engine import Engine
from steerlab.inference.geometry import persona_space
from steerlab.inference.infer import InferConfig, load_prompts, run_inference
from steerlab.inference.results import load_results
from steerlab.model.loading import load_from_options
from steerlab.model.options import ModelOptions
from steerlab.model.personas import load_personae
from steerlab.reporting.figures import steering_figure, summary_figures
from steerlab.reporting.pages import html_table, write_page
from steerlab.reporting.persona_figures import persona_space_figures
from steerlab.steering.vector import vector_paths
from steerlab.traits.collection import SAMPLES, collect
from steerlab.traits.judging import MIN_DISTINCT, THRESHOLD, filter_pairs, judge, scorer_judge
from steerlab.traits.responders import ANSWER_TOKENS, LocalResponder
from steerlab.traits.trait import DEFAULT_TRAIT, load_trait, trait_file

log = logging.getLogger(__name__)

# The persona-entropy run's prompts and personae: package data (steerlab/builtin/data).
DATA = files("steerlab.builtin") / "data"


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs; the defaults take about 10 minutes on 2 CPU cores."""

    model: ModelOptions = ModelOptions()  # which model, where (device, dtype, attention)
    trait: str = DEFAULT_TRAIT
    n_questions: int | None = None  # None: all of the trait's questions
    n_held_out: int | None = None  # None: all held-out questions
    max_tokens: int = ANSWER_TOKENS  # answers collected for the pairs
    samples: int = SAMPLES  # answers per question and side (the first greedy)
    threshold: float = THRESHOLD
    min_distinct: float = MIN_DISTINCT
    layers: tuple[int, ...] = (10, 12, 14, 16)  # captured; steered in runs of three
    strengths: tuple[float, ...] | None = None  # None: the automatic search (norm units)
    search: Search = Search()
    eval_tokens: int = 40
    n_prompts: int = 4  # persona-entropy run: prompts from the built-in prompts.json ...
    personae_per_category: int = 2  # ... times this many personae of each category
    persona_tokens: int = 48
    engine: str = "auto"  # how every generation runs (see steerlab.generation.engine.Engine)

    @classmethod
    def quick(cls) -> DemoConfig:
        """A small run (about 2 minutes on 2 cores) that exercises every stage."""
        return cls(n_held_out=8, samples=2, layers=(12, 16), search=Search(refine=1),
                   eval_tokens=24, n_prompts=2, personae_per_category=1, persona_tokens=24)


@dataclass(frozen=True)
class DemoSummary:
    """The demo's numbers, all read from the run (also written to ``summary.json``)."""

    model: str
    trait: str
    pairs_collected: int
    pairs_kept: int
    best_layers: str
    best_alpha: float
    units: str
    trait_unsteered: float
    trait_prompted: float
    trait_steered: float
    coherence_unsteered: float
    coherence_steered: float
    gap_closed: float
    gap_low: float
    gap_high: float
    random_gap_closed: float
    shuffled_gap_closed: float
    passed: bool
    verdict: str
    probe_accuracy: float
    persona_results: int
    report: str
    seconds: float

    def lines(self) -> list[str]:
        """The printed summary, one line per fact."""
        return [
            f"pairs kept: {self.pairs_kept} of {self.pairs_collected} questions",
            f"best setting: layer {self.best_layers}, strength {self.best_alpha:.3g} "
            f"({self.units} units)",
            f"trait score (coherent answers): unsteered {self.trait_unsteered:.1f}, steered "
            f"{self.trait_steered:.1f}, prompted with the positive instruction "
            f"{self.trait_prompted:.1f}",
            f"gap closed: {self.gap_closed:.0%} [95% CI {self.gap_low:.0%}, "
            f"{self.gap_high:.0%}] (random vector of equal norm: {self.random_gap_closed:.0%}, "
            f"shuffled labels: {self.shuffled_gap_closed:.0%})",
            f"coherence: unsteered {self.coherence_unsteered:.2f}, steered "
            f"{self.coherence_steered:.2f}",
            f"probe accuracy at layer {self.best_layers} (held out): {self.probe_accuracy:.2f}",
            ("PASS: " if self.passed else "FAIL: ") + self.verdict,
            *([] if self.passed else [
                "FAIL means this vector does not steer this model measurably on this trait "
                "(it is not a crash): try a trait the model can play when prompted (see the "
                "prompted score), more questions or samples, or other layers"]),
            f"persona-entropy results: {self.persona_results}",
            f"report: {self.report}",
        ]


def _pick_personae(personae: Sequence[Any], per_category: int) -> list[Any]:
    seen: dict[str, int] = {}
    out = []
    for p in personae:
        if seen.get(p.category, 0) < per_category:
            seen[p.category] = seen.get(p.category, 0) + 1
            out.append(p)
    return out


def _demo_files(out: Path) -> list[Path]:
    """Every file and folder a demo writes in ``out`` (the stages' names, each file with
    what it owns: an activation file's parts and lock, a vector's sidecar, a points lock)."""
    points = out / "steering-eval.points.jsonl"
    return [out / "demo-config.json", out / "pairs", *activation_files(out / "activations.h5"),
            *vector_paths(out / "vector"), out / "probe.json", points, points_lock(points),
            *(out / f"steering-eval.{x}" for x in ("json", "html")), out / "personae",
            out / "report.html", out / "summary.json"]


def run_demo(out_dir: str | os.PathLike, config: DemoConfig = DemoConfig(), *,
             model: Any = None, progress: bool = True) -> DemoSummary:
    """Run the whole pipeline into ``out_dir`` and return its summary.

    Args:
        out_dir: the run folder (created; rerun with the same folder to resume).
        config: what to run (:meth:`DemoConfig.quick` for a small run).
        model: an already loaded bridge (default: load ``config.model``).
        progress: show progress bars.

    Examples:
        >>> s = run_demo("demo-run")  # doctest: +SKIP
        >>> print("\\n".join(s.lines()))  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    out = output_dir(out_dir, "output_dir", owns=_demo_files(Path(out_dir)),
                     inputs={"trait": trait_file(config.trait),
                             "model": config.model.local_files() if model is None else ()})
    Engine.parse(config.engine, field="engine")
    trait = load_trait(config.trait)
    questions = list(trait.questions)[: config.n_questions]
    held_out = list(trait.held_out_questions)[: config.n_held_out]
    if not questions or not held_out or not trait.positive_instructions:
        raise SteerlabError("the demo needs questions, held-out questions and positive and "
                            "negative instructions", source=config.trait)
    trait.build_scorer()  # a trait judged only by an LLM rubric is refused before any work
    prompts, personae = _persona_inputs(config)
    bridge = model if model is not None else load_from_options(config.model)
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs and the model are good
    write_json_atomic(out / "demo-config.json", asdict(config))
    run = _Stages(out, bridge, trait, config, progress)
    pairs, collected = run.pairs(questions)
    h5 = run.capture(pairs)
    vector, accuracy = run.fit(h5)
    ev, validation = run.evaluate(vector, h5, held_out)
    records = run.personae(prompts, personae)
    space = run.space()

    log.info("demo: 6/6 report")
    b, steered = ev.best, validation.row("steered")
    summary = DemoSummary(
        model=config.model.model, trait=trait.name, pairs_collected=collected,
        pairs_kept=len(pairs), best_layers=b.label, best_alpha=b.alpha, units=ev.units,
        trait_unsteered=ev.unsteered.coherent_trait, trait_prompted=ev.prompted.coherent_trait,
        trait_steered=b.coherent_trait, coherence_unsteered=ev.unsteered.coherence,
        coherence_steered=b.coherence, gap_closed=steered.gap_closed,
        gap_low=steered.gap_low, gap_high=steered.gap_high,
        random_gap_closed=validation.row("random").gap_closed,
        shuffled_gap_closed=validation.row("shuffled").gap_closed,
        passed=validation.passed, verdict="; ".join(validation.reasons),
        probe_accuracy=sum(accuracy[x] for x in b.layers) / len(b.layers),
        persona_results=len(records), report=str(out / "report.html"),
        seconds=round(time.perf_counter() - t0, 1))
    write_demo_page(out / "report.html", summary, ev, validation, accuracy, records, space)
    write_json_atomic(out / "summary.json", asdict(summary))
    return summary


def _persona_inputs(config: DemoConfig) -> tuple[list[str], list[Any]]:
    """The persona-entropy run's prompts and personae, from the package data."""
    with as_file(DATA / "prompts.json") as f:
        prompts = load_prompts(f)[: config.n_prompts]
    with as_file(DATA / "personae.json") as f:
        personae = _pick_personae(load_personae(f), config.personae_per_category)
    return prompts, personae


@dataclass(frozen=True)
class _Stages:
    """The demo's stages 1 to 5 on one model, trait and config, each writing into the run
    folder ``out`` and resuming from what an interrupted run left there."""

    out: Path
    bridge: Any
    trait: Any
    config: DemoConfig
    progress: bool

    def pairs(self, questions: list[str]) -> tuple[list[Any], int]:
        """1/6: answers with the first positive and negative instruction, judged by the
        trait's scorer, filtered into pairs; also how many questions were answered."""
        log.info("demo: 1/6 trait pairs: collect, judge, filter")
        c, t, pd = self.config, self.trait, self.out / "pairs"
        pd.mkdir(exist_ok=True)
        pos = LocalResponder(self.bridge, t.positive_instructions[0], max_tokens=c.max_tokens,
                             engine=c.engine)
        neg = LocalResponder(self.bridge, t.negative_instructions[0], max_tokens=c.max_tokens,
                             engine=c.engine)
        collect(questions, pos, neg, pd / "collected.jsonl", samples=c.samples,
                progress=self.progress)
        judge(pd / "collected.jsonl", pd / "judged.jsonl", scorer_judge(t.build_scorer()),
              progress=self.progress)
        pairs = filter_pairs(pd / "collected.jsonl", pd / "judged.jsonl", pd / "pairs.jsonl",
                             threshold=c.threshold, min_distinct=c.min_distinct)
        collected = len({r["id"] for r in read_jsonl(pd / "collected.jsonl")})
        if len(pairs) < 4:
            raise SteerlabError(f"only {len(pairs)} pairs passed the filter; need at least 4",
                                source=str(pd / "pairs.jsonl"))
        return pairs, collected

    def capture(self, pairs: list[Any]) -> Path:
        """2/6: both answers of every pair at the divergence token and their response means."""
        log.info("demo: 2/6 capture activations")
        return extract(self.bridge, pairs, self.out / "activations.h5",
                       layers=self.config.layers, mean=True,
                       pairs_file=str(self.out / "pairs" / "pairs.jsonl"), progress=self.progress)

    def fit(self, h5: Path) -> tuple[Any, dict[int, float]]:
        """3/6: the mean-difference vector (saved) and a probe's held-out accuracy per layer."""
        log.info("demo: 3/6 fit vectors")
        vector, _ = fit_vector(h5, "mean-diff", mean=True)
        vector.save(self.out / "vector")
        _, probe = fit_vector(h5, "probe", mean=True)
        accuracy = dict(zip(self.config.layers, probe.accuracy.tolist(), strict=True))
        write_json_atomic(self.out / "probe.json", {str(k): v for k, v in accuracy.items()})
        return vector, accuracy

    def evaluate(self, vector: Any, h5: Path, held_out: list[str]) -> tuple[Any, Any]:
        """4/6: the strength search over spread layer groups with both controls, and its
        validation report."""
        log.info("demo: 4/6 steering sweep")
        c, t = self.config, self.trait
        ev = evaluate_steering(self.bridge, vector, held_out, t.build_scorer(),
                               trait_instruction=t.prompted_instruction,  # spread groups
                               strengths=c.strengths,
                               config=EvalConfig(search=c.search, max_new_tokens=c.eval_tokens,
                                                 engine=c.engine),
                               shuffled=shuffled_control(vector, h5),
                               resume=self.out / "steering-eval.points.jsonl",
                               progress=self.progress)
        validation = write_validation(self.out / "steering-eval", ev, trait=t.name)
        return ev, validation

    def personae(self, prompts: list[str], personae: list[Any]) -> list[dict]:
        """5/6: the persona-entropy run and its records."""
        log.info("demo: 5/6 persona entropy")
        c = self.config
        run_inference(self.bridge, prompts, personae, self.out / "personae",
                      InferConfig(model=c.model.model, max_tokens=c.persona_tokens,
                                  batch_size=64, engine=c.engine, capture_layers=c.layers),
                      progress=self.progress)
        return load_results(self.out / "personae")

    def space(self) -> Any:
        """The persona space of the persona run (None, with the reason logged, when its
        personae do not span the assistant category and another)."""
        try:
            return persona_space(self.out / "personae", n_boot=500)
        except SteerlabError as err:
            log.warning("demo: no persona-space figures: %s", err)
            return None


def write_demo_page(path: Path, summary: DemoSummary, ev: Any, validation: Any,
                 accuracy: dict[int, float], records: Sequence[dict],
                 space: Any = None) -> Path:
    """Write the demo's standalone HTML page (plotly inlined once, no network needed), with
    the persona space's PC and assistant-axis figures when ``space`` is given."""
    import plotly.graph_objects as go  # deferred: plotly
    import plotly.io as pio  # deferred: plotly

    probe = go.Figure(go.Bar(x=[str(k) for k in accuracy], y=list(accuracy.values())))
    probe.update_layout(title="Probe accuracy on held-out pairs", xaxis_title="layer",
                        yaxis_range=[0, 1], height=320)
    examples = [{"question": q, "unsteered": u, "steered": s, "prompted": p}
                for q, u, s, p in zip(ev.questions, ev.unsteered.answers, ev.best.answers,
                                      ev.prompted.answers, strict=False)][:8]
    persona = summary_figures(records)
    mapped = [] if space is None else [f for name, f in persona_space_figures(space).items()
                                       if name in ("pc", "axis")]
    figs = [steering_figure(ev), probe, *persona.values(), *mapped]
    plots = [pio.to_html(f, include_plotlyjs=i == 0, full_html=False) for i, f in enumerate(figs)]
    body = (f"<h1>steerlab demo: {html.escape(summary.trait)} on "
            f"{html.escape(summary.model)}</h1><pre>"
            + html.escape("\n".join(summary.lines())) + "</pre>"
            "<h2>Steering validation</h2><pre>" + html.escape("\n".join(validation.lines()))
            + "</pre><p>Every setting and example: <a href='steering-eval.html'>"
            "steering-eval.html</a></p>" + plots[0] + plots[1]
            + "<h2>Answers at the best setting</h2>" + html_table(examples)
            + "<h2>Persona entropy</h2>" + "".join(plots[2 : 2 + len(persona)])
            + ("<h2>Persona space</h2><p>Each persona's mean residual over its replies; the "
               "assistant axis is the assistant category's mean minus the others' "
               "(<code>steerlab personas map personae</code> writes all of it).</p>"
               + "".join(plots[2 + len(persona):]) if mapped else ""))
    return write_page(path, "steerlab demo", body)


def summary_json(path: str | os.PathLike) -> DemoSummary:
    """Read a run's ``summary.json`` back.

    Examples:
        >>> summary_json("demo-run/summary.json").gap_closed
    """
    return DemoSummary(**json.loads(Path(path).read_text(encoding="utf-8")))
