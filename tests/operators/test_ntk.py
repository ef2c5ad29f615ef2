"""Generic operators, reproducibility, safety (the model is never changed), clear errors, and
honest pass accounting."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from torch import nn
from torch.func import functional_call, jacrev

import model_zoo as Z
import ntkscope as nk
from ntkscope.estimators import exact as ex

TWO_SIDED = ["exact", "hutchinson", "hutchpp", "xtrace", "auto"]
ALL_METHODS = ["exact", "hutchinson", "hutchpp", "xtrace", "vjp", "jvp", "vjp_proj", "jvp_proj", "auto"]
RATIO_METHODS = ["exact", "hutchinson", "hutchpp", "xtrace", "vjp", "jvp", "auto"]


def _estimate_key(e: nk.Estimate) -> tuple[Any, ...]:
    info = {k: v for k, v in e.info.items() if k not in ("reason",)}
    return (e.value, e.stderr, e.jvp_passes, e.vjp_passes, e.num_probes, e.method, e.quantity, e.exact, repr(info))


# -- generic operators -----------------------------------------------------------------------


def _generic_kernels() -> tuple[torch.Tensor, list[Any]]:
    g = torch.Generator().manual_seed(0)
    B = torch.randn(30, 12, generator=g, dtype=torch.float64)
    K = B @ B.T
    Kn = K.numpy()
    return K, [
        K,
        nk.DenseOperator(K),
        sla.aslinearoperator(Kn),
        sla.LinearOperator((30, 30), matvec=lambda v: Kn @ v, matmat=lambda V: Kn @ V, dtype=np.float64),
        nk.CallableOperator(lambda V: K @ V, 30),
        nk.as_operator(lambda V: K @ V, dim=30),
    ]


@pytest.mark.parametrize("method", TWO_SIDED)
def test_generic_operators_agree(method: str) -> None:
    K, ops = _generic_kernels()
    y = torch.arange(30, dtype=torch.float64) - 10
    K2 = K + torch.eye(30, dtype=torch.float64)

    def run(op: Any) -> list[float]:
        return [
            nk.trace(op, method=method, num_probes=12, seed=1).value,
            nk.frobenius_norm(op, method=method, num_probes=12, seed=1).value,
            nk.effective_rank(op, method=method, num_probes=12, seed=1).value,
            nk.alignment(op, K2, method=method, num_probes=12, seed=1).value,
            nk.target_alignment(op, y, method=method, num_probes=12, seed=1).value,
        ]

    ref = run(ops[0])
    for op in ops[1:]:
        assert np.allclose(run(op), ref, rtol=1e-12, atol=0), type(op).__name__
    exact = [float(torch.trace(K)), float(K.norm())]
    assert np.allclose(ref[:2], exact, rtol=0.5)  # sanity: the right magnitude
    if method == "exact":
        assert np.allclose(ref[:2], exact, rtol=1e-12)


@pytest.mark.parametrize("method", ["vjp", "jvp", "vjp_proj", "jvp_proj"])
def test_generic_operators_refuse_one_sided(method: str) -> None:
    K, ops = _generic_kernels()
    for op in ops:
        with pytest.raises(ValueError, match="one-sided and needs the factor J"):
            nk.trace(op, method=method, num_probes=8, seed=0)


def test_bare_callable_needs_its_dimension() -> None:
    with pytest.raises(ValueError, match="needs its dimension"):
        nk.trace(lambda V: V, method="hutchinson", num_probes=4, seed=0)


# -- reproducibility -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL_METHODS)
def test_same_seed_same_estimate_and_chunk_invariance(method: str) -> None:
    case = Z.gru_loop(torch.float64)
    if method == "auto":  # auto picks by dimensions and paths, never by time: the seed fixes the value
        e = nk.trace(case.ntk(), method=method, num_probes=20, seed=5)
        # (auto's timing and pilot passes count inside its 20-pass budget, so it runs fewer probes)
        again = nk.trace(case.ntk(), method=e.method, num_probes=e.num_probes, seed=5)
        assert e.passes <= 20 and math.isclose(e.value, again.value, rel_tol=1e-12)
        return
    m = 20 if method == "exact" else Z.sampled_budget(case.ntk(), method, 20)
    a = nk.trace(case.ntk(), method=method, num_probes=m, seed=5)
    b = nk.trace(case.ntk(), method=method, num_probes=m, seed=5)
    assert _estimate_key(a) == _estimate_key(b)
    for chunk in (1, 3, 7):
        c = nk.trace(case.ntk(chunk_size=chunk), method=method, num_probes=m, seed=5)
        d = nk.trace(case.ntk(), method=method, num_probes=m, seed=5, chunk_size=chunk)
        for e in (c, d):
            assert math.isclose(e.value, a.value, rel_tol=1e-12), (chunk, e.value, a.value)
            assert (e.jvp_passes, e.vjp_passes) == (a.jvp_passes, a.vjp_passes)
    if method != "exact":
        assert not a.exact and nk.trace(case.ntk(), method=method, num_probes=m, seed=6).value != a.value


@pytest.mark.parametrize("metric", ["frobenius_norm", "effective_rank", "alignment", "target_alignment"])
def test_ratios_reproducible_and_chunk_invariant(metric: str) -> None:
    case = Z.gru(torch.float64)  # D = 32: XTrace's alignment (4+ probes, 4 passes each) still samples
    y = torch.ones(case.ntk().state_shape, dtype=torch.float64)

    def run(method: str, **kw: Any) -> nk.Estimate:
        K = case.ntk()
        m = Z.sampled_budget(K, method, 12, metric)
        if metric == "alignment":
            return nk.alignment(K, case.ntk(), method=method, num_probes=m, **kw)
        if metric == "target_alignment":
            return nk.target_alignment(K, y, method=method, num_probes=m, **kw)
        return getattr(nk, metric)(K, method=method, num_probes=m, **kw)  # type: ignore[no-any-return]

    for method in ["hutchinson", "hutchpp", "xtrace", "vjp", "jvp"]:
        a = run(method, seed=3)
        assert not a.exact, method
        assert _estimate_key(run(method, seed=3)) == _estimate_key(a)
        assert math.isclose(run(method, seed=3, chunk_size=2).value, a.value, rel_tol=1e-12)


def test_torch_generator_seed() -> None:
    K = Z.rnn(torch.float64).ntk()
    a = nk.trace(K, method="hutchinson", num_probes=8, seed=torch.Generator().manual_seed(3))
    b = nk.trace(K, method="hutchinson", num_probes=8, seed=torch.Generator().manual_seed(3))
    assert a.value == b.value
    g = torch.Generator().manual_seed(3)
    c, d = (nk.trace(K, method="hutchinson", num_probes=8, seed=g) for _ in range(2))
    assert c.value == a.value and d.value != c.value  # the generator advances
    with pytest.raises(TypeError, match="seed must be"):
        nk.trace(K, method="hutchinson", num_probes=8, seed=1.5)  # type: ignore[arg-type]


# -- safety ----------------------------------------------------------------------------------


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "ids": {n: id(p) for n, p in model.named_parameters()},
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["requires_grad"] == b["requires_grad"] and a["training"] == b["training"] and a["ids"] == b["ids"]
    for key in ("params", "buffers", "grads"):
        assert a[key].keys() == b[key].keys(), key
        for n in a[key]:
            x, y = a[key][n], b[key][n]
            assert (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y)), (key, n)


@pytest.mark.parametrize(
    "case", [f(torch.float64) for f in Z.FACTORIES.values()] + [Z.cnn_bn(torch.float32, train=True)], ids=repr
)
def test_analysis_leaves_the_model_unchanged(case: Z.Case) -> None:
    model = case.model
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 0.5)  # one .grad set, the others None
    if len(params) > 2 and case.fn is None:
        params[-1].requires_grad_(False)  # a frozen parameter stays frozen (and is excluded)
    before = _snapshot(model)
    inputs_before = case.inputs.clone()
    K = case.ntk()
    if len(params) > 2 and case.fn is None:
        assert K.num_params == sum(p.numel() for p in params[:-1])
    y = torch.randn(K.dim, generator=torch.Generator().manual_seed(0), dtype=K.dtype)
    for method in ALL_METHODS:
        nk.trace(K, method=method, num_probes=8, seed=0)
    for method in RATIO_METHODS:
        nk.frobenius_norm(K, method=method, num_probes=8, seed=0)
        nk.effective_rank(K, method=method, num_probes=8, seed=0)
        nk.alignment(K, case.ntk(), method=method, num_probes=8, seed=0)
        nk.target_alignment(K, y, method=method, num_probes=8, seed=0)
    U = torch.randn(K.num_params, 3, dtype=K.dtype)
    V = torch.randn(K.dim, 1, dtype=K.dtype)
    U0, V0, y0 = U.clone(), V.clone(), y.clone()
    K.jvp(U), K.vjp(V), K.vjp(V[:, 0]), K.matmat(V), K.jvp(U[:, 0])
    assert torch.equal(U, U0) and torch.equal(V, V0) and torch.equal(y, y0)  # probes are never modified
    _same(before, _snapshot(model))
    assert torch.equal(case.inputs, inputs_before)


# -- errors ----------------------------------------------------------------------------------


def test_clear_errors() -> None:
    case = Z.mlp(torch.float64)
    model, X, _ = case
    K = case.ntk()
    with pytest.raises(ValueError, match=r"failed on the given inputs \(input shapes \(5, 7\)\)"):
        nk.NTK(model, torch.randn(5, 7, dtype=torch.float64))
    frozen = Z.mlp(torch.float64).model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        nk.NTK(frozen, X)
    with pytest.raises(ValueError, match="no trainable parameters"):
        nk.NTK.from_function(lambda p, x: x, {}, X)
    with pytest.raises(ValueError, match="non-finite outputs"):
        nk.NTK(model, X, output=lambda z: z / 0.0 * torch.where(z > 0, 1.0, 1.0))
    with pytest.raises(ValueError, match="inputs contain non-finite values"):
        nk.NTK(model, torch.full_like(X, float("nan")))
    for bad in (0, -3):
        with pytest.raises(ValueError, match="num_probes must be >= 1"):
            nk.trace(K, method="hutchinson", num_probes=bad)
    with pytest.raises(TypeError, match="num_probes must be an int"):
        nk.trace(K, method="hutchinson", num_probes=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown method 'fast'; choose one of"):
        nk.trace(K, method="fast")
    with pytest.raises(ValueError, match="unknown probe distribution 'uniform'"):
        nk.trace(K, method="hutchinson", num_probes=4, probes="uniform")
    with pytest.raises(ValueError, match="same inputs: the two NTKs were built on different inputs"):
        nk.alignment(K, nk.NTK(model, X + 1), method="exact")
    with pytest.raises(ValueError, match="state dimensions differ"):
        nk.alignment(K, nk.NTK(model, X[:3]), method="exact")
    with pytest.raises(ValueError, match=r"targets of shape \(4,\) do not match the state of shape \(5, 3\)"):
        nk.target_alignment(K, torch.ones(4, dtype=torch.float64), method="exact")
    with pytest.raises(ValueError, match="targets are all zero"):
        nk.target_alignment(K, torch.zeros(5, 3, dtype=torch.float64), method="exact")
    with pytest.raises(ValueError, match="need num_probes >= 2"):
        nk.frobenius_norm(K, method="vjp", num_probes=1, seed=0)
    with pytest.raises(ValueError, match="not the state|output="):
        nk.NTK(Z.gru(torch.float64).model, Z.gru(torch.float64).inputs)  # returns a tuple: needs output=


def test_zero_kernel_in_ratios() -> None:
    zero = nk.NTK.from_jacobian(torch.zeros(60, 40, dtype=torch.float64))  # 4 probes stay below every exact cost
    for method in ["exact", "hutchinson", "hutchpp", "xtrace", "vjp", "jvp"]:
        with pytest.raises(ValueError, match="is zero: the kernel vanishes"):
            nk.effective_rank(zero, method=method, num_probes=4, seed=0)
        with pytest.raises(ValueError, match="is zero: the kernel vanishes"):
            nk.alignment(zero, zero, method=method, num_probes=4, seed=0)
        with pytest.raises(ValueError, match="is zero: the kernel vanishes"):
            nk.target_alignment(zero, torch.ones(60, dtype=torch.float64), method=method, num_probes=4, seed=0)
    assert nk.trace(zero, method="hutchinson", num_probes=4, seed=0).value == 0.0


def test_active_dropout_is_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    X = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"Dropout, p=0.5\) is random in training mode.*model.eval\(\)"):
        nk.NTK(model, X)
    e = nk.trace(nk.NTK(model.eval(), X), method="exact")  # eval mode: fine
    assert e.value > 0 and not model.training

    def fn(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:  # functional dropout inside vmap
        return nn.functional.dropout(x @ p["W"], 0.5, training=True)

    W = torch.randn(3, 2, dtype=torch.float64)
    state = torch.random.get_rng_state()
    with pytest.raises(ValueError, match="is random or stateful: two forward passes on the same inputs differ"):
        nk.NTK.from_function(fn, {"W": W}, X)
    assert torch.equal(torch.random.get_rng_state(), state)  # the user's random stream did not move


def test_mixed_or_bad_parameters() -> None:
    case = Z.mlp(torch.float64)
    with pytest.raises(ValueError, match="unknown parameter names"):
        nk.NTK(case.model, case.inputs, params={"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="expected a tensor of shape"):
        nk.NTK(case.model, case.inputs, params={"0.weight": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        nk.NTK(case.model, case.inputs, chunk_size=0)
    with pytest.raises(ValueError, match="unknown path"):
        nk.NTK(case.model, case.inputs, jvp_path="warp-drive")


# -- pass accounting -------------------------------------------------------------------------


class _Counting:
    """Counts the columns that really reach ``_jvp``/``_vjp`` of an operator."""

    def __init__(self, op: Any) -> None:
        self.jvp = self.vjp = 0
        orig_j, orig_v = op._jvp, op._vjp

        def j(U: torch.Tensor) -> torch.Tensor:
            self.jvp += U.shape[1]
            return orig_j(U)

        def v(V: torch.Tensor) -> torch.Tensor:
            self.vjp += V.shape[1]
            return orig_v(V)

        def counted(orig: Callable[[str, torch.Tensor], torch.Tensor]) -> Callable[[str, torch.Tensor], torch.Tensor]:
            def call(side: str, X: torch.Tensor) -> torch.Tensor:  # a fast path may answer without _jvp/_vjp
                before = (self.jvp, self.vjp)
                out = orig(side, X)
                if (self.jvp, self.vjp) == before:
                    cols = X.shape[1] if X.dim() == 2 else 1
                    if side == "vjp":
                        self.vjp += cols
                    else:
                        self.jvp += cols
                return out

            return call

        op._jvp, op._vjp = j, v
        op.sqnorms, op.gram_rows = counted(op.sqnorms), counted(op.gram_rows)


@pytest.mark.parametrize("fast", [False, None])
def test_pass_accounting(fast: bool | None) -> None:
    case = Z.gru(torch.float64)  # D = 32, P = 108; fast=None uses the fast GRU path

    def fresh() -> tuple[nk.NTK, _Counting]:
        K = case.ntk(fast=fast)
        if fast is None:  # the fast path's one-off self-check runs un-counted before the counting starts
            K.jvp(torch.zeros(K.num_params, 1, dtype=K.dtype)), K.vjp(torch.zeros(K.dim, 1, dtype=K.dtype))
        return K, _Counting(K)

    m = 12
    expected = {  # (jvp, vjp) for the trace with m probes
        "exact": (0, 32),  # D ≤ P: the D state basis vectors through Jᵀ
        "hutchinson": (m, m),
        "hutchpp": (m, m),
        "xtrace": (m, m),
        "vjp": (0, m),
        "jvp": (m, 0),
        "vjp_proj": (0, m),
        "jvp_proj": (m, 0),
    }
    for method, (nj, nv) in expected.items():
        K, c = fresh()
        e = nk.trace(K, method=method, num_probes=m, seed=0)
        assert (e.jvp_passes, e.vjp_passes) == (c.jvp, c.vjp) == (nj, nv), method
        assert e.num_probes == (0 if method == "exact" else m)
    y = torch.ones(K.dim, dtype=K.dtype)
    for method in RATIO_METHODS:
        for name, call in {
            "frobenius_norm": lambda K: nk.frobenius_norm(K, method=method, num_probes=m, seed=0),
            "effective_rank": lambda K: nk.effective_rank(K, method=method, num_probes=m, seed=0),
            "target_alignment": lambda K: nk.target_alignment(K, y, method=method, num_probes=m, seed=0),
        }.items():
            K, c = fresh()
            e = call(K)
            assert (e.jvp_passes, e.vjp_passes) == (c.jvp, c.vjp), (name, method)
            assert e.passes > 0
        K, c = fresh()
        K2, c2 = fresh()
        e = nk.alignment(K, K2, method=method, num_probes=m, seed=0)
        assert (e.jvp_passes, e.vjp_passes) == (c.jvp + c2.jvp, c.vjp + c2.vjp), ("alignment", method)
    # one-sided ratios use one mode only
    K, c = fresh()
    e = nk.effective_rank(K, method="jvp", num_probes=m, seed=0)
    assert (e.jvp_passes, e.vjp_passes) == (m, 0)
    K, c = fresh()
    e = nk.frobenius_norm(K, method="vjp", num_probes=m, seed=0)
    assert (e.jvp_passes, e.vjp_passes) == (0, m)


def test_exact_side_needs_no_pilot_passes() -> None:
    """The exact path uses min(D, P) passes of the smaller side and nothing else."""
    case = Z.cnn_bn(torch.float64)  # D = 12 < P = 210
    K = case.ntk()
    e = nk.trace(K, method="exact")
    assert (e.jvp_passes, e.vjp_passes) == (0, 12)
    K = nk.NTK.from_jacobian(ex.jacobian(Z.mlp(torch.float64).ntk()).T.contiguous())  # D = 51 > P = 15
    e = nk.trace(K, method="exact")
    assert (e.jvp_passes, e.vjp_passes) == (15, 0)


def test_one_sample_has_unknown_stderr() -> None:
    """A single random sample carries no spread: its standard error is inf, never 0."""
    K = nk.NTK.from_jacobian(torch.randn(10, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    for method in ["hutchinson", "vjp", "jvp", "hutchpp"]:
        assert nk.trace(K, method=method, num_probes=1, seed=0).stderr == math.inf
    assert nk.trace(K, method="hutchpp", num_probes=3, seed=0).stderr == math.inf  # 1 residual probe
    assert math.isfinite(nk.trace(K, method="hutchinson", num_probes=2, seed=0).stderr)  # type: ignore[arg-type]


def test_automatic_cpu_chunk_keeps_convolution_unfolds_reusable() -> None:
    """A convolution with per-probe weights unfolds its input once per probe (C_in·∏k numbers per
    output position): the automatic CPU chunk keeps those blocks under the allocator's reuse size."""
    from ntkscope.core.memory import reusable_block_bytes
    from ntkscope.operators.modules import saved_activations

    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 5, groups=4), nn.Flatten())
    K = nk.NTK(model, x)
    unfold = saved_activations(K._f, K.primals).largest_unfold
    # the larger of the two: 8·16·16 positions × 3·9 columns, 8·12·12 positions × 16·25 columns
    assert unfold == max(8 * 16 * 16 * 3 * 9, 8 * 12 * 12 * 16 * 25)
    assert K.chunk_size * unfold * 4 <= reusable_block_bytes() < 2 * K.chunk_size * unfold * 4
    dense = nk.NTK(nn.Sequential(nn.Flatten(), nn.Linear(768, 4)), x)
    assert saved_activations(dense._f, dense.primals).largest_unfold == 0


