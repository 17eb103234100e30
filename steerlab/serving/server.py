"""An OpenAI-compatible HTTP server over a local steerlab model (stdlib ThreadingHTTPServer).

``GET /v1/models``, ``POST /v1/chat/completions`` (plain JSON or ``stream: true`` SSE),
``GET /v1/vectors`` (the names of ``--vectors-dir``) and ``GET /health`` (no key needed:
status, active rows, queue depth). Request fields are checked by :mod:`steerlab.serving.requests`;
besides OpenAI's, ``persona`` and ``steering`` (a vector named, never a path:
:mod:`steerlab.serving.shelf`).

One request never changes another's answer: every per-request value is checked before
admission (a steering's added norm too: :data:`steerlab.steering.intervention.MAX_DELTA_NORM`), a
row whose
logits go non-finite fails alone (422), and a reused slot's cache is zeroed past its prompt.
Connections: HTTP/1.1 keep-alive (an SSE stream closes its connection); a request must arrive
whole within ``read_timeout`` (408), an idle connection is closed after ``idle_timeout``, and
past ``max_connections`` a new connection gets 503 with ``Retry-After``
(:mod:`steerlab.serving.http_edge`).

``static`` (what the default ``auto`` picks where the static engine can hold the model's cache,
and on a GPU once it has passed its device check there): continuous batching on the static
engine
(:mod:`steerlab.serving.batcher`):
concurrent requests decode together, each row with its own persona, sampling, budget and
steering, and a finished row's slot goes to the next request between steps. Streamed chunks go
out at each host check (every ``sync_every`` steps). ``eager``: one request at a time (a lock
around the model), as ``generate(engine="eager")``.

Both engines hold every request to the same :class:`Limits`: prompt plus ``max_tokens`` within
``max_context`` (a prompt is measured in characters before it is tokenised), ``max_tokens`` at
most the cap (refused, not cut), a body size, a deadline, and a queue (429 with
``Retry-After`` when full). A request whose client hangs up, or whose deadline passes, stops
within a poll (:data:`steerlab.serving.http_edge.POLL_S`) and frees its slot. Nothing answers with a
dropped connection: refusals are JSON in OpenAI's error shape (:mod:`steerlab.serving.http_edge`),
a stream that fails ends with an error event and ``[DONE]``. With an API key every route but
``/health`` needs ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import threading
import time
import uuid
from http.server import ThreadingHTTPServer
from typing import Any

from steerlab.base.errors import SteerlabError
from steerlab.generation.budget import context_length
from steerlab.generation.cache import cache_layout
from steerlab.generation.detokenize import Detokenizer
from steerlab.generation.engine import Engine
from steerlab.generation.generator import NonFiniteError, generate
from steerlab.model.loading import model_id
from steerlab.model.templates import encode_messages
from steerlab.serving import http_edge
from steerlab.serving.batcher import Batcher, Job
from steerlab.serving.deadlines import Watch
from steerlab.serving.http_edge import Handler, Limits, check_exposure
from steerlab.serving.requests import RequestError, parse_steering
from steerlab.serving.shelf import VectorShelf
from steerlab.steering.intervention import Steering
from steerlab.steering.norms import residual_norms

__all__ = ["Limits", "RequestError", "check_exposure", "make_server", "parse_steering"]

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 16  # a prompt longer than this many characters per position is not tokenised


class _Server(http_edge.ConnectionCap, ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many clients connect at once

    def __init__(self, addr: tuple[str, int], model: Any, model_name: str, engine: str,
                 max_batch: int, max_context: int, sync_every: int, api_key: str | None,
                 limits: Limits, vectors_dir: str | os.PathLike | None = None):
        _check_context(model, max_context)
        self.shelf = VectorShelf(vectors_dir) if vectors_dir is not None else None
        chosen = Engine.parse(engine, field="engine").resolve(model, batching=True)
        self.batcher: Any = None
        if chosen is Engine.STATIC:
            cache_layout(model)  # a cache the static engine cannot hold: one line, now
            self.batcher = Batcher(model, slots=max_batch, max_context=max_context,
                                   sync_every=sync_every)
        self.model, self.model_name, self.engine = model, model_name, chosen.value
        self.max_context, self.limits = max_context, limits
        self.slots = max_batch if self.batcher is not None else 1
        self.key = api_key.encode() if api_key else None
        self.lock, self.tok_lock, self._gate = threading.Lock(), threading.Lock(), threading.Lock()
        self.pending = 0  # requests between admission and their answer
        try:
            super().__init__(addr, Handler)
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

    def health(self) -> tuple[int, dict]:
        alive = self.batcher is None or self.batcher.alive
        active = self.batcher.active if self.batcher is not None else int(self.lock.locked())
        with self._gate:
            pending = self.pending
        return (200 if alive else 503), {
            "status": "ok" if alive else "down", "engine": self.engine, "active": active,
            "queued": max(0, pending - active), "slots": self.slots,
            "max_queue": self.limits.max_queue}

    @contextlib.contextmanager
    def _admitted(self) -> Any:
        """Count a request in; 429 when every slot and the queue are taken."""
        with self._gate:
            if self.pending >= self.slots + self.limits.max_queue:
                raise RequestError(f"the server is busy ({self.slots} decoding, "
                                   f"{self.limits.max_queue} waiting: --max-queue); retry "
                                   "later", status=429, kind="rate_limit_error",
                                   code="rate_limit_exceeded", headers={"Retry-After": "1"})
            self.pending += 1
        try:
            yield
        finally:
            with self._gate:
                self.pending -= 1

    def vectors(self) -> list[str]:
        """The vector names of ``--vectors-dir`` (none without it)."""
        return self.shelf.names() if self.shelf is not None else []

    def steering(self, spec: Any) -> tuple[Steering, ...]:
        """The request's interventions, each with a vector of ``--vectors-dir`` named by the
        request; norm units may measure residual norms, a forward of the model: run that where
        the model is free (scheduler thread, or under the lock)."""
        items = spec if isinstance(spec, list) else [spec]
        norm = any(isinstance(x, dict) and x.get("units") == "norm" for x in items)
        if not norm or self.shelf is None:
            return parse_steering(self.model, spec, self.shelf)  # no model run needed
        if self.batcher is not None:
            return self.batcher.call(lambda: parse_steering(self.model, spec, self.shelf))
        with self.lock:
            return parse_steering(self.model, spec, self.shelf)

    def _check_chars(self, req: dict) -> None:
        """Refuse a prompt too long to fit ``max_context`` by its characters alone, before
        tokenising (a giant text costs memory and time to tokenise)."""
        chars = sum(len(m["content"]) for m in req["messages"]) + len(req["persona"].persona)
        if chars > CHARS_PER_TOKEN * self.max_context:
            raise RequestError(f"'messages': {chars} characters; the server's max_context of "
                               f"{self.max_context} tokens (--max-context) takes at most "
                               f"{CHARS_PER_TOKEN * self.max_context} ({CHARS_PER_TOKEN} a "
                               "token)", param="messages", code="context_length_exceeded")

    def _encode(self, req: dict) -> list[int]:
        """Prompt ids, checked: the prompt plus ``max_tokens`` must fit ``max_context``."""
        try:
            with self.tok_lock:
                ids = encode_messages(self.model.tokenizer, req["messages"], req["persona"])
        except SteerlabError as err:
            raise RequestError(str(err), param="messages") from None
        need = len(ids) + req["max_tokens"]
        if len(ids) >= self.max_context:
            raise RequestError(f"'messages': the prompt is {len(ids)} tokens; the server's "
                               f"max_context is {self.max_context} (--max-context), prompt "
                               "plus max_tokens", param="messages",
                               code="context_length_exceeded")
        if need > self.max_context:
            raise RequestError(f"'max_tokens': a prompt of {len(ids)} tokens plus max_tokens "
                               f"{req['max_tokens']} needs {need} positions; the server's "
                               f"max_context is {self.max_context} (--max-context)",
                               param="max_tokens", code="context_length_exceeded")
        return ids

    def complete(self, h: Handler, req: dict) -> None:
        self._check_chars(req)
        with self._admitted():
            watch = Watch(h.connection, self.limits.request_timeout)
            ids = self._encode(req)
            cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            head = {"id": cid, "created": created, "model": self.model_name}
            steerings = self.steering(req["steering"])  # reads the named vectors
            run = self._eager if self.batcher is None else self._batched
            done = run(h, req, ids, head, steerings, watch)
        if done is None:
            return  # the client went away, or its stream ended with an error event
        stream, tokens, stopped = done
        finish = "stop" if stopped else "length"
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(tokens),
                 "total_tokens": len(ids) + len(tokens)}
        if req["stream"]:
            (stream or _Stream(h, self, head)).finish(tokens, finish, usage)
        else:
            with self.tok_lock:
                text = self.model.tokenizer.decode(tokens, skip_special_tokens=True)
            h._json(200, {**head, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text},
                 "finish_reason": finish}]})

    @staticmethod
    def _cut(watch: Watch, stream: _Stream | None) -> None:
        """A request given up (``watch.reason``): tell its client why, if it is there."""
        if watch.reason == "gone":
            log.info("client went away; its request stopped")
            return None
        if stream is None:
            raise watch.error()
        stream.error(watch.error())
        return None

    def _eager(self, h: Handler, req: dict, ids: list[int], head: dict,
               steerings: tuple[Steering, ...], watch: Watch) -> tuple | None:
        while not self.lock.acquire(timeout=http_edge.POLL_S):  # waiting: deadline and client count
            if watch.stop():
                return self._cut(watch, None)
        try:
            with contextlib.ExitStack() as applied:
                for steering in steerings:
                    applied.enter_context(steering.apply(self.model))
                # a stream answers 200 at once: open it only after every check has passed
                stream = _Stream(h, self, head) if req["stream"] else None

                def on_token(new: list) -> bool:  # True stops generation
                    return watch.stop() or bool(stream and new[0] is not None
                                                and stream.push([new[0]]))

                try:
                    seed = None if req["seed"] is None else [req["seed"]]
                    gen = generate(self.model, [ids], max_new_tokens=req["max_tokens"],
                                   temperature=req["temperature"], seed=seed, engine="eager",
                                   on_token=on_token)
                except Exception as err:
                    failure = _failure(err)
                    if stream is None:
                        raise failure from None
                    if failure.status >= 500:
                        log.exception("generation failed mid-stream")
                    return stream.error(failure)
        finally:
            self.lock.release()
        if watch.reason is not None:
            return self._cut(watch, stream)
        if stream is not None and stream.gone:
            return None
        return stream, gen.tokens[0], gen.stopped[0]

    def _batched(self, h: Handler, req: dict, ids: list[int], head: dict,
                 steerings: tuple[Steering, ...], watch: Watch) -> tuple | None:
        seed = req["seed"] if req["seed"] is not None else random.getrandbits(31)
        job = Job(ids, req["max_tokens"], req["temperature"], seed, steerings, head["id"])
        stream, tokens = None, []
        try:
            self.batcher.submit(job)
            while True:
                event = job.next_event(http_edge.POLL_S)
                if event is not None and event[0] == "error":
                    if stream is None:  # nothing sent yet: an HTTP error
                        raise _failure(event[1]) from None
                    return stream.error(_failure(event[1]))
                if event is not None and event[0] == "done":
                    return stream, tokens, event[1]
                if watch.stop():
                    return self._cut(watch, stream)
                if event is None:
                    continue
                tokens += event[1]
                if req["stream"]:  # opened at the first tokens: a failure before is a 500
                    stream = stream or _Stream(h, self, head)
                    if stream.push(event[1]):
                        return None  # the client went away
        finally:
            job.cancel()  # no-op once done; frees the slot if this thread stops early


def _failure(err: BaseException) -> RequestError:
    """What a client is told when its generation failed: a row whose logits went
    non-finite is its request's fault (422, the others go on); anything else is a 500."""
    if isinstance(err, NonFiniteError):
        return RequestError("the reply's logits went NaN or infinite while generating: the "
                            "steering is too strong for this model; lower 'steering.alpha'",
                            status=422, param="steering", code="non_finite_logits")
    return err if isinstance(err, RequestError) else http_edge.server_error(err)


