"""One request never changes another's answer (issue 25).

A reused slot of the static cache ignores what its last row left (even NaN); a row whose
logits go non-finite fails alone (``generate`` names it, ``serve`` answers its client 422 and
serves the others); 50 hostile requests interleaved with 50 normal ones on the static engine
leave the normal answers equal to a fresh server's; vectors are named, never paths, and
every refusal of a name reads the same whether or not some file exists.

The model is a tiny random Llama in float16, where a steering inside the up-front bound
(:data:`steerlab.steering.intervention.MAX_DELTA_NORM`) can still overflow: a spike of 1e5 on one
coordinate
is beyond float16's 65504, so the residual turns infinite in the middle of a reply.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import make_tiny_model

from steerlab.generation.generator import NonFiniteError, generate
from steerlab.model.attention import use_hf_mixers
from steerlab.serving.shelf import VectorShelf
from steerlab.steering.intervention import Steering
from steerlab.steering.vector import Provenance, SteeringVector

D = 64
QUESTIONS = ["Hello there", "What is the sea?", "Name a colour.", "Tell me a story.",
             "Why is the sky blue?", "Count to three.", "Who are you?", "Say yes or no.",
             "What time is it?", "Describe a ship."]


def _model(tokenizer, dtype=torch.float16):
    model = make_tiny_model(tokenizer, n_layers=2, seed=3)
    model.original_model.to(dtype)
    use_hf_mixers(model.original_model, "sdpa")
    return model


@pytest.fixture(scope="module")
def half_model(tokenizer):
    return _model(tokenizer)


def _spike(size=1e5):
    d = torch.zeros(1, D)
    d[0, 0] = size  # beyond float16's range on one coordinate, inside MAX_DELTA_NORM
    return SteeringVector(d, (0,))


def test_a_reused_slot_ignores_what_its_last_row_left(half_model, tokenizer):
    from steerlab.generation.decode import StepProgram
    from steerlab.generation.slots import SlotBatch

    prompts = [tokenizer.encode(q) for q in QUESTIONS[:3]]
    want = generate(half_model, prompts[2:3], max_new_tokens=6, engine="eager").tokens[0]
    batch = SlotBatch(half_model, 2, 128, StepProgram(0, False, False, (), (2,), 0))
    with batch.running():
        batch.admit([0, 1], prompts[:2], limits=[6, 6], temps=[0.0, 0.0], seeds=[0, 0])
        for t in (*batch.cache.keys, *batch.cache.values):
            t.fill_(float("nan"))  # what a row that went non-finite leaves in its slot
        batch.release([0])
        batch.admit([0], prompts[2:3], limits=[6], temps=[0.0], seeds=[0])
        while bool(batch.st.active[0]):
            batch.step()
    got = batch.st.tokens[0, : int(batch.st.n_out[0])].tolist()
    assert got == want
    assert not bool(batch.st.broken[0])


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_generate_names_the_row_whose_logits_went_non_finite(half_model, tokenizer, engine):
    prompts = [tokenizer.encode(q) for q in QUESTIONS[:3]]
    steering = Steering.create(half_model, _spike(), [0.0, 1.0, 0.0], positions="generated",
                               units="raw")
    with pytest.raises(NonFiniteError) as err, steering.apply(half_model):
        generate(half_model, prompts, max_new_tokens=6, engine=engine)
    assert err.value.rows == [1]
    # the rows at strength 0 are unharmed, and nothing stays broken afterwards
    want = generate(half_model, prompts, max_new_tokens=6, engine="eager").tokens
    assert [err.value.tokens[i] for i in (0, 2)] == [want[0], want[2]]
    assert len(err.value.tokens[1]) < 6
    assert generate(half_model, prompts, max_new_tokens=6, engine=engine).tokens == want


def test_a_steering_that_would_overflow_is_refused_up_front(tiny_model):
    from steerlab.base.errors import SteerlabError

    for bad in (SteeringVector(torch.ones(1, D), (1,), Provenance(resid_norms={"1": 1e30})),):
        with pytest.raises(SteerlabError, match="at most 1e"):
            Steering.create(tiny_model, bad, 1.0, units="norm")
    v = SteeringVector(torch.ones(1, D), (1,))
    with pytest.raises(SteerlabError, match="norm 1.6e\\+07"):
        Steering.create(tiny_model, v, 2e6, units="raw")
    ok = Steering.create(tiny_model, v, 1.0, units="raw")
    with pytest.raises(SteerlabError, match="field 'alpha'"):
        ok.with_alpha(1e6)


# -- over HTTP -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vectors_dir(tmp_path_factory):
    """mild: a seeded random direction of norm 2; spike: overflows float16 mid-reply;
    huge-norm and nan-norm: sidecars whose residual norms make norm units explode."""
    root = tmp_path_factory.mktemp("vectors")
    g = torch.Generator().manual_seed(0)
    d = torch.randn(2, D, generator=g)
    SteeringVector(2 * d / d.norm(dim=-1, keepdim=True), (0, 1)).save(root / "mild")
    _spike().save(root / "spike")
    SteeringVector(d[:1], (1,), Provenance(resid_norms={"1": 1e30})).save(root / "huge-norm")
    SteeringVector(d[:1], (1,)).save(root / "nan-norm")
    side = root / "nan-norm.json"
    side.write_text(side.read_text().replace('"resid_norms": {}', '"resid_norms": {"1": NaN}'))
    outside = tmp_path_factory.mktemp("secret")
    SteeringVector(d[:1], (1,)).save(outside / "secret")
    os.symlink(outside / "secret.safetensors", root / "linked.safetensors")
    os.symlink(outside / "secret.json", root / "linked.json")
    return root


class _Server:
    def __init__(self, model, vectors_dir, **kw):
        from steerlab.serving.server import make_server

        self.srv = make_server(model, port=0, model_name="tiny", max_batch=8, max_context=256,
                               vectors_dir=vectors_dir, **kw)
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}/v1/chat/completions"

    def post(self, body: dict | bytes) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url, data, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as err:
            return err.code, json.load(err)

    def close(self):
        self.srv.shutdown()


def _normal(i: int) -> dict:
    """Greedy and seeded sampled requests, some with a persona or the mild vector."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": QUESTIONS[i % 10]}],
            "max_tokens": 6 + i % 5, "temperature": 0.0}
    if i % 3 == 1:
        body |= {"temperature": 0.9, "seed": 1000 + i}
    if i % 4 == 2:
        body["persona"] = "a pirate captain"
    if i % 5 == 3:
        body["steering"] = {"vector": "mild", "alpha": 1.5 + i % 3, "layers": [1], "units": "raw"}
    elif i % 7 == 5:  # operators beyond addition, several at once, per row in the batch
        body["steering"] = [{"vector": "mild", "op": "ablate", "layers": [1]},
                            {"vector": "mild", "op": "cap", "bounds": [None, 0.02 * (i % 3)],
                             "layers": [0]},
                            {"vector": "mild", "alpha": 0.1, "layers": [1]}]
    elif i % 7 == 6:
        body["steering"] = {"vector": "mild", "op": "set", "target": 0.1 + 0.05 * (i % 4),
                            "layers": [1], "units": "norm"}
    return body


