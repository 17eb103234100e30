"""``steerlab serve`` as a real subprocess on localhost: the OpenAI SDK talks to it, streaming
matches non-streaming, bad requests get 400s, the pirate pipeline over HTTP gives the same
pairs as local responders (greedy), and continuous batching: 16 concurrent clients (steered,
unsteered, sampled) get the replies they get one at a time, at >= 4x the throughput; streams
and disconnects per row; a failing decode step answers 500s instead of hanging, or ends its
stream with an error event and [DONE] (both engines). Bad requests in depth, the key, limits
and a soak: tests/test_bad_requests.py."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from steerlab.model.personas import Persona
from steerlab.traits.client import Endpoint, EndpointClient
from steerlab.traits.collection import collect, collected_pairs
from steerlab.traits.judging import filter_pairs, judge, scorer_judge
from steerlab.traits.responders import EndpointResponder, LocalResponder
from steerlab.traits.trait import load_trait

pytestmark = pytest.mark.slow


MAX_CONTEXT = 512


@pytest.fixture(scope="module")
def vectors_dir(tmp_path_factory):
    """The server's --vectors-dir; the vector fixtures below save into it (it is read when
    a request names a vector)."""
    return tmp_path_factory.mktemp("vectors")


@pytest.fixture(scope="module")
def serve_proc(tmp_path_factory, vectors_dir):
    """The server subprocess (default engine: static, 16 slots) and its log file."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1",  # same threads: same float sums as here
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "steerlab.cli", "serve", "--port", "0",
                                 "--device", "cpu", "--max-context", str(MAX_CONTEXT),
                                 "--vectors-dir", str(vectors_dir)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "serving embedded on http://" in line, (line, log.read_text())
        yield line.split()[-1], log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(serve_proc):
    return serve_proc[0]


def _client(url, concurrency=2):
    return EndpointClient(Endpoint(url, "embedded", None, timeout=120.0, max_retries=0,
                                   concurrency=concurrency))


