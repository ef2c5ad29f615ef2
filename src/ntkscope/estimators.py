"""Generic randomized estimators: *what* is averaged × *how probes are drawn* × *how combined*.

All functions are operator-agnostic.  Two-sided ones need only ``matmat`` on each
:class:`~ntkscope.operators.KernelOperator`; one-sided ones need a
:class:`~ntkscope.operators.FactoredKernel` (``jvp`` or ``vjp`` alone).  They return raw,
per-probe statistics; :mod:`ntkscope.metrics` turns those into values with error bars.

Per-probe statistics are small Gram matrices.  For a probe ``v`` and operators K₁..K_k the
two-sided estimators record ``g = Gram([v, K₁v, …, K_kv])`` so that ``E g[0, a] = tr K_a`` and
``E g[a, b] = tr(K_a K_b)`` — trace, squared Frobenius norm and alignment numerators all come from
the same products.

References:
    Hutchinson (1989); Meyer, Musco, Musco, Woodruff, "Hutch++", SOSA 2021;
    Epperly, Tropp, Webber, "XTrace: making the most of every sample in stochastic trace
    estimation", SIMAX 2024; Hazelden, "Fast NTK alignment, norm and effective rank via trace
    estimation", arXiv 2511.10796 (one-sided estimators).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from .operators import FactoredKernel, KernelOperator
from .probes import Probe, ProbeStream

# Stream ids: independent probe sets under one seed.
MAIN, SKETCH, RESIDUAL, SECOND = 0, 1, 2, 3

ProbeFn = Callable[[int, int], torch.Tensor]
_T = TypeVar("_T")
Executor = Callable[[int, int, ProbeFn], torch.Tensor]


def local_executor(m: int, chunk: int, fn: ProbeFn) -> torch.Tensor:
    """Evaluate probes ``0..m-1`` chunk by chunk; ``fn(start, stop)`` returns per-probe rows."""
    outs = [fn(s, min(m, s + chunk)) for s in range(0, m, chunk)]
    return torch.cat(outs, 0)


#: Where probe blocks are evaluated.  :mod:`ntkscope.distributed` swaps in an executor that
#: splits probes over ranks and gathers the per-probe rows, so every estimator scales out.
EXECUTOR: contextvars.ContextVar[Executor] = contextvars.ContextVar("ntkscope_executor", default=local_executor)


def map_probes(m: int, chunk: int, fn: ProbeFn) -> torch.Tensor:
    return current_executor()(m, max(1, chunk), fn)


def current_executor() -> Executor:
    """The executor set in :data:`EXECUTOR`; if none was, probe-parallel over the initialised world."""
    ex = EXECUTOR.get()
    if ex is local_executor and torch.distributed.is_available() and torch.distributed.is_initialized():
        from .distributed import default_executor

        ex = default_executor()
    return ex


def agree(value: _T) -> _T:
    """The first rank's ``value`` when probes are split over processes (choices must match)."""
    fn = getattr(current_executor(), "agree", None)
    return fn(value) if fn is not None else value  # type: ignore[no-any-return]


def _chunk(ops: Sequence[KernelOperator], chunk_size: int | None) -> int:
    if chunk_size is not None:
        return chunk_size
    return min(int(getattr(op, "chunk_size", 64)) for op in ops)


