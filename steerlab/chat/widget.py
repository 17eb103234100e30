"""A notebook chat widget with a persona, a system prompt, a vector picker and a strength slider.

Examples:
    >>> from steerlab.chat.widget import SteeringChat
    >>> chat = SteeringChat(model, vectors="vectors/")   # *.safetensors in the folder
    >>> chat                                              # shows the widget
    >>> chat.strength.value = 0.2; chat.send("Who are you?").text   # the same, from code
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as w

from steerlab.base.errors import SteerlabError
from steerlab.chat.session import ChatReply, ChatSession
from steerlab.steering.intervention import DEFAULT_UNITS, Units
from steerlab.steering.operators import bounds_from_text
from steerlab.steering.vector import SteeringVector

VectorSource = str | os.PathLike | Mapping[str, SteeringVector] | Sequence[SteeringVector]
# the operators the widget offers next to the vector picker (set: from code, ChatSession)
OPERATORS = ("add", "ablate", "cap")


def find_vectors(source: VectorSource | None) -> dict[str, SteeringVector | Path]:
    """Name -> vector (or file, loaded when picked) from a folder, a mapping or a list.

    Args:
        source: a folder whose ``*.safetensors`` files are vectors, ``{name: vector}``, a list
            of vectors (named ``vector 0``, ``vector 1``, …), or ``None``.
    """
    if source is None:
        return {}
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise SteerlabError("expected a folder of *.safetensors vectors",
                                source=str(folder), field="vectors")
        return {p.stem: p for p in sorted(folder.glob("*.safetensors"))}
    items = source.items() if isinstance(source, Mapping) else (
        (f"vector {i}", v) for i, v in enumerate(source))
    out: dict[str, SteeringVector | Path] = {}
    for name, vec in items:
        if not isinstance(vec, SteeringVector):
            raise SteerlabError(f"{name!r} is {type(vec).__name__}; expected a SteeringVector",
                                field="vectors")
        out[str(name)] = vec
    return out


class SteeringChat(w.VBox):
    """Chat with a (steered) model in a notebook; replies stream into :attr:`output`.

    Controls: persona, system prompt, vector picker, operator (``add`` at the slider's
    strength, ``ablate`` the direction, ``cap`` its projection into the bounds box's ``LO:HI``,
    numbers or percentiles such as ``25%:``), layer, steering strength (read when a reply
    starts, so moving the slider affects the next reply), max tokens, thinking, and a toggle
    that colours each reply token by its projection on the vector (after the interventions;
    hover for before).

    Args:
        model: a bridge from :func:`steerlab.load_model`.
        vectors: a folder of ``*.safetensors`` vectors, ``{name: SteeringVector}`` or a list.
        axis: a vector to follow over the conversation (e.g. the assistant axis): each
            reply's mean projection on it goes into the status line and a small line plot
            over the turns (:attr:`turn_projections`).
        axis_layer: where ``axis`` is read (default: its middle layer).
        persona: the initial persona.
        max_tokens: the initial token budget per reply.
        strength_range: the slider's ``(min, max)``, in ``units``.
        units: what the slider's strength is measured in: ``"norm"`` (the default, a fraction
            of the layer's residual norm) or ``"raw"`` (a multiple of the vector).

    Examples:
        >>> chat = SteeringChat(model, {"pirate": vec}, persona="assistant", max_tokens=16)
        >>> chat.vector_picker.value = "pirate"
        >>> chat.strength.value = 0.2  # norm units: a fifth of the residual norm
        >>> reply = chat.send("What do you do on Sundays?")
    """

    def __init__(self, model: Any, vectors: VectorSource | None = None, *,
                 persona: str = "assistant", max_tokens: int = 120,
                 strength_range: tuple[float, float] = (-3.0, 3.0),
                 units: str = DEFAULT_UNITS.value, axis: SteeringVector | None = None,
                 axis_layer: int | None = None):
        self.session = ChatSession(model, max_tokens=max_tokens)
        self.axis = axis
        self.axis_layer = self.session.watch(axis, axis_layer)  # checked now, None without
        self.session.watch(None)
        self.turn_projections: list[float] = []
        self.drift_view = w.HTML()
        self.vectors = find_vectors(vectors)
        self.units = Units.parse(units, field="units").value
        self._loaded: dict[str, SteeringVector] = {}
        self.persona_box = w.Text(value=persona, description="persona")
        self.system_box = w.Textarea(placeholder="default: You are PERSONA.",
                                     description="system", rows=2)
        self.vector_picker = w.Dropdown(options=["(none)", *self.vectors], description="vector")
        self.op_picker = w.Dropdown(options=list(OPERATORS), value="add", description="operator",
                                    tooltip="add: steer at the strength; ablate: remove the "
                                    "direction; cap: clamp its projection into the bounds")
        self.bounds_box = w.Text(value="", description="bounds", placeholder="LO:HI e.g. 25%: "
                                 "or :0.1", tooltip="cap: LO:HI, numbers (in the units) or "
                                 "percentiles of the vector's reference projections")
        self.layer_picker = w.Dropdown(options=[("all", None)], description="layer")
        self.strength = w.FloatSlider(value=0.0, min=strength_range[0], max=strength_range[1],
                                      step=0.05, description=f"strength ({self.units})",
                                      continuous_update=False)
        self.max_tokens = w.BoundedIntText(value=max_tokens, min=1, max=32768,
                                           description="max tokens")
        self.thinking = w.Checkbox(value=False, description="thinking")
        self.show_projection = w.ToggleButton(value=False, description="projection",
                                              tooltip="colour tokens by projection on the vector")
        # continuous_update=False: the box syncs its value on Enter (and on leaving it), which
        # sends; ipywidgets 8's replacement for the deprecated on_submit
        self.message = w.Text(placeholder="message (Enter sends)", continuous_update=False,
                              layout=w.Layout(width="60%"))
        self.send_button = w.Button(description="send", button_style="primary")
        self.clear_button = w.Button(description="clear")
        self.output = w.Output(layout=w.Layout(border="1px solid #ccc", min_height="6em"))
        self.projection_view = w.HTML()
        self.status = w.HTML()
        self.last_chunks: list[str] = []
        self.last_reply: ChatReply | None = None
        self.vector_picker.observe(self._on_vector, names="value")
        self.message.observe(lambda _: self._send_message(), names="value")
        for control in (self.vector_picker, self.op_picker, self.bounds_box, self.layer_picker,
                        self.strength):
            control.observe(lambda _: self._show_status(), names="value")
        self.send_button.on_click(lambda _: self._send_message())
        self.clear_button.on_click(lambda _: self.clear())
        super().__init__([
            w.HBox([self.persona_box, self.system_box]),
            w.HBox([self.vector_picker, self.op_picker, self.layer_picker]),
            w.HBox([self.strength, self.bounds_box]),
            w.HBox([self.max_tokens, self.thinking, self.show_projection]),
            self.output, self.projection_view, self.drift_view,
            w.HBox([self.message, self.send_button, self.clear_button]), self.status,
        ])

    # --- programmatic API -------------------------------------------------------------------
    def send(self, text: str) -> ChatReply:
        """Send a message with the current control values; the reply streams into the output."""
        s = self.session
        s.set_persona(self.persona_box.value or "assistant")
        s.system = self.system_box.value.strip() or None
        s.set_max_tokens(int(self.max_tokens.value))
        s.thinking = bool(self.thinking.value)
        vector = self.selected_vector()
        s.clear_steering()
        if vector is not None:
            layer = self.layer_picker.value
            layers = None if layer is None else [layer]
            op = self.op_picker.value
            if op == "add":
                s.set_steering(vector, self.strength.value, layers, self.units)
            else:
                bounds = bounds_from_text(self.bounds_box.value) if op == "cap" else None
                s.add_intervention(vector, op, layers, bounds=bounds, units=self.units)
        watch = None
        if self.axis is not None:
            watch = s.watch(self.axis, self.axis_layer)
        elif self.show_projection.value and vector is not None:
            watch = s.watch(vector, (s.steered_layers() or
                                     [x.layers[0] for x in s.interventions])[0])
        else:
            s.watch(None)
        self.last_chunks = []
        self.output.append_stdout(f"you: {text}\n{s.persona.persona}: ")

        def on_text(chunk: str) -> None:
            self.last_chunks.append(chunk)
            self.output.append_stdout(chunk)

        reply = s.reply(text, on_text=on_text, projection_layer=watch)
        self.output.append_stdout("\n")
        self.last_reply = reply
        self._show_status()
        self.projection_view.value = (self._projection_html(reply, watch) if
                                      reply.projection is not None and
                                      self.show_projection.value else "")
        if self.axis is not None and reply.mean_projection is not None:
            self.turn_projections.append(reply.mean_projection)
            self.drift_view.value = drift_svg(self.turn_projections, int(watch or 0))
            self._show_status()
        return reply

    def clear(self) -> None:
        """Forget the conversation and empty the output (and the drift plot)."""
        self.session.clear()
        self.output.outputs = ()
        self.projection_view.value = ""
        self.turn_projections = []
        self.drift_view.value = ""

    def selected_vector(self) -> SteeringVector | None:
        """The picked vector (files are loaded once, on first use), or ``None``."""
        name = self.vector_picker.value
        if name in (None, "(none)"):
            return None
        if name not in self._loaded:
            item = self.vectors[name]
            self._loaded[name] = item if isinstance(item, SteeringVector) else (
                SteeringVector.load(item))
        return self._loaded[name]

    def steering_label(self) -> str:
        """The intervention the controls set for the next reply: ``"pirate × 0.2 norm (layer
        12)"``, ``"ablate pirate"``, ``"cap pirate to 25%:"`` or ``"off"`` (no vector, or
        strength 0 for add)."""
        name, alpha, layer, op = self.vector_picker.value, self.strength.value, \
            self.layer_picker.value, self.op_picker.value
        where = "" if layer is None else f" (layer {layer})"
        if name in (None, "(none)") or (op == "add" and alpha == 0):
            return "off"
        if op == "ablate":
            return f"ablate {name}{where}"
        if op == "cap":
            return f"cap {name} to {self.bounds_box.value.strip() or '?'} ({self.units})" + where
        return f"{name} × {alpha:g} {self.units}" + where

    # --- callbacks --------------------------------------------------------------------------
    def _show_status(self) -> None:
        """The status line: the last reply's length and the steering in force now (it follows
        the controls at once, so it never shows a stale strength)."""
        done = "" if self.last_reply is None else f"{self.last_reply.n_tokens} tokens · "
        if self.turn_projections:
            done += f"axis {self.turn_projections[-1]:+.3f} · "
        self.status.value = f"<small>{done}steering {html.escape(self.steering_label())}</small>"

    def _send_message(self) -> None:
        text = self.message.value.strip()
        if not text:
            return
        self.message.value = ""  # observed again, empty: nothing is sent twice
        try:
            self.send(text)
        except SteerlabError as err:
            self.status.value = f"<span style='color:#b00'>{html.escape(str(err))}</span>"

    def _on_vector(self, change: dict) -> None:
        try:
            vector = self.selected_vector()
        except SteerlabError as err:
            self.status.value = f"<span style='color:#b00'>{html.escape(str(err))}</span>"
            vector = None
        layers = [] if vector is None else list(vector.layers)
        self.layer_picker.options = [("all", None), *((str(x), x) for x in layers)]
        self.layer_picker.value = None

    def _projection_html(self, reply: ChatReply, layer: int) -> str:
        tok = self.session.model.tokenizer
        values = reply.projection or []
        before = reply.projection_before or values
        scale = max((abs(v) for v in values), default=1.0) or 1.0
        spans = []
        for token, value, was in zip(reply.tokens, values, before, strict=False):
            a = min(abs(value) / scale, 1.0)
            colour = f"rgba(220,60,40,{a:.2f})" if value > 0 else f"rgba(40,90,220,{a:.2f})"
            text = html.escape(tok.decode([token], skip_special_tokens=True))
            spans.append(f"<span title='{was:.3f} before, {value:.3f} after' "
                         f"style='background:{colour}'>{text}</span>")
        mean = sum(values) / len(values) if values else 0.0
        mean_before = sum(before) / len(before) if before else 0.0
        return (f"<div><small>projection on the unit vector at layer {layer}, after the "
                f"interventions (red +, blue −; max |p| = {scale:.2f}; mean {mean:.3f}, "
                f"{mean_before:.3f} before them; hover a token for both)</small><br>"
                "<span style='white-space:pre-wrap'>" + "".join(spans) + "</span></div>")


def drift_svg(values: Sequence[float], layer: int, width: int = 320, height: int = 80) -> str:
    """A small line plot (inline SVG) of each reply's mean projection on the axis over the
    turns, with the values in the points' tooltips.

    Examples:
        >>> drift_svg([1.0, 0.5, -0.2], 12).startswith("<div><small>")
        True
    """
    pad = 8
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    step = (width - 2 * pad) / max(len(values) - 1, 1)
    points = [(pad + i * step, height - pad - (v - lo) / span * (height - 2 * pad))
              for i, v in enumerate(values)]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    dots = "".join(f"<circle cx='{x:.1f}' cy='{y:.1f}' r='3' fill='#d62728'><title>turn {i + 1}: "
                   f"{v:+.3f}</title></circle>"
                   for i, ((x, y), v) in enumerate(zip(points, values, strict=True)))
    return (f"<div><small>mean projection of each reply on the axis at layer {layer}, by turn "
            f"({lo:+.2f} to {hi:+.2f})</small><br><svg width='{width}' height='{height}' "
            f"style='border:1px solid #ddd'><polyline points='{line}' fill='none' "
            f"stroke='#d62728' stroke-width='1.5'/>{dots}</svg></div>")
