"""Property-based request bodies (Hypothesis, fixed seed, bounded counts; issue 25).

Bodies are valid chat requests with fields dropped or replaced by arbitrary JSON values
(text with lone surrogates and NULs included), steering specs naming real, hostile and
missing vectors. The field checks alone (``parse_chat_request`` + ``parse_steering``) must
accept a body or refuse it with a :class:`RequestError` (a 4xx), never raise anything else;
over HTTP, against a real static-engine server, every body is answered 200 in OpenAI's shape
or 4xx in its error shape, never a 5xx, and a normal request answers afterwards exactly as it
did before the storm.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
import torch
from conftest import make_tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steerlab.model.attention import use_hf_mixers
from steerlab.serving.requests import RequestError, parse_chat_request, parse_steering
from steerlab.serving.shelf import VectorShelf
from steerlab.steering.vector import Provenance, SteeringVector

SEEDED = settings(derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
COUNTS: dict[str, int] = {}

ANY_TEXT = st.text(st.characters(exclude_categories=[]), max_size=12)  # surrogates, NUL
SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | ANY_TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(ANY_TEXT, inner, max_size=3), max_leaves=6)
FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "seed",
          "stream", "persona", "steering", "n", "top_p", "stop", "response_format",
          "stream_options", "logprobs", "presence_penalty")
NUMBER = st.floats() | st.integers(-10, 10)  # NaN and infinities included
ONE_STEERING = st.fixed_dictionaries(
    {"vector": st.sampled_from(["mild", "spike", "nan-norm", "missing", "../mild", "/etc/passwd",
                                "mild.json"]) | ANY_TEXT,
     "alpha": st.floats(allow_nan=False, allow_infinity=False) | st.integers(-10, 10) | JSON},
    optional={"layers": st.lists(st.integers(-4, 4), max_size=3) | JSON,
              "units": st.sampled_from(["raw", "norm"]) | JSON,
              "op": st.sampled_from(["add", "ablate", "cap", "set"]) | JSON,
              "bounds": st.lists(st.none() | NUMBER, max_size=3) | JSON,
              "target": NUMBER | JSON})
STEERING = ONE_STEERING | st.lists(ONE_STEERING, max_size=10)
MESSAGES = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant"]) | ANY_TEXT,
     "content": ANY_TEXT | JSON}), max_size=3)


def _valid() -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
            "temperature": 0.0}


@st.composite
def bodies(draw) -> dict:
    """A valid body with some fields dropped or replaced."""
    body = _valid()
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        special = {"steering": STEERING, "messages": MESSAGES,
                   "persona": ANY_TEXT | JSON}.get(name, JSON)
        if draw(st.booleans()) and name in body:
            del body[name]
        else:
            body[name] = draw(special | JSON)
    return body


@pytest.fixture(scope="module")
def half_model(tokenizer):
    model = make_tiny_model(tokenizer, n_layers=2, seed=3)
    model.original_model.to(torch.float16)
    use_hf_mixers(model.original_model, "sdpa")
    return model


@pytest.fixture(scope="module")
def shelf(tmp_path_factory) -> VectorShelf:
    root = tmp_path_factory.mktemp("vectors")
    d = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    SteeringVector(d, (0, 1)).save(root / "mild")
    spike = torch.zeros(1, 64)
    spike[0, 0] = 1e5
    SteeringVector(spike, (0,)).save(root / "spike")
    SteeringVector(d[:1], (1,), Provenance(resid_norms={"1": 1.0})).save(root / "nan-norm")
    side = root / "nan-norm.json"
    side.write_text(side.read_text().replace('{"1": 1.0}', '{"1": NaN}'))
    return VectorShelf(root)


def test_field_checks_accept_or_refuse_with_a_4xx(half_model, shelf):
    @settings(SEEDED, max_examples=400)
    @given(bodies())
    def check(body):
        COUNTS["fields"] = COUNTS.get("fields", 0) + 1
        try:
            req = parse_chat_request(body, model_name="tiny", max_tokens_cap=8)
            parse_steering(half_model, req["steering"], shelf)
        except RequestError as err:
            assert 400 <= err.status < 500 and str(err), err

    check()
    print(f"{COUNTS['fields']} generated request bodies checked")
    assert COUNTS["fields"] >= 300


def test_every_generated_body_is_served_or_refused_never_a_5xx(half_model, shelf):
    from steerlab.serving.http_edge import Limits
    from steerlab.serving.server import make_server

    srv = make_server(half_model, port=0, model_name="tiny", engine="static", max_batch=4,
                      max_context=128, vectors_dir=shelf.root, limits=Limits(max_tokens=4))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1/chat/completions"

    def post(body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if not body.get("stream") else {})
        except urllib.error.HTTPError as err:
            return err.code, json.load(err)

    before = post(_valid())

    @settings(SEEDED, max_examples=120)
    @given(bodies())
    def check(body):
        COUNTS["http"] = COUNTS.get("http", 0) + 1
        status, out = post(body)
        assert status == 200 or 400 <= status < 500, (status, out, body)
        if status != 200:
            assert set(out["error"]) == {"message", "type", "param", "code"}, out
        elif not body.get("stream"):
            assert out["choices"][0]["message"]["role"] == "assistant", out

    try:
        check()
        after = post(_valid())
    finally:
        srv.shutdown()
    print(f"{COUNTS['http']} generated request bodies sent over HTTP")
    assert before[0] == after[0] == 200
    assert after[1]["choices"] == before[1]["choices"]
