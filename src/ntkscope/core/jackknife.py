"""Jackknife (leave-one-probe-out) statistics: the one implementation every estimate uses.

Estimators produce per-probe samples; :func:`mean_loo`, :func:`pair_mean_loo` and (batched, from
row and column sums) :func:`pair_mean_loo_from_sums` turn samples and pair statistics into
(value, leave-one-out values); :func:`stderr_and_corrected` gives the delete-one jackknife
standard error and bias-corrected value of every entry of such a tensor; a :class:`Part` holds
components from one probe set, and :func:`combine` gives the value, the jackknife standard error
and the bias-corrected value of any smooth function of the components (Quenouille 1956;
Efron & Stein 1981; for U-statistics, Arvesen 1969).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def pair_mean_loo(H: torch.Tensor, independent_diag: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``H_ij`` over pairs, and its leave-one-probe-out values.

    ``H`` is ``(m, m)``.  Pairs are ``i ≠ j`` (one probe set, so ``i = j`` is not an independent
    pair), or all ``(i, j)`` when the two probe sets are independent (``independent_diag``);
    leaving probe i out drops row i and column i.  Returns (full, loo of shape (m,)).

    With ``H = S∘S`` for the one-sided probe Gram ``S_ij = w_iᵀKw_j`` this is the order-2
    U-statistic ``mean_{i≠j} (w_iᵀKw_j)²``, unbiased for ``‖K‖_F²`` when the probes are
    independent and isotropic (``E (w_iᵀKw_j)² = tr(K E[w_jw_jᵀ] K) = tr K²``).  Its variance is
    ``(4ζ₁(m − 2) + 2ζ₂)/(m(m − 1))`` (Hoeffding 1948) with ``ζ₁ = Var(wᵀK²w)``: to leading order
    ``8‖K²‖_F²/m`` for Gaussian probes.  No extra passes: the m one-sided passes give all
    ``m(m − 1)`` pairs.
    """
    m = H.shape[0]
    return pair_mean_loo_rows(lambda s, e: H[s:e], m, independent_diag, block=max(m, 1))


