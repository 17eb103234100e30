"""The clocks of a ``steerlab serve`` connection: how long its client may take.

:class:`Clock` holds a connection's socket reads to their deadlines: a request (request line,
headers and body) must arrive whole within ``read_s`` (from the accept for the first request,
from its first byte for a later one) and a keep-alive connection may sit idle ``idle_s``
between requests; past either, a read raises :class:`Late`. :class:`Watch` is an admitted
request's deadline and its client's socket, looked at while it waits for a slot or decodes.
"""

from __future__ import annotations

import io
import select
import socket
import time
from typing import Any

from steerlab.serving.requests import RequestError

__all__ = ["Clock", "Late", "Watch"]


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


class Late(Exception):  # noqa: N818 - not an OSError: the stdlib's handler would swallow it
    """A request did not arrive within its deadline (``started``: some of it had), or a
    keep-alive connection sat idle past its idle time."""

    def __init__(self, started: bool):
        super().__init__("late")
        self.started = started


class Clock(io.RawIOBase):
    """A connection's socket reads, held to its deadlines (raises :class:`Late`).

    The first request must arrive whole within ``read_s`` of the accept; a later one must
    begin within ``idle_s`` (:meth:`next_request`) and arrive within ``read_s`` of its first
    byte. Between reads the socket keeps ``read_s`` as its per-operation timeout, for the
    writes."""

    def __init__(self, sock: socket.socket, read_s: float, idle_s: float):
        self.sock, self.read_s, self.idle_s = sock, read_s, idle_s
        self.deadline = time.monotonic() + read_s
        self.idle, self.got = False, 0  # idle: the next byte starts the request's clock

    def readable(self) -> bool:
        return True

    def next_request(self) -> None:
        self.deadline = time.monotonic() + self.idle_s
        self.idle, self.got = True, 0

    def readinto(self, buf: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Late(self.got > 0)
        self.sock.settimeout(left)
        try:
            n = self.sock.recv_into(buf)
        except TimeoutError:
            raise Late(self.got > 0) from None
        finally:
            self.sock.settimeout(self.read_s)
        if n and self.idle:
            self.idle, self.deadline = False, time.monotonic() + self.read_s
        self.got += n
        return n
