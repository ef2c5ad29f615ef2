"""XTrace and XNysTrace: exchangeable leave-one-out trace estimators, with their jackknives.

Reference: Epperly, Tropp, Webber, "XTrace: making the most of every sample in stochastic trace
estimation", SIAM J. Matrix Anal. Appl. 2024.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..core.linalg import NONFINITE_PRODUCTS
from ..core.probes import Probe, ProbeStream
from .products import colnorm2, diag_prod, gather_columns, require_independent


def xtrace_samples(
    matmat: Callable[[torch.Tensor], torch.Tensor],
    stream: ProbeStream,
    m: int,
    dtype: torch.dtype,
    chunk: int,
) -> torch.Tensor:
    """XTrace (Epperly–Tropp–Webber): m matvecs, ``m // 2`` exchangeable estimates.

    Each estimate i is Hutch++ with the sketch of all other test vectors and ω_i as its single
    residual probe; their mean is the trace estimate.  Sphere probes get the paper's "improved"
    normalisation.  Works for any square matrix.

    Cost: ``m // 2`` matvecs for the sketch ``Y = AΩ`` and ``m // 2`` for ``AQ`` (2 AD passes
    each for an NTK).  Unbiased (each leave-one-out estimate is).  Its error is close to that of
    Hutch++ with a sketch of ``m // 2`` columns (every test vector serves as sketch and as
    probe).  The k samples are dependent, so their spread understates the error (a 95 % interval
    from it covered 0.6–0.8); the metrics report a grouped jackknife of the whole estimator instead.
    """
    Om, Y, Q, Z = _xtrace_products(matmat, stream, m, dtype, chunk)
    return _xtrace_core(Om, Y, Q, Z, stream.dim, stream.kind is Probe.SPHERE).cpu()


def _xtrace_products(
    matmat: Callable[[torch.Tensor], torch.Tensor], stream: ProbeStream, m: int, dtype: torch.dtype, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    k = m // 2
    n = stream.dim
    require_independent(stream, "XTrace")
    if k < 2:
        raise ValueError(f"XTrace needs num_probes >= 4 (two test vectors), got {m}")
    if k >= n:
        raise ValueError(f"XTrace needs fewer than {2 * n} probes for a {n}×{n} operator; use method='exact'")
    Om = stream.columns(0, k).to(torch.float64)
    Y = gather_columns(lambda X: matmat(X.to(dtype)), Om, chunk).to(torch.float64)
    Q, _ = torch.linalg.qr(Y)
    Z = gather_columns(lambda X: matmat(X.to(dtype)), Q, chunk).to(torch.float64)
    return Om, Y, Q, Z


def _xtrace_core(Om: torch.Tensor, Y: torch.Tensor, Q0: torch.Tensor, Z0: torch.Tensor, n: int, improved: bool) -> torch.Tensor:
    """XTrace's k estimates from test vectors Ω, ``Y = AΩ`` and ``Z0 = A Q0`` for any orthonormal
    Q0 whose range contains Y's (so ``A Q = Z0 Q0ᵀQ`` for Q = orth(Y): no new products)."""
    k = Om.shape[1]
    Q, R = torch.linalg.qr(Y)
    Z = Z0 if Q0 is Q else Z0 @ (Q0.T @ Q)
    W = Q.T @ Om
    eye = torch.eye(k, dtype=torch.float64)
    S = eye - torch.linalg.solve_triangular(R, torch.triu(R, 1), upper=True, left=False)
    S = (S / torch.linalg.vector_norm(S, dim=1, keepdim=True)).T
    if improved:
        scale = (n - k + 1) ** 0.5 / torch.sqrt(
            n - colnorm2(W) + (diag_prod(S, W).abs() * torch.linalg.vector_norm(S, dim=0)) ** 2
        )
        Om, R, Y, W = Om * scale, R * scale, Y * scale, W * scale
    H = Q.T @ Z
    HW = H @ W
    T = Z.T @ Om
    dSW = diag_prod(W, S)
    dSHS = diag_prod(S, H @ S)
    dOmY = diag_prod(Om, Y)
    dWR = diag_prod(W, R)
    dTW = diag_prod(T, W)
    dWHW = diag_prod(W, HW)
    dSRmHW = diag_prod(S, R - HW)
    dTmHRS = diag_prod(T - H.T @ W, S)
    return torch.trace(H) - dSHS + dOmY - dWR - dTW + dWHW + dSW * dSRmHW + dSW**2 * dSHS + dTmHRS * dSW


