"""Metadata is checked like flags: vector sidecars (and their tensors) and activation-file
attributes, corrupted by hand (a table) and at random (Hypothesis), are either read as a
valid, consistent vector or file, or refused in one SteerlabError line naming the file and
field, by the library and by the CLI (exit 2, before any model loads). Also: fitting from
activations that do not differ is refused, nothing non-JSON is written, and every atomically
written file follows the umask."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import run_cli
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from steerlab.base.errors import SteerlabError
from steerlab.extraction.attributes import StoreMeta
from steerlab.extraction.fitters import fit_vector
from steerlab.extraction.store import ActivationFile, Rows, write_rows_file
from steerlab.steering.vector import Provenance, SteeringVector

D = 8
N_ROWS = 4
NORMS = {"0": 2.0, "2": 3.5}


def make_vector(path: Path) -> Path:
    """A valid vector on layers (1, 2) of a 3-layer model, with every provenance field set."""
    g = torch.Generator().manual_seed(0)
    prov = Provenance(model_id="m", method="mean-diff", n_pairs=5, source="a.h5",
                      capture={"devices": ["cpu"], "dtype": "float32"},
                      resid_norms={"1": 3.0, "2": 4.5}, n_layers=3)
    return SteeringVector(torch.randn(2, D, generator=g), (1, 2), prov).save(path)


def make_acts(path: Path, *, same_at: int | None = None) -> Path:
    """A valid activation file: 4 pairs on layers (0, 2) of a 3-layer model, residual norms in
    its provenance; ``same_at``: rejected equals chosen at that layer index."""
    rng = np.random.default_rng(0)
    chosen = rng.standard_normal((N_ROWS, 2, D)).astype(np.float32)
    rejected = rng.standard_normal((N_ROWS, 2, D)).astype(np.float32)
    if same_at is not None:
        rejected[:, same_at] = chosen[:, same_at]
    meta = StoreMeta(model_id="m", hook="resid_post", layers=(0, 2), d_model=D, dtype="float32",
                     mean=False, steerlab_version="0", n_pairs=N_ROWS, n_layers=3,
                     provenance=json.dumps({"devices": ["cpu"], "resid_norms": NORMS}))
    write_rows_file(path, meta, Rows([f"p{i}" for i in range(N_ROWS)], chosen, rejected,
                                     *(np.zeros(N_ROWS, dtype=np.int64) for _ in range(4))))
    return path


def assert_one_line(err: SteerlabError, file: str, field: str | None) -> None:
    line = str(err)
    assert "\n" not in line and file in line, line
    if field is not None:
        assert f"field {field!r}" in line, line


def assert_cli_refuses(capsys, file: str, field: str | None, *args: str) -> None:
    capsys.readouterr()
    assert run_cli(*args) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and file in lines[0], lines
    if field is not None:
        assert f"field {field!r}" in lines[0], lines


# ----------------------------------------------------------------- vector sidecars, a table

DROP = object()
# (id, sidecar key, new value (DROP: removed), file refused, field named)
SIDECAR_ROWS = [
    ("layers-null", "layers", None, "json", "layers"),
    ("layers-missing", "layers", DROP, "json", "layers"),
    ("layers-string", "layers", "1,2", "json", "layers"),
    ("layers-bool", "layers", [True, 2], "json", "layers"),
    ("layers-repeat", "layers", [2, 2], "json", "layers"),
    ("layers-negative", "layers", [-1, 2], "json", "layers"),
    ("layers-past-model", "layers", [1, 600], "json", "layers"),
    ("layers-fraction", "layers", [1.5, 2], "json", "layers"),
    ("layers-empty", "layers", [], "json", "layers"),
    ("layers-not-tensors", "layers", [2, 1], "safetensors", "layers"),
    ("d_model-mismatch", "d_model", 16, "json", "d_model"),
    ("d_model-string", "d_model", "8", "json", "d_model"),
    ("d_model-bool", "d_model", True, "json", "d_model"),
    ("d_model-missing", "d_model", DROP, "json", "d_model"),
    ("format-missing", "format", DROP, "json", "format"),
    ("norms-negative", "resid_norms", {"1": -2.0}, "json", "resid_norms.1"),
    ("norms-zero", "resid_norms", {"1": 0}, "json", "resid_norms.1"),
    ("norms-string", "resid_norms", {"1": "3"}, "json", "resid_norms.1"),
    ("norms-not-a-layer", "resid_norms", {"7": 3.0}, "json", "resid_norms"),
    ("norms-list", "resid_norms", [3.0], "json", "resid_norms"),
    ("n_pairs-negative", "n_pairs", -1, "json", "n_pairs"),
    ("n_pairs-string", "n_pairs", "5", "json", "n_pairs"),
    ("n_pairs-bool", "n_pairs", True, "json", "n_pairs"),
    ("n_pairs-fraction", "n_pairs", 2.5, "json", "n_pairs"),
    ("n_layers-negative", "n_layers", -3, "json", "n_layers"),
    ("n_layers-too-few", "n_layers", 2, "json", "layers"),
    ("model_id-number", "model_id", 5, "json", "model_id"),
    ("model_id-null", "model_id", None, "json", "model_id"),
    ("model_id-surrogate", "model_id", "m\ud800", "json", "model_id"),
    ("hook-unknown", "hook", "blocks.3", "json", "hook"),
    ("method-list", "method", ["mean-diff"], "json", "method"),
    ("source-object", "source", {"a": 1}, "json", "source"),
    ("capture-string", "capture", "cpu", "json", "capture"),
]
# raw sidecar text replacements: (id, old, new, field)
SIDECAR_TEXT_ROWS = [
    ("norms-nan", '"1": 3.0', '"1": NaN', "resid_norms.1"),
    ("norms-infinity", '"2": 4.5', '"2": Infinity', "resid_norms.2"),
    ("norms-overflow", '"2": 4.5', '"2": 1e999', "resid_norms.2"),
    ("capture-nan", '"dtype": "float32"', '"dtype": NaN', "capture.dtype"),
]


def _tensor_cases(directions: torch.Tensor) -> list[tuple[str, dict, str]]:
    zero = directions.clone()
    zero[1] = 0
    nan = directions.clone()
    nan[0, 3] = float("nan")
    layers = torch.tensor([1, 2])
    return [
        ("zero-row", {"directions": zero, "layers": layers}, "directions"),
        ("nan", {"directions": nan, "layers": layers}, "directions"),
        ("ints", {"directions": directions.long(), "layers": layers}, "directions"),
        ("three-d", {"directions": directions[None], "layers": layers}, "directions"),
        ("wider", {"directions": torch.ones(2, 2 * D), "layers": layers}, "d_model"),
        ("layers-differ", {"directions": directions, "layers": torch.tensor([1, 3])}, "layers"),
        ("missing", {"layers": layers}, "directions"),
    ]


TENSOR_IDS = ["zero-row", "nan", "ints", "three-d", "wider", "layers-differ", "missing"]


def _sidecar(st_path: Path) -> Path:
    return st_path.with_suffix(".json")


@pytest.mark.parametrize("row", SIDECAR_ROWS, ids=[r[0] for r in SIDECAR_ROWS])
def test_corrupt_sidecar_is_refused(row, tmp_path, capsys):
    _, key, value, file, field = row
    st_path = make_vector(tmp_path / "v")
    side = _sidecar(st_path)
    meta = json.loads(side.read_text())
    if value is DROP:
        del meta[key]
    else:
        meta[key] = value
    side.write_text(json.dumps(meta))
    name = f"v.{file}"
    with pytest.raises(SteerlabError) as err:
        SteeringVector.load(st_path)
    assert_one_line(err.value, name, field)
    out = tmp_path / "x.gguf"
    assert_cli_refuses(capsys, name, field, "vectors", "export-gguf", str(st_path), "-o", str(out))
    assert not out.exists()


@pytest.mark.parametrize("row", SIDECAR_TEXT_ROWS, ids=[r[0] for r in SIDECAR_TEXT_ROWS])
def test_sidecar_that_is_not_strict_json_is_refused(row, tmp_path, capsys, tripwire):
    _, old, new, field = row
    st_path = make_vector(tmp_path / "v")
    side = _sidecar(st_path)
    text = side.read_text()
    assert text.count(old) == 1
    side.write_text(text.replace(old, new))
    with pytest.raises(SteerlabError) as err:
        SteeringVector.load(st_path)
    assert_one_line(err.value, "v.json", field)
    # every command that reads a vector: before any model loads
    assert_cli_refuses(capsys, "v.json", field, "vectors", "export-gguf", str(st_path), "-o",
                       str(tmp_path / "x.gguf"))
    assert_cli_refuses(capsys, "v.json", field, "vectors", "eval", str(st_path), "--output",
                       str(tmp_path / "e"))
    assert_cli_refuses(capsys, "v.json", field, "chat", "--vector", str(st_path))


@pytest.mark.parametrize("case", TENSOR_IDS)
def test_corrupt_tensors_are_refused(case, tmp_path, capsys):
    st_path = make_vector(tmp_path / "v")
    tensors = load_file(str(st_path))
    _, replacement, field = dict((c[0], c) for c in _tensor_cases(tensors["directions"]))[case]
    save_file(replacement, str(st_path))
    file = "v.json" if field == "d_model" else "v.safetensors"
    with pytest.raises(SteerlabError) as err:
        SteeringVector.load(st_path)
    assert_one_line(err.value, file, field)
    if case == "zero-row":
        assert "layer 2" in str(err.value)
    assert_cli_refuses(capsys, file, field, "vectors", "export-gguf", str(st_path), "-o",
                       str(tmp_path / "x.gguf"))


def test_vector_of_another_model_is_refused_before_it_loads(tmp_path, capsys, tripwire):
    """The embedded model (30 layers, d_model 576) is read from its config, not loaded."""
    st_path = make_vector(tmp_path / "v")  # d_model 8
    assert_cli_refuses(capsys, "v.safetensors", "d_model", "vectors", "eval", str(st_path),
                       "--output", str(tmp_path / "e"))
    assert_cli_refuses(capsys, "v.safetensors", "d_model", "chat", "--vector", str(st_path))
    wide = SteeringVector(torch.ones(1, 576), (40,)).save(tmp_path / "w")
    assert_cli_refuses(capsys, "w.safetensors", "layers", "vectors", "eval", str(wide),
                       "--output", str(tmp_path / "e"))


def test_nothing_non_json_or_inconsistent_is_written(tmp_path):
    vec = SteeringVector.load(make_vector(tmp_path / "v"))
    with pytest.raises(SteerlabError, match="resid_norms.1"):
        Provenance(resid_norms={"1": float("nan")})
    with pytest.raises(SteerlabError, match="'resid_norms'.*one of the layers"):
        SteeringVector(vec.directions, vec.layers, Provenance(resid_norms={"0": 1.0}))
    with pytest.raises(SteerlabError, match="'layers'.*the model has 3 layers"):
        SteeringVector(torch.ones(1, D), (3,), Provenance(n_layers=3))
    vec.provenance.capture["oops"] = float("inf")  # a dict stays mutable in a frozen dataclass
    with pytest.raises(SteerlabError, match="w.json.*'capture'.*strict JSON"):
        vec.save(tmp_path / "w")
    zero = SteeringVector(torch.zeros(2, D), (1, 2))
    with pytest.raises(SteerlabError, match="layer 1 is zero"):
        zero.save(tmp_path / "z")
    with pytest.raises(SteerlabError, match="layer 1 is zero"):
        zero.normalise()
    assert not list(tmp_path.glob("[wz]*"))
    # select keeps only its layers' norms, so the result is consistent (and saveable)
    one = SteeringVector.load(tmp_path / "v").select([2])
    assert one.provenance.resid_norms == {"2": 4.5}
    assert SteeringVector.load(one.save(tmp_path / "one")).provenance == one.provenance


# --------------------------------------------------------- activation attributes, a table

# (id, attribute, new value (DROP: removed), field named)
ATTR_ROWS = [
    ("layers-negative-and-huge", "layers", [-1, 4, 600], "layers"),
    ("layers-past-model", "layers", [0, 600], "layers"),
    ("layers-repeat", "layers", [2, 2], "layers"),
    ("layers-scalar", "layers", 2, "layers"),
    ("layers-bool", "layers", True, "layers"),
    ("layers-string", "layers", "0,2", "layers"),
    ("layers-not-dataset", "layers", [2, 0], "layers"),
    ("layers-missing", "layers", DROP, "layers"),
    ("n_layers-too-few", "n_layers", 2, "layers"),
    ("n_layers-negative", "n_layers", -1, "n_layers"),
    ("n_layers-string", "n_layers", "3", "n_layers"),
    ("d_model-mismatch", "d_model", 16, "d_model"),
    ("d_model-string", "d_model", "8", "d_model"),
    ("d_model-bool", "d_model", True, "d_model"),
    ("d_model-zero", "d_model", 0, "d_model"),
    ("mean-int", "mean", 1, "mean"),
    ("mean-string", "mean", "yes", "mean"),
    ("hook-unknown", "hook", "nowhere", "hook"),
    ("model_id-number", "model_id", 5, "model_id"),
    ("model_id-missing", "model_id", DROP, "model_id"),
    ("dtype-list", "dtype", [1, 2], "dtype"),
    ("version-float", "steerlab_version", 1.5, "steerlab_version"),
    ("n_pairs-negative", "n_pairs", -1, "n_pairs"),
    ("n_pairs-fewer-than-rows", "n_pairs", 2, "n_pairs"),
    ("format-other", "format", "steerlab.activations/0", "format"),
    ("provenance-not-json", "provenance", "{", "provenance"),
    ("provenance-list", "provenance", "[1]", "provenance"),
    ("provenance-number", "provenance", 7, "provenance"),
    ("norms-nan", "provenance", '{"resid_norms": {"0": NaN}}', "provenance.resid_norms.0"),
    ("norms-infinite", "provenance", '{"resid_norms": {"2": 1e999}}', "provenance.resid_norms.2"),
    ("norms-negative", "provenance", '{"resid_norms": {"0": -1}}', "provenance.resid_norms.0"),
    ("norms-not-a-layer", "provenance", '{"resid_norms": {"5": 1.0}}', "provenance.resid_norms"),
]


@pytest.fixture(scope="module")
def good_acts(tmp_path_factory):
    return make_acts(tmp_path_factory.mktemp("acts") / "acts.h5")


def _set_attr(path: Path, name: str, value) -> None:
    with h5py.File(path, "a") as f:
        if value is DROP:
            del f.attrs[name]
        else:
            f.attrs[name] = value


@pytest.mark.parametrize("row", ATTR_ROWS, ids=[r[0] for r in ATTR_ROWS])
def test_corrupt_activation_attributes_are_refused(row, good_acts, tmp_path, capsys):
    _, attr, value, field = row
    path = tmp_path / "acts.h5"
    shutil.copy(good_acts, path)
    _set_attr(path, attr, value)
    with pytest.raises(SteerlabError) as err:
        ActivationFile(path)
    assert_one_line(err.value, "acts.h5", field)
    assert_cli_refuses(capsys, "acts.h5", field, "vectors", "fit", str(path), "-o",
                       str(tmp_path / "v"))
    assert not list(tmp_path.glob("v.*"))


def test_identical_activations_are_refused_naming_the_layer(tmp_path, capsys):
    path = make_acts(tmp_path / "acts.h5", same_at=1)  # layer 2 is the second
    for method in ("mean-diff", "pca"):  # the probe's zero is the same check (and slow)
        with pytest.raises(SteerlabError, match="layer 2 is zero") as err:
            fit_vector(path, method)
        assert_one_line(err.value, "acts.h5", "layers")
    vec, _ = fit_vector(path, layers=[0])  # the layer that differs still fits
    assert vec.layers == (0,) and vec.provenance.resid_norms == {"0": 2.0}
    assert vec.provenance.n_layers == 3
    assert_cli_refuses(capsys, "acts.h5", "layers", "vectors", "fit", str(path), "-o",
                       str(tmp_path / "v"), "--normalise")
    assert not list(tmp_path.glob("v.*"))


def test_non_finite_norms_never_reach_a_file(tmp_path):
    with pytest.raises(SteerlabError, match="'provenance.resid_norms.0'.*nan"):
        StoreMeta("m", "resid_post", (0,), D, "float32", False, "0",
                  provenance=json.dumps({"resid_norms": {"0": float("nan")}}))


# ------------------------------------------------------------------ files follow the umask


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_atomic_files_follow_the_umask(mask, tmp_path):
    old = os.umask(mask)
    try:
        st_path = make_vector(tmp_path / "v")
        acts = make_acts(tmp_path / "a.h5")
        SteeringVector.load(st_path).to_gguf(tmp_path / "v.gguf")
    finally:
        os.umask(old)
    for p in (st_path, _sidecar(st_path), acts, tmp_path / "v.gguf"):
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, (p, oct(p.stat().st_mode))


# -------------------------------------------------------------- Hypothesis: random damage

COUNTS: dict[str, dict[str, int]] = {}


def _count(test: str, outcome: str) -> None:
    COUNTS.setdefault(test, {"accepted": 0, "refused": 0})[outcome] += 1


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    """After the module: one line per Hypothesis test with its number of generated cases,
    shown with or without ``-s`` (output capture is lifted for it, as pytest's own logging
    does)."""
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin(
        "capturemanager")
    lines = [f"test_metadata {test}: {sum(counts.values())} generated cases, "
             f"{counts['accepted']} accepted, {counts['refused']} refused"
             for test, counts in COUNTS.items()]
    if reporter is None or capture is None:
        print(*lines, sep="\n")
        return
    with capture.global_and_fixture_disabled():
        reporter.write_sep("-", "Hypothesis")
        for line in lines:
            reporter.write_line(line)


SETTINGS = settings(max_examples=200, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

odd_text = st.sampled_from(["\ud800", "a\x00b", "", " ", "é"])
finite_or_not = st.floats(allow_nan=True, allow_infinity=True)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | finite_or_not
    | st.text(max_size=6) | odd_text,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=3), kids,
                                                               max_size=3),
    max_leaves=6)
small_layers = st.integers(-2, 4) | st.sampled_from([True, 600, 2**64, 1.0, 1.5])
norm_keys = st.sampled_from(["0", "1", "2", "3", "01", "x", " 1"])
norm_values = finite_or_not | st.integers(-1, 5) | st.sampled_from(["3", None])
NEAR = {  # values close to valid ones, where bugs hide
    "layers": st.lists(small_layers, max_size=4),
    "d_model": st.sampled_from([D, 2 * D, 0, -D, float(D), True, str(D)]),
    "resid_norms": st.dictionaries(norm_keys, norm_values, max_size=3),
    "n_layers": st.integers(-1, 5) | st.sampled_from([1000, 3.0, "3"]),
    "n_pairs": st.integers(-1, 6) | st.sampled_from([2.5, "5"]),
    "hook": st.sampled_from(["resid_post", "resid_pre", "resid_mid", "hook", ""]),
    "capture": st.dictionaries(st.text(max_size=3), json_values, max_size=3),
    "format": st.sampled_from(["steerlab.vector/1", "steerlab.vector/2"]),
}
SIDECAR_KEYS = ["format", "layers", "d_model", "model_id", "hook", "method", "n_pairs",
                "normalisation", "source", "capture", "resid_norms", "n_layers", "extra"]


def _mutations(keys: list[str]) -> st.SearchStrategy:
    one = st.sampled_from(keys).flatmap(lambda k: st.tuples(
        st.just(k), st.just(DROP) | json_values | NEAR.get(k, json_values)))
    return st.lists(one, max_size=3)


@pytest.fixture(scope="module")
def vector_variants(tmp_path_factory):
    """The good vector's safetensors bytes and those of each corrupt tensor case."""
    root = tmp_path_factory.mktemp("variants")
    st_path = make_vector(root / "v")
    good = load_file(str(st_path))
    out = {"good": st_path.read_bytes()}
    for name, tensors, _ in _tensor_cases(good["directions"]):
        save_file(tensors, str(root / f"{name}.safetensors"))
        out[name] = (root / f"{name}.safetensors").read_bytes()
    return json.loads(_sidecar(st_path).read_text()), out, root


