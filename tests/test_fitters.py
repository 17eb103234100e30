"""Fitters: planted directions recovered, references (numpy SVD, float64 means), streaming ==
one-shot, probe accuracy on separable and on uninformative data, file streaming."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import EPS32

from steerlab.base.errors import SteerlabError
from steerlab.extraction.attributes import StoreMeta
from steerlab.extraction.fitters import LogisticProbe, MeanDifference, Method, fit_vector, fitter
from steerlab.extraction.store import Rows, write_rows_file


def planted(n=240, layers=3, d=64, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(layers, d, generator=g)
    direction /= direction.norm(dim=-1, keepdim=True)
    base = torch.randn(n, layers, d, generator=g) * spread
    strength = 4 + torch.rand(n, 1, 1, generator=g)
    chosen = base + strength * direction + 0.3 * torch.randn(n, layers, d, generator=g)
    rejected = base + 0.3 * torch.randn(n, layers, d, generator=g)
    return chosen, rejected, direction


def cos(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def mean_diff_64(chosen, rejected):
    """The mean difference in float64 (exact differences of float32 values, 1e-14 sums)."""
    return (chosen.double() - rejected.double()).mean(0)


# MeanDifference sums in float64 and rounds once to float32, so it is within one float32 ulp
# (<= eps relative) of the float64 mean, or of another float64 summation order; the atol covers
# the float64 sums themselves (<= 240 terms: ~240 x 1.1e-16 of the largest difference).
def one_rounding(chosen, rejected):
    return dict(rtol=2 * EPS32, atol=1e-12 * float((chosen - rejected).abs().max()))


@pytest.mark.parametrize("name", [m.value for m in Method])
def test_planted_direction_is_recovered(name):
    # the probe separates unpaired rows, so it needs classes apart beyond the shared spread
    chosen, rejected, direction = planted(spread=0.5 if name == "probe" else 3.0)
    f = fitter(name)
    for i in range(0, len(chosen), 50):
        f.update(chosen[i : i + 50], rejected[i : i + 50])
    fit = f.fit()
    assert fit.n_pairs == 240 and fit.directions.shape == (3, 64)
    # Seeded data, so these cosines are fixed numbers (measured 0.9987-0.9988; the probe's
    # 0.92-0.95): a probe finds a separating direction, not the mean shift, hence its bound.
    bound = 0.9 if name == "probe" else 0.99
    assert (cos(fit.directions, direction) > bound).all(), cos(fit.directions, direction)
    # every method is scaled by the mean projection of the differences on its direction; the
    # fitter sums n x d = 15k float32 products (blocked: ~sqrt(15k) eps ~ 1.5e-5 relative at
    # worst in practice; measured <= 2.5 eps), the reference is float64
    norms = fit.directions.double().norm(dim=-1)
    proj = (mean_diff_64(chosen, rejected) * fit.directions.double()).sum(-1) / norms
    torch.testing.assert_close(norms, proj, rtol=1e-4, atol=0)


def test_pca_direction_is_numpys_first_singular_vector():
    chosen, rejected, _ = planted(n=60)
    f = fitter("pca")
    f.update(chosen, rejected)
    got = f.fit().directions
    got = got / got.norm(dim=-1, keepdim=True)
    for layer in range(got.shape[0]):
        diffs = (chosen[:, layer] - rejected[:, layer]).double().numpy()
        v = np.linalg.svd(diffs, full_matrices=False)[2][0]
        v *= np.sign((diffs @ v).sum())  # oriented towards chosen
        # both are float64 SVDs of the same matrix; the fitter rounds its unit vector to
        # float32 (<= eps/2 per entry of magnitude <= 1; measured 1.6e-8)
        torch.testing.assert_close(got[layer].double(), torch.from_numpy(v), rtol=0,
                                   atol=2 * EPS32)


def test_streaming_mean_difference_equals_one_shot():
    chosen, rejected, _ = planted(n=101)
    one = MeanDifference()
    one.update(chosen, rejected)
    stream = MeanDifference()
    for i in range(0, 101, 7):
        stream.update(chosen[i : i + 7], rejected[i : i + 7])
    oracle = mean_diff_64(chosen, rejected).float()
    tol = one_rounding(chosen, rejected)
    torch.testing.assert_close(stream.fit().directions, oracle, **tol)
    torch.testing.assert_close(stream.fit().directions, one.fit().directions, **tol)


def test_probe_held_out_accuracy():
    # separable by construction: the classes are 4-5 apart along the direction, the shared
    # spread and the noise are 0.5 and 0.3 (about 7 standard deviations): every held-out row is
    # classified right
    chosen, rejected, _ = planted(n=80, spread=0.5)
    probe = LogisticProbe(test_fraction=0.25)
    probe.update(chosen, rejected)
    fit = probe.fit()
    assert fit.accuracy.shape == (3,) and (fit.accuracy == 1.0).all(), fit.accuracy
    # uninformative: chosen == rejected, so both rows of every held-out pair look the same and
    # any classifier gets exactly one of the two right
    same = LogisticProbe()
    same.update(rejected, rejected)
    assert (same.fit().accuracy == 0.5).all()


def write_planted_file(path, chosen, rejected) -> int:
    """An activation file of layers (4, 7, 9) holding the given rows; returns the pair count."""
    meta = StoreMeta("m", "resid_post", (4, 7, 9), 64, "float32", False, "0")
    n = len(chosen)
    rows = Rows([f"p{i}" for i in range(n)], chosen.numpy(), rejected.numpy(),
                *(np.zeros(n, dtype=np.int64) for _ in range(4)))
    write_rows_file(path, meta, rows)
    return n


def test_fit_vector_streams_an_activation_file(tmp_path):
    chosen, rejected, direction = planted(n=50)
    write_planted_file(tmp_path / "a.h5", chosen, rejected)
    vec, fit = fit_vector(tmp_path / "a.h5", "mean-diff", batch_size=8)
    want = mean_diff_64(chosen, rejected).float()
    torch.testing.assert_close(vec.directions, want, **one_rounding(chosen, rejected))
    assert vec.layers == (4, 7, 9) and vec.provenance.n_pairs == 50
    assert vec.provenance.source.endswith("a.h5")
    sub, _ = fit_vector(tmp_path / "a.h5", MeanDifference(), layers=[9, 4])
    # other batch sizes (256 vs 8): other float64 summation orders, same float32 rounding
    torch.testing.assert_close(sub.direction(9), vec.direction(9),
                               **one_rounding(chosen, rejected))
    with pytest.raises(SteerlabError, match="not captured"):
        fit_vector(tmp_path / "a.h5", layers=[5])
    with pytest.raises(SteerlabError, match="field 'method'.*'lda'"):
        fitter("lda")
    with pytest.raises(SteerlabError, match="no response means"):
        fit_vector(tmp_path / "a.h5", mean=True)


def test_shuffled_label_control_swaps_exactly_half_the_pairs(tmp_path):
    from steerlab.extraction.fitters import shuffled_control

    chosen, rejected, direction = planted(n=40)
    n = write_planted_file(tmp_path / "a.h5", chosen, rejected)
    vec, _ = fit_vector(tmp_path / "a.h5", "mean-diff", batch_size=8)
    control = shuffled_control(vec, tmp_path / "a.h5", seed=5)
    swap = np.zeros(n, dtype=bool)
    swap[np.random.default_rng(5).permutation(n)[: n // 2]] = True
    sign = torch.from_numpy(np.where(swap, -1.0, 1.0))[:, None, None]
    want = ((chosen.double() - rejected.double()) * sign).mean(0).float()
    torch.testing.assert_close(control.directions, want, **one_rounding(chosen, rejected))
    assert control.layers == vec.layers and "shuffled(seed=5)" in control.provenance.method
    # the planted trait cancels: far less aligned with it than the real vector
    assert float(cos(control.directions, direction).abs().max()) < 0.5 < float(
        cos(vec.directions, direction).min())
