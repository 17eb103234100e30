"""An OpenAI-compatible HTTP server over a local steerlab model (stdlib ThreadingHTTPServer).

``GET /v1/models`` and ``POST /v1/chat/completions`` (plain JSON or ``stream: true`` SSE).
Extra request fields: ``persona`` (a name, or ``{"persona", "category", "article"}``) and
``steering`` (``{"vector": path, "alpha": float, "layers": [int] | null}``); ``temperature``
defaults to 1 as in OpenAI's API, a request without ``seed`` samples with a random one.

``static`` (the default): continuous batching on the static engine (:mod:`steerlab.batcher`):
concurrent requests decode together, each row with its own persona, sampling, budget and
steering, and a finished row's slot goes to the next request between steps. Batching is what a
server is for, on the CPU too (a step over 16 rows costs little more than one over a single
row). Streamed chunks go out at each host check (every ``sync_every`` steps); a client that
hangs up frees its slot at the next check. ``eager``: one request at a time (a lock around the
model), as ``generate(engine="eager")``. Every 400 is decided before a request is queued.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from steerlab.errors import SteerlabError
from steerlab.personas import ASSISTANT, Persona
from steerlab.responders import encode_messages
from steerlab.steer import Steering

__all__ = ["make_server", "parse_steering", "RequestError"]

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A bad request: answered with HTTP 400 and this message."""


def _number(v: Any, name: str, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise RequestError(f"'{name}' must be a number in [{lo}, {hi}], got {v!r:.60}")
    return float(v)


def parse_steering(model: Any, spec: Any) -> Steering | None:
    """The :class:`steerlab.steer.Steering` a request's ``steering`` field asks for.

    Args:
        model: the served bridge (layers and width are checked against it).
        spec: ``{"vector": path, "alpha": float, "layers": [int] | null, "units": "raw" |
            "norm"}`` (units default raw: alpha times the vector), or None (none).

    Raises:
        RequestError: the field is malformed, the vector cannot be loaded or does not fit.
    """
    if spec is None:
        return None
    if not isinstance(spec, dict) or set(spec) - {"vector", "alpha", "layers", "units"}:
        raise RequestError("'steering' must be an object with 'vector' (path), 'alpha' "
                           "(number), optional 'layers' (list of ints or null) and optional "
                           "'units' ('raw' or 'norm')")
    units = spec.get("units", "raw")
    if units not in ("raw", "norm"):
        raise RequestError(f"'steering.units' must be 'raw' or 'norm'; got {units!r:.40}")
    if not isinstance(spec.get("vector"), str) or not spec["vector"]:
        raise RequestError("'steering.vector' must be the path of a vector file")
    alpha = _number(spec.get("alpha"), "steering.alpha", -1e6, 1e6)
    layers = spec.get("layers")
    if layers is not None and (not isinstance(layers, list) or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in layers)):
        raise RequestError("'steering.layers' must be a list of integers or null")
    from steerlab.vectors import SteeringVector

    try:
        vector = SteeringVector.load(spec["vector"])
    except (SteerlabError, OSError) as err:
        raise RequestError(f"'steering.vector': {err}") from None
    try:
        return Steering.create(model, vector, alpha, layers=layers, units=units)
    except SteerlabError as err:
        raise RequestError(f"'steering': {err}") from None


def _persona(v: Any) -> Persona:
    if v is None:
        return ASSISTANT
    if isinstance(v, str) and v.strip():
        return Persona(v.strip(), "custom", "")
    if isinstance(v, dict) and isinstance(v.get("persona"), str) and v["persona"].strip():
        return Persona(v["persona"], str(v.get("category", "custom")), str(v.get("article", "")))
    raise RequestError("'persona' must be a name or {'persona': str, 'category', 'article'}")


def _messages(v: Any) -> list[dict[str, str]]:
    if not isinstance(v, list) or not v:
        raise RequestError("'messages' must be a non-empty list of {'role', 'content'}")
    out = []
    for i, m in enumerate(v):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # [{"type": "text", "text": ...}] parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}] must be {{'role': system|user|assistant, "
                               f"'content': str}}")
        out.append({"role": m["role"], "content": content})
    return out


