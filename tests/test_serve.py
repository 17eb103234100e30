"""``steerlab serve`` as a real subprocess on localhost: the OpenAI SDK talks to it, streaming
matches non-streaming, bad requests get 400s, and the pirate pipeline over HTTP gives the same
pairs as local responders (greedy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from steerlab.client import Endpoint, EndpointClient
from steerlab.collect import collect, collected_pairs
from steerlab.judge import filter_pairs, judge, scorer_judge
from steerlab.personas import Persona
from steerlab.responders import EndpointResponder, LocalResponder
from steerlab.traits import load_trait

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "steerlab.cli", "serve", "--port", "0",
                             "--device", "cpu"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "serving embedded on http://" in line, line
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _client(url, concurrency=2):
    return EndpointClient(Endpoint(url, "embedded", None, timeout=120.0, max_retries=0,
                                   concurrency=concurrency))


def _post(url, body) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
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
                        ({"steering": {"vector": "v", "alpha": 1, "layers": "all"}},
                         "steering.layers"),
                        ({"steering": {"vector": "v", "alpha": 1, "colour": 1}}, "steering")):
        status, body = _post(server, {**ok, **change})
        assert status == 400 and msg in body["error"]["message"], (change, body)
    status, body = _post(server, ok)
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"


def test_pipeline_over_http_matches_local(server, embedded_model, tmp_path):
    t = load_trait("pirate")
    questions = list(t.questions[:4])
    pos, neg = t.positive_instructions[0], t.negative_instructions[0]
    client = _client(server)
    http = (EndpointResponder(client, pos, max_tokens=48),
            EndpointResponder(client, neg, max_tokens=48))
    local = (LocalResponder(embedded_model, pos, max_tokens=48, batch_size=1),
             LocalResponder(embedded_model, neg, max_tokens=48, batch_size=1))
    judge_fn = scorer_judge(t.build_scorer())
    out = {}
    for name, (a, b) in (("http", http), ("local", local)):
        d = tmp_path / name
        r = collect(questions, a, b, d / "collected.jsonl", progress=False)
        assert r.failed == 0
        judge(d / "collected.jsonl", d / "judged.jsonl", judge_fn, progress=False)
        out[name] = (collected_pairs(d / "collected.jsonl"),
                     filter_pairs(d / "collected.jsonl", d / "judged.jsonl"))
    assert out["http"] == out["local"]
    assert len(out["http"][0]) == 4

    # the persona request field relabels the assistant turn like a local persona responder
    persona = Persona("Captain Hook", "custom")
    via_http = dict(EndpointResponder(client, None, max_tokens=12,
                                      extra_body={"persona": "Captain Hook"}).respond(["Hi!"]))
    via_local = dict(LocalResponder(embedded_model, None, persona, max_tokens=12).respond(["Hi!"]))
    assert via_http == via_local
