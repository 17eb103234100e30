"""The HTTP edge of ``steerlab serve``: limits, the API key, routes, bodies, errors, deadlines.

:class:`Handler` answers everything that needs no model: a refusal by the stdlib's parser, a
missing or wrong key (401), an unknown route (404), a method a route does not take (405 with
``Allow``), a bad ``Content-Length`` or a short body (400), a body over the limit (413), a
request that did not arrive whole within ``read_timeout`` (408), a body that is not a JSON
object (400), and the field checks of :mod:`steerlab.serving.requests`. Every refusal is JSON in
OpenAI's error shape (``{"error": {"message", "type", "param", "code"}}``), never a dropped
connection. What passes goes to the server's ``complete(handler, request)``.

Connections (:class:`ConnectionCap`, the server's mixin, and the clocks of
:mod:`steerlab.serving.deadlines`): HTTP/1.1 keep-alive. An answer of known length
(``Content-Length``) to a request read whole keeps the connection for the next request,
which must begin within ``idle_timeout``; an SSE stream, and a refusal that leaves the body
unread, say ``Connection: close`` and close. Each request (request line, headers and body)
must arrive within ``read_timeout`` in all, counted from the connection's accept for its
first request and from the first byte for later ones: a client that trickles bytes gets 408,
then a close. Beyond ``max_connections`` open connections, the next one is answered 503 with
``Retry-After`` by the accepting thread itself and closed.
"""

from __future__ import annotations

import contextlib
import hmac
import io
import ipaddress
import json
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass, fields
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any

from steerlab.base.checks import integer, number
from steerlab.base.errors import SteerlabError
from steerlab.serving.deadlines import Clock, Late, Watch
from steerlab.serving.requests import RequestError, decode_body, parse_chat_request

__all__ = ["ConnectionCap", "Handler", "Limits", "Watch", "authorize", "check_exposure",
           "error_body", "server_error"]

log = logging.getLogger(__name__)

ROUTES = {"/v1/chat/completions": "POST", "/chat/completions": "POST", "/v1/models": "GET",
          "/models": "GET", "/v1/vectors": "GET", "/vectors": "GET", "/health": "GET"}
POLL_S = 0.1  # how often a waiting request looks at its deadline and its client's socket


@dataclass(frozen=True)
class Limits:
    """What one request may ask of ``steerlab serve`` (each has a CLI flag).

    Args:
        max_tokens: most new tokens a request may ask for; more is a 400 (``--max-tokens-cap``).
        max_body_bytes: largest request body; more is a 413 (``--max-body-bytes``).
        request_timeout: seconds from a request's arrival to its last token; past them its
            slot is freed and it gets a 504, or an error event ending its stream
            (``--request-timeout``).
        max_queue: requests that may wait for a slot; more get 429 with ``Retry-After``
            (``--max-queue``).
        read_timeout: seconds a request (request line, headers and body) may take to arrive,
            in all, from the connection's accept or the request's first byte; past them a
            408 and a close (``--read-timeout``). Also the most one write waits on a client
            that does not read.
        idle_timeout: seconds a keep-alive connection may sit idle between requests before
            it is closed (``--idle-timeout``; longer than the 5 s after which httpx, the
            OpenAI SDK's client, drops an idle connection itself, so it closes first and
            never sends on a connection the server is closing).
        max_connections: open connections; one more is answered 503 with ``Retry-After``
            and closed (``--max-connections``).
    """

    max_tokens: int = 1024
    max_body_bytes: int = 1 << 20
    request_timeout: float = 300.0
    max_queue: int = 64
    read_timeout: float = 30.0
    idle_timeout: float = 10.0
    max_connections: int = 256

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "int":
                v = integer(v, f.name, lo=0 if f.name == "max_queue" else 1)
            else:
                v = number(v, f.name, lo=0, lo_open=True)
            object.__setattr__(self, f.name, v)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, or "" (every interface)


def check_exposure(host: str, api_key: str | None, no_auth: bool) -> None:
    """Refuse to serve beyond this machine without a key, unless ``no_auth`` says so.

    Raises:
        SteerlabError: ``host`` is not a loopback address, no key, no ``no_auth``; or both.
    """
    if api_key and no_auth:
        raise SteerlabError("give an API key or --no-auth, not both", field="no_auth")
    if not api_key and not no_auth and not _loopback(host):
        raise SteerlabError(f"--host {host or '(every interface)'} lets other machines use "
                            "the model; set --api-key or STEERLAB_API_KEY, or pass --no-auth "
                            "to serve it without a key", field="api_key")


