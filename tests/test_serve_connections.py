"""``steerlab serve``'s connections, against real servers (``make_server`` on the tiny model,
eager engine): a client that trickles its request (request line, headers or body) gets 408
and a close within ``read_timeout`` of its connect while a normal client is served
meanwhile; a connection beyond ``max_connections`` gets 503 with ``Retry-After`` at once,
from no handler thread, while the capped ones stay open; HTTP/1.1 keep-alive (several
requests on one ``http.client`` connection; a stream, and a refusal before the body is read,
close it); an idle keep-alive connection, or one that never sends, is closed after its
timeout; the CLI checks the new flags before the model loads."""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import socket
import threading
import time

import pytest

from steerlab.serving.http_edge import Limits
from steerlab.serving.server import make_server

OK = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
      "temperature": 0}
SLACK = 0.8  # seconds a deadline may be overrun (thread wake-ups on a busy machine)


@contextlib.contextmanager
def _serving(model, **limits):
    srv = make_server(model, port=0, model_name="tiny", engine="eager", max_context=128,
                      limits=Limits(**limits))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv, srv.server_address[1]
    finally:
        srv.shutdown()


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _answer(sock: socket.socket, raw: bytes = b"") -> tuple[int, dict, bytes, bytes]:
    """One answer read off ``sock`` after ``raw``, the bytes already read: status, headers,
    body (by Content-Length) and the bytes read beyond it."""
    while b"\r\n\r\n" not in raw:
        more = sock.recv(1 << 16)
        assert more, f"closed before an answer: {raw!r}"
        raw += more
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    size = int(headers["content-length"])
    while len(rest) < size:
        more = sock.recv(1 << 16)
        assert more, "closed inside the body"
        rest += more
    return int(status_line.split()[1]), headers, rest[:size], rest[size:]


def _closes(sock: socket.socket, within: float) -> float:
    """Seconds until the server closes ``sock`` (it sends nothing more); fails after
    ``within``."""
    t = time.monotonic()
    sock.settimeout(within)
    assert sock.recv(1 << 16) == b""
    return time.monotonic() - t


def _get(conn: http.client.HTTPConnection, path: str, body: dict | None = None
         ) -> http.client.HTTPResponse:
    if body is None:
        conn.request("GET", path)
    else:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return conn.getresponse()


def _handler_threads() -> int:
    return sum("process_request_thread" in t.name for t in threading.enumerate())


HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"


@pytest.mark.parametrize("part", ["request line", "headers", "body"])
def test_a_trickling_client_gets_408_within_the_deadline(tiny_model, part):
    """Bytes every 0.2 s: each read is quick, the request never whole. Meanwhile a normal
    client is served."""
    deadline = 1.5
    sent = {"request line": b"", "headers": HEAD[:40], "body": HEAD}[part]
    with _serving(tiny_model, read_timeout=deadline) as (_, port):
        sock = _connect(port)
        t = time.monotonic()
        sock.sendall(sent)
        result = {}

        def normal():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            for key, path, body in (("health", "/health", None),
                                    ("chat", "/v1/chat/completions", OK)):
                r = _get(conn, path, body)
                r.read()
                result[key] = r.status
            result["at"] = time.monotonic() - t

        th = threading.Thread(target=normal)
        th.start()
        for byte in (HEAD if part == "request line" else b"x" * 100 if part == "body"
                     else HEAD[40:]):
            sock.sendall(bytes([byte]))
            if select.select([sock], [], [], 0.2)[0]:
                break
        status, headers, body, rest = _answer(sock)
        took = time.monotonic() - t
        assert rest == b"" and _closes(sock, 2.0) < 0.5
        th.join(10)
    assert deadline - 0.1 < took < deadline + SLACK, took
    assert status == 408 and headers["connection"] == "close"
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == "read_timeout" and "--read-timeout of 1.5 s" in err["message"]
    assert result == {"health": 200, "chat": 200, "at": result["at"]} and result["at"] < took


