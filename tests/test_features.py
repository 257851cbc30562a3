"""The feature maps phi (slimtune/features.py) against the independent float64 definitions of tests/reference.py,
and the FAVOR+ draw: blocks of exactly orthogonal rows with chi-distributed norms, seeded, and positive random
features whose mean inner product estimates the softmax kernel exp(q . k / sqrt(d_h))."""

import math

import pytest
import reference
import torch
from helpers import assert_close

from slimtune.errors import ConfigError
from slimtune.features import ELEMENTWISE, FEATURE_TYPES, apply_features, draw_orthogonal_features


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_elementwise_maps_match_the_reference(name):
    x = _x(3, 5, 8) * 2
    assert_close(apply_features(x, name), reference.phi(x, name, None), 1e-15, name)
    assert apply_features(x, name).shape == x.shape


def test_elementwise_maps_by_hand():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0], dtype=torch.float64)
    assert apply_features(x, "sqr").tolist() == [4.0, 0.25, 0.0, 0.25, 9.0]
    assert apply_features(x, "relu").tolist() == [0.0, 0.0, 0.0, 0.5, 3.0]
    assert apply_features(x, "abs").tolist() == [2.0, 0.5, 0.0, 0.5, 3.0]
    expected = [math.exp(-2.0), math.exp(-0.5), 1.0, 1.5, 4.0]
    assert apply_features(x, "elu+1").tolist() == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("multiplier", [1, 3])
def test_favor_features_match_the_reference(multiplier):
    d_h = 8
    w = draw_orthogonal_features(multiplier * d_h, d_h, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = _x(2, 7, d_h)
    got = apply_features(x, "favor+", w)
    assert got.shape == (2, 7, multiplier * d_h) and (got > 0).all()
    assert_close(got, reference.phi(x, "favor+", w), 1e-14, "favor+")
    # By hand for one vector: exp(w_i . x' - |x'|^2 / 2) with x' = x / d_h^(1/4).
    xs = x[0, 0] / d_h**0.25
    by_hand = torch.tensor(
        [math.exp(float(w[i] @ xs) - float(xs @ xs) / 2) for i in range(w.shape[0])], dtype=torch.float64
    )
    assert_close(got[0, 0], by_hand, 1e-14, "by hand")


def test_favor_without_a_draw_says_to_draw_one():
    with pytest.raises(ConfigError, match="redraw_features"):
        apply_features(_x(2, 4), "favor+")


@pytest.mark.parametrize("n_features, head_dim", [(8, 8), (20, 8), (3, 5)])
def test_the_draw_is_orthogonal_within_each_block(n_features, head_dim):
    w = draw_orthogonal_features(n_features, head_dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert w.shape == (n_features, head_dim) and w.dtype == torch.float64
    for start in range(0, n_features, head_dim):
        block = w[start : start + head_dim]
        gram = block @ block.T
        off_diagonal = gram - torch.diag(torch.diagonal(gram))
        assert off_diagonal.abs().max() <= 1e-12 * gram.diagonal().max()
    assert (w.norm(dim=1) > 0).all()


def test_row_norms_are_chi_distributed():
    """Each row's squared norm is chi^2 with head_dim degrees of freedom: mean head_dim, variance 2 head_dim."""
    head_dim, n = 16, 16 * 400
    w = draw_orthogonal_features(n, head_dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    squared = w.norm(dim=1) ** 2
    assert abs(squared.mean().item() - head_dim) < 4 * math.sqrt(2 * head_dim / n)
    assert abs(squared.var().item() - 2 * head_dim) < 0.15 * 2 * head_dim


def test_a_seeded_draw_repeats_and_another_seed_differs():
    draw = lambda seed: draw_orthogonal_features(12, 4, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(5), draw(5)) and not torch.equal(draw(5), draw(6))
    assert draw(5).dtype == torch.float32


# torch.linalg.qr leaves the signs of R's diagonal free: Q of a Gaussian matrix is Haar-distributed only once each
# column is multiplied by sign(R_ii). Without that the rows leaned towards one orthant (mean direction about +-0.1
# per coordinate at d_h = 4) and the FAVOR+ kernel estimate was off by 13-30 %.


def test_the_rows_are_marginally_gaussian():
    """A Gaussian row has mean 0 in every coordinate: the mean of n rows is within 4 / sqrt(n) of 0."""
    d_h, n = 4, 4 * 5000
    w = draw_orthogonal_features(n, d_h, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert w.mean(0).abs().max().item() < 4 / math.sqrt(n), w.mean(0)


def test_favor_estimates_the_softmax_kernel():
    """E[phi(q) . phi(k)] / M = exp(q . k / sqrt(d_h)) for positive random features; averaged over many rows."""
    d_h, n = 4, 4 * 10000
    w = draw_orthogonal_features(n, d_h, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    q, k = _x(d_h, seed=1) * 0.5, _x(d_h, seed=2) * 0.5
    estimate = (apply_features(q, "favor+", w) @ apply_features(k, "favor+", w)).item() / n
    exact = math.exp((q @ k).item() / math.sqrt(d_h))
    assert abs(estimate - exact) < 0.03 * exact, (estimate, exact)


def test_the_kernel_estimate_of_plain_gaussian_rows():
    """The same estimate with i.i.d. Gaussian rows (no orthogonality): checks the estimator the test above uses."""
    d_h, n = 4, 4 * 10000
    w = torch.randn(n, d_h, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    q, k = _x(d_h, seed=1) * 0.5, _x(d_h, seed=2) * 0.5
    estimate = (apply_features(q, "favor+", w) @ apply_features(k, "favor+", w)).item() / n
    exact = math.exp((q @ k).item() / math.sqrt(d_h))
    assert abs(estimate - exact) < 0.03 * exact, (estimate, exact)


def test_feature_type_names():
    assert FEATURE_TYPES == ("sqr", "relu", "elu+1", "abs", "favor+", "favor+_N")
