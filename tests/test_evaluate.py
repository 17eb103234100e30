"""Steering evaluation: coherence metrics against references; pirate steering on the real model."""

from __future__ import annotations

import pytest
import torch

from steerlab.base.errors import SteerlabError
from steerlab.evaluation.evaluate import EvalConfig, SteeringEval, evaluate_steering, spread_groups
from steerlab.evaluation.rating import AnswerRater, Setting, answer_nll
from steerlab.model.templates import encode_chat
from steerlab.reporting.figures import steering_figure
from steerlab.traits.scorers import distinct_n


def test_distinct_n_catches_repetition():
    assert distinct_n([1, 2, 3, 4, 5]) == 1.0
    assert distinct_n([7, 7, 7, 7, 7, 7]) == pytest.approx(1 / 5)
    assert distinct_n([1, 2, 1, 2, 1, 2, 1, 2]) == pytest.approx(2 / 7)
    assert distinct_n([3]) == 1.0


def test_answer_nll_matches_unbatched_cross_entropy(tiny_model, tokenizer):
    prompts = [encode_chat(tokenizer, "Hi"), encode_chat(tokenizer, "Tell me a longer thing.")]
    answers = [[100, 200, 300], [5, 6]]
    got = answer_nll(tiny_model, prompts, answers)
    for p, a, g in zip(prompts, answers, got, strict=True):
        with torch.inference_mode():
            logits = tiny_model.original_model(torch.tensor([p + a])).logits[0].float()
        want = torch.nn.functional.cross_entropy(logits[len(p) - 1 : -1], torch.tensor(a))
        assert g == pytest.approx(float(want), abs=1e-4)


def test_gap_and_figure():
    def s(layers, alpha, trait, coh=1.0):
        return Setting(layers, alpha, trait + 5, coh, 1.0, 1.0, coherent_trait=trait)

    sweep = (s((4,), 1.0, 30.0), s((4,), 2.0, 60.0, 0.5), s((2, 4), 1.0, 20.0))
    ev = SteeringEval(s((), 0.0, 10.0), s((), 0.0, 50.0), sweep, sweep[0], s((4,), 1.0, 11.0),
                      0.8)
    assert ev.gap_closed(ev.best) == pytest.approx(0.5)
    assert ev.gap_closed(ev.random) == pytest.approx(0.025)
    assert [x.label for x in sweep] == ["4", "4", "2+4"] and ev.unsteered.label == "-"
    # coherent trait, raw trait and coherence for each of two groups, and the random control
    fig = steering_figure(ev)
    assert len(fig.data) == 7
    # one colour per layer group, lines and markers alike, in every panel
    for group in ("4", "2+4"):
        traces = [t for t in fig.data if t.legendgroup == group]
        assert len(traces) == 3
        assert len({(t.line.color, t.marker.color) for t in traces}) == 1
        assert traces[0].line.color == traces[0].marker.color
    assert len({t.line.color for t in fig.data if t.legendgroup}) == 2
    # the two reference labels of a panel sit at different places
    refs = [a for a in fig.layout.annotations if a.text in ("unsteered", "prompted")]
    for axis in {a.xref for a in refs}:
        spots = [(a.x, a.xanchor, a.yanchor) for a in refs if a.xref == axis]
        assert len(spots) == 2 and len(set(spots)) == 2, spots


def test_spread_groups():
    assert spread_groups([14, 8, 10, 12]) == [(8, 10, 12), (10, 12, 14)]
    assert spread_groups([3, 5]) == [(3, 5)]
    assert spread_groups([1, 2, 3, 4], 2) == [(1, 2), (2, 3), (3, 4)]


TINY_QUESTIONS = ["Hi", "Tell me a thing.", "What now?"]


def length_score(text: str) -> float:
    return float(len(text) % 101)