def test_a_connection_that_never_sends_is_closed_after_the_deadline(tiny_model):
    with _serving(tiny_model, read_timeout=1.0) as (_, port):
        sock = _connect(port)
        assert _closes(sock, 1.0 + SLACK) > 0.9  # no answer: nothing was asked


def test_connections_over_the_cap_get_503_at_once(tiny_model):
    with _serving(tiny_model, max_connections=2, read_timeout=10.0) as (srv, port):
        held = [_connect(port), _connect(port)]
        t = time.monotonic()
        while srv.connections < 2:
            assert time.monotonic() - t < 5
            time.sleep(0.01)
        threads = _handler_threads()
        for _ in range(3):
            t = time.monotonic()
            sock = _connect(port)
            status, headers, body, rest = _answer(sock)
            assert time.monotonic() - t < 0.5
            assert status == 503 and headers["retry-after"] == "1"
            assert headers["connection"] == "close" and rest == b""
            assert _closes(sock, 1.0) < 0.5
            err = json.loads(body)["error"]
            assert err["code"] == "too_many_connections" and "--max-connections" in err["message"]
        assert _handler_threads() == threads and srv.connections == 2  # no thread started
        assert not select.select(held, [], [], 0)[0]  # the capped ones: open, untouched
        held[0].close()
        t = time.monotonic()
        while srv.connections > 1:
            assert time.monotonic() - t < 5
            time.sleep(0.01)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        assert _get(conn, "/health").status == 200  # a freed place is taken again
        conn.close()
        held[1].close()


def test_keep_alive_serves_several_requests_on_one_connection(tiny_model):
    with _serving(tiny_model) as (_, port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        r = _get(conn, "/health")
        sock = conn.sock
        assert r.status == 200 and r.version == 11 and r.getheader("Connection") is None
        r.read()
        for path, body, status in (("/v1/chat/completions", OK, 200), ("/v1/models", None, 200),
                                   ("/v1/chat/completions", {**OK, "temperature": "hot"}, 400)):
            r = _get(conn, path, body)
            assert r.status == status and json.loads(r.read())
            assert conn.sock is sock  # the same connection, kept
        # a stream has no length: it closes its connection after [DONE]
        r = _get(conn, "/v1/chat/completions", {**OK, "stream": True})
        assert r.status == 200 and r.getheader("Connection") == "close"
        assert r.read().rstrip().endswith(b"data: [DONE]") and conn.sock is None
        # a refusal before the body is read (the key, the route, the size) closes too
        r = _get(conn, "/v1/nowhere", OK)
        assert r.status == 404 and r.getheader("Connection") == "close"
        r.read()
        assert conn.sock is None
        assert _get(conn, "/health").status == 200  # http.client reconnects
        conn.close()


def test_an_idle_keep_alive_connection_is_closed_after_its_timeout(tiny_model):
    with _serving(tiny_model, idle_timeout=0.6) as (_, port):
        sock = _connect(port)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 2)  # pipelined
        rest = b""
        for i in range(3):  # both answered, then one more sent within the idle time
            if i == 2:
                time.sleep(0.3)
                sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, _, rest = _answer(sock, rest)
            assert status == 200 and "connection" not in headers
        assert rest == b"" and 0.5 < _closes(sock, 0.6 + SLACK)


@pytest.mark.parametrize("flag, value, field", [
    ("--read-timeout", "0", "read_timeout"), ("--idle-timeout", "nan", "idle_timeout"),
    ("--max-connections", "0", "max_connections"), ("--vectors-dir", "/nonexistent/vectors",
                                                    "vectors_dir")])
def test_cli_checks_the_connection_flags_before_the_model_loads(capsys, flag, value, field):
    from conftest import run_cli

    missing = "/nonexistent/model"  # loading it fails: reaching the load means the check passed
    assert run_cli("serve", "--model", missing, flag, value) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err and missing not in err, err