def assert_consistent_vector(vec: SteeringVector, root: Path) -> None:
    """What every vector that loads satisfies, and it survives a save and load unchanged."""
    layers, prov = vec.layers, vec.provenance
    assert all(type(x) is int and x >= 0 for x in layers) and len(set(layers)) == len(layers)
    assert not prov.n_layers or max(layers) < prov.n_layers
    assert vec.directions.shape == (len(layers), vec.d_model)
    assert bool(torch.isfinite(vec.directions).all()) and bool((vec.norms() > 0).all())
    assert set(prov.resid_norms) <= {str(x) for x in layers}
    assert all(math.isfinite(v) and v > 0 for v in prov.resid_norms.values())
    assert type(prov.n_pairs) is int and prov.n_pairs >= 0 and isinstance(prov.capture, dict)
    back = SteeringVector.load(vec.save(root / "round-trip"))
    assert back.layers == layers and back.provenance == prov
    assert torch.equal(back.directions, vec.directions.float())
    json.loads((root / "round-trip.json").read_text(),  # strict JSON
               parse_constant=lambda word: pytest.fail(f"{word} written"))


@SETTINGS
@given(mutations=_mutations(SIDECAR_KEYS),
       tensors=st.sampled_from(["good", "good", "good", *TENSOR_IDS]))