def _gram_rows(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-column Gram: ``(c, k, k)`` from k blocks of shape ``(n, c)``, in float64."""
    X = torch.stack([v.to(torch.float64) for v in vectors])  # (k, n, c)
    return torch.einsum("anc,bnc->cab", X, X).cpu()


# -- two-sided -------------------------------------------------------------------------------


def hutchinson_grams(ops: Sequence[KernelOperator], stream: ProbeStream, m: int, chunk_size: int | None = None) -> torch.Tensor:
    """Hutchinson: per probe v, ``Gram([v, K₁v, …])`` → ``(m, k+1, k+1)``.

    ``mean[:, 0, a]`` is unbiased for ``tr K_a`` and ``mean[:, a, b]`` for ``tr(K_a K_b)``
    (a, b ≥ 1): one matvec per operator per probe (2 AD passes for an NTK: a VJP, then a JVP).

    Variance of one sample ``vᵀKv``: ``2(‖K‖_F² − Σᵢ Kᵢᵢ²)`` for Rademacher probes,
    ``2‖K‖_F²`` for Gaussian ones, so the mean of m has error ``O(‖K‖_F/√m)`` (Hutchinson 1989;
    Avron & Toledo 2011).  For an NTK with Rademacher probes ``vᵀKv = ‖Jᵀv‖²``: the trace
    samples equal the one-sided VJP samples of the same probes, at twice the cost.
    """

    def fn(s: int, e: int) -> torch.Tensor:
        V = stream.columns(s, e)
        return _gram_rows([V, *(op.matmat(V) for op in ops)])

    return map_probes(m, _chunk(ops, chunk_size), fn)


@dataclass
class HutchppResult:
    exact: torch.Tensor  # (k+1, k+1): the sketch-space part, deterministic given the sketch
    residual: torch.Tensor  # (r, k+1, k+1): Hutchinson grams of the deflated probes
    sketch_size: int


def hutchpp_split(m: int, num_ops: int = 1) -> tuple[int, int]:
    """Hutch++'s budget split for m matvecs per operator: (sketch columns, residual probes).

    Thirds (Meyer et al.): ``q = m // 3`` sketch columns (shared out among the operators),
    ``q`` exact products with the basis, ``r = m − q − q`` residual probes — every matvec of the
    budget used, none wasted, whatever m.  Below 3 it is plain Hutchinson.
    """
    q = m // 3
    if q < num_ops:
        return 0, m
    share = q // num_ops
    q = share * num_ops
    return q, m - share - q


def hutchpp_grams(ops: Sequence[KernelOperator], stream: ProbeStream, m: int, chunk_size: int | None = None) -> HutchppResult:
    """Hutch++ for ``tr K_a`` and ``tr(K_a K_b)`` at once.

    Sketch Y = [K₁S₁, …] (q columns in all), Q = orth(Y); exact part ``Σ Gram([q, K₁q, …])``
    over Q's columns; residual: Hutchinson on the deflated probes ``(I − QQᵀ)g``.  Unbiased:
    ``tr(K_a K_b) = tr(Qᵀ K_a K_b Q) + tr(P⊥ K_a K_b P⊥)`` for any orthonormal Q.

    Cost: m matvecs per operator (:func:`hutchpp_split`; 2 AD passes each for an NTK).  Only
    the residual is random: its variance is ``2‖P⊥KP⊥‖_F²/r`` (Gaussian probes), and for PSD K
    ``‖K − QQᵀK‖_F ≤ O(1/√q)·tr K`` in expectation, so the relative error is ``O(1/m)``
    instead of Hutchinson's ``O(1/√m)`` (Meyer, Musco, Musco, Woodruff 2021, Thm. 1); the
    estimate is exact once Q spans K's range (a low-rank kernel).
    """
    k = len(ops)
    q, r = hutchpp_split(m, k)
    chunk = _chunk(ops, chunk_size)
    if q == 0:
        return HutchppResult(torch.zeros(k + 1, k + 1, dtype=torch.float64), hutchinson_grams(ops, stream, m, chunk), 0)
    share = q // k
    sketch = stream.child(SKETCH)

    def sketch_rows(a: int) -> torch.Tensor:
        # operator a sketches its own columns [a*share, (a+1)*share) of the sketch stream
        def fn(s: int, e: int) -> torch.Tensor:
            return ops[a].matmat(sketch.columns(a * share + s, a * share + e)).T

        return map_probes(share, chunk, fn)

    Y = torch.cat([sketch_rows(a) for a in range(k)], 0).T
    Q, _ = torch.linalg.qr(Y.to(torch.float64))
    Q = Q.to(ops[0].dtype)

    def exact_fn(s: int, e: int) -> torch.Tensor:
        B = Q[:, s:e]
        return _gram_rows([B, *(op.matmat(B) for op in ops)])

    exact = map_probes(Q.shape[1], chunk, exact_fn).sum(0)
    resid_stream = stream.child(RESIDUAL)
    Qd = Q.to(torch.float64)

    def resid_fn(s: int, e: int) -> torch.Tensor:
        G = resid_stream.columns(s, e).to(torch.float64)
        G = (G - Qd @ (Qd.T @ G)).to(ops[0].dtype)
        return _gram_rows([G, *(op.matmat(G) for op in ops)])

    residual = map_probes(r, chunk, resid_fn) if r > 0 else torch.zeros(0, k + 1, k + 1, dtype=torch.float64)
    return HutchppResult(exact, residual, Q.shape[1])


def _colnorm2(X: torch.Tensor) -> torch.Tensor:
    return X.square().sum(0)


def _diag_prod(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``diag(Aᵀ B)`` without forming AᵀB."""
    return (A * B).sum(0)


def _gather_cols(matmat: Callable[[torch.Tensor], torch.Tensor], X: torch.Tensor, chunk: int) -> torch.Tensor:
    rows = map_probes(X.shape[1], chunk, lambda s, e: matmat(X[:, s:e]).T)
    return rows.T


def _require_independent(stream: ProbeStream, what: str) -> None:
    # each leave-one-out estimate needs ω_i independent of the others; orthogonal blocks are not
    if stream.kind is Probe.ORTHOGONAL:
        raise ValueError(f"{what} needs independent probes; orthogonal probes are dependent (use 'sphere' or 'gaussian')")


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
    _require_independent(stream, "XTrace")
    if k < 2:
        raise ValueError(f"XTrace needs num_probes >= 4 (two test vectors), got {m}")
    if k >= n:
        raise ValueError(f"XTrace needs fewer than {2 * n} probes for a {n}×{n} operator; use method='exact'")
    Om = stream.columns(0, k).to(torch.float64)
    Y = _gather_cols(lambda X: matmat(X.to(dtype)), Om, chunk).to(torch.float64)
    Q, _ = torch.linalg.qr(Y)
    Z = _gather_cols(lambda X: matmat(X.to(dtype)), Q, chunk).to(torch.float64)
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
            n - _colnorm2(W) + (_diag_prod(S, W).abs() * torch.linalg.vector_norm(S, dim=0)) ** 2
        )
        Om, R, Y, W = Om * scale, R * scale, Y * scale, W * scale
    H = Q.T @ Z
    HW = H @ W
    T = Z.T @ Om
    dSW = _diag_prod(W, S)
    dSHS = _diag_prod(S, H @ S)
    dOmY = _diag_prod(Om, Y)
    dWR = _diag_prod(W, R)
    dTW = _diag_prod(T, W)
    dWHW = _diag_prod(W, HW)
    dSRmHW = _diag_prod(S, R - HW)
    dTmHRS = _diag_prod(T - H.T @ W, S)
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
    Y = _gather_cols(lambda X: matmat(X.to(dtype)), Om, chunk).to(torch.float64)
    return _xnys_core(Om, Y, stream.dim, dtype, stream.kind is Probe.SPHERE).cpu()