def _check_context(model: Any, max_context: int) -> None:
    """``max_context`` within what the model's positions allow (and at least 2)."""
    most = context_length(model)
    if max_context < 2 or (most is not None and max_context > most):
        raise SteerlabError(f"got {max_context}; expected 2 to {most or 'any'} (the model's "
                            "context length)", field="max_context")


class _Stream:
    """Server-sent events: a chunk per piece of new text (per token eager, per check static),
    the text made by a :class:`~steerlab.generation.detokenize.Detokenizer` (a window of the last
    tokens
    decoded, never the whole reply); joined, the chunks are the non-streamed answer."""

    def __init__(self, h: Handler, server: _Server, head: dict):
        self.h, self.server, self.head, self.gone = h, server, head, False
        self.text, self.pushed = Detokenizer(server.model.tokenizer), 0
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
        """Send the text ``new`` tokens add (a character split over tokens waits until whole);
        True when the client has disconnected."""
        self.pushed += len(new)
        with self.server.tok_lock:
            piece = self.text.push(new)
        if not piece:
            return False
        try:
            self._chunk({"content": piece}, None)
        except OSError:
            self.gone = True
        return self.gone

    def error(self, err: RequestError) -> None:
        """End a stream that failed after it began: an error event, then ``[DONE]``."""
        with contextlib.suppress(OSError):
            self._write(http_edge.error_body(err))
            self._write("[DONE]")

    def finish(self, tokens: list[int], finish: str, usage: dict) -> None:
        """Send the text of ``tokens`` (the whole reply) not sent yet, then the end."""
        if self.gone:
            return
        with self.server.tok_lock:
            rest = self.text.push(tokens[self.pushed:]) + self.text.flush()
        if rest:
            self._chunk({"content": rest}, None)
        self._chunk({}, finish, usage=usage)
        self._write("[DONE]")