def parse_request(body: dict) -> dict[str, Any]:
    """Validated generation settings of a chat-completions request body."""
    n = body.get("n", 1)
    if n != 1:
        raise RequestError("only 'n': 1 is supported")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 256))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError(f"'max_tokens' must be a positive integer, got {max_tokens!r:.60}")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not -(2**63) <= seed < 2**63):
        raise RequestError("'seed' must be a 64-bit integer")
    temp = body.get("temperature")
    return {"messages": _messages(body.get("messages")), "max_tokens": max_tokens,
            "temperature": 1.0 if temp is None else _number(temp, "temperature", 0.0, 2.0),
            "seed": seed, "stream": bool(body.get("stream", False)),
            "persona": _persona(body.get("persona")), "steering": body.get("steering")}


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def _json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self._json(status, {"error": {"message": message, "type": kind, "code": status}})

    def do_GET(self) -> None:  # noqa: N802
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self._json(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": 0,
                 "owned_by": "steerlab"}]})
        else:
            self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            return self._error(404, f"no route {self.path}", "not_found")
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"null")
            if not isinstance(body, dict):
                raise RequestError("the body must be a JSON object")
            req = parse_request(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return self._error(400, "the body is not valid JSON")
        except RequestError as err:
            return self._error(400, str(err))
        try:
            self.server.complete(self, req)
        except RequestError as err:
            self._error(400, str(err))
        except (BrokenPipeError, ConnectionResetError):
            log.info("client went away")
        except Exception as err:  # noqa: BLE001 - report, keep serving
            log.exception("generation failed")
            self._error(500, f"{type(err).__name__}: {err}", "server_error")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many clients connect at once

    def __init__(self, addr: tuple[str, int], model: Any, model_name: str, engine: str,
                 max_batch: int, max_context: int, sync_every: int):
        from steerlab.engine import Engine, hf_attention

        chosen = Engine.parse(engine, field="engine")
        if chosen is Engine.AUTO:  # a server batches whenever the model allows it
            chosen = Engine.STATIC if hf_attention(model) else Engine.EAGER
        self.batcher: Any = None
        if chosen is Engine.STATIC:
            from steerlab.batcher import Batcher

            self.batcher = Batcher(model, slots=max_batch, max_context=max_context,
                                   sync_every=sync_every)
        self.model, self.model_name, self.engine = model, model_name, chosen.value
        self.lock, self.tok_lock = threading.Lock(), threading.Lock()
        try:
            super().__init__(addr, _Handler)
        except BaseException:
            self.server_close()
            raise

    def shutdown(self) -> None:  # stops serve_forever and the scheduler
        super().shutdown()
        self.server_close()

    def server_close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()  # its requests end with an error, none hangs
        super().server_close()

    def steering(self, spec: Any) -> Steering | None:
        """The request's steering; norm units may measure residual norms, a forward of the
        model: run that where the model is free (scheduler thread, or under the lock)."""
        if not (isinstance(spec, dict) and spec.get("units") == "norm"):
            return parse_steering(self.model, spec)  # no model run needed
        if self.batcher is not None:
            return self.batcher.call(lambda: parse_steering(self.model, spec))
        with self.lock:
            return parse_steering(self.model, spec)

    def complete(self, h: _Handler, req: dict) -> None:
        tok = self.model.tokenizer
        try:
            with self.tok_lock:
                ids = encode_messages(tok, req["messages"], req["persona"])
        except SteerlabError as err:
            raise RequestError(str(err)) from None
        need = len(ids) + req["max_tokens"]
        if self.batcher is not None and need > self.batcher.max_context:
            raise RequestError(f"'max_tokens': a prompt of {len(ids)} tokens plus max_tokens "
                               f"{req['max_tokens']} needs {need} positions; the server's "
                               f"max_context is {self.batcher.max_context} (--max-context)")
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "created": created, "model": self.model_name}
        steering = self.steering(req["steering"])  # reads the vector file
        run = self._eager if self.batcher is None else self._batched
        stream, tokens, stopped = run(h, req, ids, head, steering)
        if tokens is None:
            return  # the client went away, or its stream ended with an error event
        with self.tok_lock:
            text = tok.decode(tokens, skip_special_tokens=True)
        finish = "stop" if stopped else "length"
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(tokens),
                 "total_tokens": len(ids) + len(tokens)}
        if req["stream"]:
            (stream or _Stream(h, self, head)).finish(text, finish, usage)
        else:
            h._json(200, {**head, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text},
                 "finish_reason": finish}]})

    def _eager(self, h: _Handler, req: dict, ids: list[int], head: dict,
               steering: Steering | None) -> tuple[_Stream | None, list[int], bool]:
        from steerlab.generate import generate

        with self.lock, (steering.apply(self.model) if steering else contextlib.nullcontext()):
            # a stream answers 200 at once: open it only after every check has passed
            stream = _Stream(h, self, head) if req["stream"] else None
            gen = generate(self.model, [ids], max_new_tokens=req["max_tokens"],
                           temperature=req["temperature"], seed=req["seed"], engine="eager",
                           on_token=(lambda new: new[0] is not None and stream.push([new[0]]))
                           if stream else None)
        return stream, gen.tokens[0], gen.stopped[0]

    def _batched(self, h: _Handler, req: dict, ids: list[int], head: dict,
                 steering: Steering | None) -> tuple[_Stream | None, list[int] | None, bool]:
        from steerlab.batcher import Job

        seed = req["seed"] if req["seed"] is not None else random.getrandbits(31)
        job = Job(ids, req["max_tokens"], req["temperature"], seed, steering, head["id"])
        stream, tokens = None, []
        try:
            self.batcher.submit(job)
            for kind, value in job.events():
                if kind == "error" and stream is None:
                    raise value  # nothing sent yet: an HTTP 500
                if kind == "error":
                    return stream.error(value), None, False
                if kind == "done":
                    return stream, tokens, value
                tokens += value
                if req["stream"]:  # opened at the first tokens: a failure before is a 500
                    stream = stream or _Stream(h, self, head)
                    if stream.push(value):
                        return stream, None, False  # the client went away
        finally:
            job.cancel()  # no-op once done; frees the slot if this thread stops early
        return stream, tokens, False