def _xnys_probes(stream: ProbeStream, m: int) -> torch.Tensor:
    n = stream.dim
    _require_independent(stream, "XNysTrace")
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
        X = _gather_cols(lambda V: matmat(V.to(dtype)), X, chunk).to(torch.float64)
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
        scale = (n - m + 1) / (n - _colnorm2(WW) + (_diag_prod(SS, WW).abs() * torch.linalg.vector_norm(SS, dim=0)) ** 2)
    else:
        scale = torch.ones(m, dtype=torch.float64)
    W = Q.T @ Om
    S = torch.linalg.solve_triangular(C.T, B, upper=False, left=False)  # B C⁻ᵀ
    # diag(H⁻¹) from the Cholesky factor (H = CᵀC): positive by construction, unlike diag(inv(H))
    # of a nearly singular H, whose rounding can make entries negative (NaN estimates)
    Cinv = torch.linalg.solve_triangular(C, torch.eye(m, dtype=torch.float64), upper=True)
    S = S * Cinv.square().sum(1).rsqrt()
    dSW = _diag_prod(S, W)
    ests = torch.linalg.matrix_norm(B) ** 2 - _colnorm2(S) + dSW**2 * scale - nu * n
    return ests


# -- one-sided -------------------------------------------------------------------------------


def onesided(
    op: FactoredKernel,
    side: str,
    columns: Callable[[int, int], torch.Tensor],
    m: int,
    *,
    keep: bool,
    chunk_size: int | None = None,
    project: torch.Tensor | None = None,
) -> torch.Tensor:
    """One-sided passes: rows ``Jᵀw`` (side "vjp", probes in R^D) or ``Ju`` (side "jvp", R^P).

    ``columns(start, stop)`` gives the probes (a :meth:`ProbeStream.columns`).  Returns
    ``(m, out_dim)`` vectors when ``keep`` (for Gram-based statistics), else the squared norms
    ``(m,)`` — unbiased samples of ``tr K`` (``E‖Jᵀw‖² = E‖Ju‖² = tr K``).  ``project``
    (orthonormal columns in probe space) deflates each probe first: ``(I − QQᵀ)w``.

    Cost: one AD pass of a single mode per probe (Hazelden 2025).  Variance of one sample
    ``‖Jᵀw‖² = wᵀKw``: ``2(‖K‖_F² − Σᵢ Kᵢᵢ²)`` (Rademacher) or ``2‖K‖_F²`` (Gaussian); of
    ``‖Ju‖² = uᵀGu`` with ``G = JᵀJ``: ``2(‖G‖_F² − Σⱼ Gⱼⱼ²)`` (Rademacher) or ``2‖K‖_F²``
    (Gaussian, as ``‖G‖_F = ‖K‖_F``).  With Rademacher probes the better side is the one whose
    trace mass sits on fewer diagonal entries — usually the smaller of D and P.
    """
    apply = op.vjp if side == "vjp" else op.jvp
    Qd = project.to(torch.float64) if project is not None else None

    def fn(s: int, e: int) -> torch.Tensor:
        X = columns(s, e)
        if Qd is not None:
            Xd = X.to(torch.float64)
            X = (Xd - Qd @ (Qd.T @ Xd)).to(X.dtype)
        if not keep:  # only the squared norms: a fast path need not write the block (op.sqnorms)
            return op.sqnorms(side, X).cpu()
        return apply(X).T.contiguous()

    return map_probes(m, _chunk([op], chunk_size), fn)