def _hostile(i: int) -> dict | bytes:
    base = {"model": "tiny", "messages": [{"role": "user", "content": QUESTIONS[i % 10]}],
            "max_tokens": 8, "temperature": 0.0}
    kinds = [
        # 422 mid-reply
        {**base, "steering": {"vector": "spike", "alpha": 1.0, "layers": [0], "units": "raw"}},
        {**base, "steering": {"vector": "huge-norm", "alpha": 1.0, "units": "norm"}},
        {**base, "steering": {"vector": "nan-norm", "alpha": 0.5, "units": "norm"}},
        {**base, "steering": {"vector": "mild", "alpha": 1e6, "units": "raw"}},
        {**base, "steering": {"vector": "../secret", "alpha": 1.0, "units": "raw"}},
        {**base, "steering": {"vector": "linked", "alpha": 1.0, "units": "raw"}},
        {**base, "steering": {"vector": "/etc/passwd", "alpha": 1.0, "units": "raw"}},
        {**base, "messages": [{"role": "user", "content": "bad \ud800 text"}]},
        {**base, "persona": "x" * 100_000},
        {**base, "persona": {"persona": "a\u0000b"}},
        {**base, "temperature": 1e308},
        {**base, "max_tokens": 10**9},
        {**base, "messages": [{"role": "user", "content": "word " * 2000}]},
        b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "seed": NaN}',
        {**base, "steering": {"vector": "mild", "alpha": 1.0, "layers": [600], "units": "raw"}},
        # hostile bounds and targets: refused before admission, other rows untouched
        {**base, "steering": {"vector": "mild", "op": "cap", "bounds": [1e30, None]}},
        {**base, "steering": [{"vector": "mild", "op": "cap", "bounds": [0.5, 0.1]}]},
        {**base, "steering": {"vector": "mild", "op": "set"}},
        {**base, "steering": [{"vector": "mild", "op": "ablate"}] * 9},
        b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "steering": '
        b'{"vector": "mild", "op": "cap", "bounds": [NaN, 1]}}',
    ]
    return kinds[i % len(kinds)]


