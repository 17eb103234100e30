"""SteeringVector: arithmetic, save/load, bad files, GGUF control-vector export read back."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import EPS32

from steerlab.base.errors import SteerlabError
from steerlab.steering.vector import Provenance, SteeringVector, random_like, read_gguf


def vec(seed=0, layers=(3, 5)):
    g = torch.Generator().manual_seed(seed)
    return SteeringVector(torch.randn(len(layers), 16, generator=g), layers,
                          Provenance(model_id="m", method="mean-diff", n_pairs=7))


# a direction divided by its norm and measured again: a 16-term float32 sum of squares and a
# division, ~(16 / 2 + 2) eps relative at worst (measured <= 1 eps)
NORM_TOL = dict(rtol=16 * EPS32, atol=0.0)


def test_arithmetic():
    a, b = vec(0), vec(1)
    # exact: one float32 operation per element, as in IEEE (x + -1.0 * y is x - y; scaling by
    # 2 or -1 is exact), so bit-identical to the direct computation
    assert torch.equal((a + b).directions, a.directions + b.directions)
    assert torch.equal((a - b).directions, a.directions - b.directions)
    assert torch.equal((2 * a).directions, 2 * a.directions)
    assert torch.equal((-a).directions, -a.directions)
    unit = a.normalise()
    torch.testing.assert_close(unit.norms(), torch.ones(2), **NORM_TOL)
    assert unit.provenance.normalisation == "unit" and a.provenance.normalisation == "none"
    assert (a - b).provenance.method == "(mean-diff) - (mean-diff)"
    assert torch.equal(a.select([5]).direction(5), a.directions[1])  # a copy: exact
    with pytest.raises(SteerlabError, match="cannot"):
        a + vec(2, layers=(3, 6))
    with pytest.raises(SteerlabError, match="no layer"):
        a.direction(4)
    with pytest.raises(SteerlabError, match="directions"):
        SteeringVector(torch.zeros(3, 16), (1, 2))
    r = random_like(a, seed=3)
    torch.testing.assert_close(r.norms(), a.norms(), **NORM_TOL)
    # its own seeded generator: the same draw whatever ran before, another for another seed
    assert torch.equal(random_like(a, seed=3).directions, r.directions)
    assert not torch.equal(random_like(a, seed=4).directions, r.directions)
    # seeded, so a fixed number (measured 0.42): not a copy of ``a``'s direction
    cos = torch.nn.functional.cosine_similarity(r.directions, a.directions)
    assert cos.abs().max() < 0.9, cos


def test_save_load_round_trip(tmp_path):
    a = vec()
    st = a.save(tmp_path / "v" / "pirate")
    assert st.name == "pirate.safetensors" and (tmp_path / "v" / "pirate.json").is_file()
    for p in (st, tmp_path / "v" / "pirate", tmp_path / "v" / "pirate.json"):
        b = SteeringVector.load(p)
        assert torch.equal(b.directions, a.directions) and b.layers == a.layers
        assert b.provenance == a.provenance


def test_bad_vector_files(tmp_path):
    st = vec().save(tmp_path / "v")
    side = tmp_path / "v.json"
    good = side.read_text()
    side.write_text("{")
    with pytest.raises(SteerlabError, match="v.json.*JSON"):
        SteeringVector.load(st)
    side.write_text('{"format": "other"}')
    with pytest.raises(SteerlabError, match="format"):
        SteeringVector.load(st)
    side.write_text(good.replace('"layers": [\n  3,\n  5\n ]', '"layers": [3]'))
    with pytest.raises(SteerlabError, match="v.safetensors.*'layers': holds \\[3, 5\\]"):
        SteeringVector.load(st)
    side.write_text(good)
    st.write_bytes(b"garbage")
    with pytest.raises(SteerlabError, match="safetensors"):
        SteeringVector.load(st)
    with pytest.raises(SteerlabError, match="no such file"):
        SteeringVector.load(tmp_path / "nothing")


def _field(reader, name):
    f = reader.fields[name]
    return f.parts[f.data[0]]


def test_gguf_control_vector_names_layers_as_llama_cpp_does(tmp_path, caplog):
    """llama.cpp adds ``direction.N`` to the output of its 0-based layer N, the residual
    steerlab steers at layer N; it has no slot for layer 0, which is left out (warned)."""
    import gguf

    from steerlab.model.loading import EMBEDDED_REPO_ID

    a = replace(vec(layers=(0, 4, 9)), provenance=Provenance(model_id=EMBEDDED_REPO_ID))
    with caplog.at_level("WARNING", logger="steerlab.steering.vector"):
        path = a.to_gguf(tmp_path / "c.gguf")
    assert "layer 0" in caplog.text
    reader = gguf.GGUFReader(str(path))
    assert sorted(t.name for t in reader.tensors) == ["direction.4", "direction.9"]
    assert bytes(_field(reader, "general.architecture")).decode() == "controlvector"
    # the architecture, as llama.cpp's own generator and repeng write it, not the model id
    assert bytes(_field(reader, "controlvector.model_hint")).decode() == "llama"
    assert int(_field(reader, "controlvector.layer_count")[0]) == 2
    back = read_gguf(path)  # the exact inverse, layer numbers included
    assert sorted(back) == [4, 9]
    for layer in back:
        assert torch.equal(back[layer], a.direction(layer))
    hinted = a.to_gguf(tmp_path / "d.gguf", model_hint="qwen3")
    assert bytes(_field(gguf.GGUFReader(str(hinted)), "controlvector.model_hint")).decode() \
        == "qwen3"
    with pytest.raises(SteerlabError, match="only layer 0"):
        vec(layers=(0,)).to_gguf(tmp_path / "e.gguf")