def probe_dim(op: FactoredKernel, side: str) -> int:
    return op.dim if side == "vjp" else op.num_params


def onesided_projected_trace(
    op: FactoredKernel, side: str, stream: ProbeStream, m: int, chunk_size: int | None = None
) -> tuple[float, torch.Tensor, int]:
    """The paper's one-sided variant with a projected low-rank part.

    A *random* orthonormal block Q of ``q = m // 6`` columns in probe space is handled exactly
    (``Σ‖JᵀQ‖²``), the rest by one-sided Hutchinson on deflated probes ``(I − QQᵀ)w``:
    ``tr K = tr(QᵀKQ) + tr(P⊥KP⊥)``.  Returns (exact part, residual samples, q).

    Cost: m passes of one mode (q for the block, m − q for the residual) plus ``O(d·q²)``
    probe-space algebra.  Unbiased; because Q is random rather than range-finding, it removes
    only a fraction of order q/d of the variance (the reference code's variant, kept for
    comparison; :func:`hutchpp_grams` is the range-finding version).
    """
    d = probe_dim(op, side)
    q = min(m // 6, d)
    Q = None
    exact = 0.0
    if q > 0:
        gauss = ProbeStream(d, Probe.GAUSSIAN, stream.seed, SKETCH, torch.float64, stream.device)
        Q, _ = torch.linalg.qr(gauss.columns(0, q))
        Qt = Q.to(op.dtype)
        exact = float(onesided(op, side, lambda s, e: Qt[:, s:e], q, keep=False, chunk_size=chunk_size).sum())
    resid = onesided(op, side, stream.child(RESIDUAL).columns, m - q, keep=False, chunk_size=chunk_size, project=Q)
    return exact, resid, q


# -- U-statistics over one-sided Gram matrices ------------------------------------------------


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
    H = H.to(torch.float64)
    m = H.shape[0]
    if m < 2:
        raise ValueError(f"pair statistics (one-sided Frobenius norms and ratios) need num_probes >= 2, got {m}")
    if independent_diag:
        total = H.sum()
        full = total / m**2
        loo = (total - H.sum(0) - H.sum(1) + H.diagonal()) / (m - 1) ** 2
        return full, loo
    Hoff = H - torch.diag_embed(H.diagonal())
    total = Hoff.sum()
    full = total / (m * (m - 1))
    loo = (total - Hoff.sum(0) - Hoff.sum(1)) / ((m - 1) * (m - 2)) if m > 2 else torch.full((m,), float("nan"))
    return full, loo


def mean_loo(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of per-probe samples and its leave-one-out values."""
    x = x.to(torch.float64)
    m = x.shape[0]
    total = x.sum()
    return total / m, (total - x) / (m - 1)
