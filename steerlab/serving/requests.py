"""Reading and checking a chat-completions request for ``steerlab serve``.

:func:`decode_body` turns the request bytes into a JSON object; :func:`parse_chat_request`
checks every field it reads and returns the generation settings; :func:`parse_steering` loads
and fits the ``steering`` field. Each refusal is a :class:`RequestError` that names the field,
the value and what was expected, with the HTTP status and OpenAI error ``code`` to answer.
No model runs here, and nothing is tokenised: the server decides prompt lengths.
"""

from __future__ import annotations

import json
from typing import Any

from steerlab.base import checks
from steerlab.base.errors import SteerlabError
from steerlab.model.personas import ASSISTANT, Persona, persona_record
from steerlab.model.templates import MAX_MESSAGE_CHARS
from steerlab.serving.shelf import NAME, VectorShelf
from steerlab.steering.intervention import DEFAULT_UNITS, Steering
from steerlab.steering.reference import parse_percentile

__all__ = ["RequestError", "decode_body", "parse_chat_request", "parse_steering"]

ROLES = ("system", "user", "assistant")
# OpenAI fields steerlab serve does not implement: refused unless they hold a value that
# changes nothing, never silently ignored
UNSUPPORTED = ("stop", "tools", "tool_choice", "functions", "function_call", "logit_bias",
               "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty")


class RequestError(ValueError):
    """A request refused with ``status`` (400 unless said) and OpenAI's error fields.

    Args:
        message: what was wrong: the field, the value, what was expected.
        status: the HTTP status.
        param: the request field at fault, if one.
        code: OpenAI's short error code (``"model_not_found"``, ``"rate_limit_exceeded"``...).
        kind: OpenAI's error ``type`` (default ``invalid_request_error``).
        headers: extra response headers (``Retry-After``, ``Allow``).
    """

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind
        self.headers = headers or {}


def _shown(v: Any) -> str:
    return f"{v!r:.60}"


def _reject_constant(name: str) -> Any:
    raise RequestError(f"the body holds {name}, which is not JSON; expected finite numbers",
                       code="invalid_json")


def decode_body(raw: bytes) -> dict:
    """The JSON object ``raw`` holds (UTF-8/16/32 JSON, no ``NaN``/``Infinity`` literals).

    Raises:
        RequestError: empty, not JSON, nested too deep, or not an object.
    """
    if not raw.strip():
        raise RequestError("the body is empty; expected a JSON object", code="invalid_json")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RequestError:
        raise
    except RecursionError:
        raise RequestError("the body nests too deep", code="invalid_json") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, a 5,000-digit int
        raise RequestError(f"the body is not valid JSON ({str(err):.120})",
                           code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object, got {type(body).__name__}",
                           code="invalid_json")
    return body


def _number(v: Any, name: str, lo: float, hi: float) -> float:
    """A finite number in ``[lo, hi]`` (steerlab's one check), or a 400 naming ``name``."""
    try:
        return checks.number(v, name, lo=lo, hi=hi)
    except SteerlabError as err:
        raise RequestError(str(err), param=name) from None


def _bound(v: Any, name: str) -> float | str:
    """A bound or target: a finite number within +-1e6, or a percentile of the vector's
    reference projections such as ``"25%"``; else a 400 naming ``name``."""
    if not isinstance(v, str):
        return _number(v, name, -1e6, 1e6)
    try:
        parse_percentile(v, name)
    except SteerlabError as err:
        raise RequestError(str(err), param=name) from None
    return v


def _integer(v: Any, name: str, lo: int, hi: int, hint: str = "") -> int:
    """A JSON integer in ``[lo, hi]`` (``5.0`` is not one here), or a 400 naming ``name``."""
    try:
        if isinstance(v, float):
            raise SteerlabError(f"got {_shown(v)}; expected an integer", field=name)
        return checks.integer(v, name, lo=lo, hi=hi, hint=hint.strip())
    except SteerlabError as err:
        raise RequestError(str(err), param=name) from None


def _text(v: Any, name: str) -> str:
    """Text every later stage can handle (:func:`steerlab.base.checks.text`), or a 400."""
    try:
        return checks.text(v, name, max_chars=MAX_MESSAGE_CHARS)
    except SteerlabError as err:
        raise RequestError(str(err), param=name) from None


def _persona(v: Any) -> Persona:
    """The request's persona, its fields checked as a personae file's
    (:func:`steerlab.model.personas.persona_record`)."""
    if v is None:
        return ASSISTANT
    if isinstance(v, str) and v.strip():
        v = {"persona": v}
    if isinstance(v, dict) and not set(v) - {"persona", "category", "article"} and all(
            isinstance(v.get(k, ""), str) for k in ("persona", "category", "article")
    ) and v.get("persona", "").strip():
        try:
            return persona_record({**v, "persona": v["persona"].strip()}, "persona",
                                  category="custom")
        except SteerlabError as err:
            raise RequestError(str(err), param="persona") from None
    raise RequestError("'persona' must be a non-empty name or {'persona': str, 'category': "
                       f"str, 'article': str}}, got {_shown(v)}", param="persona")


