"""``steerlab infer --capture-layers``: the mean residual over each reply, its thinking and its
output, against plain HF ``output_hidden_states``; resume and shards equal one run; bad layers
refused in one line before the model loads.

Tolerance: the run captures a left-padded batch (another attention shape, padded rows masked)
and averages with one einsum; the reference runs each row alone and averages with ``mean``.
Both are float32 sums of the same terms in another order, so they agree to a few eps of the
residual's scale per term of the longest reduction (d_model 576, 30 layers of accumulated
rounding): relative 1e-4 of each row's largest value holds with a wide margin and still fails
any wrong position, layer or section (those move the mean by percents).
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from conftest import run_cli

from steerlab.base.errors import SteerlabError
from steerlab.inference import activations as capture
from steerlab.inference.activations import capture_replies, section_spans
from steerlab.inference.infer import InferConfig, capture_layer_list, run_inference
from steerlab.inference.results import load_results, read_activations, read_per_token
from steerlab.inference.runs import merge_run
from steerlab.model.personas import Persona
from steerlab.model.templates import encode_chat, think_end_marker

PERSONAE = [Persona("assistant", "assistant", "an"), Persona("Hamlet", "fictional-character")]
PROMPTS = ["Who are you?", "Tell me, in a few careful words, about the sea."]  # left-padded
# -2, not -1: HF applies the final norm to its last hidden_states (hidden_states[n_layers]),
# while resid_post of the last layer is before it, so the reference holds below the last layer
LAYERS = (8, 12, -2)
CONFIG = InferConfig(max_tokens=6, batch_size=2, capture_layers=LAYERS)  # 4 tasks, 2 batches


def _close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal to 1e-4 of each row's largest magnitude (see the module docstring)."""
    scale = np.abs(want).max(-1, keepdims=True)
    assert np.all(np.abs(got - want) <= 1e-4 * scale), float(np.abs(got - want).max())


def _hf_means(model, prompt: list[int], reply: list[int], layers, spans) -> dict:
    """The reference: plain HF on one unpadded row, ``hidden_states[L + 1]`` averaged over each
    section's positions (NaN for an empty one)."""
    ids = torch.tensor([[*prompt, *reply]])
    with torch.inference_mode():
        hs = model.original_model(input_ids=ids, output_hidden_states=True).hidden_states
    out = {}
    for name, (lo, hi) in spans.items():
        rows = [hs[layer + 1][0, len(prompt) + lo : len(prompt) + hi].float().mean(0)
                for layer in layers]
        out[name] = torch.stack(rows).numpy()
    return out


@pytest.fixture(scope="module")
def whole(embedded_model, tmp_path_factory):
    """One uninterrupted run with capture."""
    return run_inference(embedded_model, PROMPTS, PERSONAE, tmp_path_factory.mktemp("c") / "run",
                         CONFIG, progress=False)


def test_capture_equals_hf_hidden_states(embedded_model, whole):
    acts = read_activations(whole)
    n_layers = embedded_model.cfg.n_layers
    assert acts.layers == (8, 12, n_layers - 2)  # -2 stored normalised
    with h5py.File(whole / "activations.h5") as f:
        assert f.attrs["format"] == "steerlab.activations.run/1"
        assert list(f.attrs["layers"]) == [8, 12, n_layers - 2]
        assert f.attrs["d_model"] == embedded_model.cfg.d_model
        assert f["reply"].dtype == np.float32
    records = load_results(whole)
    assert acts.record_id.tolist() == [r["id"] for r in records]
    assert acts.reply.shape == (4, 3, embedded_model.cfg.d_model)
    marker = think_end_marker(embedded_model.tokenizer)
    for row, rec in enumerate(records):
        persona = next(p for p in PERSONAE if p.persona == rec["persona"])
        prompt = encode_chat(embedded_model.tokenizer, rec["prompt"], persona=persona)
        reply = read_per_token(whole, rec["id"])["tokens"].tolist()
        assert len(reply) == rec["n_tokens"] > 0
        want = _hf_means(embedded_model, prompt, reply, acts.layers, section_spans(reply, marker))
        _close(acts.reply[row], want["reply"])
        _close(acts.output[row], want["output"])  # no </think>: the output is the reply
        assert np.isnan(acts.thinking[row]).all()


def test_thinking_and_output_split_at_the_marker(embedded_model):
    """A reply with ``</think>`` (several tokens for this tokenizer) in the middle: thinking is
    up to and including the marker, output after it; an empty reply is all NaN."""
    tok = embedded_model.tokenizer
    marker = think_end_marker(tok)
    head, tail = tok.encode("Blue is a colour.")[:4], tok.encode("Blue.")
    reply = [*head, *marker, *tail]
    spans = section_spans(reply, marker)
    end = len(head) + len(marker)
    assert spans == {"reply": (0, len(reply)), "thinking": (0, end), "output": (end, len(reply))}
    assert section_spans([], marker) == {"reply": (0, 0), "thinking": (0, 0), "output": (0, 0)}
    prompts = [encode_chat(tok, "Name a colour.", persona=p) for p in PERSONAE]
    got = capture_replies(embedded_model, prompts, [reply, []], [3, 20], marker)
    want = _hf_means(embedded_model, prompts[0], reply, [3, 20], spans)
    for name in ("reply", "thinking", "output"):
        _close(got[name][0], want[name])
        assert np.isnan(got[name][1]).all()  # a 0-token reply: NaN rows


