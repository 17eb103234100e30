"""The HTTP edge of ``steerlab serve``: limits, the API key, routes, bodies, errors, deadlines.

:class:`Handler` answers everything that needs no model: a refusal by the stdlib's parser, a
missing or wrong key (401), an unknown route (404), a method a route does not take (405 with
``Allow``), a bad ``Content-Length`` or a short body (400), a body over the limit (413), a
body that is not a JSON object (400), and the field checks of
:mod:`steerlab.chat_request`. Every refusal is JSON in OpenAI's error shape
(``{"error": {"message", "type", "param", "code"}}``), never a dropped connection. What
passes goes to the server's ``complete(handler, request)``. :class:`Watch` is a request's
deadline and its client's socket, looked at while it waits or decodes.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import re
import select
import socket
import time
from dataclasses import dataclass, fields
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any

from steerlab.chat_request import RequestError, decode_body, parse_chat_request
from steerlab.errors import SteerlabError

__all__ = ["Handler", "Limits", "Watch", "authorize", "check_exposure", "error_body",
           "server_error"]

log = logging.getLogger(__name__)

ROUTES = {"/v1/chat/completions": "POST", "/chat/completions": "POST", "/v1/models": "GET",
          "/models": "GET", "/health": "GET"}
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
        read_timeout: seconds a client may take to send its request.
    """

    max_tokens: int = 1024
    max_body_bytes: int = 1 << 20
    request_timeout: float = 300.0
    max_queue: int = 64
    read_timeout: float = 30.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            low = 0 if f.name == "max_queue" else 1
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= low:
                raise SteerlabError(f"got {v!r}; expected a number >= {low}", field=f.name)


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


def _hung_up(sock: socket.socket) -> bool:
    """True once the client has closed its end (EOF or reset); unread bytes stay unread."""
    try:
        if hasattr(select, "poll"):  # no FD_SETSIZE limit: a busy server has many sockets
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            readable = bool(poller.poll(0))
        else:
            readable = bool(select.select([sock], [], [], 0)[0])
        return readable and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class Watch:
    """A request's deadline and its client: :meth:`stop` says when to give up, and why."""

    def __init__(self, sock: socket.socket, seconds: float):
        self.sock, self.seconds = sock, seconds
        self.deadline = time.monotonic() + seconds
        self.reason: str | None = None  # "timeout" or "gone"

    def stop(self) -> bool:
        if self.reason is None:
            if time.monotonic() > self.deadline:
                self.reason = "timeout"
            elif _hung_up(self.sock):
                self.reason = "gone"
        return self.reason is not None

    def error(self) -> RequestError:
        return RequestError(f"the request ran past the server's --request-timeout of "
                            f"{self.seconds:g} s; its slot is freed", status=504,
                            kind="timeout_error", code="request_timeout")


class Handler(BaseHTTPRequestHandler):
    server: Any  # steerlab.serve's server: limits, authorize, health, models, complete
    responded = False
    linger = False  # answered before reading the body: drain it, so the answer is not reset

    def setup(self) -> None:
        self.timeout = self.server.limits.read_timeout
        super().setup()

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def send_response(self, code: int, message: str | None = None) -> None:
        self.responded = True
        super().send_response(code, message)

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
        except TimeoutError:
            raise RequestError(f"the body stopped coming for {self.timeout:g} s before the "
                               f"{size} bytes its Content-Length announced",
                               param="Content-Length") from None
        if len(raw) < size:
            raise RequestError(f"the body ended after {len(raw)} of the {size} bytes its "
                               "Content-Length announced", param="Content-Length")
        self.linger = False
        return raw