def make_server(model: Any, host: str = "127.0.0.1", port: int = 8000, *,
                model_name: str | None = None, engine: str = "auto", max_batch: int = 16,
                max_context: int = 2048, sync_every: int = 4, api_key: str | None = None,
                no_auth: bool = False, limits: Limits | None = None,
                vectors_dir: str | os.PathLike | None = None) -> ThreadingHTTPServer:
    """A ready server (call ``serve_forever()``); ``port=0`` picks a free port
    (``server.server_address[1]``); ``server_close()`` or ``shutdown()`` stop its scheduler.

    ``engine``: ``"static"`` (continuous batching of up to ``max_batch`` rows, checked every
    ``sync_every`` steps; a model whose cache it cannot hold is refused here, in one line),
    ``"eager"`` (one request at a time) or ``"auto"`` (the default: static where
    :meth:`steerlab.Engine.resolve` allows it for a batching server). Either way a request's
    prompt plus ``max_tokens`` must fit ``max_context`` positions, within ``limits``
    (:class:`Limits`).
    ``api_key``: required as ``Authorization: Bearer <key>``; serving beyond loopback without
    one needs ``no_auth=True`` (:func:`check_exposure`).
    ``vectors_dir``: the folder of the vectors requests may steer with, by name
    (:class:`steerlab.serving.shelf.VectorShelf`); None refuses every steering request.

    Examples:
        >>> srv = make_server(sl.load_model("embedded"), port=0)  # doctest: +SKIP
        >>> threading.Thread(target=srv.serve_forever, daemon=True).start()  # doctest: +SKIP
    """
    check_exposure(host, api_key, no_auth)
    if vectors_dir is not None:
        # Norm-unit strengths (the default) need each layer's residual norm. Measured here,
        # once, before the scheduler thread decodes: a request thread must never run the model.
        residual_norms(model)
    return _Server((host, port), model, model_name or model_id(model), engine, max_batch,
                   max_context, sync_every, api_key or None, limits or Limits(), vectors_dir)
