"""Exact paths against an independent ``torch.func.jacrev`` Jacobian, the JVP/VJP adjoint identity,
and every evaluation path (vmap, loop, oneDNN off, double-VJP) against the default one."""

from __future__ import annotations

import pytest
import torch

import model_zoo as Z
import ntkscope as nk
from ntkscope.estimators import exact as ex
from ntkscope.operators.evaluators import JVP_PATHS as _JVP_PATHS
from ntkscope.operators.evaluators import VJP_PATHS as _VJP_PATHS

F64 = [f(torch.float64) for f in Z.FACTORIES.values()]
F32 = [f(torch.float32) for f in Z.FACTORIES.values()]
ALL = F64 + F32
ids = repr


def _rel(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _perturbed(case: Z.Case) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    return {
        n: p.detach() + 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for n, p in case.params.items()
    }


def _ntk_at(case: Z.Case, params: dict[str, torch.Tensor]) -> nk.NTK:
    if case.fn is not None:
        return nk.NTK.from_function(case.fn, params, case.inputs, output=case.output)
    return nk.NTK(case.model, case.inputs, output=case.output, params=params)


@pytest.mark.parametrize("case", F64, ids=ids)
def test_exact_paths_match_jacrev(case: Z.Case) -> None:
    tol = 1e-9
    K = case.ntk()
    J = Z.reference_jacobian(case)
    Kref = J @ J.T
    assert K.dim == J.shape[0] and K.num_params == J.shape[1]
    assert _rel(ex.jacobian(K, "vjp"), J) < tol
    assert _rel(ex.jacobian(K, "jvp"), J) < tol
    assert _rel(ex.kernel(K), Kref) < tol
    assert _rel(ex.exact_trace(K), torch.trace(Kref)) < tol
    assert _rel(ex.exact_frobenius_sq(K), Kref.square().sum()) < tol
    y = torch.randn(K.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert _rel(ex.exact_quadratic(K, y), y @ Kref @ y) < tol
    # a second parameter point: the cross term of the alignment
    p2 = _perturbed(case)
    K2 = _ntk_at(case, p2)
    J2 = Z.reference_jacobian(case, p2)
    K2ref = J2 @ J2.T
    assert _rel(ex.exact_inner(K, K2), (Kref * K2ref).sum()) < tol
    assert _rel(ex.eigenvalues(K)[: min(J.shape)], torch.linalg.eigvalsh(Kref).flip(0)[: min(J.shape)]) < tol

    # the public metrics with method="exact"
    tr, fro2 = torch.trace(Kref), Kref.square().sum()
    e = nk.trace(K, method="exact")
    assert e.exact and e.stderr is None and e.method == "exact" and _rel(e.value, tr) < tol
    assert _rel(nk.frobenius_norm(K, method="exact").value, fro2.sqrt()) < tol
    assert _rel(nk.frobenius_norm(K, method="exact", squared=True).value, fro2) < tol
    assert _rel(nk.effective_rank(K, method="exact").value, tr**2 / fro2) < tol
    cos = (Kref * K2ref).sum() / (fro2.sqrt() * K2ref.square().sum().sqrt())
    assert _rel(nk.alignment(K, K2, method="exact").value, cos) < tol
    assert (
        _rel(nk.target_alignment(K, y.reshape(K.state_shape), method="exact").value, (y @ Kref @ y) / (fro2.sqrt() * (y @ y)))
        < tol
    )


@pytest.mark.parametrize("case", F32, ids=ids)
def test_exact_float32_close_to_float64_jacrev(case: Z.Case) -> None:
    K = case.ntk()
    p64 = {n: p.detach().double() for n, p in case.params.items()}
    inputs64 = case.inputs.double()
    # the float32 model evaluated in float64 by the reference: the difference is float32 rounding
    J = Z.reference_jacobian(Z.FACTORIES[_key(case)](torch.float64), p64)
    assert inputs64.shape == case.inputs.shape
    assert _rel(ex.jacobian(K), J) < 1e-5
    assert _rel(ex.exact_trace(K), (J**2).sum()) < 1e-5


def _key(case: Z.Case) -> str:
    return case.name.rsplit("-", 1)[0]


@pytest.mark.parametrize("case", F64, ids=ids)
def test_jvp_vjp_adjoint(case: Z.Case) -> None:
    K = case.ntk()
    g = torch.Generator().manual_seed(3)
    U = torch.randn(K.num_params, 6, generator=g, dtype=torch.float64)
    V = torch.randn(K.dim, 6, generator=g, dtype=torch.float64)
    lhs = K.jvp(U).T @ V  # ⟨J u_i, v_j⟩
    rhs = U.T @ K.vjp(V)  # ⟨u_i, Jᵀ v_j⟩
    assert _rel(lhs, rhs) < 1e-10
    # vectors and blocks agree; matmat is J(Jᵀ·)
    assert _rel(K.jvp(U[:, 0]), K.jvp(U)[:, 0]) < 1e-14
    assert _rel(K.matmat(V), K.jvp(K.vjp(V))) < 1e-14


@pytest.mark.parametrize("case", ALL, ids=ids)
def test_every_fallback_path_agrees(case: Z.Case) -> None:
    """Forcing each loop / no-oneDNN / double-VJP path gives the numbers of the default path."""
    tol = 1e-12 if case.dtype == torch.float64 else 1e-5
    ref = case.ntk(jvp_path="vmap-forward-no-mkldnn", vjp_path="vmap-reverse")
    g = torch.Generator().manual_seed(4)
    U = torch.randn(ref.num_params, 3, generator=g, dtype=torch.float64)
    V = torch.randn(ref.dim, 3, generator=g, dtype=torch.float64)
    a, b = ref.jvp(U), ref.vjp(V)
    mkldnn_gap = case.name == "lstm-float32"  # oneDNN's LSTM has no forward-mode rule
    has_rules = bool(ref.rules)
    for p in _JVP_PATHS:
        if p.rules and not has_rules:  # a model without ruled submodules cannot be forced onto rules
            with pytest.raises(ValueError, match="no submodule of this model has a rule"):
                case.ntk(jvp_path=p.name)
            continue
        K = case.ntk(jvp_path=p.name, chunk_size=2)  # chunk 2 < 3 probes: the chunk loop runs too
        if mkldnn_gap and not (p.mkldnn_off or p.double_vjp or p.rules):  # the rules need no oneDNN
            with pytest.raises(RuntimeError, match="(?s)no JVP evaluation path works.*mkldnn"):
                K.jvp(U)
            continue
        assert _rel(K.jvp(U), a) < tol, p.name
        assert K.paths["jvp"] == p.name
    for p in _VJP_PATHS:
        if p.rules and not has_rules:
            continue
        K = case.ntk(vjp_path=p.name, chunk_size=2)
        assert _rel(K.vjp(V), b) < tol, p.name
        assert K.paths["vjp"] == p.name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lstm_forward_mode_path_is_reported(dtype: torch.dtype) -> None:
    case = Z.lstm(dtype)
    K = case.ntk()
    assert K.paths == {"jvp": None, "vjp": None}
    J = Z.reference_jacobian(Z.lstm(torch.float64)).to(dtype)
    U = torch.randn(K.num_params, 4, generator=torch.Generator().manual_seed(0), dtype=dtype)
    assert _rel(K.jvp(U), J @ U) < (1e-5 if dtype == torch.float32 else 1e-12)
    assert K.paths["jvp"] == "vmap-forward+rules"  # the LSTM rule needs no oneDNN kernel
    if dtype == torch.float32:  # without rules: oneDNN's LSTM cell lacks forward AD, the no-oneDNN path takes over
        K2 = case.ntk(rules=False)
        assert _rel(K2.jvp(U), J @ U) < 1e-5
        assert K2.paths["jvp"] == "vmap-forward-no-mkldnn"
    assert K.modes() == {"jvp": True, "vjp": True}
    est = nk.trace(K, method="jvp", num_probes=8, seed=0)
    assert est.info["paths"]["jvp"] == K.paths["jvp"]


def test_double_vjp_gives_forward_mode_without_forward_ad() -> None:
    """A function whose op has no forward-mode rule still gets J·u (by the VJP of a VJP)."""

    class NoForward(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x):  # type: ignore[no-untyped-def]
            return x.sin()

        @staticmethod
        def setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def]
            (x,) = ctx.saved_tensors
            return g * x.cos()

    W = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    X = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def fn(p, x):  # type: ignore[no-untyped-def]
        return NoForward.apply(x @ p["W"].T)

    K = nk.NTK.from_function(fn, {"W": W}, X)
    J = torch.func.jacrev(lambda w: (X @ w.T).sin().reshape(-1))(W).reshape(15, -1)
    U = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert _rel(K.jvp(U), J @ U) < 1e-12
    assert "double-vjp" in (K.paths["jvp"] or "")


def test_train_mode_batchnorm_couples_the_batch() -> None:
    """Train-mode BN uses batch statistics: its kernel differs from eval mode's and is not block-diagonal."""
    ktr = ex.kernel(Z.cnn_bn(torch.float64, train=True).ntk())
    kev = ex.kernel(Z.cnn_bn(torch.float64, train=False).ntk())
    assert _rel(ktr, kev) > 1e-2
    J = Z.reference_jacobian(Z.cnn_bn(torch.float64, train=True))
    assert _rel(ktr, J @ J.T) < 1e-10