def test_batched_groups_equal_each_setting_alone(tiny_model, tmp_path):
    """Every candidate of a round shares one batch (groups steer their own rows only): each
    setting's answers equal a run of that steering alone, and a resumed evaluation reads
    everything back without generating."""
    from steerlab.generation.generator import generate
    from steerlab.model.templates import encode_chat
    from steerlab.steering.intervention import Steering

    g = torch.Generator().manual_seed(0)
    vec = __import__("steerlab").SteeringVector(torch.randn(3, 64, generator=g), (0, 1, 2))
    cfg = EvalConfig(max_new_tokens=6, units="norm")
    ev = evaluate_steering(tiny_model, vec, TINY_QUESTIONS, length_score,
                           trait_instruction="Be long.", layers=[0, (1, 2)],
                           strengths=[0.5, 2.0], config=cfg, resume=tmp_path / "p.jsonl",
                           progress=False)
    assert [(x.layers, x.alpha) for x in ev.sweep] == [((0,), 0.5), ((0,), 2.0),
                                                        ((1, 2), 0.5), ((1, 2), 2.0)]
    tok = tiny_model.tokenizer
    prompts = [encode_chat(tok, q) for q in TINY_QUESTIONS]
    for x in ev.sweep:
        with Steering.create(tiny_model, vec, x.alpha, layers=list(x.layers),
                             units="norm").apply(tiny_model):
            alone = generate(tiny_model, prompts, max_new_tokens=6).texts(tok)
        assert list(x.answers) == alone, x.label
        assert x.scores == tuple(length_score(a) for a in alone)
    assert ev.units == "norm" and ev.questions == tuple(TINY_QUESTIONS)
    lines = (tmp_path / "p.jsonl").read_text().count("\n")
    again = evaluate_steering(tiny_model, vec, TINY_QUESTIONS, length_score,
                              trait_instruction="Be long.", layers=[0, (1, 2)],
                              strengths=[0.5, 2.0], config=cfg, resume=tmp_path / "p.jsonl",
                              progress=False)
    assert again == ev and (tmp_path / "p.jsonl").read_text().count("\n") == lines
    ev.save(tmp_path / "ev.json")
    assert SteeringEval.load(tmp_path / "ev.json") == ev
    # the same points file for another evaluation is refused, and left as it was
    before = (tmp_path / "p.jsonl").read_bytes()
    with pytest.raises(SteerlabError, match="another evaluation"):
        evaluate_steering(tiny_model, 2.0 * vec, TINY_QUESTIONS, length_score,
                          trait_instruction="Be long.", layers=[0], strengths=[0.5],
                          config=cfg, resume=tmp_path / "p.jsonl", progress=False)
    assert (tmp_path / "p.jsonl").read_bytes() == before


def test_search_mode_and_controls_on_a_tiny_model(tiny_model):
    from steerlab.evaluation.calibrate import Search

    g = torch.Generator().manual_seed(3)
    vec = __import__("steerlab").SteeringVector(torch.randn(2, 64, generator=g), (1, 2))
    search = Search(start=0.1, max_alpha=0.8, refine=1)
    ev = evaluate_steering(tiny_model, vec, TINY_QUESTIONS, length_score,
                           trait_instruction="Be long.", shuffled=-vec,
                           config=EvalConfig(max_new_tokens=4, search=search),
                           progress=False)
    assert {x.layers for x in ev.sweep} == {(1, 2)}  # the default: one spread group
    assert len(ev.sweep) <= search.most_points(1)
    assert ev.best in ev.sweep and ev.shuffled is not None
    assert (ev.random.layers, ev.random.alpha) == (ev.best.layers, ev.best.alpha)
    ok = [x for x in ev.sweep if x.coherence >= ev.floor]
    if ok:
        assert ev.best.coherent_trait == max(x.coherent_trait for x in ok)


@pytest.mark.parametrize("kwargs,field", [({"units": "volts"}, "units"),
                                          ({"positions": "some"}, "positions"),
                                          ({"max_new_tokens": 0}, "max_new_tokens"),
                                          ({"min_coherence": 1.5}, "min_coherence")])
def test_bad_eval_settings_name_the_field(kwargs, field):
    with pytest.raises(SteerlabError, match=field):
        EvalConfig(**kwargs)


# --- coherence on the embedded model --------------------------------------------------------

QUESTIONS = ["How do I boil an egg?", "Describe a forest.", "What is a good hobby?",
             "Tell me about the moon.", "How do I save money?", "What is friendship?"]


@pytest.fixture(scope="module")
def judged(embedded_model):
    from steerlab.generation.generator import generate
    from steerlab.traits.trait import load_trait

    t = load_trait("pirate")
    judge = AnswerRater.for_questions(embedded_model, QUESTIONS, t.build_scorer(),
                                      t.trait_instruction)
    tok = embedded_model.tokenizer
    g = generate(embedded_model, judge.contexts[0], max_new_tokens=32)
    return judge.calibrate(g.tokens), g.tokens, g.texts(tok)