def _post(url, body, timeout=60) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_stream_and_plain_agree(server):
    import openai

    sdk = openai.OpenAI(base_url=server, api_key="none")
    assert [m.id for m in sdk.models.list()] == ["embedded"]
    msgs = [{"role": "user", "content": "Tell me about the sea."}]
    plain = sdk.chat.completions.create(model="embedded", messages=msgs, max_tokens=16,
                                        temperature=0)
    chunks = list(sdk.chat.completions.create(model="embedded", messages=msgs, max_tokens=16,
                                              temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert plain.choices[0].message.content == streamed
    assert plain.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 16


def test_bad_requests_get_400(server, tmp_path):
    ok = {"model": "embedded", "messages": [{"role": "user", "content": "Hi"}],
          "max_tokens": 2}
    for change, msg in (({"messages": []}, "messages"),
                        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
                        ({"max_tokens": 0}, "max_tokens"),
                        ({"temperature": "hot"}, "temperature"),
                        ({"persona": 3}, "persona"),
                        ({"steering": {"vector": "v.safetensors"}}, "steering.alpha"),
                        ({"steering": {"vector": str(tmp_path / "no.safetensors"),
                                       "alpha": 2.0}}, "steering.vector"),
                        ({"persona": "\ud800"}, "lone surrogate"),
                        ({"steering": {"vector": "v", "alpha": 1, "layers": "all"}},
                         "steering.layers"),
                        ({"steering": {"vector": "v", "alpha": 1, "colour": 1}}, "steering"),
                        ({"max_tokens": MAX_CONTEXT - 8}, "max_tokens"),  # prompt + that > 512
                        ({"max_tokens": MAX_CONTEXT - 8, "stream": True}, "max_context")):
        status, body = _post(server, {**ok, **change})
        assert status == 400 and msg in body["error"]["message"], (change, body)
    status, body = _post(server, ok)
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"


def test_pipeline_over_http_matches_local(server, embedded_model, tmp_path):
    t = load_trait("pirate")
    questions = list(t.questions[:3])
    pos, neg = t.positive_instructions[0], t.negative_instructions[0]
    client = _client(server, concurrency=6)  # a side's questions decode together
    http = (EndpointResponder(client, pos, max_tokens=32),
            EndpointResponder(client, neg, max_tokens=32))
    local = (LocalResponder(embedded_model, pos, max_tokens=32, batch_size=1),
             LocalResponder(embedded_model, neg, max_tokens=32, batch_size=1))
    judge_fn = scorer_judge(t.build_scorer())
    out = {}
    for name, (a, b) in (("http", http), ("local", local)):
        d = tmp_path / name
        r = collect(questions, a, b, d / "collected.jsonl", samples=1, progress=False)
        assert r.failed == 0
        judge(d / "collected.jsonl", d / "judged.jsonl", judge_fn, progress=False)
        out[name] = (collected_pairs(d / "collected.jsonl"),
                     filter_pairs(d / "collected.jsonl", d / "judged.jsonl", min_distinct=0.0))
    assert out["http"] == out["local"]
    assert len(out["http"][0]) == 3

    # the persona request field relabels the assistant turn like a local persona responder
    persona = Persona("Captain Hook", "custom")
    via_http = dict(EndpointResponder(client, None, max_tokens=12,
                                      extra_body={"persona": "Captain Hook"}).respond(["Hi!"]))
    via_local = dict(LocalResponder(embedded_model, None, persona, max_tokens=12).respond(["Hi!"]))
    assert via_http == via_local


@pytest.fixture(scope="module")
def pirate_vector(embedded_model, vectors_dir):
    """A small pirate vector (response means of four hand-written pairs), served as 'pirate'."""
    from types import SimpleNamespace

    from steerlab.extraction.capture import capture_pairs
    from steerlab.steering.vector import SteeringVector

    rows = [("How is the weather?", "Arr, the seas be calm, matey!", "It is sunny and mild."),
            ("What do you eat?", "Arr, salted pork and grog, matey!", "Mostly pasta."),
            ("Where did you go?", "Arr, to Tortuga, ye landlubber!", "To the mountains."),
            ("Do you like music?", "Aye, a fine sea shanty, me hearty!", "Yes, jazz and folk.")]
    pairs = [SimpleNamespace(id=str(i), prompt=p, chosen=c, rejected=r)
             for i, (p, c, r) in enumerate(rows)]
    acts = capture_pairs(embedded_model, pairs, [6, 8], mean=True)
    vector = SteeringVector((acts.chosen_mean - acts.rejected_mean).mean(0), (6, 8))
    vector.save(vectors_dir / "pirate")
    return vector, "pirate"


def test_steering_field_equals_local_steer(server, embedded_model, pirate_vector):
    from steerlab.generation.generator import generate
    from steerlab.model.templates import encode_messages
    from steerlab.steering.intervention import steer

    vector, path = pirate_vector
    tok = embedded_model.tokenizer
    msgs = [{"role": "user", "content": "Tell me about your weekend."}]
    ids = encode_messages(tok, msgs)
    body = {"model": "embedded", "messages": msgs, "max_tokens": 24, "temperature": 0}

    def local(alpha=None, layers=None):
        if alpha is None:
            return generate(embedded_model, [ids], max_new_tokens=24).tokens[0]
        with steer(embedded_model, vector, alpha, layers=layers):
            return generate(embedded_model, [ids], max_new_tokens=24).tokens[0]

    def http(steering=None, stream=False):
        req = {**body, **({"steering": steering} if steering else {})}
        if not stream:
            status, out = _post(server, req)
            assert status == 200, out
            return out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"]
        import openai

        sdk = openai.OpenAI(base_url=server, api_key="none")
        chunks = sdk.chat.completions.create(**body, extra_body={"steering": steering},
                                             stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), None

    plain = local()
    text = tok.decode(plain, skip_special_tokens=True)
    configs = ((1.0, [8]), (-1.5, None), (0.75, [6, 8]))
    wants = [local(alpha, layers) for alpha, layers in configs]
    for want in wants:  # the vector moves the greedy reply, so equality below means much
        assert want != plain
    # every request at once (rows are independent, tested below): plain, strength 0, and
    # each steering plain and streamed, side by side in one batch
    specs = [None, {"vector": path, "alpha": 0.0}] + [
        {"vector": path, "alpha": alpha, "layers": layers} for alpha, layers in configs]
    jobs = [(spec, False) for spec in specs] + [(spec, True) for spec in specs[2:]]
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: http(*job), jobs))
    assert got[0] == (text, len(plain))
    assert got[1] == got[0]  # strength 0: unsteered
    for i, want in enumerate(wants):
        assert got[2 + i] == (tok.decode(want, skip_special_tokens=True), len(want))
        assert got[5 + i][0] == tok.decode(want, skip_special_tokens=True)  # streamed
    # the steering is per request: the next plain request is unsteered again
    assert http()[0] == text