class _Stream:
    """Server-sent events: a chunk per piece of new text (per token eager, per check static)."""

    def __init__(self, h: _Handler, server: _Server, head: dict):
        self.h, self.server, self.head, self.sent, self.gone = h, server, head, "", False
        self.tokens: list[int] = []
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Cache-Control", "no-cache")
        h.end_headers()
        self._chunk({"role": "assistant", "content": ""}, None)

    def _write(self, obj: dict | str) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj)
        self.h.wfile.write(f"data: {data}\n\n".encode())
        self.h.wfile.flush()

    def _chunk(self, delta: dict, finish: str | None, **extra: Any) -> None:
        self._write({**self.head, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                     **extra})

    def push(self, new: list[int]) -> bool:
        """Send the text ``new`` tokens add; True when the client has disconnected."""
        self.tokens += new
        with self.server.tok_lock:
            text = self.server.model.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.sent) or text == self.sent:
            return False  # wait for the rest of a multi-byte character
        try:
            self._chunk({"content": text[len(self.sent):]}, None)
        except OSError:
            self.gone = True
            return True
        self.sent = text
        return False

    def error(self, err: BaseException) -> _Stream:
        """End a stream that failed after it began with an error event."""
        with contextlib.suppress(OSError):
            self._write({"error": {"message": f"{type(err).__name__}: {err}",
                                   "type": "server_error", "code": 500}})
        return self

    def finish(self, text: str, finish: str, usage: dict) -> None:
        if self.gone:
            return
        if text.startswith(self.sent) and text != self.sent:
            self._chunk({"content": text[len(self.sent):]}, None)
        self._chunk({}, finish, usage=usage)
        self._write("[DONE]")


def make_server(model: Any, host: str = "127.0.0.1", port: int = 8000, *,
                model_name: str | None = None, engine: str = "static", max_batch: int = 16,
                max_context: int = 2048, sync_every: int = 4) -> ThreadingHTTPServer:
    """A ready server (call ``serve_forever()``); ``port=0`` picks a free port
    (``server.server_address[1]``); ``server_close()`` or ``shutdown()`` stop its scheduler.

    ``engine``: ``"static"`` (continuous batching of up to ``max_batch`` rows of at most
    ``max_context`` positions each, checked every ``sync_every`` steps; needs HF attention),
    ``"eager"`` (one request at a time) or ``"auto"`` (static when the model allows it).

    Example:
        >>> srv = make_server(load_model("embedded"), port=0)
        >>> threading.Thread(target=srv.serve_forever, daemon=True).start()
    """
    from steerlab.models import model_id

    return _Server((host, port), model, model_name or model_id(model), engine, max_batch,
                   max_context, sync_every)