def test_resume_after_a_failed_batch_equals_the_whole_run(embedded_model, whole, tmp_path,
                                                          monkeypatch):
    real, calls = capture.capture_replies, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr("steerlab.inference.infer.capture_replies", failing)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        run_inference(embedded_model, PROMPTS, PERSONAE, run, CONFIG, progress=False)
    assert len(list((run / "parts").glob("*.h5"))) == 1 and not (run / "activations.h5").exists()
    monkeypatch.undo()
    run_inference(embedded_model, PROMPTS, PERSONAE, run, CONFIG, progress=False)
    _assert_same_activations(run, whole)


def test_two_shards_and_merge_equal_one_run(embedded_model, whole, tmp_path):
    run = tmp_path / "run"
    for i in range(2):
        run_inference(embedded_model, PROMPTS, PERSONAE, run, CONFIG, shard=(i, 2),
                      progress=False)
    assert not (run / "activations.h5").exists()  # written by the merge
    merge_run(run)
    _assert_same_activations(run, whole)


def _assert_same_activations(a, b) -> None:
    """Bit-identical: the same batches through the same kernels in one process."""
    x, y = read_activations(a), read_activations(b)
    assert x.layers == y.layers and x.model == y.model
    for name in ("record_id", "reply", "thinking", "output"):
        np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=name)
    with h5py.File(a / "activations.h5") as fa, h5py.File(b / "activations.h5") as fb:
        assert {k: str(v) for k, v in fa.attrs.items()} == {k: str(v) for k, v in fb.attrs.items()}


def test_a_run_without_capture_has_no_activations(embedded_model, tmp_path):
    run = run_inference(embedded_model, PROMPTS[:1], PERSONAE[:1], tmp_path / "run",
                        InferConfig(max_tokens=4), progress=False)
    assert not (run / "activations.h5").exists()
    assert "capture_layers" not in (run / "config.json").read_text()  # identity as before
    with pytest.raises(SteerlabError) as err:
        read_activations(run)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and str(run) in message
    assert "has no captured activations (run steerlab infer with --capture-layers)" in message


@pytest.mark.parametrize("layers, expect", [
    ("30", "got 30"), ("-31", "got -31"), ("8,x", "comma-separated integers"),
    ("8,-22", "distinct"),
])
def test_bad_capture_layers_are_exit_2_before_the_model_loads(layers, expect, tmp_path, capsys,
                                                              tripwire):
    from test_infer import PERSONAE_JSON, PROMPTS_JSON

    out = tmp_path / "out"
    code = run_cli("infer", "--prompts-json", PROMPTS_JSON, "--personae-json", PERSONAE_JSON,
                   "--capture-layers", layers, "--output-dir", str(out))
    err = capsys.readouterr().err
    assert code == 2 and "field 'capture_layers'" in err and expect in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_capture_layers_in_the_library_are_refused_before_the_folder(embedded_model,
                                                                         tmp_path):
    for bad in [(30,), (-31,), (8, -22)]:
        with pytest.raises(SteerlabError, match="field 'capture_layers'"):
            run_inference(embedded_model, PROMPTS, PERSONAE, tmp_path / "run",
                          InferConfig(max_tokens=4, capture_layers=bad), progress=False)
    assert not (tmp_path / "run").exists()
    # values a YAML or JSON file may hold (the dataclass's annotation is checked under pytest)
    for bad in [[1.5], ["8"], 8, [True]]:
        with pytest.raises(SteerlabError, match="field 'capture_layers'"):
            capture_layer_list(bad, n_layers=30)
    assert capture_layer_list([8, -1], n_layers=30) == (8, 29)


def test_a_steering_limited_to_generated_tokens_is_refused(embedded_model, tmp_path):
    from steerlab.steering.intervention import Steering
    from steerlab.steering.vector import SteeringVector

    d = embedded_model.cfg.d_model
    vector = SteeringVector(torch.ones(1, d) / d**0.5, (8,))
    steering = Steering.create(embedded_model, vector, 1.0, positions="generated", units="raw")
    with steering.apply(embedded_model), \
            pytest.raises(SteerlabError, match="positions='generated'"):
        run_inference(embedded_model, PROMPTS, PERSONAE, tmp_path / "run", CONFIG,
                      progress=False)
    assert not (tmp_path / "run").exists()
