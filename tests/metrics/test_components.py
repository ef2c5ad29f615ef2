"""The method × component table: one-sided pair statistics in bounded row blocks."""

from __future__ import annotations

import pytest
import torch

import ntkscope as nk
from ntkscope.metrics import components
from ntkscope.tasks import jacobian_with_spectrum


@pytest.mark.parametrize("side", ["vjp", "jvp"])
def test_probe_gram_in_row_blocks_gives_the_same_estimates(monkeypatch: pytest.MonkeyPatch, side: str) -> None:
    """Above GRAM_BLOCK_ENTRIES the m × m probe Gram is swept in row blocks (memory O(block·m));
    the estimates and their jackknife errors are the whole-matrix ones up to summation order."""
    J1 = jacobian_with_spectrum(30, 40, torch.arange(1, 31, dtype=torch.float64) ** -1.0, seed=0)
    J2 = J1 + 0.3 * torch.randn(30, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    A, B = nk.NTK.from_jacobian(J1), nk.NTK.from_jacobian(J2)
    y = torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    calls = {
        "effective_rank": lambda: nk.effective_rank(A, method=side, num_probes=29, seed=0),
        "alignment": lambda: nk.alignment(A, B, method=side, num_probes=29, seed=0),
        "target_alignment": lambda: nk.target_alignment(A, y, method=side, num_probes=29, seed=0),
    }
    whole = {k: f() for k, f in calls.items()}
    seen: list[int] = []
    real = components._GramRows.__init__

    def small_blocks(self: components._GramRows, m: int) -> None:
        real(self, m)
        seen.append(self.block)

    monkeypatch.setattr(components, "GRAM_BLOCK_ENTRIES", 29 * 4)  # blocks of 4 rows
    monkeypatch.setattr(components._GramRows, "__init__", small_blocks)
    for k, f in calls.items():
        e = f()
        assert e.value == pytest.approx(whole[k].value, rel=1e-12), k
        assert e.stderr == pytest.approx(whole[k].stderr, rel=1e-9), k
        assert e.passes == whole[k].passes
    assert seen and set(seen) == {4}
