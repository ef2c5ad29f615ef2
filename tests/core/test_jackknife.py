"""The one jackknife: leave-one-probe-out values against brute force, and ratio errors."""

from __future__ import annotations

import math

import pytest
import torch

from ntkscope.core.jackknife import Part, combine, dof, mean_loo, pair_mean_loo, pair_mean_loo_rows


def test_mean_loo_is_the_mean_without_each_sample() -> None:
    x = torch.randn(9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    full, loo = mean_loo(x)
    assert float(full) == pytest.approx(float(x.mean()))
    assert torch.allclose(loo, torch.stack([torch.cat([x[:i], x[i + 1 :]]).mean() for i in range(9)]))
    # for a plain mean the jackknife standard error is the sample std / √m
    _, se, _ = combine([Part.means(x)], lambda c: c[..., 0])
    assert se == pytest.approx(float(x.std() / 3))


@pytest.mark.parametrize("independent", [False, True])
def test_pair_mean_loo_against_brute_force(independent: bool) -> None:
    m = 7
    H = torch.randn(m, m, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if not independent:
        H = H + H.T

    def pair_mean(idx: list[int]) -> float:
        pairs = [(i, j) for i in idx for j in idx if independent or i != j]
        return sum(float(H[i, j]) for i, j in pairs) / len(pairs)

    full, loo = pair_mean_loo(H, independent_diag=independent)
    assert float(full) == pytest.approx(pair_mean(list(range(m))))
    for i in range(m):
        assert float(loo[i]) == pytest.approx(pair_mean([j for j in range(m) if j != i]))


def test_ratio_error_matches_the_delta_method() -> None:
    g = torch.Generator().manual_seed(2)
    a = 5 + torch.randn(400, dtype=torch.float64, generator=g)
    b = 2 + 0.5 * torch.randn(400, dtype=torch.float64, generator=g)
    value, se, bc = combine([Part.means(torch.stack([a, b], 1))], lambda c: c[..., 0] / c[..., 1])
    ma, mb = float(a.mean()), float(b.mean())
    delta = math.sqrt(float(a.var()) / mb**2 + ma**2 * float(b.var()) / mb**4) / 400**0.5
    assert value == pytest.approx(ma / mb) and se == pytest.approx(delta, rel=0.05)
    assert abs(bc - value) < se  # the bias correction is O(1/m), well inside one stderr


def test_independent_parts_add_variances_and_exact_parts_add_none() -> None:
    x = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.randn(80, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    _, sx, _ = combine([Part.means(x)], lambda c: c[..., 0])
    _, sy, _ = combine([Part.means(y)], lambda c: c[..., 0])
    _, s, _ = combine([Part.means(x), Part.means(y), Part.exact(1.0)], lambda c: c[..., 0] + c[..., 1] + c[..., 2])
    assert s == pytest.approx(math.hypot(sx, sy))
    assert dof([Part.means(x), Part.means(y), Part.exact(1.0)]) == 49 and dof([Part.exact(1.0)]) is None
    _, s1, _ = combine([Part.means(x[:1])], lambda c: c[..., 0])
    assert s1 == math.inf  # one sample: no spread to measure


@pytest.mark.parametrize("independent", [False, True])
def test_pair_statistics_from_row_blocks_equal_the_whole_matrix(independent: bool) -> None:
    g = torch.Generator().manual_seed(5)
    A, B = torch.randn(23, 6, dtype=torch.float64, generator=g), torch.randn(23, 6, dtype=torch.float64, generator=g)
    H = (A @ B.T) ** 2 if independent else (A @ A.T) ** 2
    full, loo = pair_mean_loo(H, independent_diag=independent)
    f2, l2 = pair_mean_loo_rows(lambda s, e: H[s:e], 23, independent_diag=independent, block=5)
    assert float(f2) == pytest.approx(float(full), rel=1e-12)
    assert torch.allclose(l2, loo, rtol=1e-12)
    with pytest.raises(ValueError, match="num_probes >= 2"):
        pair_mean_loo_rows(lambda s, e: H[s:e, :1], 1)