def authorize(key: bytes | None, header: str | None) -> None:
    """Pass a request whose ``Authorization`` header is ``Bearer <key>`` (constant-time
    compare; the header is never logged); no ``key``: pass all.

    Raises:
        RequestError: 401 in OpenAI's shape, with ``WWW-Authenticate: Bearer``.
    """
    if key is None:
        return
    scheme, _, token = (header or "").strip().partition(" ")
    given = token.strip().encode("utf-8", "surrogateescape")
    if not (scheme.lower() == "bearer" and hmac.compare_digest(given, key)):
        raise RequestError("a missing or wrong API key; send 'Authorization: Bearer <key>'",
                           status=401, code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})


def error_body(err: RequestError) -> dict:
    return {"error": {"message": str(err), "type": err.kind, "param": err.param,
                      "code": err.code}}


def server_error(err: BaseException) -> RequestError:
    return RequestError(f"{type(err).__name__}: {err}", status=500, kind="server_error")


def _refuse(sock: socket.socket, cap: int) -> None:
    """503 on a connection beyond the cap, written without waiting on the client, then close."""
    err = RequestError(f"the server has {cap} open connections, its --max-connections; retry "
                       "later", status=503, kind="server_error", code="too_many_connections")
    body = json.dumps(error_body(err)).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        sock.send(head.encode() + body)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(1 << 16):  # what it sent already (unread bytes would reset the answer)
            pass
    sock.close()


class ConnectionCap:
    """Mixin of ``serve``'s ThreadingHTTPServer (before it in the bases): at most
    ``limits.max_connections`` open connections; the next is refused with 503 and
    ``Retry-After`` by the accepting thread itself (no handler thread), and closed."""

    limits: Limits

    def __init__(self, *args: Any, **kwargs: Any):
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    @property
    def connections(self) -> int:
        with self._open_lock:
            return len(self._open)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            full = len(self._open) >= self.limits.max_connections
            if not full:
                self._open.add(request)
        if full:
            log.info("refused a connection: %d open (--max-connections)", len(self._open))
            _refuse(request, self.limits.max_connections)
            return
        super().process_request(request, client_address)  # type: ignore[misc]

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)  # type: ignore[misc]


