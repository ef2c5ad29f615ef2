"""Probe streams: reproducible, chunk-invariant, independent across streams, isotropic."""

from __future__ import annotations

import pytest
import torch

from ntkscope.core.probes import BLOCK, Probe, ProbeStream, Stream, parse_probe, resolve_seed


@pytest.mark.parametrize("kind", list(Probe))
def test_columns_do_not_depend_on_chunking(kind: Probe) -> None:
    s = ProbeStream(37, kind, seed=3, stream=Stream.MAIN, dtype=torch.float64)
    whole = s.columns(0, 3 * BLOCK + 5)
    pieces = torch.cat([s.columns(a, min(a + 7, 3 * BLOCK + 5)) for a in range(0, 3 * BLOCK + 5, 7)], 1)
    assert torch.equal(whole, pieces)
    assert torch.equal(s.rows(5, 40), whole[:, 5:40].T)
    assert torch.equal(ProbeStream(37, kind, 3, Stream.MAIN, torch.float64).columns(0, 10), whole[:, :10])


def test_streams_and_seeds_are_independent() -> None:
    a = ProbeStream(50, Probe.GAUSSIAN, 1, Stream.MAIN, torch.float64).columns(0, 64)
    b = ProbeStream(50, Probe.GAUSSIAN, 1, Stream.SECOND, torch.float64).columns(0, 64)
    c = ProbeStream(50, Probe.GAUSSIAN, 2, Stream.MAIN, torch.float64).columns(0, 64)
    for x, y in [(a, b), (a, c)]:
        # independent N(0,1) columns: the sample correlation of 3200 pairs is ~N(0, 1/3200)
        r = float((x * y).mean() / (x.std() * y.std()))
        assert abs(r) < 4 / 3200**0.5
    assert torch.equal(ProbeStream(50, Probe.GAUSSIAN, 1).child(Stream.SECOND).columns(0, 64).double(), b.float().double())


def test_stream_ids_are_fixed() -> None:
    # the values seed the probes: renumbering a stream would change every estimate that uses it
    assert [int(s) for s in Stream] == [0, 1, 2, 3, 4, 11, 12, 16]


@pytest.mark.parametrize("kind", list(Probe))
def test_probes_are_isotropic(kind: Probe) -> None:
    d, m = 8, 4096
    V = ProbeStream(d, kind, 0, dtype=torch.float64).columns(0, m)
    cov = V @ V.T / m
    # E[v vᵀ] = I; each entry's sampling sd is at most ~sqrt(3/m) (Gaussian fourth moment)
    assert torch.allclose(cov, torch.eye(d, dtype=torch.float64), atol=5 * (3 / m) ** 0.5)


def test_distribution_shapes() -> None:
    d = 16
    r = ProbeStream(d, Probe.RADEMACHER, 0, dtype=torch.float64).columns(0, 100)
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    s = ProbeStream(d, Probe.SPHERE, 0, dtype=torch.float64).columns(0, 100)
    assert torch.allclose(s.norm(dim=0), torch.full((100,), d**0.5, dtype=torch.float64))
    o = ProbeStream(d, Probe.ORTHOGONAL, 0, dtype=torch.float64).columns(0, d)
    assert torch.allclose(o.T @ o, d * torch.eye(d, dtype=torch.float64), atol=1e-10)


def test_dtypes_see_the_same_probes() -> None:
    for kind in (Probe.RADEMACHER, Probe.GAUSSIAN):
        a = ProbeStream(20, kind, 4, dtype=torch.float64).columns(0, 40)
        b = ProbeStream(20, kind, 4, dtype=torch.float32).columns(0, 40)
        assert torch.allclose(a, b.double(), atol=1e-6)


def test_seed_and_kind_parsing() -> None:
    assert resolve_seed(5) == 5
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert resolve_seed(g1) == resolve_seed(g2) and resolve_seed(g1) != resolve_seed(torch.Generator().manual_seed(0))
    assert resolve_seed(None) != resolve_seed(None)
    with pytest.raises(ValueError, match="non-negative"):
        resolve_seed(-1)
    with pytest.raises(TypeError, match="seed must be"):
        resolve_seed(1.5)  # type: ignore[arg-type]
    assert parse_probe("sphere") is Probe.SPHERE
    with pytest.raises(ValueError, match="unknown probe distribution 'cauchy'"):
        parse_probe("cauchy")


@pytest.mark.parametrize("kind", list(Probe))
@pytest.mark.parametrize("dim", [1, 7, 3201, 4096])
def test_rows_across_blocks_are_the_rows_one_at_a_time(kind: Probe, dim: int) -> None:
    """Multi-block rows are drawn block by block into one allocation (straight into it where a
    block holds whole 64-bit draws, even dim): the same values as any other split."""
    s = ProbeStream(dim, kind, 3, 1, torch.float64)
    one_by_one = torch.cat([s.rows(i, i + 1) for i in range(5, 75)])
    assert torch.equal(s.rows(5, 75), one_by_one)
    assert s.rows(5, 75).is_contiguous()
