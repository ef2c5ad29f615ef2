"""Dense linear algebra the randomized methods share: Nyström from a sketch, Lanczos, row norms."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

#: what a non-finite kernel product means, and the ways out
NONFINITE_PRODUCTS = (
    "the kernel's products are not finite (nan or inf): an overflow in a float16/bfloat16 model, or a derivative that "
    "is infinite where the forward is not (e.g. sqrt at 0); a one-sided method (method='vjp') or float32 may avoid it"
)


def nystrom_from_sketch(S: torch.Tensor, Y: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clipped at 0) and vectors of the Nyström approximation.

    ``Y = K S`` for a PSD K; ``eps`` is the unit round-off of the arithmetic that produced Y.
    The approximation ``K S (SᵀKS)⁺ SᵀK`` depends only on range(S), so S need not be orthonormal.
    Stable shift: Tropp et al. (2017), Alg. 3.
    """
    S, Y = S.to(torch.float64), Y.to(torch.float64)
    if not bool(torch.isfinite(Y).all()):  # no shift makes a Cholesky of inf/nan succeed
        raise FloatingPointError(NONFINITE_PRODUCTS)
    n = S.shape[0]
    nu = max(eps * float(torch.linalg.matrix_norm(Y)) * math.sqrt(n), torch.finfo(torch.float64).tiny)
    Yn = Y + nu * S
    B = S.T @ Yn
    C, info = torch.linalg.cholesky_ex((B + B.T) / 2, upper=True)
    for _ in range(40):  # a negative eigenvalue from round-off: grow the shift
        if int(info) == 0:
            break
        nu *= 10
        Yn = Y + nu * S
        B = S.T @ Yn
        C, info = torch.linalg.cholesky_ex((B + B.T) / 2, upper=True)
    if int(info) != 0:
        raise FloatingPointError(f"the Nyström core SᵀKS stays indefinite after a shift of {nu:.3g}: K·S is not a PSD kernel's product")
    F = torch.linalg.solve_triangular(C, Yn, upper=True, left=False)
    U, sig, _ = torch.linalg.svd(F, full_matrices=False)
    return (sig**2 - nu).clamp(min=0), U


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lanczos tridiagonalisation with full reorthogonalisation (float64).

    Returns ``(alpha, beta, V)``: the diagonal and off-diagonal of T and the Lanczos basis.
    Stops early at an invariant subspace (``β`` below round-off), so T may be smaller than steps.
    """
    return _lanczos_columns(lambda X: matvec(X[:, 0])[:, None], v0[:, None], steps)[0]


def lanczos_many(
    matmat: Callable[[torch.Tensor], torch.Tensor], V0: torch.Tensor, steps: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`lanczos` from every column of ``V0`` (n × m) at once: one ``matmat`` of the columns
    still running per step (a block of probes through the model, not m single passes), each column
    reorthogonalised against its own basis only.  Returns ``(alpha, beta)`` per column; a column
    stops at its invariant subspace as :func:`lanczos` does."""
    return [(alpha, beta) for alpha, beta, _ in _lanczos_columns(matmat, V0, steps)]


def _lanczos_columns(
    matmat: Callable[[torch.Tensor], torch.Tensor], V0: torch.Tensor, steps: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Independent Lanczos runs from the columns of ``V0``: ``(alpha, beta, basis (n × k))`` each."""
    X = V0.to(torch.float64)
    n, m = X.shape
    steps = min(steps, n)
    basis = torch.zeros(m, steps, n, dtype=torch.float64, device=X.device)
    basis[:, 0] = (X / torch.linalg.vector_norm(X, dim=0)).T
    alphas: list[list[float]] = [[] for _ in range(m)]
    betas: list[list[float]] = [[] for _ in range(m)]
    scale = [0.0] * m
    active = list(range(m))
    for j in range(steps):
        idx = torch.tensor(active, device=X.device)
        Q = basis[idx, : j + 1]  # (k, j + 1, n)
        W = matmat(Q[:, j].T.contiguous()).to(torch.float64).T  # (k, n)
        a = (Q[:, j] * W).sum(1)
        for _ in range(2):  # classical Gram–Schmidt twice against the column's basis ("twice is enough")
            W = W - torch.einsum("ksn,ks->kn", Q, torch.einsum("ksn,kn->ks", Q, W))
        b = torch.linalg.vector_norm(W, dim=1)
        still = []
        for r, col in enumerate(active):
            alphas[col].append(float(a[r]))
            scale[col] = max(scale[col], abs(float(a[r])), float(b[r]))
            if j == steps - 1 or float(b[r]) <= 1e-12 * max(scale[col], 1e-300):
                continue
            betas[col].append(float(b[r]))
            basis[col, j + 1] = W[r] / b[r]
            still.append(col)
        active = still
        if not active:
            break
    out = []
    for col, (al, be) in enumerate(zip(alphas, betas)):
        k = len(al)
        out.append((torch.tensor(al, dtype=torch.float64), torch.tensor(be[: k - 1], dtype=torch.float64), basis[col, :k].T))
    return out


def tridiag_eig(alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of the symmetric tridiagonal matrix with diagonal ``alpha``, off-diagonal ``beta``."""
    T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    return torch.linalg.eigh(T)


def sqnorms(blocks: list[torch.Tensor]) -> torch.Tensor:
    """Per-row squared norms of column blocks, in float64 (each block reduced in its own dtype, or
    float32 for half precisions: no float64 copy of the block is made).  ``vector_norm`` is one
    reduction kernel; ``vecdot`` multiplied into a temporary block first and ran 5× slower."""
    total = torch.zeros(blocks[0].shape[0], dtype=torch.float64, device=blocks[0].device)
    for b in blocks:
        acc = None if b.dtype in (torch.float32, torch.float64) else torch.float32
        total += torch.linalg.vector_norm(b.reshape(b.shape[0], -1), dim=1, dtype=acc).to(torch.float64).square()
    return total
