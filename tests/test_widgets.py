"""The notebook chat widget, driven from code on the tiny model."""

from __future__ import annotations

import pytest
import torch

from steerlab.base.errors import SteerlabError
from steerlab.steering.vector import SteeringVector

pytest.importorskip("ipywidgets")

from steerlab.chat.widget import SteeringChat, find_vectors  # noqa: E402


def _vector(layers: tuple[int, ...], norm: float, seed: int = 0) -> SteeringVector:
    d = torch.randn(len(layers), 64, generator=torch.Generator().manual_seed(seed))
    return SteeringVector(d / d.norm(dim=-1, keepdim=True) * norm, layers)


def _stream_texts(chat: SteeringChat) -> list[str]:
    return [o["text"] for o in chat.output.outputs if o.get("output_type") == "stream"]


def test_find_vectors(tmp_path):
    _vector((1,), 1.0).save(tmp_path / "b")
    _vector((2,), 1.0).save(tmp_path / "a")
    assert list(find_vectors(tmp_path)) == ["a", "b"]
    assert list(find_vectors([_vector((1,), 1.0)])) == ["vector 0"]
    with pytest.raises(SteerlabError, match="folder"):
        find_vectors(tmp_path / "nope")
    with pytest.raises(TypeError):  # SteerlabError, or the runtime type checker's error
        find_vectors({"x": torch.zeros(3)})


def test_slider_and_message_stream_a_reply(tiny_model, tmp_path):
    _vector((1, 2), 50.0).save(tmp_path / "random")
    chat = SteeringChat(tiny_model, vectors=tmp_path, max_tokens=10)
    assert chat.vector_picker.options == ("(none)", "random")

    plain = chat.send("Hello")
    streamed = _stream_texts(chat)
    assert streamed[0].startswith("you: Hello\nassistant: ")
    assert len(chat.last_chunks) > 1 and "".join(chat.last_chunks) == plain.text
    assert len(streamed) == len(chat.last_chunks) + 2  # label, chunks, newline

    chat.clear()
    assert chat.output.outputs == ()
    chat.vector_picker.value = "random"
    assert [v for _, v in chat.layer_picker.options] == [None, 1, 2]
    chat.layer_picker.value = 2
    chat.strength.value = 1.0  # takes effect on the next reply
    chat.show_projection.value = True
    chat.persona_box.value = "Hamlet"
    steered = chat.send("Hello")
    # the reference: the library path with the same vector, layer, strength and persona
    from steerlab.chat.session import ChatSession
    from steerlab.model.personas import Persona

    ref = ChatSession(tiny_model, max_tokens=10, persona=Persona("Hamlet", "custom", ""))
    ref.set_steering(chat.selected_vector(), 1.0, [2])
    assert steered.tokens == ref.reply("Hello").tokens
    assert _stream_texts(chat)[0].startswith("you: Hello\nHamlet: ")
    assert chat.session.steered_layers() == [2]
    assert steered.projection is not None and len(steered.projection) == steered.n_tokens
    assert chat.projection_view.value.count("<span title=") == steered.n_tokens
    assert "steering random × 1" in chat.status.value

    chat.clear()
    chat.strength.value = 0.0
    chat.persona_box.value = "assistant"
    assert chat.send("Hello").tokens == plain.tokens  # strength 0 leaves the model untouched


def test_vector_objects_and_bad_input_in_status(tiny_model):
    chat = SteeringChat(tiny_model, {"planted": _vector((1,), 5.0)}, max_tokens=4)
    chat.vector_picker.value = "planted"
    chat.message.value = "Hi"
    chat.send_button.click()
    assert chat.last_reply is not None and chat.message.value == ""
    chat.persona_box.value = "two\nlines"
    chat.message.value = "Hi"
    chat.send_button.click()
    assert "persona" in chat.status.value


def test_enter_sends_and_the_status_follows_the_controls(tiny_model):
    chat = SteeringChat(tiny_model, {"planted": _vector((1,), 5.0)}, max_tokens=4)
    # Enter in the box syncs its value (continuous_update=False): that alone sends
    assert chat.message.continuous_update is False
    chat.message.value = "Hi"
    assert chat.last_reply is not None and chat.message.value == ""
    assert _stream_texts(chat)[0].startswith("you: Hi\n")
    assert "steering off" in chat.status.value
    chat.vector_picker.value = "planted"
    chat.strength.value = 2.5  # no reply yet: the status shows the strength set now
    assert "steering planted × 2.5" in chat.status.value
    chat.strength.value = -1.0
    assert "planted × -1" in chat.status.value and "2.5" not in chat.status.value
    chat.layer_picker.value = 1
    assert "planted × -1 norm (layer 1)" in chat.status.value  # the units with the value
    before = len(_stream_texts(chat))
    chat.message.value = "   "  # blank: nothing is sent
    assert len(_stream_texts(chat)) == before


@pytest.mark.parametrize("op, bounds", [("ablate", ""), ("cap", ":0.05"), ("cap", "-0.02:")])
def test_operator_choice_equals_the_library_intervention(tiny_model, op, bounds):
    """The operator picker beside the vector picker: the reply is the one ChatSession gives
    with the same intervention, the status names it, the projection view shows both reads."""
    from steerlab.chat.session import ChatSession
    from steerlab.steering.operators import bounds_from_text

    vec = _vector((1, 2), 5.0, seed=3)
    chat = SteeringChat(tiny_model, {"v": vec}, max_tokens=6)
    chat.vector_picker.value = "v"
    chat.op_picker.value = op
    chat.bounds_box.value = bounds
    chat.layer_picker.value = 2
    chat.strength.value = 2.0  # add's strength: ignored by ablate and cap
    chat.show_projection.value = True
    assert chat.steering_label().startswith(op)
    got = chat.send("Hello")
    ref = ChatSession(tiny_model, max_tokens=6)
    ref.add_intervention(vec, op, [2], bounds=bounds_from_text(bounds) if bounds else None)
    assert got.tokens == ref.reply("Hello").tokens
    assert chat.session.steering is None and [s.op.value for s in chat.session.interventions] \
        == [op]
    # read after the interventions at the intervened layer: ablated to 0 or within the cap
    # (float32 re-projection: ~1e-6 of the residual norm; 1e-3 is far below any residual here)
    after, before = got.projection, got.projection_before
    assert len(after) == len(before) == got.n_tokens
    if op == "ablate":
        assert max(abs(p) for p in after) < 1e-3
    else:
        lo, hi = (float(b) if b else None for b in bounds.split(":"))
        s = chat.session.interventions[0]
        assert all((s.lo[0] - 1e-3 <= p) and (p <= s.hi[0] + 1e-3) for p in after)
        assert lo is not None or hi is not None
    assert "before" in chat.projection_view.value


def test_bad_cap_bounds_go_to_the_status(tiny_model):
    chat = SteeringChat(tiny_model, {"v": _vector((1,), 5.0)}, max_tokens=4)
    chat.vector_picker.value = "v"
    chat.op_picker.value = "cap"
    for text in ("", "a:b", "200%:"):
        chat.bounds_box.value = text
        chat.message.value = "Hi"
        assert "bounds" in chat.status.value and "\n" not in chat.status.value