def test_random_sidecars_load_or_are_refused_in_one_line(vector_variants, mutations, tensors):
    good, variants, root = vector_variants
    meta = dict(good)
    for key, value in mutations:
        if value is DROP:
            meta.pop(key, None)
        else:
            meta[key] = value
    st_path = root / "case.safetensors"
    st_path.write_bytes(variants[tensors])
    _sidecar(st_path).write_text(json.dumps(meta))  # NaN and Infinity as Python writes them
    try:
        vec = SteeringVector.load(st_path)
    except SteerlabError as err:
        _count("sidecars", "refused")
        assert "\n" not in str(err) and "case." in str(err), str(err)
        return
    _count("sidecars", "accepted")
    assert_consistent_vector(vec, root)


ATTR_KEYS = ["format", "model_id", "hook", "layers", "d_model", "dtype", "mean",
             "steerlab_version", "pairs_file", "n_pairs", "attn_implementation", "provenance",
             "n_layers", "extra"]
h5_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                  max_size=6)
h5_values = (st.integers(-(2**63), 2**63 - 1) | finite_or_not | st.booleans() | h5_text
             | st.lists(st.integers(-3, 700), max_size=4)
             | st.lists(finite_or_not, min_size=1, max_size=3)
             | st.lists(st.text("ab01", max_size=3), min_size=1, max_size=3))