@pytest.mark.slow
def test_verdicts_follow_their_definition(judged, embedded_model):
    """Each verdict, recomputed from its definition: distinct-2 >= min_distinct and the best
    NLL over both contexts <= the unsteered mean + margin (the rater skips the second context
    where the first already decides; the verdicts must not change)."""
    judge, tokens, texts = judged
    s = judge(tokens, texts)
    plain = answer_nll(embedded_model, judge.contexts[0], tokens)
    prompted = answer_nll(embedded_model, judge.contexts[1], tokens)
    assert judge.nll_ref == pytest.approx(sum(plain) / len(plain), rel=1e-6)
    bound = judge.nll_ref + judge.nll_margin
    want = tuple(distinct_n(t) >= judge.min_distinct and min(a, b) <= bound
                 for t, a, b in zip(tokens, plain, prompted, strict=True))
    # the rater batches the second context over fewer answers (other padding): NLLs agree to
    # ~1e-6, so a verdict may only differ for an answer that close to the bound
    close = [abs(min(a, b) - bound) < 1e-4 for a, b in zip(plain, prompted, strict=True)]
    assert all(g == w or c for g, w, c in zip(s.coherent, want, close, strict=True))
    want = s.coherent
    scores = [judge.scorer(t) for t in texts]
    assert s.coherence == pytest.approx(sum(want) / len(want))
    assert s.coherent_trait == pytest.approx(sum(x * k for x, k in zip(scores, want,
                                                                       strict=True)) / len(want))
    assert s.nll <= sum(plain) / len(plain) + 1e-6  # per answer the lower of two contexts


@pytest.mark.slow
def test_coherence_catches_loops_and_gibberish(judged, embedded_model):
    judge, tokens, texts = judged
    tok = embedded_model.tokenizer
    loop = tok("Aye, aye, aye, aye, aye, aye, aye, aye, aye, aye, aye!")["input_ids"]
    loops = judge([loop] * len(QUESTIONS), [tok.decode(loop)] * len(QUESTIONS))
    assert loops.coherence == 0.0 and loops.distinct < judge.min_distinct
    assert loops.trait > 50 and loops.coherent_trait == 0.0  # loud but not counted
    # the same tokens in a random order keep their distinct-2 but read as gibberish
    g = torch.Generator().manual_seed(0)
    shuffled = [[t[i] for i in torch.randperm(len(t), generator=g).tolist()] for t in tokens]
    gib = judge(shuffled, [tok.decode(t) for t in shuffled])
    assert gib.distinct > judge.min_distinct and gib.coherence == 0.0, gib.nll


def test_uncalibrated_judge_refuses(tiny_model):
    judge = AnswerRater.for_questions(tiny_model, ["Hi"], lambda t: 0.0, "Be a pirate.")
    with pytest.raises(SteerlabError, match="calibrate"):
        judge([[1, 2, 3]], ["x"])


@pytest.mark.slow
def test_vectors_eval_command(tmp_path):
    import json
    import subprocess
    import sys

    from steerlab.steering.vector import SteeringVector
    from steerlab.traits.trait import load_trait

    t = load_trait("pirate")
    small = {"name": "pirate-small", "trait_instruction": t.trait_instruction,
             "held_out_questions": list(t.held_out_questions[:3]), "scorer": t.scorer}
    (tmp_path / "small.json").write_text(json.dumps(small))
    vec = SteeringVector(torch.randn(2, 576, generator=torch.Generator().manual_seed(0)),
                         (10, 12)).save(tmp_path / "v")
    cmd = [sys.executable, "-m", "steerlab.cli", "vectors", "eval", str(vec), "--trait",
           str(tmp_path / "small.json"), "--layers", "12", "--strengths", "0.05,0.1",
           "--max-tokens", "8", "--output", str(tmp_path / "ev")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert [(s["layers"], s["alpha"]) for s in ev["sweep"]] == [([12], 0.05), ([12], 0.1)]
    assert len(ev["unsteered"]["answers"]) == 3 and (tmp_path / "ev.html").is_file()
    assert ev["units"] == "norm" and "in norm units" in run.stdout
    best = ev["best"]
    assert any(line.startswith("steered") and f"{best['alpha']:.3g}" in line
               for line in run.stdout.splitlines())
    # no activation file: the report says the shuffled control is missing
    assert "no shuffled-label control" in run.stdout
    # a layer the vector lacks: one error line, exit 2, earlier output untouched
    before = (tmp_path / "ev.json").read_bytes()
    bad = subprocess.run(cmd[:8] + ["--layers", "14"] + cmd[10:], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "layers" in bad.stderr, bad.stderr[-2000:]
    assert (tmp_path / "ev.json").read_bytes() == before