def test_a_forward_that_writes_its_parameters_analyses_a_copy() -> None:
    """``nn.Embedding(max_norm=)`` renormalises looked-up rows in place on every forward: the
    analysis must not write through its detached views into the model, and the NTK is that of
    the function as it runs (checked on a copy)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 3, max_norm=1.0), nn.Flatten(), nn.Linear(12, 2)).double()
    x = torch.tensor([[0, 1, 2, 0], [3, 0, 6, 5]])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert float(before["0.weight"].norm(dim=1).min()) > 1.0  # every row would be renormalised
    K = nk.NTK(model, x)
    exact = nk.trace(K, method="exact").value
    sampled = {m: [nk.trace(K, method=m, num_probes=3, seed=s).value for s in range(100)] for m in ("vjp", "jvp")}
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    ref = copy.deepcopy(model)
    params = {n: p.detach().clone() for n, p in ref.named_parameters()}
    J = jacrev(lambda p: functional_call(ref, p, (x,)).reshape(-1))(params)
    assert exact == pytest.approx(sum(float(t.square().sum()) for t in J.values()), rel=1e-12)
    for method, values in sampled.items():  # unbiased: the mean of 100 seeds within 4 standard errors
        v = torch.tensor(values, dtype=torch.float64)
        assert abs(float(v.mean()) - exact) < 4 * float(v.std()) / 10, method


def test_errors_name_the_real_problem() -> None:
    """Errors about output=, the state's dtype and jit modules say what is wrong (they were
    blamed on "the given inputs", or said "got Tensor"); a tied parameter's second name is its
    first."""
    x = torch.randn(5, 4, dtype=torch.float64)

    class Dct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> Any:
            return {"logits": self.a(x)}

    class Tup(Dct):
        def forward(self, x: torch.Tensor) -> Any:
            return self.a(x), self.a(x).argmax(-1)

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.out = nn.Embedding(7, 4), nn.Linear(4, 7, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.out(self.emb(t))

    with pytest.raises(ValueError, match=r"^output=0 indexes a tuple or list, but the model returned a mapping with keys \['logits'\]"):
        nk.NTK(Dct().double(), x, output=0)
    with pytest.raises(TypeError, match="floating-point tensor, got a tensor of dtype torch.int64"):
        nk.NTK(Tup().double(), x, output=1)
    with pytest.raises(TypeError, match="torch.jit module.*pass the original nn.Module"):
        nk.NTK(torch.jit.script(nn.Sequential(nn.Linear(4, 3)).double()), x)
    t, tied = torch.tensor([[1, 2]]), Tied().double()
    by_alias = nk.NTK(tied, t, params=["out.weight"])
    assert by_alias.param_names == ["emb.weight"]
    assert nk.trace(by_alias, method="exact").value == pytest.approx(nk.trace(nk.NTK(tied, t), method="exact").value, rel=1e-12)


class _NoGradFeatures(nn.Module):
    """A frozen feature extractor written with ``torch.no_grad()``: backpropagation (and so J)
    never sees ``a``, while forward-mode AD ignores ``no_grad``."""

    def __init__(self, rnn: bool = False) -> None:
        super().__init__()
        self.a = nn.GRU(4, 5, batch_first=True) if rnn else nn.Linear(4, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = self.a(x)[0] if isinstance(self.a, nn.GRU) else torch.tanh(self.a(x))
        return self.b(h)


@pytest.mark.parametrize("rnn", [False, True], ids=["linear", "gru-rule"])
def test_forward_mode_follows_backpropagation_through_no_grad(rnn: bool) -> None:
    torch.manual_seed(0)
    model = _NoGradFeatures(rnn).double()
    x = torch.randn(7, 2, 4, dtype=torch.float64) if rnn else torch.randn(7, 4, dtype=torch.float64)
    params = {n: p.detach() for n, p in model.named_parameters()}
    J = jacrev(lambda p: functional_call(model, p, (x,)).reshape(-1))(params)
    ref = sum(float(j.square().sum()) for j in J.values())  # only b's parameters move the output
    K = nk.NTK(model, x)
    P = K.num_params
    assert nk.trace(K, method="jvp", num_probes=P, seed=0).value == pytest.approx(ref, rel=1e-10)  # the JVP side's exact value
    assert K.paths["jvp"] == "vmap-double-vjp"
    for method in ("exact", "hutchinson"):
        e = nk.trace(K, method=method, num_probes=24, seed=0)
        assert abs(e.value - ref) <= max(1e-10 * ref, 5 * (e.stderr or 0))
    # a model whose forward mode is consistent keeps its forward-mode path
    plain = nk.NTK(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double(), torch.randn(7, 4, dtype=torch.float64))
    nk.trace(plain, method="jvp", num_probes=4, seed=0)
    assert plain.paths["jvp"] == "vmap-forward"


def test_a_forward_that_writes_into_its_input_is_refused_before_it_changes_the_tensor() -> None:
    class Doubles(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x.mul_(2.0)  # was reported as "random or stateful", after doubling the user's tensor
            return self.lin(x)

    x = torch.randn(6, 4, dtype=torch.float64)
    before = x.clone()
    for model in (Doubles().double(), nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 3)).double()):
        with pytest.raises(ValueError, match=r"writes into its input tensor 0 in place.*x = x.clone\(\)"):
            nk.NTK(model, x)
        assert torch.equal(x, before)


def test_building_kernels_leaks_no_tensors() -> None:
    """Measuring a forward's activations kept each saved tensor tied to its own grad_fn, a cycle
    the garbage collector cannot see: 4 tensors per NTK, so a Monitor's memory grew every record."""
    import gc

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)), torch.randn(8, 5)

    def live() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is torch.Tensor or type(o) is nn.Parameter)

    nk.trace(nk.NTK(model, x), method="vjp", num_probes=4, seed=0)
    before = live()
    for s in range(10):
        nk.trace(nk.NTK(model, x), method="vjp", num_probes=4, seed=s)
    assert live() - before <= 2