provenance_texts = st.builds(
    lambda norms, extra: json.dumps({"devices": ["cpu"], "resid_norms": norms, **extra}),
    st.dictionaries(norm_keys, norm_values, max_size=3) | json_values,
    st.dictionaries(st.text(max_size=3), json_values, max_size=2))
H5_NEAR = {
    "layers": st.lists(st.integers(-1, 4), max_size=4) | st.just([-1, 4, 600]),
    "provenance": provenance_texts | st.sampled_from(["", "{", "[]", "null"]),
    "n_layers": st.integers(-1, 5),
    "d_model": st.sampled_from([D, 2 * D, 0, -1]),
    "mean": st.booleans() | st.integers(0, 1),
    "hook": st.sampled_from(["resid_post", "resid_pre", "resid_mid", "x"]),
    "n_pairs": st.integers(-1, N_ROWS + 2),
}


def _attr_mutations() -> st.SearchStrategy:
    one = st.sampled_from(ATTR_KEYS).flatmap(lambda k: st.tuples(
        st.just(k), st.just(DROP) | h5_values | H5_NEAR.get(k, h5_values)))
    return st.lists(one, max_size=3)


@pytest.fixture(scope="module")
def acts_root(tmp_path_factory, good_acts):
    return good_acts, tmp_path_factory.mktemp("random-acts")