def pair_mean_loo_from_sums(rowsum: torch.Tensor, colsum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Off-diagonal pair mean and its leave-one-probe-out values, batched, from row and column sums.

    For pair statistics ``H_ij`` (any trailing batch shape ``...``, e.g. one per pair of blocks)
    given through ``rowsum[k] = Σ_{j≠k} H_kj`` and ``colsum[k] = Σ_{i≠k} H_ik`` (leading probe
    axis k, shape ``(m, ...)``): the mean ``Σ_{i≠j} H_ij / (m(m − 1))`` and, leaving probe k out
    (dropping row k and column k), ``(Σ_{i≠j} H_ij − rowsum[k] − colsum[k]) / ((m − 1)(m − 2))``
    (NaN for m = 2: one pair left, no spread).  The order-2 U-statistic of
    :func:`pair_mean_loo` (``independent_diag=False``) without forming each ``(m, m)`` matrix:
    callers accumulate the sums block by block.  Hoeffding (1948); Arvesen (1969) for its jackknife.
    """
    m = rowsum.shape[0]
    total = rowsum.sum(0)
    full = total / (m * (m - 1))
    loo = (total - rowsum - colsum) / ((m - 1) * (m - 2)) if m > 2 else torch.full_like(rowsum, math.nan)
    return full, loo


def mean_loo(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of per-probe samples over the leading (probe) axis and its leave-one-out values.

    ``x`` is ``(m, ...)``; returns ``(x̄, x̄_(k))`` with ``x̄_(k) = (Σ_i x_i − x_k)/(m − 1)`` of
    shape ``(m, ...)``, in float64.
    """
    x = x.to(torch.float64)
    m = x.shape[0]
    total = x.sum(0)
    return total / m, (total - x) / (m - 1)


def stderr_and_corrected(full: torch.Tensor, loo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Delete-one jackknife standard error and bias-corrected value, entrywise.

    ``full`` is a statistic ``θ̂`` of m probes (any shape ``...``), ``loo`` its leave-one-out
    values ``θ̂_(k)`` (shape ``(m, ...)``).  With ``θ̄ = mean_k θ̂_(k)``:
    ``se = √((m − 1)/m · Σ_k (θ̂_(k) − θ̄)²)`` and ``θ̂_jack = m θ̂ − (m − 1) θ̄``, which removes
    the O(1/m) bias of smooth functions such as ratios (Quenouille 1956; Efron & Stein 1981).
    For a plain mean ``se = std/√m``.  With fewer than 2 probes: ``se = inf`` and ``full``.
    :func:`combine` does the same for a scalar function of components from several probe sets.
    """
    m = loo.shape[0]
    if m < 2:
        return torch.full_like(full, math.inf), full
    mean = loo.mean(0)
    se = ((m - 1) / m * (loo - mean).square().sum(0)).sqrt()
    return se, m * full - (m - 1) * mean


@dataclass
class Part:
    """Components estimated from one probe set: values, and leave-one-probe-out values."""

    full: torch.Tensor  # (k,)
    loo: torch.Tensor | None = None  # (m, k); None for exact components

    @staticmethod
    def exact(*values: float) -> Part:
        return Part(torch.tensor(values, dtype=torch.float64))

    @staticmethod
    def means(samples: torch.Tensor, offset: torch.Tensor | float = 0.0) -> Part:
        """Components that are sample means (columns of ``samples``) plus exact offsets."""
        x = samples.to(torch.float64)
        if x.dim() == 1:
            x = x[:, None]
        m = x.shape[0]
        total = x.sum(0)
        off = torch.as_tensor(offset, dtype=torch.float64)
        # one sample: no spread to measure, so the standard error is unknown (inf), not zero
        loo = (total - x) / (m - 1) + off if m > 1 else torch.full_like(x, math.nan)
        return Part(total / m + off, loo)

    @staticmethod
    def stack(*parts: tuple[torch.Tensor, torch.Tensor]) -> Part:
        """Components given as (full, loo) pairs from the same probes."""
        return Part(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts], 1))


def dof(parts: Sequence[Part]) -> int | None:
    """Degrees of freedom of the jackknife error: ``rows − 1`` of the smallest random part
    (``None`` when every part is exact).  :meth:`Estimate.ci` uses Student's t with them."""
    rows = [p.loo.shape[0] for p in parts if p.loo is not None]
    return max(1, min(rows) - 1) if rows else None


def combine(parts: Sequence[Part], fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float, float]:
    """Value, jackknife standard error and bias-corrected value of ``fn(components)``.

    Parts from independent probe sets contribute independent variances (summed); components
    within a part share probes, so their covariance is captured.
    """
    full = torch.cat([p.full.reshape(-1) for p in parts])
    value = float(fn(full))
    var, bias = 0.0, 0.0
    start = 0
    for p in parts:
        k = p.full.numel()
        if p.loo is not None:
            m = p.loo.shape[0]
            X = full.repeat(m, 1)
            X[:, start : start + k] = p.loo
            vals = fn(X)
            if m < 2 or not torch.isfinite(vals).all():
                var = math.inf
            else:
                mv = vals.mean()
                var += float((m - 1) / m * ((vals - mv) ** 2).sum())
                bias += float((m - 1) * (mv - value))
        start += k
    return value, math.sqrt(var), value - bias


def pair_mean_loo_rows(
    rows: Callable[[int, int], torch.Tensor], m: int, independent_diag: bool = False, block: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pair_mean_loo` of an ``(m, m)`` matrix given by row blocks, never held whole.

    ``rows(s, e)`` returns ``H[s:e]`` (``(e − s, m)``).  The pair mean and its leave-one-out
    values need only the total, the row and column sums and the diagonal, accumulated
    ``block`` rows at a time: memory ``O(block · m)`` instead of ``O(m²)``, so a one-sided probe
    Gram ``S_ij = w_iᵀKw_j`` of tens of thousands of probes costs no more than its vectors.
    """
    if m < 2:
        raise ValueError(f"pair statistics (one-sided Frobenius norms and ratios) need num_probes >= 2, got {m}")
    row, col, diag = (torch.zeros(m, dtype=torch.float64) for _ in range(3))
    for s in range(0, m, block):
        e = min(m, s + block)
        Hb = rows(s, e).to(torch.float64).cpu()
        row[s:e] = Hb.sum(1)
        col += Hb.sum(0)
        diag[s:e] = Hb[torch.arange(e - s), torch.arange(s, e)]
    if independent_diag:
        total = row.sum()
        return total / m**2, (total - row - col + diag) / (m - 1) ** 2
    full, loo = pair_mean_loo_from_sums(row - diag, col - diag)
    return full, loo