HOSTILE_KINDS = 20  # len(kinds) above: the spike is kind 0


def test_hostile_requests_leave_normal_answers_unchanged(tokenizer, vectors_dir):
    """50 hostile requests interleaved with 50 normal ones, 8 at a time, on the static
    engine: every hostile one gets a 4xx, never a 5xx; every normal one answers as a fresh
    server (another instance of the same weights, its own workspaces) answers it alone."""
    fresh = _Server(_model(tokenizer), vectors_dir, engine="static")
    try:
        want = [fresh.post(_normal(i)) for i in range(50)]
    finally:
        fresh.close()
    assert all(status == 200 for status, _ in want), want
    server = _Server(_model(tokenizer), vectors_dir, engine="static")
    bodies = [b for i in range(50) for b in (_hostile(i), _normal(i))]
    try:
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(server.post, bodies))
        after = [server.post(_normal(i)) for i in range(10)]  # and nothing stays broken
    finally:
        server.close()
    hostile, normal = got[0::2], got[1::2]
    print(f"{len(hostile)} hostile and {len(normal)} normal requests")
    for i, (status, out) in enumerate(hostile):
        assert 400 <= status < 500, (i, status, out)
        assert set(out["error"]) == {"message", "type", "param", "code"}, out
    spikes = hostile[0::HOSTILE_KINDS]  # the spike, mid-reply
    assert [s for s, _ in spikes] == [422] * len(spikes)
    for i, ((status, out), (_, ref)) in enumerate(zip(normal, want, strict=True)):
        assert status == 200, (i, out)
        assert out["choices"] == ref["choices"] and out["usage"] == ref["usage"], i
    for (_, out), (_, ref) in zip(after, want, strict=False):
        assert out["choices"] == ref["choices"]


def test_steering_needs_a_vectors_dir_and_names_reveal_nothing(half_model, vectors_dir):
    server = _Server(half_model, None, engine="eager")
    base = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    try:
        status, out = server.post({**base, "steering": {"vector": "mild", "alpha": 1.0}})
        assert status == 400 and out["error"]["code"] == "steering_disabled", out
    finally:
        server.close()
    server = _Server(half_model, vectors_dir, engine="eager")
    try:
        messages = set()
        for name in ("linked", "secret", "nothing-here", "mild.txt"):
            status, out = server.post({**base, "steering": {"vector": name, "alpha": 1.0}})
            assert status == 404, out
            messages.add(out["error"]["message"].replace(repr(name), "NAME"))
        assert len(messages) == 1, messages  # one message, whatever lies on the disk
        status, out = server.post({**base, "steering": {"vector": "mild", "alpha": 1.0}})
        assert status == 200, out
        listed = json.load(urllib.request.urlopen(server.url.replace("chat/completions",
                                                                     "vectors")))
        assert [v["id"] for v in listed["data"]] == VectorShelf(vectors_dir).names()
    finally:
        server.close()


def test_a_shelf_offers_plain_names_inside_its_folder(vectors_dir, tmp_path):
    from steerlab.base.errors import SteerlabError

    shelf = VectorShelf(vectors_dir)
    assert shelf.names() == ["huge-norm", "linked", "mild", "nan-norm", "spike"]
    assert shelf.get("mild").layers == (0, 1)
    assert shelf.get("mild") is shelf.get("mild")  # kept
    for bad in ("linked", "../mild", "mild/", ".hidden", "", 3, None, "a" * 200):
        with pytest.raises(SteerlabError, match="no usable vector named"):
            shelf.get(bad)
    moved = tmp_path / "shelf"
    moved.mkdir()
    SteeringVector(torch.ones(1, D), (1,)).save(moved / "v")
    shelf = VectorShelf(moved)
    first = shelf.get("v")
    SteeringVector(2 * torch.ones(1, D), (1,)).save(moved / "v")  # replaced: read again
    assert torch.equal(shelf.get("v").directions, 2 * first.directions)
    with pytest.raises(SteerlabError, match="vectors_dir"):
        VectorShelf(tmp_path / "missing")