class Handler(BaseHTTPRequestHandler):
    server: Any  # steerlab.serving.server's server: limits, authorize, health, models, complete
    protocol_version = "HTTP/1.1"  # keep-alive: see the module's docstring
    responded = False
    linger = False  # answered before reading the body: drain it, so the answer is not reset
    code, sized, served = 0, False, 0  # this answer's status, its Content-Length; requests

    def setup(self) -> None:
        limits = self.server.limits
        self.timeout = limits.read_timeout
        super().setup()
        self.rfile.close()  # the socket's plain reader, replaced by one held to deadlines
        self.clock = Clock(self.connection, limits.read_timeout, limits.idle_timeout)
        self.rfile = io.BufferedReader(self.clock)

    def handle_one_request(self) -> None:
        """One request of the connection; one that arrives late gets 408 and a close, an
        idle keep-alive connection is closed without a word."""
        self.responded = self.linger = False
        self.raw_requestline, self.requestline, self.request_version, self.command = (
            b"", "", "", "")
        if self.served:
            self.clock.next_request()
        self.served += 1
        try:
            super().handle_one_request()
        except Late as late:
            self.close_connection = True
            if late.started or self.raw_requestline:
                self.linger = True
                self._error(self._late())
        except ConnectionError:  # reset by the client: no one to answer
            self.close_connection = True

    def _late(self) -> RequestError:
        return RequestError(f"the request did not arrive whole (request line, headers and "
                            f"body) within the server's --read-timeout of "
                            f"{self.clock.read_s:g} s", status=408,
                            kind="timeout_error", code="read_timeout")

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def send_response(self, code: int, message: str | None = None) -> None:
        self.responded = True
        super().send_response(code, message)

    def send_response_only(self, code: int, message: str | None = None) -> None:
        self.code, self.sized = code, False
        super().send_response_only(code, message)

    def send_header(self, keyword: str, value: str) -> None:
        self.sized = self.sized or keyword.lower() == "content-length"
        super().send_header(keyword, value)

    def end_headers(self) -> None:
        """Keep the connection only after an answer of known length to a request read whole;
        else (a stream, a refusal before the body is read) ``Connection: close``."""
        if self.code >= 200 and (self.linger or self.close_connection or not self.sized):
            self.send_header("Connection", "close")  # also sets close_connection
        super().end_headers()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None
                   ) -> None:
        """The stdlib's own refusals (bad request line, URI or headers too long) in JSON
        too, with a status line even where the request line was unreadable."""
        self.close_connection, self.linger = True, True
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        if code == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:  # the client's fault: a 4xx
            code, message = 400, f"{message}; use HTTP/1.0 or HTTP/1.1"
        phrase = HTTPStatus(code).phrase
        self._error(RequestError(f"{phrase}: {message}" if message and message != phrase
                                 else phrase, status=code,
                                 kind="server_error" if code >= 500 else "invalid_request_error"))

    def _json(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, err: RequestError) -> None:
        if self.responded:  # a stream has begun: its own error event ends it
            log.warning("cannot answer %d after the response began: %s", err.status, err)
            return
        with contextlib.suppress(OSError):
            self._json(err.status, error_body(err), err.headers)

    def parse_request(self) -> bool:
        """The stdlib's parse of the request line and headers, then key, route and method."""
        if not super().parse_request():
            return False
        self.route = self.path.split("?", 1)[0].rstrip("/") or "/"
        method = ROUTES.get(self.route)
        try:
            if self.route != "/health":
                authorize(self.server.key, self.headers.get("Authorization"))
            if method is None:
                raise RequestError(f"no route {self.route!r:.80} (routes: "
                                   f"{', '.join(sorted(ROUTES))})", status=404,
                                   code="unknown_url")
            if self.command != method:
                raise RequestError(f"{self.command:.20} is not allowed on {self.route}; use "
                                   f"{method}", status=405, code="method_not_allowed",
                                   headers={"Allow": method})
        except RequestError as err:
            self.close_connection, self.linger = True, True
            self._error(err)
            return False
        if self.command != "POST" and (self.headers.get("Transfer-Encoding") or self.headers.get(
                "Content-Length", "0").strip() != "0"):
            self.linger = True  # a body no route reads: answer, drain it and close
        return True

    def finish(self) -> None:
        super().finish()
        if self.linger:  # closing with unread bytes resets the connection, answer and all
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_WR)
                self.connection.settimeout(0.5)
                end = time.monotonic() + 1.0
                while time.monotonic() < end and self.connection.recv(1 << 16):
                    pass

    def do_GET(self) -> None:  # noqa: N802
        if self.route == "/health":
            self._json(*self.server.health())
        elif self.route.endswith("/vectors"):  # the names requests may steer with
            self._json(200, {"object": "list", "data": [
                {"id": name, "object": "steering_vector"} for name in self.server.vectors()]})
        else:
            self._json(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": 0,
                 "owned_by": "steerlab"}]})

    def do_POST(self) -> None:  # noqa: N802
        try:
            req = parse_chat_request(decode_body(self._body()),
                                     model_name=self.server.model_name,
                                     max_tokens_cap=self.server.limits.max_tokens)
            self.server.complete(self, req)
        except RequestError as err:
            self._error(err)
        except OSError as err:  # writing to a client that went away
            log.info("client went away (%s)", type(err).__name__)
        except Exception as err:  # noqa: BLE001 - report, keep serving
            log.exception("generation failed")
            self._error(server_error(err))

    def _body(self) -> bytes:
        """The body, exactly ``Content-Length`` bytes of it (no chunked bodies)."""
        self.linger = True
        if self.headers.get("Transfer-Encoding"):
            raise RequestError("chunked bodies are not supported; send a Content-Length",
                               param="Content-Length")
        values = {v.strip() for v in self.headers.get_all("Content-Length") or []}
        if len(values) != 1:
            raise RequestError("the request needs one Content-Length header, got "
                               f"{sorted(values) or 'none'}", param="Content-Length")
        text = values.pop()
        if not re.fullmatch(r"[0-9]{1,20}", text):
            raise RequestError(f"'Content-Length' must be a byte count, got {text!r:.40}",
                               param="Content-Length")
        size, limit = int(text), self.server.limits.max_body_bytes
        if size > limit:
            raise RequestError(f"the body is {size} bytes; this server takes at most {limit} "
                               "(--max-body-bytes)", status=413, code="body_too_large")
        try:
            raw = self.rfile.read(size)
        except Late:
            raise self._late() from None
        if len(raw) < size:
            raise RequestError(f"the body ended after {len(raw)} of the {size} bytes its "
                               "Content-Length announced", param="Content-Length")
        self.linger = False
        return raw