@SETTINGS
@given(mutations=_attr_mutations())
def test_random_attributes_load_or_are_refused_in_one_line(acts_root, mutations):
    good, root = acts_root
    path = root / "case.h5"
    shutil.copy(good, path)
    with h5py.File(path, "a") as f:
        for key, value in mutations:
            try:
                if value is DROP:
                    f.attrs.pop(key, None)
                else:
                    f.attrs[key] = value
            except (TypeError, ValueError, OverflowError):  # not storable as an attribute
                assume(False)
    try:
        acts = ActivationFile(path)
        vec, _ = fit_vector(acts)
    except SteerlabError as err:
        _count("attributes", "refused")
        assert "\n" not in str(err) and "case.h5" in str(err), str(err)
        return
    _count("attributes", "accepted")
    m = acts.meta
    with h5py.File(path, "r") as f:
        assert list(f["layers"][:]) == list(m.layers)
        assert f["chosen"].shape == (acts.n_pairs, len(m.layers), m.d_model)
    assert not m.n_layers or max(m.layers) < m.n_layers
    assert not m.n_pairs or acts.n_pairs <= m.n_pairs
    assert isinstance(m.mean, bool) and all(isinstance(getattr(m, k), str) for k in (
        "model_id", "hook", "dtype", "steerlab_version", "pairs_file", "provenance"))
    assert vec.layers == m.layers and vec.provenance.n_layers == m.n_layers
    assert_consistent_vector(vec, root)


