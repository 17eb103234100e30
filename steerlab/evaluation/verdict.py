"""The validation report of a steering evaluation: conditions side by side with bootstrap
confidence intervals over questions, a verdict with its reasons, text and HTML.

One code path for every front end: ``steerlab vectors eval``, the demo and the notebooks all
print :meth:`ValidationReport.lines` and write :func:`write_validation_html`.

A vector *passes* when the chosen setting closes at least ``min_gap_closed`` (50%) of the
unsteered -> prompted gap in coherent trait score with the lower 95% bound of its effect (the
paired difference from unsteered; the bound of a gap *share* is unstable when the gap itself
is small) above 0, keeps
coherence at least ``min_coherence`` x unsteered, and both controls (a random vector of equal
norm and a shuffled-label vector) close at most ``max_control`` (5%). A prompted gap under
``min_gap_points`` (10) points is reported as too small to judge a vector by.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steerlab.evaluation.evaluate import SteeringEval
from steerlab.evaluation.rating import Setting
from steerlab.reporting.figures import steering_figure
from steerlab.reporting.pages import html_table, write_page

__all__ = ["Criteria", "Row", "ValidationReport", "validation_report", "write_validation_html"]


@dataclass(frozen=True)
class Criteria:
    """What a vector must show to pass (see the module docstring)."""

    min_gap_closed: float = 0.5
    max_control: float = 0.05
    min_gap_points: float = 10.0
    n_boot: int = 2000
    level: float = 0.95
    seed: int = 0


@dataclass(frozen=True)
class Row:
    """One condition: coherent trait (mean and CI), coherence, share of the gap closed (CI),
    and the effect over unsteered in points (CI of the paired difference)."""

    condition: str
    layers: str
    alpha: float
    coherent_trait: float
    trait_low: float
    trait_high: float
    coherence: float
    gap_closed: float
    gap_low: float
    gap_high: float
    effect_low: float = float("nan")
    effect_high: float = float("nan")


@dataclass(frozen=True)
class ValidationReport:
    """Rows for unsteered, prompted, best steered and the controls; the verdict and why."""

    trait: str
    units: str
    n_questions: int
    rows: tuple[Row, ...]
    passed: bool
    reasons: tuple[str, ...]

    def row(self, condition: str) -> Row:
        """The row of a condition (``"steered"``, ``"random"``, …)."""
        return next(r for r in self.rows if r.condition == condition)

    def lines(self) -> list[str]:
        """The report as text: a table, then the verdict."""
        out = [f"validation of {self.trait or 'the vector'} on {self.n_questions} held-out "
               f"questions (alpha in {self.units} units; 95% bootstrap intervals):",
               f"{'condition':<11}{'layers':<10}{'alpha':>7}  {'coherent trait':<22}"
               f"{'coherence':>9}  gap closed"]
        for r in self.rows:
            gap = ("" if r.condition in ("unsteered", "prompted") else
                   f"{r.gap_closed:6.0%} [{r.gap_low:.0%}, {r.gap_high:.0%}]  effect "
                   f"[{r.effect_low:+.1f}, {r.effect_high:+.1f}]")
            out.append(f"{r.condition:<11}{r.layers:<10}{r.alpha:>7.3g}  "
                       f"{r.coherent_trait:5.1f} [{r.trait_low:5.1f}, {r.trait_high:5.1f}]   "
                       f"{r.coherence:9.2f}  {gap}")
        out.append(("PASS: " if self.passed else "FAIL: ") + "; ".join(self.reasons))
        return out

    def markdown(self) -> str:
        """The table as Markdown (for docs and notebooks)."""
        head = ("| condition | layers | α | coherent trait [95% CI] | coherence | "
                "gap closed [95% CI] | effect vs unsteered [95% CI] |\n"
                "|---|---|---|---|---|---|---|")
        body = [f"| {r.condition} | {r.layers} | {r.alpha:.3g} | {r.coherent_trait:.1f} "
                f"[{r.trait_low:.1f}, {r.trait_high:.1f}] | {r.coherence:.2f} | "
                + ("– | –" if r.condition in ("unsteered", "prompted") else
                   f"{r.gap_closed:.0%} [{r.gap_low:.0%}, {r.gap_high:.0%}] | "
                   f"[{r.effect_low:+.1f}, {r.effect_high:+.1f}]") + " |"
                for r in self.rows]
        return "\n".join([head, *body])


def _per_question(s: Setting) -> np.ndarray:
    return np.array([x * k for x, k in zip(s.scores, s.coherent, strict=True)], dtype=float)


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    good = values[np.isfinite(values)]
    if not len(good):
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(good, [tail, 100 - tail])
    return float(lo), float(hi)


def validation_report(ev: SteeringEval, *, trait: str = "",
                      criteria: Criteria = Criteria()) -> ValidationReport:
    """Bootstrap the evaluation over questions (paired: one resample for every condition) and
    judge it against ``criteria``.

    Examples:
        >>> rep = sl.validation_report(ev, trait="pirate")
        >>> print("\\n".join(rep.lines()))
        validation of pirate on 2 held-out questions (alpha in norm units; 95% bootstrap
        intervals):
        condition  layers      alpha  coherent trait        coherence  gap closed
        unsteered ...
        prompted ...
        steered ...
        random ...
    """
    conditions = [("unsteered", ev.unsteered), ("prompted", ev.prompted), ("steered", ev.best),
                  ("random", ev.random)] + ([("shuffled", ev.shuffled)] if ev.shuffled else [])
    per = {name: _per_question(s) for name, s in conditions}
    n = len(per["unsteered"])
    if not n or any(len(v) != n for v in per.values()):
        raise ValueError("every condition needs per-question scores on the same questions")
    rng = np.random.default_rng(criteria.seed)
    idx = rng.integers(0, n, size=(criteria.n_boot, n))
    means = {k: v[idx].mean(axis=1) for k, v in per.items()}
    gap = means["prompted"] - means["unsteered"]
    with np.errstate(divide="ignore", invalid="ignore"):
        closed = {k: np.where(gap != 0, (m - means["unsteered"]) / gap, np.nan)
                  for k, m in means.items()}
    rows = []
    for name, s in conditions:
        t_lo, t_hi = _interval(means[name], criteria.level)
        g_lo, g_hi = _interval(closed[name], criteria.level)
        e_lo, e_hi = _interval(means[name] - means["unsteered"], criteria.level)
        rows.append(Row(name, s.label, s.alpha, s.coherent_trait, t_lo, t_hi, s.coherence,
                        ev.gap_closed(s), g_lo, g_hi, e_lo, e_hi))
    report = ValidationReport(trait, ev.units, n, tuple(rows), False, ())
    passed, reasons = _verdict(ev, report, criteria)
    return ValidationReport(trait, ev.units, n, tuple(rows), passed, tuple(reasons))


def _verdict(ev: SteeringEval, rep: ValidationReport, c: Criteria) -> tuple[bool, list[str]]:
    gap = ev.prompted.coherent_trait - ev.unsteered.coherent_trait
    best = rep.row("steered")
    bad: list[str] = []
    if gap < c.min_gap_points:
        bad.append(f"the prompted gap is {gap:.1f} points, under {c.min_gap_points:g}: the "
                   "trait instruction barely changes this model's answers, so there is little "
                   "for a vector to close")
    if not best.gap_closed >= c.min_gap_closed:
        bad.append(f"the best setting closes {best.gap_closed:.0%} of the gap, under "
                   f"{c.min_gap_closed:.0%}")
    if not best.effect_low > 0:
        bad.append(f"the lower bound of its effect over unsteered is {best.effect_low:.1f} "
                   "points, not above 0 (the gain may be chance)")
    if ev.best.coherence < ev.floor:
        bad.append(f"no setting keeps coherence >= {ev.floor:.2f} "
                   f"({ev.min_coherence:g} x unsteered); the best has {ev.best.coherence:.2f}")
    for name in ("random", "shuffled"):
        if any(r.condition == name for r in rep.rows):
            r = rep.row(name)
            if r.gap_closed > c.max_control:
                bad.append(f"the {name} control closes {r.gap_closed:.0%} (over "
                           f"{c.max_control:.0%}): the effect is not specific to the vector")
    if ev.shuffled is None:
        bad.append("no shuffled-label control was run (its activation file is needed)")
    if bad:
        return False, bad
    return True, [f"layer {best.layers}, alpha {best.alpha:.3g} closes {best.gap_closed:.0%} "
                  f"of a {gap:.1f}-point gap [{best.gap_low:.0%}, {best.gap_high:.0%}], "
                  f"+{best.effect_low:.1f} points at least, at coherence {best.coherence:.2f}; "
                  f"controls within {c.max_control:.0%}"]


def _examples(ev: SteeringEval, k: int) -> list[dict]:
    rows = []
    for name, s in (("unsteered", ev.unsteered), ("prompted", ev.prompted), *(
            (f"layer {x.label}, alpha {x.alpha:.3g}", x) for x in ev.sweep),
            ("random", ev.random), ("shuffled", ev.shuffled)):
        if s is None:
            continue
        for q, a, ok, score in list(zip(ev.questions, s.answers, s.coherent, s.scores,
                                        strict=False))[:k]:
            rows.append({"setting": name, "question": q, "answer": a,
                         "coherent": "yes" if ok else "no", "trait": score})
    return rows


def write_validation_html(path: str | os.PathLike, ev: SteeringEval,
                          report: ValidationReport, *, examples: int = 2,
                          extra: Sequence[str] = ()) -> Path:
    """A standalone HTML page: the table and verdict, the strength curves per layer group,
    and ``examples`` answers at every setting. ``extra`` is more HTML appended to the body.

    Examples:
        >>> write_validation_html("eval.html", ev, validation_report(ev, trait="pirate"))
    """
    import plotly.io as pio  # deferred: plotly

    body = (f"<h1>Steering validation: {html.escape(report.trait or 'vector')}</h1><pre>"
            + html.escape("\n".join(report.lines())) + "</pre><h2>Strength curves</h2>"
            + pio.to_html(steering_figure(ev), include_plotlyjs=True, full_html=False)
            + "".join(extra) + "<h2>Example answers at every setting</h2>"
            + html_table(_examples(ev, examples)))
    return write_page(path, f"steerlab validation: {report.trait}", body)


def write_validation(stem: str | os.PathLike, ev: SteeringEval, *, trait: str = "",
                     criteria: Criteria = Criteria()) -> ValidationReport:
    """The one way an evaluation is reported: its validation report, with the evaluation saved
    to ``<stem>.json`` and the report's page to ``<stem>.html`` (used by ``steerlab vectors
    eval``, the demo and the experiments).

    Examples:
        >>> from pathlib import Path
        >>> report = write_validation("runs/pirate-eval", ev, trait="pirate")
        >>> sorted(p.name for p in Path("runs").iterdir())
        ['pirate-eval.html', 'pirate-eval.json']
    """
    stem = Path(stem)
    report = validation_report(ev, trait=trait, criteria=criteria)
    ev.save(stem.with_name(stem.name + ".json"))
    write_validation_html(stem.with_name(stem.name + ".html"), ev, report)
    return report