def _content(v: Any, where: str) -> str:
    if isinstance(v, str):
        return _text(v, f"{where}.content")
    if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                   and isinstance(p.get("text"), str) for p in v):
        return _text("".join(p["text"] for p in v), f"{where}.content")
    raise RequestError(f"'{where}.content' must be a string or a list of {{'type': 'text', "
                       f"'text': str}} parts, got {_shown(v)}", param=f"{where}.content")


def _messages(v: Any) -> list[dict[str, str]]:
    if not isinstance(v, list) or not v:
        raise RequestError("'messages' must be a non-empty list of {'role', 'content'}, got "
                           f"{_shown(v)}", param="messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"'{where}' must be {{'role': system|user|assistant, "
                               f"'content': str}}, got {_shown(m)}", param=where)
        out.append({"role": m["role"], "content": _content(m.get("content"), where)})
    return out


def _model(v: Any, served: str) -> None:
    if not isinstance(v, str) or not v:
        raise RequestError(f"'model' must be the model's name ({served!r}), got {_shown(v)}",
                           param="model")
    if v != served:
        raise RequestError(f"the model {v!r:.80} does not exist; this server serves "
                           f"{served!r}", status=404, param="model", code="model_not_found")


def _unsupported(body: dict) -> None:
    for name in UNSUPPORTED:
        v = body.get(name)
        zero = isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0
        if not (v is None or v is False and name == "logprobs" or zero and "penalty" in name):
            raise RequestError(f"'{name}' is not supported by steerlab serve (got "
                               f"{_shown(v)}); leave it out", param=name,
                               code="unsupported_parameter")
    top_p = body.get("top_p")
    if top_p is not None and _number(top_p, "top_p", 0.0, 1.0) != 1.0:
        raise RequestError(f"'top_p' {top_p!r} is not supported (no nucleus sampling); "
                           "leave it out or send 1", param="top_p",
                           code="unsupported_parameter")


def parse_chat_request(body: dict, *, model_name: str, max_tokens_cap: int) -> dict[str, Any]:
    """The checked generation settings of a chat-completions request ``body``.

    Args:
        body: the decoded JSON object (:func:`decode_body`).
        model_name: the served model's name; another ``model`` is a 404.
        max_tokens_cap: most new tokens a request may ask for (more is a 400, not capped).

    Returns:
        ``messages``, ``max_tokens``, ``temperature``, ``seed`` (None: random), ``stream``,
        ``persona`` and the raw ``steering`` spec (see :func:`parse_steering`).
    """
    _model(body.get("model"), model_name)
    messages = _messages(body.get("messages"))
    if body.get("n", 1) is not None:
        _integer(body.get("n", 1), "n", 1, 1, " (one choice per request)")
    _unsupported(body)
    max_tokens = min(256, max_tokens_cap)
    for name in ("max_tokens", "max_completion_tokens"):  # the latter wins when both are set
        if body.get(name) is not None:
            max_tokens = _integer(body[name], name, 1, max_tokens_cap,
                                  " (the server's --max-tokens-cap)")
    seed = body.get("seed")
    if seed is not None:
        _integer(seed, "seed", -(2**63), 2**63 - 1)
    temp = body.get("temperature")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise RequestError(f"'stream' must be true or false, got {_shown(stream)}",
                           param="stream")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and isinstance(
            options.get("include_usage", True), bool) and not set(options) - {"include_usage"}):
        raise RequestError("'stream_options' must be {'include_usage': bool}, got "
                           f"{_shown(options)}", param="stream_options")
    fmt = body.get("response_format")  # accepted; replies are plain text (chat_json parses)
    if fmt is not None and not (isinstance(fmt, dict) and isinstance(fmt.get("type"), str)):
        raise RequestError(f"'response_format' must be an object with a 'type', got "
                           f"{_shown(fmt)}", param="response_format")
    return {"messages": messages, "max_tokens": max_tokens,
            "temperature": 1.0 if temp is None else _number(temp, "temperature", 0.0, 2.0),
            "seed": seed, "stream": bool(stream), "persona": _persona(body.get("persona")),
            "steering": _steering_shapes(body.get("steering"))}


MAX_INTERVENTIONS = 8  # interventions one request may ask for together
STEERING_KEYS = {"vector", "alpha", "layers", "units", "op", "bounds", "target"}


def _steering_shapes(spec: Any) -> dict | list[dict] | None:
    """A request's ``steering``, one intervention or a list of them, checked field by field
    (no file read yet)."""
    if not isinstance(spec, list):
        return _steering_shape(spec)
    if not 1 <= len(spec) <= MAX_INTERVENTIONS:
        raise RequestError(f"'steering' takes 1 to {MAX_INTERVENTIONS} interventions, got "
                           f"{len(spec)}", param="steering")
    shapes = [_steering_shape(x, f"steering[{i}]") for i, x in enumerate(spec)]
    if any(s is None for s in shapes):
        raise RequestError("'steering' items must be objects, not null", param="steering")
    return shapes  # type: ignore[return-value]


def _steering_shape(spec: Any, at: str = "steering") -> dict | None:
    """One intervention of ``spec`` checked field by field (no file read yet); ``at`` names
    it in errors (``steering`` or ``steering[i]``)."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or set(spec) - STEERING_KEYS:
        raise RequestError(f"'{at}' must be an object with 'vector' (a name), 'alpha' "
                           "(number; optional for ablate, cap and set), optional 'layers' "
                           "(list of ints or null), 'units' ('raw' or 'norm'), 'op' ('add', "
                           "'ablate', 'cap', 'set'), 'bounds' ([lo, hi], null for an open "
                           f"side; cap) and 'target' (number; set), got {_shown(spec)}",
                           param=at)
    units = spec.get("units", DEFAULT_UNITS.value)
    if units not in ("raw", "norm"):
        raise RequestError(f"'{at}.units' must be 'raw' or 'norm', got {_shown(units)}",
                           param=f"{at}.units")
    op = spec.get("op", "add")
    if op not in ("add", "ablate", "cap", "set"):
        raise RequestError(f"'{at}.op' must be 'add', 'ablate', 'cap' or 'set', got "
                           f"{_shown(op)}", param=f"{at}.op")
    name = spec.get("vector")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise RequestError(f"'{at}.vector' must be the name of a vector the server offers "
                           f"(letters, digits, '.', '_', '-'), got {_shown(name)}",
                           param=f"{at}.vector")
    alpha = _number(spec.get("alpha"), f"{at}.alpha", -1e6, 1e6) if op == "add" or \
        "alpha" in spec else 1.0
    layers = spec.get("layers")
    if layers is not None and (not isinstance(layers, list) or not layers or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in layers)
            or len(set(layers)) != len(layers)):
        raise RequestError(f"'{at}.layers' must be a non-empty list of distinct layer "
                           f"indices, or null (the vector's layers), got {_shown(layers)}",
                           param=f"{at}.layers")
    bounds = spec.get("bounds")
    if bounds is not None:
        if not isinstance(bounds, list) or len(bounds) != 2:
            raise RequestError(f"'{at}.bounds' must be [lo, hi], null for an open side, got "
                               f"{_shown(bounds)}", param=f"{at}.bounds")
        bounds = [None if b is None else _bound(b, f"{at}.bounds") for b in bounds]
    target = spec.get("target")
    if target is not None:
        target = _bound(target, f"{at}.target")
    return {"vector": name, "alpha": alpha, "layers": layers, "units": units, "op": op,
            "bounds": bounds, "target": target}


def parse_steering(model: Any, spec: Any, shelf: VectorShelf | None
                   ) -> tuple[Steering, ...]:
    """The interventions (:class:`steerlab.steering.intervention.Steering`) a request's
    ``steering`` field asks for, applied together (projection operators first within a layer,
    then additions: :class:`steerlab.steering.intervention.Operator`).

    Args:
        model: the served bridge (layers and width are checked against it).
        spec: one intervention ``{"vector": name, "alpha": float, "layers": [int] | null,
            "units": "norm" | "raw", "op": "add" | "ablate" | "cap" | "set", "bounds": [lo,
            hi], "target": float}`` (bounds and target numbers, or percentiles of the vector's
            reference projections such as ``"25%"``; units default norm,
            :data:`steerlab.steering.intervention.DEFAULT_UNITS`: a fraction of the layer's
            residual norm; op default add), a list of up to :data:`MAX_INTERVENTIONS` of them,
            or None (none).
        shelf: the vectors the server offers by name (``--vectors-dir``); None refuses
            every steering request.

    Raises:
        RequestError: the field is malformed, names no usable vector, or does not fit.

    Examples:
        >>> parse_steering(model, {"vector": "pirate", "alpha": 4.0, "layers": [10]}, shelf)
        >>> parse_steering(model, [{"vector": "pirate", "op": "ablate"},
        ...                        {"vector": "calm", "alpha": 0.1}], shelf)
    """
    shapes = _steering_shapes(spec)
    if shapes is None:
        return ()
    if isinstance(shapes, dict):
        return (_one_steering(model, shapes, shelf, "steering"),)
    return tuple(_one_steering(model, s, shelf, f"steering[{i}]") for i, s in enumerate(shapes))


def _one_steering(model: Any, spec: dict, shelf: VectorShelf | None, at: str) -> Steering:
    if shelf is None:
        raise RequestError("this server steers with no vector (it was started without "
                           "--vectors-dir); leave 'steering' out", param="steering",
                           code="steering_disabled")
    try:
        vector = shelf.get(spec["vector"])
    except SteerlabError as err:
        raise RequestError(str(err), status=404, param=f"{at}.vector",
                           code="vector_not_found") from None
    try:
        return Steering.create(model, vector, spec["alpha"], layers=spec["layers"],
                               units=spec["units"], op=spec["op"],
                               bounds=None if spec["bounds"] is None else tuple(spec["bounds"]),
                               target=spec["target"])
    except SteerlabError as err:
        raise RequestError(f"'{at}': {err}", param=at) from None