def test_a_failed_call_does_not_disable_the_kernel() -> None:
    """A forward that failed once (a live kernel kept through training) made every later call
    raise "VJP is unavailable", even once the cause was gone."""

    class Flaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.fail = nn.Linear(3, 2), False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.fail:
                raise RuntimeError("transient")
            return self.lin(x)

    torch.manual_seed(0)
    model = Flaky().double()
    K = nk.NTK(model, torch.randn(4, 3, dtype=torch.float64))
    model.fail = True
    for method in ("vjp", "jvp"):
        with pytest.raises(RuntimeError, match="transient"):
            nk.trace(K, method=method, num_probes=4, seed=0)
    model.fail = False
    exact = nk.trace(K, method="exact").value
    for method in ("vjp", "jvp"):
        assert nk.trace(K, method=method, num_probes=64, seed=0).value == pytest.approx(exact, rel=0.5)
    assert K.modes() == {"jvp": True, "vjp": True}


def test_data_parallel_wrappers_are_analysed_through_their_module() -> None:
    """DataParallel refuses the stateless API and DDP syncs buffers in place during forward: both
    failed with errors that named neither (a QA repro); their kernel is the wrapped module's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    dp = nn.DataParallel(model)
    ref = nk.trace(nk.NTK(model, x), method="exact").value
    assert nk.trace(nk.NTK(dp, x), method="exact").value == pytest.approx(ref, rel=1e-12)
    sub = nk.NTK(dp, x, params=["module.3.weight", "module.3.bias"])  # the wrapper's own names
    assert sub.param_names == ["3.weight", "3.bias"]


def test_spectral_norm_in_training_mode_is_refused_and_its_vectors_stay() -> None:
    """Accepted when its power iteration had nearly converged, it then moved the user's _u on every
    pass and gave a different exact trace per call (a QA repro)."""
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    spectral_norm(model[0])
    x = torch.randn(5, 4, dtype=torch.float64)
    u = model[0].parametrizations.weight[0]._u.clone()
    with pytest.raises(ValueError, match="spectral_norm in training mode"):
        nk.NTK(model, x)
    assert torch.equal(model[0].parametrizations.weight[0]._u, u)
    K = nk.NTK(model.eval(), x)
    assert nk.trace(K, method="exact").value == nk.trace(K, method="exact").value


def test_complex_parameters_are_refused_with_the_way_out() -> None:
    class Spectral(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, dtype=torch.complex128))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.fft.irfft(torch.fft.rfft(x) * self.w, n=x.shape[-1])

    with pytest.raises(TypeError, match=r"complex parameters \['w'\] are not supported.*view_as_complex"):  # was "mixed dtypes"
        nk.NTK(Spectral(), torch.randn(3, 8, dtype=torch.float64))