def test_bad_steering_gets_a_4xx_naming_the_field(server, pirate_vector, vectors_dir,
                                                  tmp_path):
    import torch

    from steerlab.steering.vector import SteeringVector

    _, path = pirate_vector
    SteeringVector(torch.ones(1, 64), (8,)).save(vectors_dir / "narrow")
    SteeringVector(torch.ones(1, 576), (8,)).save(tmp_path / "outside")
    ok = {"model": "embedded", "messages": [{"role": "user", "content": "Hi"}],
          "max_tokens": 2}
    cases = (({"vector": str(tmp_path / "outside"), "alpha": 1.0}, "steering.vector"),
             ({"vector": "missing", "alpha": 1.0}, "no usable vector"),
             ({"vector": path, "alpha": "strong"}, "steering.alpha"),
             ({"vector": path, "alpha": True}, "steering.alpha"),
             ({"vector": path, "alpha": 1e9}, "steering.alpha"),
             ({"vector": path, "alpha": 1.0, "layers": [99]}, "layers"),
             ({"vector": path, "alpha": 1.0, "layers": [3]}, "layers"),
             ({"vector": "narrow", "alpha": 1.0}, "vector"),
             ("pirate", "steering"))
    for stream in (False, True):
        for spec, field in cases:
            status, body = _post(server, {**ok, "steering": spec, "stream": stream})
            assert 400 <= status < 500, (spec, stream, status)
            assert field in body["error"]["message"], (spec, stream, body)
    assert _post(server, {**ok, "steering": {"vector": path, "alpha": 1.0}})[0] == 200


# -- continuous batching -------------------------------------------------------------------

QUESTIONS = ["What do you like to do on weekends?", "Describe the ocean in two sentences.",
             "How do I boil an egg?", "Tell me a short story about a dragon.",
             "What is the capital of France, and why is it famous?",
             "Give me three tips for learning to code.", "Why is the sky blue?",
             "Write a limerick about a cat."]
# per question: (alpha, layers) of its steered twin; the twins of the last two sample
STEER = [(1.0, [10]), (-1.5, [4, 16]), (2.0, None), (1.5, [16]), (-2.0, [10]), (2.5, [4]),
         (-1.0, None), (3.0, [10, 16])]
BUDGET = [32, 36, 40, 32, 36, 40, 32, 36]


@pytest.fixture(scope="module")
def random_vector(vectors_dir):
    """Seeded random directions (norm 40, about a third of a mid-layer residual) at layers
    4, 10 and 16, in raw units: strong enough to move every greedy reply below."""
    from steerlab.steering.vector import SteeringVector

    g = torch.Generator().manual_seed(0)
    d = torch.randn(3, 576, generator=g)
    vector = SteeringVector(40 * d / d.norm(dim=-1, keepdim=True), (4, 10, 16))
    vector.save(vectors_dir / "random")
    return "random"


def _mixed_requests(vector):
    """16 requests: each question unsteered and steered (own strength and layers), budgets
    32-40, a persona and a system message on some, the last two questions sampled (seeded)."""
    out = []
    for i, q in enumerate(QUESTIONS):
        msgs = [{"role": "user", "content": q}]
        if i == 3:
            msgs = [{"role": "system", "content": "Answer briefly."}, *msgs]
        base = {"model": "embedded", "messages": msgs, "max_tokens": BUDGET[i],
                "temperature": 0.8 if i >= 6 else 0, **({"seed": 100 + i} if i >= 6 else {}),
                **({"persona": "a pirate captain"} if i == 2 else {})}
        alpha, layers = STEER[i]
        out += [base, {**base, "steering": {"vector": vector, "alpha": alpha, "layers": layers}}]
    return out


