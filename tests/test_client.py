"""Endpoint client against a fault-injecting OpenAI-compatible server: runs complete, retries
are bounded, failures are recorded, a resumed run fills the gaps, keys never leak."""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from steerlab.base.errors import SteerlabError
from steerlab.base.files import read_jsonl
from steerlab.traits.client import Endpoint, EndpointClient, parse_json_reply, validate_json
from steerlab.traits.collection import collect, collected_pairs
from steerlab.traits.elicit import elicit_trait
from steerlab.traits.judging import filter_pairs, judge, rubric_judge
from steerlab.traits.responders import EndpointResponder
from steerlab.traits.trait import Trait

KEY = "sk-test-very-secret-4242"


class FaultServer(ThreadingHTTPServer):
    """Chat completions whose reply depends on the user message: 'fail500' always fails with a
    body echoing the Authorization header, '429once' and 'slowonce' fail the first time,
    'garbage' returns a malformed body, anything else answers 'answer to <q>'. ``heal()``
    turns every fault off. The slow reply waits for ``release`` (set when the test ends), so it
    times out on any machine, however loaded, and however long the client's timeout."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _FaultHandler)
        self.seen: Counter[str] = Counter()
        self.healed = False
        self.reject_format = False  # answer 400 to response_format requests
        self.replies: dict[str, str] = {}  # user message -> fixed reply content
        self.lock = threading.Lock()
        self.release = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def heal(self) -> None:
        self.healed = True


class _FaultHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status, body: bytes, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        s: FaultServer = self.server
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        q = req["messages"][-1]["content"]
        with s.lock:
            s.seen[q] += 1
            n = s.seen[q]
        auth = self.headers.get("Authorization", "")
        if auth != f"Bearer {KEY}":
            return self._send(401, b'{"error": {"message": "bad key"}}')
        if s.reject_format and "response_format" in req:
            return self._send(400, b'{"error": {"message": "response_format unsupported"}}')
        if not s.healed:
            if "fail500" in q:
                return self._send(500, json.dumps({"error": {"message": f"boom {auth}"}}).encode())
            if "429once" in q and n == 1:
                return self._send(429, b'{"error": {"message": "slow down"}}',
                                  [("Retry-After", "0")])
            if "slowonce" in q and n == 1:
                s.release.wait(30)
            if "garbage" in q:
                return self._send(200, b'{"choices": [oops')
        content = s.replies.get(q, f"answer to {q}")
        self._send(200, json.dumps({
            "id": "x", "object": "chat.completion", "created": 0, "model": req["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}]}).encode())


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("STEERLAB_TEST_KEY", KEY)
    srv = FaultServer()
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


# A local reply takes milliseconds; 1 s leaves a loaded machine room not to time out where a
# test expects an answer (only the slow reply, which never comes in time, must time out).
def _client(server, retries=2, timeout=1.0, concurrency=4):
    return EndpointClient(Endpoint(server.url, "fake", "STEERLAB_TEST_KEY", timeout=timeout,
                                   max_retries=retries, backoff=0.01, concurrency=concurrency))


QUESTIONS = ["q0 fine", "q1 fail500", "q2 429once", "q3 slowonce", "q4 garbage", "q5 fine"]


def test_faults_do_not_stop_a_run_and_resume_fills_gaps(server, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "collected.jsonl"
    a = EndpointResponder(_client(server), "be a pirate", max_tokens=8)
    b = EndpointResponder(_client(server), "be plain", max_tokens=8)
    r = collect(QUESTIONS, a, b, out, samples=1, progress=False)
    # 500s and malformed bodies exhaust the retries; 429 and timeouts recover
    assert (r.written, r.failed, r.skipped) == (8, 4, 0)
    assert server.seen["q1 fail500"] == 2 * 3 and server.seen["q4 garbage"] == 2 * 3
    assert server.seen["q2 429once"] == 3 and server.seen["q0 fine"] == 2
    errors = [x for x in read_jsonl(out) if "error" in x]
    assert {x["prompt"] for x in errors} == {"q1 fail500", "q4 garbage"}
    assert any("InternalServerError" in x["error"] for x in errors)
    assert len(collected_pairs(out)) == 4

    server.heal()
    r2 = collect(QUESTIONS, a, b, out, samples=1, progress=False)
    assert (r2.written, r2.failed, r2.skipped) == (4, 0, 8)
    pairs = collected_pairs(out)
    assert [p.prompt for p in pairs] == QUESTIONS
    assert all(p.chosen == f"answer to {p.prompt}" for p in pairs)
    assert collect(QUESTIONS, a, b, out, samples=1, progress=False).written == 0

    text = out.read_text() + caplog.text + "".join(capsys.readouterr())
    assert "boom" in text and KEY not in text and "Bearer ***" in text


def test_missing_key_and_non_retryable_errors(server, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(SteerlabError, match="NO_SUCH_KEY_VAR"):
        EndpointClient(Endpoint(server.url, "fake", "NO_SUCH_KEY_VAR"))
    monkeypatch.setenv("WRONG_KEY", "sk-wrong-1234")
    c = EndpointClient(Endpoint(server.url, "fake", "WRONG_KEY", max_retries=3, backoff=0.01))
    with pytest.raises(RuntimeError, match="AuthenticationError") as e:
        c.chat([{"role": "user", "content": "hello 401"}])
    assert server.seen["hello 401"] == 1  # 4xx other than 429: no retry
    assert "sk-wrong-1234" not in str(e.value)


def test_structured_output_falls_back_to_parsing(server):
    c = _client(server)
    server.reject_format = True
    q = "rate this"
    server.replies[q] = 'Sure! ```json\n{"score": 72}\n```'
    schema = {"type": "object", "properties": {"score": {"type": "number"}},
              "required": ["score"]}
    assert c.chat_json([{"role": "user", "content": q}], schema) == {"score": 72}
    assert server.seen[q] == 2  # one rejected structured request, one plain


def test_rubric_judge_records_malformed_outputs(server, tmp_path):
    collected = tmp_path / "c.jsonl"
    collected.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "a", "prompt": "Q", "role": "chosen", "text": "good"},
        {"id": "a", "prompt": "Q", "role": "rejected", "text": "bad"},
        {"id": "b", "prompt": "Q2", "role": "chosen", "text": "huge"},
        {"id": "b", "prompt": "Q2", "role": "rejected", "text": "prose"}]))
    rubric = "Rate {answer}"
    suffix = '\n\nReply with JSON only: {"score": <number from 0 to 100>}'
    server.replies.update({f"Rate good{suffix}": '{"score": 90}',
                           f"Rate bad{suffix}": '{"score": 10}',
                           f"Rate huge{suffix}": '{"score": 250}',
                           f"Rate prose{suffix}": "I think it is quite good."})
    fn = rubric_judge(_client(server, retries=1), rubric)
    r = judge(collected, tmp_path / "j.jsonl", fn, progress=False)
    assert (r.written, r.failed) == (2, 2)
    errs = {x["id"]: x["error"] for x in read_jsonl(tmp_path / "j.jsonl") if "error" in x}
    assert set(errs) == {"b"} or len(errs) == 1
    assert server.seen[f"Rate huge{suffix}"] == 2  # malformed replies are retried, bounded
    pairs = filter_pairs(collected, tmp_path / "j.jsonl", tmp_path / "p.jsonl")
    assert [(p.id, p.chosen_score, p.rejected_score) for p in pairs] == [("a", 90.0, 10.0)]


def test_elicit_trait_with_structured_output(server):
    art = {"positive_instructions": ["Be playful!"], "negative_instructions": ["Be dry."],
           "questions": ["How?", "Why?", "How?"], "held_out_questions": ["Why?", "When?"],
           "evaluation_prompt": "Q: {question} A: {answer} 0-100?"}
    c = _client(server)
    server.replies.setdefault("x", "")
    t0 = Trait("playful", "The assistant is playful.")
    # the fake server answers the (unique) prompt with the artefacts as plain JSON
    from steerlab.traits.elicit import _PROMPT

    prompt = _PROMPT.format(name="playful", instruction=t0.trait_instruction, n_inst=1,
                            n_q=2, n_h=1)
    server.replies[prompt] = json.dumps(art)
    t = elicit_trait(c, t0, n_instructions=1, n_questions=2, n_held_out=1)
    assert t.questions == ("How?", "Why?") and t.held_out_questions == ("When?",)
    assert t.positive_instructions == ("Be playful!",) and "{answer}" in t.evaluation_prompt


def test_parse_and_validate_json():
    assert parse_json_reply('{"a": 1}') == {"a": 1}
    assert parse_json_reply("blah [1, 2] blah") == [1, 2]
    with pytest.raises(ValueError, match="no JSON"):
        parse_json_reply("nothing here")
    schema = {"type": "object", "required": ["s"],
              "properties": {"s": {"type": "number", "minimum": 0, "maximum": 100}}}
    validate_json({"s": 5}, schema)
    for bad, msg in (({}, "missing"), ({"s": "5"}, "expected number"), ({"s": 101}, "above"),
                     ({"s": True}, "expected number")):
        with pytest.raises(ValueError, match=msg):
            validate_json(bad, schema)
