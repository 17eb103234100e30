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
import torch

from steerlab.client import Endpoint, EndpointClient
from steerlab.collect import collect, collected_pairs
from steerlab.judge import filter_pairs, judge, scorer_judge
from steerlab.personas import Persona
from steerlab.responders import EndpointResponder, LocalResponder
from steerlab.traits import load_trait

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    env = {**os.environ, "HF_HUB_OFFLINE": "1",  # same threads: same float sums as here
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
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
    questions = list(t.questions[:3])
    pos, neg = t.positive_instructions[0], t.negative_instructions[0]
    client = _client(server)
    http = (EndpointResponder(client, pos, max_tokens=32),
            EndpointResponder(client, neg, max_tokens=32))
    local = (LocalResponder(embedded_model, pos, max_tokens=32, batch_size=1),
             LocalResponder(embedded_model, neg, max_tokens=32, batch_size=1))
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
    assert len(out["http"][0]) == 3

    # the persona request field relabels the assistant turn like a local persona responder
    persona = Persona("Captain Hook", "custom")
    via_http = dict(EndpointResponder(client, None, max_tokens=12,
                                      extra_body={"persona": "Captain Hook"}).respond(["Hi!"]))
    via_local = dict(LocalResponder(embedded_model, None, persona, max_tokens=12).respond(["Hi!"]))
    assert via_http == via_local


@pytest.fixture(scope="module")
def pirate_vector(embedded_model, tmp_path_factory):
    """A small pirate vector (response means of four hand-written pairs) saved to disk."""
    from types import SimpleNamespace

    from steerlab.capture import capture_pairs
    from steerlab.vectors import SteeringVector

    rows = [("How is the weather?", "Arr, the seas be calm, matey!", "It is sunny and mild."),
            ("What do you eat?", "Arr, salted pork and grog, matey!", "Mostly pasta."),
            ("Where did you go?", "Arr, to Tortuga, ye landlubber!", "To the mountains."),
            ("Do you like music?", "Aye, a fine sea shanty, me hearty!", "Yes, jazz and folk.")]
    pairs = [SimpleNamespace(id=str(i), prompt=p, chosen=c, rejected=r)
             for i, (p, c, r) in enumerate(rows)]
    acts = capture_pairs(embedded_model, pairs, [6, 8], mean=True)
    vector = SteeringVector((acts.chosen_mean - acts.rejected_mean).mean(0), (6, 8))
    return vector, vector.save(tmp_path_factory.mktemp("vec") / "pirate")


def test_steering_field_equals_local_steer(server, embedded_model, pirate_vector):
    from steerlab.generate import generate
    from steerlab.responders import encode_messages
    from steerlab.steer import steer

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
    assert http() == (tok.decode(plain, skip_special_tokens=True), len(plain))
    assert http({"vector": str(path), "alpha": 0.0}) == http()  # strength 0: unsteered
    for alpha, layers in ((1.0, [8]), (-1.5, None), (0.75, [6, 8])):
        want = local(alpha, layers)
        assert want != plain  # the vector moves the greedy reply, so equality below means much
        spec = {"vector": str(path), "alpha": alpha, "layers": layers}
        assert http(spec) == (tok.decode(want, skip_special_tokens=True), len(want))
        assert http(spec, stream=True)[0] == tok.decode(want, skip_special_tokens=True)
    # the steering is per request: the next plain request is unsteered again
    assert http()[0] == tok.decode(plain, skip_special_tokens=True)


def test_bad_steering_gets_a_4xx_naming_the_field(server, pirate_vector, tmp_path):
    import torch

    from steerlab.vectors import SteeringVector

    _, path = pirate_vector
    wrong_width = SteeringVector(torch.ones(1, 64), (8,)).save(tmp_path / "narrow")
    ok = {"model": "embedded", "messages": [{"role": "user", "content": "Hi"}],
          "max_tokens": 2}
    cases = (({"vector": str(tmp_path / "missing"), "alpha": 1.0}, "steering.vector"),
             ({"vector": str(path), "alpha": "strong"}, "steering.alpha"),
             ({"vector": str(path), "alpha": True}, "steering.alpha"),
             ({"vector": str(path), "alpha": 1e9}, "steering.alpha"),
             ({"vector": str(path), "alpha": 1.0, "layers": [99]}, "layers"),
             ({"vector": str(path), "alpha": 1.0, "layers": [3]}, "layers"),
             ({"vector": str(wrong_width), "alpha": 1.0}, "vector"),
             ("pirate", "steering"))
    for stream in (False, True):
        for spec, field in cases:
            status, body = _post(server, {**ok, "steering": spec, "stream": stream})
            assert 400 <= status < 500, (spec, stream, status)
            assert field in body["error"]["message"], (spec, stream, body)
    assert _post(server, {**ok, "steering": {"vector": str(path), "alpha": 1.0}})[0] == 200
