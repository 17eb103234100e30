"""The validation report: bootstrap intervals against a plain resampling loop, the verdict's
rules one at a time, text/Markdown/HTML from the same rows."""

from __future__ import annotations

import numpy as np
import pytest

from steerlab.evaluation.evaluate import SteeringEval
from steerlab.evaluation.rating import Setting
from steerlab.evaluation.verdict import Criteria, validation_report, write_validation_html


def setting(scores, coherent=None, layers=(12,), alpha=0.2):
    coherent = tuple(coherent if coherent is not None else [True] * len(scores))
    kept = [s * k for s, k in zip(scores, coherent, strict=True)]
    return Setting(tuple(layers), alpha, float(np.mean(scores)), float(np.mean(coherent)), 0.9,
                   2.0, float(np.mean(kept)), tuple(f"answer {i}" for i in range(len(scores))),
                   coherent, tuple(float(s) for s in scores))


def evaluation(steered, random=None, shuffled=None, prompted=None, n=12, seed=0):
    rng = np.random.default_rng(seed)
    un = setting(rng.uniform(0, 4, n), layers=(), alpha=0.0)
    pr = setting(prompted if prompted is not None else rng.uniform(40, 80, n), layers=(),
                 alpha=0.0)
    st = setting(steered)
    zero = np.zeros(n)
    return SteeringEval(un, pr, (st,), st, setting(zero if random is None else random), 0.8,
                        setting(zero if shuffled is None else shuffled), "norm",
                        tuple(f"q{i}" for i in range(n)))


def test_intervals_equal_a_plain_paired_bootstrap():
    rng = np.random.default_rng(1)
    ev = evaluation(rng.uniform(20, 70, 12))
    c = Criteria(n_boot=500, seed=3)
    rep = validation_report(ev, criteria=c)
    per = {k: np.array(s.scores) * np.array(s.coherent)
           for k, s in (("u", ev.unsteered), ("p", ev.prompted), ("s", ev.best))}
    idx = np.random.default_rng(3).integers(0, 12, size=(500, 12))
    gaps = []
    for row in idx:  # the reference: one resample of questions at a time, for every condition
        u, p, s = (per[k][row].mean() for k in "ups")
        gaps.append((s - u) / (p - u))
    lo, hi = np.percentile(gaps, [2.5, 97.5])
    got = rep.row("steered")
    assert (got.gap_low, got.gap_high) == pytest.approx((lo, hi), rel=1e-12)
    effect = [per["s"][row].mean() - per["u"][row].mean() for row in idx]
    assert (got.effect_low, got.effect_high) == pytest.approx(
        tuple(np.percentile(effect, [2.5, 97.5])), rel=1e-12)
    assert got.gap_closed == pytest.approx(ev.gap_closed(ev.best), rel=1e-12)
    assert got.gap_low <= got.gap_closed <= got.gap_high


def test_a_clear_effect_with_clean_controls_passes():
    rep = validation_report(evaluation(np.full(12, 60.0)), trait="t")
    assert rep.passed, rep.reasons
    text = "\n".join(rep.lines())
    assert "PASS" in text and "steered" in text and "shuffled" in text
    assert rep.markdown().count("\n") == 1 + len(rep.rows)


@pytest.mark.parametrize("case,needle", [
    ({"steered": np.full(12, 10.0)}, "under 50%"),
    ({"steered": np.full(12, 60.0), "random": np.full(12, 20.0)}, "random control"),
    ({"steered": np.full(12, 60.0), "shuffled": np.full(12, 20.0)}, "shuffled control"),
    ({"steered": np.full(12, 3.0), "prompted": np.full(12, 8.0)}, "prompted gap"),
])
def test_each_failed_rule_is_named(case, needle):
    rep = validation_report(evaluation(**case))
    assert not rep.passed and any(needle in r for r in rep.reasons), rep.reasons


def test_incoherent_best_and_a_lucky_question_fail():
    ev = evaluation(np.full(12, 60.0))
    bad = SteeringEval(ev.unsteered, ev.prompted, ev.sweep,
                       setting(np.full(12, 60.0), [True] * 6 + [False] * 6), ev.random,
                       0.8, ev.shuffled, "norm", ev.questions)
    assert any("coherence" in r for r in validation_report(bad).reasons)
    one = np.zeros(12)
    one[0] = 100.0  # all of the effect in one question: the interval reaches 0
    rep = validation_report(evaluation(one, prompted=np.full(12, 12.0)))
    assert rep.row("steered").effect_low <= 0 and not rep.passed
    assert any("may be chance" in r for r in rep.reasons)


def test_html_page_has_the_table_and_every_setting(tmp_path):
    ev = evaluation(np.full(12, 60.0))
    page = write_validation_html(tmp_path / "v.html", ev, validation_report(ev, trait="x"))
    text = page.read_text()
    assert "plotly" in text.lower() and "layer 12, alpha 0.2" in text and "PASS" in text