def _answer(url, body):
    status, out = _post(url, body, timeout=600)
    assert status == 200, out
    return out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"]


@pytest.fixture(scope="module")
def batched_runs(server, random_vector):
    """The 16 requests one at a time, then all at once from 16 threads: replies and wall
    times of both."""
    bodies = _mixed_requests(random_vector)
    _answer(server, {**bodies[1], "max_tokens": 4})  # warm-up: the cache is allocated
    t = time.perf_counter()
    one_at_a_time = [_answer(server, b) for b in bodies]
    sequential_s = time.perf_counter() - t
    together: list = [None] * len(bodies)
    start = threading.Barrier(len(bodies) + 1)

    def client(i):
        start.wait()
        together[i] = _answer(server, bodies[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for th in threads:
        th.start()
    start.wait()
    t = time.perf_counter()
    for th in threads:
        th.join()
    concurrent_s = time.perf_counter() - t
    return bodies, one_at_a_time, sequential_s, together, concurrent_s


def test_concurrent_clients_get_their_one_at_a_time_replies(batched_runs):
    bodies, one_at_a_time, _, together, _ = batched_runs
    assert together == one_at_a_time
    for i in range(0, 12, 2):  # greedy twins: the steering moved each reply
        assert one_at_a_time[i][0] != one_at_a_time[i + 1][0], bodies[i + 1]
    for body, (_, n) in zip(bodies, one_at_a_time, strict=True):
        assert 0 < n <= body["max_tokens"]
    assert len({text for text, _ in one_at_a_time}) == len(bodies)


def test_concurrent_throughput_is_4x_one_at_a_time(batched_runs):
    _, one_at_a_time, sequential_s, together, concurrent_s = batched_runs
    tokens = sum(n for _, n in one_at_a_time)
    assert tokens == sum(n for _, n in together)
    ratio = (tokens / concurrent_s) / (tokens / sequential_s)
    print(f"\n{tokens} tokens: one at a time {tokens / sequential_s:.1f} tok/s, 16 together "
          f"{tokens / concurrent_s:.1f} tok/s: {ratio:.1f}x")
    assert ratio >= 4.0, (sequential_s, concurrent_s)


def _in_background(url, bodies):
    out: list = [None] * len(bodies)

    def run(i):
        out[i] = _answer(url, bodies[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for th in threads:
        th.start()
    return out, threads


def test_stream_under_concurrency_equals_its_plain_reply(server, batched_runs):
    import openai

    bodies, one_at_a_time, *_ = batched_runs
    others, threads = _in_background(server, bodies[2:8])
    sdk = openai.OpenAI(base_url=server, api_key="none")
    body = {k: v for k, v in bodies[1].items() if k != "steering"}
    chunks = list(sdk.chat.completions.create(**body, extra_body={
        "steering": bodies[1]["steering"]}, stream=True))
    for th in threads:
        th.join()
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and
              c.choices[0].delta.content]
    assert "".join(pieces) == one_at_a_time[1][0]
    assert len(pieces) > 2  # chunks arrive at each check, not all at the end
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == one_at_a_time[1][1]
    assert others == one_at_a_time[2:8]


def _read_chunks(url, body, n):
    """Open a raw streaming request, read ``n`` content chunks, then hang up."""
    host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()
    sock = socket.create_connection((host, int(port)), timeout=120)
    data = json.dumps({**body, "stream": True}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    buf, seen = b"", 0
    while seen < n:
        more = sock.recv(65536)
        assert more, buf
        buf += more
        seen = buf.count(b'"content": "') - 1  # the first chunk holds the empty role delta
    sock.close()
    return buf


def test_disconnected_stream_frees_its_slot(serve_proc):
    url, log = serve_proc
    body = {"model": "embedded", "messages": [{"role": "user", "content": "Tell me a long "
            "story about the sea."}], "max_tokens": 400, "temperature": 0}
    plain = {**body, "max_tokens": 8}
    others, threads = _in_background(url, [plain, plain])
    _read_chunks(url, body, 3)
    t = time.perf_counter()
    for th in threads:
        th.join()
    assert others[0] == others[1] and others[0][1] == 8
    # the server logs the freed slot at its next checks; the row stopped long before 400
    pattern = re.compile(r"client went away after (\d+) of 400 tokens")
    while not (found := pattern.findall(log.read_text())) and time.perf_counter() - t < 60:
        time.sleep(0.5)
    assert found and int(found[-1]) < 100, log.read_text()[-2000:]
    assert _answer(url, plain) == others[0]  # and the server goes on serving


def _error_then_done(raw: bytes) -> dict:
    """The error event ending a stream (OpenAI's shape), checked to be followed by [DONE]."""
    events = [e for e in raw.split(b"\r\n\r\n", 1)[-1].decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]", events[-3:]
    err = json.loads(events[-2].removeprefix("data: "))["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


@pytest.mark.parametrize("engine", ["static", "eager"])
def test_failing_decode_answers_500_and_shutdown_stops_the_scheduler(tokenizer, engine):
    from conftest import make_tiny_model

    from steerlab.model.attention import use_hf_mixers
    from steerlab.model.hooks import decoder_layers
    from steerlab.serving.server import make_server

    model = make_tiny_model(tokenizer, n_layers=2, seed=2)
    use_hf_mixers(model.original_model, "sdpa")
    srv = make_server(model, port=0, model_name="tiny", max_batch=4, max_context=256,
                      engine=engine)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
            "temperature": 0}
    state = {"fail_after": None, "calls": 0, "sleep": 0.0}

    def hook(module, args, output):
        state["calls"] += 1
        time.sleep(state["sleep"])
        if state["fail_after"] is not None and state["calls"] > state["fail_after"]:
            raise RuntimeError("boom in layer 1")

    handle = decoder_layers(model)[1].register_forward_hook(hook)
    try:
        ok = _post(url, body)
        assert ok[0] == 200
        state.update(fail_after=0, calls=0)  # the prefill fails: a plain 500
        status, out = _post(url, body)
        assert status == 500 and "boom in layer 1" in out["error"]["message"], out
        state.update(fail_after=None)
        assert _post(url, body) == (200, {**ok[1], "id": ANY, "created": ANY})
        state.update(fail_after=8, calls=0)  # fails mid-stream: an error event, then [DONE]
        raw = _drain(*_open_stream(url, {**body, "max_tokens": 200}))
        assert b'"finish_reason": null' in raw
        err = _error_then_done(raw)
        assert "boom in layer 1" in err["message"] and err["type"] == "server_error"
        state.update(fail_after=None)
        assert _post(url, body) == (200, {**ok[1], "id": ANY, "created": ANY})  # serving on
        if engine == "eager":
            return
        state.update(sleep=0.01)  # a slow row, then the server closes
        opened = _open_stream(url, {**body, "max_tokens": 200})
        srv.shutdown()
        srv.server_close()
        assert "shutting down" in _error_then_done(_drain(*opened))["message"]
        assert not srv.batcher.alive
    finally:
        handle.remove()
        srv.server_close()


class _Any:
    def __eq__(self, other):
        return True


ANY = _Any()


def _open_stream(url, body):
    """A raw streaming request whose stream has opened: ``(socket, bytes read)``."""
    host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()
    sock = socket.create_connection((host, int(port)), timeout=60)
    data = json.dumps({**body, "stream": True}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    buf = b""
    while b'"finish_reason": null' not in buf:
        more = sock.recv(65536)
        assert more, buf
        buf += more
    return sock, buf


def _drain(sock, buf):
    """``buf`` and everything after it until the server closes the connection."""
    while more := sock.recv(65536):
        buf += more
    sock.close()
    return buf
