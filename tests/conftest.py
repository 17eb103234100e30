"""Shared fixtures: a tiny random Llama (fast unit tests) and the embedded model (integration)."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

EPS32 = torch.finfo(torch.float32).eps


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, eps_units: float) -> None:
    """``got == want`` to ``eps_units`` float32 epsilons of the largest magnitude in the same row
    (last axis: one position's residual or logits) of ``want``.

    Two float32 paths that sum the same products in another order (another batch shape,
    padding, kernel) differ by a few eps of the scale of the sums, not of each element: an
    element near zero carries the rounding of its row's large terms. The caller's comment says
    why that many eps.
    """
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape)
    scale = want.detach().abs().double().amax(-1, keepdim=True) * EPS32
    err = (got.detach().double() - want.detach().double()).abs()
    units = torch.where(err == 0, 0.0, err / scale)
    worst = float(units.max())
    assert worst <= eps_units, f"off by {worst:.3g} eps of the row's scale; allowed {eps_units}"


def assert_same_tokens(model, prompt, got, want, *, eps_units: float, temperature: float = 0.0,
                       seed: int | None = None, stop_ids=()) -> None:
    """Tokens generated from ``prompt`` by two paths are equal, or part at a tie.

    Two paths whose logits differ by up to ``eps_units`` eps of their scale (float32
    reordering) may pick different tokens where the top two logits (greedy) or the step's
    uniform and a CDF boundary (sampling with ``seed``, see
    :func:`steerlab.generation.generator.sample`)
    are closer than that. At the first step where ``got`` and ``want`` differ, the unpadded
    reference logits of ``prompt + want[:t]`` must show such a tie for both picks (a row that
    stopped picked one of ``stop_ids``); later tokens follow other prefixes and are not
    compared. Code that picks wrongly parts away from ties and fails; rounding alone cannot.
    """
    got, want = [int(x) for x in got], [int(x) for x in want]
    if got == want:
        return
    t = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
             min(len(got), len(want)))
    hf = model.original_model
    ids = torch.tensor([[*prompt, *want[:t]]], device=next(hf.parameters()).device)
    with torch.inference_mode():
        logits = hf(input_ids=ids).logits[0, -1].double().cpu()
    atol = eps_units * EPS32 * float(logits.abs().max())
    for seq in (got, want):
        picks = [seq[t]] if t < len(seq) else sorted(stop_ids)
        if temperature == 0:
            # each path's logits are within atol of these: a tie is a gap <= 2 atol
            ok = [p for p in picks if logits[p] >= logits.max() - 2 * atol]
        else:
            from steerlab.generation.sampling import row_uniforms

            cdf = torch.softmax(logits / temperature, -1).cumsum(-1)
            u = float(row_uniforms(torch.tensor([seed]), t)[0] * cdf[-1])
            # logits within atol of these move each probability by <= ~2 atol / T relative, so
            # every CDF value (<= 1) by as much; 2x for the first-order expansion
            slack = 4 * atol / temperature
            ok = [p for p in picks if float(cdf[p - 1] if p else 0.0) - slack <= u
                  <= float(cdf[p]) + slack]
        assert ok, (f"tokens part at step {t} without a tie: got {got[t:t + 3]}, "
                    f"want {want[t:t + 3]}")


def metric_tolerances(logits: torch.Tensor, k: int, delta: float = 0.0) -> tuple[dict, dict]:
    """``assert_close`` tolerances for (entropy, top-k mass) of ``softmax(logits)`` computed by
    two float32 paths whose logits differ by at most ``delta``.

    Each path's log-softmax rounds its logsumexp, shifting every log-probability by up to
    e ~ eps (max|z| + ln V): H moves by e |1 - H| and every probability by e relative; its
    V-term sum adds ~log2(V) eps relative (pairwise), the k-term mass ~k eps. A logit error
    <= delta moves H by <= 2 max|z| delta (dH = -sum p (log p + H) dz, and |log p + H| =
    |z - E_p z|) and a mass by <= 2 delta relative. Two paths: each term twice.
    """
    z, v = float(logits.abs().max()), logits.shape[-1]
    e = EPS32 * (z + math.log(v))
    h = dict(rtol=2 * (e + math.log2(v) * EPS32), atol=2 * e + 2 * z * delta)
    m = dict(rtol=2 * (e + (k + 1) * EPS32) + 2 * delta, atol=0.0)
    return h, m


def matmul_delta(x: torch.Tensor, w: torch.Tensor) -> float:
    """Largest difference between two float32 evaluations of ``x @ w.T`` in any summation
    orders: a K-term dot product is within K (eps / 2) sum|x w| of exact, whatever the order."""
    return x.shape[-1] * EPS32 * float((x.detach().abs() @ w.detach().abs().T).max())


def assert_same_run(a: Path, b: Path, exact: bool = True) -> None:
    """Same records and per-token arrays. The shards compute the same batches through the same
    kernels, so values are bit-identical in one process (``exact``); between processes with the
    same thread count, floats may differ in the last bits (thread scheduling inside BLAS
    reductions): rtol 1e-6 (8 eps), and an atol of 1e-6 of each array's largest value for the
    entries near zero, which carry the rounding of their logits' scale (a low entropy moves by
    the log-softmax's rounding, ~eps (max|z| + ln V) ~ 6e-6 nats, not by eps of itself)."""
    from steerlab.inference.results import load_results

    ra, rb = load_results(a), load_results(b)
    if exact:
        assert ra == rb
    else:
        assert len(ra) == len(rb)
        for x, y in zip(ra, rb, strict=True):
            assert x.keys() == y.keys()
            for k in x:
                if isinstance(x[k], float) or isinstance(x[k], list):
                    np.testing.assert_allclose(x[k], y[k], rtol=1e-6, err_msg=k)
                else:
                    assert x[k] == y[k], k
    with h5py.File(a / "per_token.h5") as fa, h5py.File(b / "per_token.h5") as fb:
        assert_same_datasets(fa, fb, exact)
        assert dict(fa.attrs) == dict(fb.attrs)


def assert_same_datasets(fa: h5py.File, fb: h5py.File, exact: bool = True) -> list[str]:
    """Every dataset of ``fa`` (groups included) is in ``fb`` and the same, and ``fb`` has no
    other: exactly, or (``exact=False``, floats only) to the between-process tolerance of
    :func:`assert_same_run` (rtol 1e-6, atol 1e-6 of the reference ``fb``'s largest value).
    Returns the datasets' names."""

    def datasets(f: h5py.File) -> list[str]:
        names: list[str] = []
        f.visit(lambda n: names.append(n) if isinstance(f[n], h5py.Dataset) else None)
        return sorted(names)

    names = datasets(fa)
    assert names and names == datasets(fb), (names, datasets(fb))
    for name in names:
        x, y = fa[name][()], fb[name][()]
        if x.dtype.kind == "f" and not exact:
            atol = 1e-6 * float(np.abs(y).max(initial=0.0))
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=atol, err_msg=name)
        else:
            assert np.array_equal(x, y), name
    return names


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for a server to bind, or, left unbound,
    an address whose connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str) -> int:
    """The real ``steerlab`` entry point in-process with ``args``; its exit code."""
    import sys

    from steerlab.cli import main

    old = sys.argv
    sys.argv = ["steerlab", *args]
    try:
        main()
    except SystemExit as exit_:
        return exit_.code
    finally:
        sys.argv = old
    return 0