def test_layers_of_a_file_without_a_layer_count_are_checked_against_the_model(tmp_path):
    """A file written before ``n_layers`` was kept: its layers are checked against the model's
    config when that is readable without a load (a local folder here), else left to steering."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(
        {"num_hidden_layers": 3, "hidden_size": D, "vocab_size": 10}))
    rng = np.random.default_rng(0)
    for model_id, layers, refused in ((str(model_dir), (0, 600), True),
                                      (str(model_dir), (0, 2), False),
                                      ("no/such-model", (0, 600), False)):
        meta = StoreMeta(model_id=model_id, hook="resid_post", layers=layers, d_model=D,
                         dtype="float32", mean=False, steerlab_version="0", n_pairs=N_ROWS)
        path = tmp_path / "acts.h5"
        path.unlink(missing_ok=True)
        write_rows_file(path, meta, Rows(
            [f"p{i}" for i in range(N_ROWS)],
            *(rng.standard_normal((N_ROWS, 2, D)).astype(np.float32) for _ in range(2)),
            *(np.zeros(N_ROWS, dtype=np.int64) for _ in range(4))))
        if refused:
            with pytest.raises(SteerlabError, match="layer 600 does not exist") as err:
                fit_vector(path)
            assert_one_line(err.value, "acts.h5", "layers")
        else:
            assert fit_vector(path)[0].layers == layers