#: Groups of XTrace's grouped jackknife (each leaves out 1/g of the test vectors).
JACK_GROUPS = 10


def _groups(k: int, g: int) -> list[torch.Tensor]:
    """Keep-masks of a delete-a-group jackknife: g contiguous groups of the k test vectors."""
    g = max(2, min(g, k))
    bounds = [round(i * k / g) for i in range(g + 1)]
    masks = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        keep = torch.ones(k, dtype=torch.bool)
        keep[a:b] = False
        masks.append(keep)
    return masks


def xtrace_jackknife(
    matmat: Callable[[torch.Tensor], torch.Tensor],
    stream: ProbeStream,
    m: int,
    dtype: torch.dtype,
    chunk: int,
    groups: int = JACK_GROUPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """XTrace's estimate and its delete-a-group jackknife replicates, from the same products.

    XTrace's own error estimate (the spread of its exchangeable samples) ignores that the
    samples share their sketch, and under-covers badly (Epperly et al. call it a rough
    indicator).  The jackknife recomputes the whole estimator without each group of test
    vectors; range(AΩ₋g) ⊂ range(AΩ), so no new matvecs are needed.  Returns
    ``(full (1,), replicates (g, 1))``.
    """
    Om, Y, Q, Z = _xtrace_products(matmat, stream, m, dtype, chunk)
    n, sph = stream.dim, stream.kind is Probe.SPHERE
    full = _xtrace_core(Om, Y, Q, Z, n, sph).mean()
    reps = [_xtrace_core(Om[:, keep], Y[:, keep], Q, Z, n, sph).mean() for keep in _groups(Om.shape[1], groups)]
    return full.reshape(1).cpu(), torch.stack(reps)[:, None].cpu()


def xnystrace_samples(
    matmat: Callable[[torch.Tensor], torch.Tensor],
    stream: ProbeStream,
    m: int,
    dtype: torch.dtype,
    chunk: int,
) -> torch.Tensor:
    """XNysTrace: the Nyström variant of XTrace for PSD operators; m matvecs, m estimates.

    Each estimate i is the trace of the Nyström approximation from the other m − 1 columns plus
    ω_i as its residual probe (Epperly, Tropp, Webber 2024); one round of m matvecs (2 AD
    passes each for an NTK) instead of XTrace's two.  Unbiased for PSD operators (the shift ν
    below is subtracted exactly).
    """
    Om = _xnys_probes(stream, m)
    Y = gather_columns(lambda X: matmat(X.to(dtype)), Om, chunk).to(torch.float64)
    return _xnys_core(Om, Y, stream.dim, dtype, stream.kind is Probe.SPHERE).cpu()


def _xnys_probes(stream: ProbeStream, m: int) -> torch.Tensor:
    n = stream.dim
    require_independent(stream, "XNysTrace")
    if m < 2:
        raise ValueError(f"XNysTrace needs num_probes >= 2, got {m}")
    if m >= n:
        raise ValueError(f"XNysTrace needs fewer than {n} probes for a {n}×{n} operator; use method='exact'")
    return stream.columns(0, m).to(torch.float64)


def xnystrace_jackknife(
    matmat: Callable[[torch.Tensor], torch.Tensor],
    stream: ProbeStream,
    m: int,
    dtype: torch.dtype,
    chunk: int,
    powers: Sequence[int] = (1,),
    groups: int = JACK_GROUPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """XNysTrace of ``tr A^p`` for each p in ``powers``, all on the *same* probes Ω, with a
    grouped jackknife.

    ``AΩ, A²Ω, …`` are computed once each (``A^{p}Ω = A·A^{p-1}Ω``: ``m·max(powers)`` matvecs), so
    the trace and ``‖A‖_F² = tr A²`` share their probes and products.  Each replicate recomputes
    every component without one group of probes (no new matvecs), so ratios keep their
    correlation.  Returns ``(full (k,), replicates (g, k))``.
    """
    Om = _xnys_probes(stream, m)
    n, sph = stream.dim, stream.kind is Probe.SPHERE
    Ys: dict[int, torch.Tensor] = {}
    X = Om
    for p in range(1, max(powers) + 1):
        X = gather_columns(lambda V: matmat(V.to(dtype)), X, chunk).to(torch.float64)
        Ys[p] = X
    full = torch.stack([_xnys_core(Om, Ys[p], n, dtype, sph).mean() for p in powers])
    reps = torch.stack(
        [torch.stack([_xnys_core(Om[:, keep], Ys[p][:, keep], n, dtype, sph).mean() for p in powers]) for keep in _groups(m, groups)]
    )
    return full.cpu(), reps.cpu()


def _xnys_core(Om: torch.Tensor, Y: torch.Tensor, n: int, dtype: torch.dtype, sphere: bool) -> torch.Tensor:
    m = Om.shape[1]
    # The shift ν makes Ωᵀ(A + νI)Ω numerically positive definite; the estimate is of
    # tr(A + νI) − νn, so any ν > 0 keeps it unbiased.  Epperly et al. use ν = eps‖Y‖_F/√n; that
    # is too small once m exceeds the numerical rank of A (or Y carries float32 rounding), so ν
    # grows tenfold until the Cholesky factorisation succeeds.
    eps = torch.finfo(dtype).eps
    ynorm = float(torch.linalg.matrix_norm(Y))
    if not math.isfinite(ynorm):
        raise FloatingPointError(NONFINITE_PRODUCTS)
    if ynorm == 0:  # A Ω = 0: the zero operator (on these probes); every estimate is 0
        return torch.zeros(m, dtype=torch.float64)
    nu = eps * ynorm / n**0.5
    Y0 = Y
    for _ in range(12):
        Y = Y0 + nu * Om
        H = Om.T @ Y
        C, info = torch.linalg.cholesky_ex((H + H.T) / 2, upper=True)
        if int(info) == 0:
            break
        nu *= 10
    else:
        raise RuntimeError("XNysTrace: Ωᵀ(A + νI)Ω is not positive definite; is the operator PSD?")
    Q, R = torch.linalg.qr(Y)
    B = torch.linalg.solve_triangular(C, R, upper=True, left=False)  # R C⁻¹
    if sphere:
        QQ, RR = torch.linalg.qr(Om)
        WW = QQ.T @ Om
        SS = torch.eye(m, dtype=torch.float64) - torch.linalg.solve_triangular(RR, torch.triu(RR, 1), upper=True, left=False)
        SS = (SS / torch.linalg.vector_norm(SS, dim=1, keepdim=True)).T
        scale = (n - m + 1) / (n - colnorm2(WW) + (diag_prod(SS, WW).abs() * torch.linalg.vector_norm(SS, dim=0)) ** 2)
    else:
        scale = torch.ones(m, dtype=torch.float64)
    W = Q.T @ Om
    S = torch.linalg.solve_triangular(C.T, B, upper=False, left=False)  # B C⁻ᵀ
    # diag(H⁻¹) from the Cholesky factor (H = CᵀC): positive by construction, unlike diag(inv(H))
    # of a nearly singular H, whose rounding can make entries negative (NaN estimates)
    Cinv = torch.linalg.solve_triangular(C, torch.eye(m, dtype=torch.float64), upper=True)
    S = S * Cinv.square().sum(1).rsqrt()
    dSW = diag_prod(S, W)
    ests = torch.linalg.matrix_norm(B) ** 2 - colnorm2(S) + dSW**2 * scale - nu * n
    return ests


# -- one-sided -------------------------------------------------------------------------------