class ModelLoaded(AssertionError):
    """Raised by the tripwire: a bad input reached model loading."""


@pytest.fixture
def tripwire(monkeypatch):
    """Fail the test if a command loads a model before refusing its input."""
    from steerlab.model import loading as models
    def loaded(*args, **kwargs):
        raise ModelLoaded("the model loaded before the bad input was refused")

    monkeypatch.setattr(models, "load_model", loaded)


@pytest.fixture(scope="session")
def embedded_dir():
    """The converted embedded model directory (converted once per cache)."""
    from steerlab.model.loading import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    """The embedded SmolLM2 tokenizer (ChatML template)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def make_tiny_hf(tokenizer, n_layers: int = 3, seed: int = 0):
    """A tiny random HF Llama (d_model 64) with the real tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # HF initialises from torch's global generator: seed it for these weights only, so the model
    # is the same whatever ran before and the tests after it see the global state they had.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).eval()


def make_tiny_model(tokenizer, n_layers: int = 3, seed: int = 0):
    """A tiny random Llama (d_model 64) booted as a bridge offline with the real tokenizer."""
    from transformer_lens.model_bridge import TransformerBridge

    hf = make_tiny_hf(tokenizer, n_layers, seed)
    bridge = TransformerBridge.boot_transformers(
        "tiny-llama", hf_model=hf, tokenizer=tokenizer, device="cpu"
    )
    return bridge.eval()


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """Session-wide tiny random Llama bridge (3 layers, d_model 64). Do not leave hooks on it."""
    return make_tiny_model(tokenizer)


@pytest.fixture(scope="session")
def embedded_model():
    """The real embedded SmolLM2-135M-Instruct bridge, loaded once per test session."""
    from steerlab.model.loading import load_model

    return load_model("embedded", device="cpu")
