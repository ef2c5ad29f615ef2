"""Hidden-trajectory NTKs of recurrent models against an independent, exact computation.

The reference re-implements each recurrence by hand (PyTorch's gate orders and bias placement)
and differentiates it with ``torch.func.jacrev``; the block statistics are then plain tensor
algebra on that dense Jacobian.  Everything runs in float64 at small sizes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import jacrev

import ntkscope as nk
from ntkscope.estimators import exact as ex
from ntkscope.metrics.structure import structure
from ntkscope.models.recurrent import RecurrentNTK, hidden_ntk, step_ntk

DT = torch.float64


# -- the independent reference -------------------------------------------------------------------


def _cell(kind: str, x: torch.Tensor, h: torch.Tensor | tuple[torch.Tensor, torch.Tensor], w: list[torch.Tensor | None]):
    Wih, Whh, bih, bhh = w
    gi = x @ Wih.T + (bih if bih is not None else 0)
    hh = h[0] if isinstance(h, tuple) else h
    gh = hh @ Whh.T + (bhh if bhh is not None else 0)
    if kind == "rnn":
        return torch.tanh(gi + gh)
    if kind == "gru":
        ir, iz, inn = gi.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(inn + r * hn)  # b_hn inside r ⊙ (W_hn h + b_hn), as PyTorch does
        return (1 - z) * n + z * hh
    assert isinstance(h, tuple)
    i, f, g, o = (gi + gh).chunk(4, -1)
    c = torch.sigmoid(f) * h[1] + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _weights(p: dict[str, torch.Tensor], layer: int, sfx: str) -> list[torch.Tensor | None]:
    return [p.get(f"{n}_l{layer}{sfx}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]


def _reference_stack(kind: str, num_layers: int, bidirectional: bool, batch_first: bool, layer, H: int):
    """A function ``params -> trajectory`` written from the equations, for jacrev."""

    def f(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        inp = x.transpose(0, 1) if batch_first else x  # (T, B, I)
        T, B = inp.shape[:2]
        outs = []
        for k in range(num_layers):
            dirs = []
            for sfx in ("", "_reverse") if bidirectional else ("",):
                w = _weights(p, k, sfx)
                z = inp.new_zeros(B, H)
                h: torch.Tensor | tuple[torch.Tensor, torch.Tensor] = (z, z) if kind == "lstm" else z
                steps = range(T - 1, -1, -1) if sfx else range(T)
                hs = [torch.empty(0)] * T
                for t in steps:
                    h = _cell(kind, inp[t], h, w)
                    hs[t] = h[0] if isinstance(h, tuple) else h
                dirs.append(torch.stack(hs))
            out = torch.stack(dirs, 2) if bidirectional else dirs[0]  # (T, B, [2,] H)
            outs.append(out.transpose(0, 1) if batch_first else out)
            inp = out.reshape(T, B, -1)
        if layer == "all":
            return torch.stack(outs)
        return outs[-1 if layer is None else layer]

    return f


def _dense_jacobian(
    f, params: dict[str, torch.Tensor], x: torch.Tensor, names: list[str]
) -> tuple[torch.Tensor, tuple[int, ...]]:
    jac = jacrev(f)(params, x)
    state_shape = f(params, x).shape
    D = state_shape.numel()
    return torch.cat([jac[n].reshape(D, -1) for n in names], 1), tuple(state_shape)


def _reference_blocks(J: torch.Tensor, shape: tuple[int, ...], time_axis: int):
    """Per-time-step traces, time-block Frobenius norms ‖K_st‖_F², full trace."""
    Jt = J.T.reshape(J.shape[1], *shape).movedim(1 + time_axis, 0)  # (T, P, ...)
    Jt = Jt.reshape(Jt.shape[0], J.shape[1], -1).transpose(1, 2)  # (T, R, P)
    tr_t = Jt.square().sum((1, 2))
    K = torch.einsum("srp,tqp->stqr", Jt, Jt)
    fro_st = K.square().sum((2, 3))
    return tr_t, fro_st, float(J.square().sum())


def _check_against_reference(K: RecurrentNTK, f, params, x, time_axis: int) -> None:
    J, shape = _dense_jacobian(f, params, x, K.param_names)
    assert shape == K.state_shape
    assert J.shape == (K.dim, K.num_params)
    tr_t, fro_st, tr = _reference_blocks(J, shape, time_axis)
    s = structure(K, "time", method="exact")
    torch.testing.assert_close(s.trace.values, tr_t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s.frobenius.values, fro_st, rtol=1e-10, atol=1e-12)
    assert s.total_trace.value == pytest.approx(tr, rel=1e-10)
    assert float(s.trace.values.sum()) == pytest.approx(tr, rel=1e-12)  # per-step traces sum to tr K
    assert ex.exact_trace(K) == pytest.approx(tr, rel=1e-10)  # through the operator's own passes


# -- nn.RNN / nn.GRU / nn.LSTM -------------------------------------------------------------------

CONFIGS = [
    ("rnn", 1, False, False, None),
    ("rnn", 2, True, True, "all"),
    ("rnn", 2, False, False, -1),
    ("gru", 1, False, False, None),
    ("gru", 2, False, True, 0),
    ("gru", 2, True, False, None),
    ("lstm", 1, False, True, None),
    ("lstm", 2, True, False, "all"),
    ("lstm", 3, False, False, 1),
]


@pytest.mark.parametrize("kind,L,bi,bf,layer", CONFIGS)
def test_module_hidden_ntk_matches_reference(kind, L, bi, bf, layer):
    torch.manual_seed(1)
    H = 3
    mod = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[kind](2, H, num_layers=L, bidirectional=bi, batch_first=bf).to(DT)
    x = torch.randn(2, 4, 2, dtype=DT) if bf else torch.randn(4, 2, 2, dtype=DT)
    K = hidden_ntk(mod, x, layer=layer)
    expected_axes = (["layer"] if layer == "all" else []) + (["batch", "time"] if bf else ["time", "batch"])
    expected_axes += (["direction"] if bi else []) + ["hidden"]
    assert K.axes == tuple(expected_axes)
    # only layers at or below the chosen one move its state
    top = L - 1 if layer in (None, "all") else layer % L
    assert all(int(n.split("_l")[1][0]) <= top for n in K.param_names)
    params = {n: p.detach() for n, p in mod.named_parameters()}
    f = _reference_stack(kind, L, bi, bf, layer, H)
    _check_against_reference(K, f, params, x, K.axes.index("time"))


@pytest.mark.parametrize("cell_kind", ["rnn", "gru", "lstm"])
def test_cell_loop_matches_reference(cell_kind):
    torch.manual_seed(2)
    cls = {"rnn": nn.RNNCell, "gru": nn.GRUCell, "lstm": nn.LSTMCell}[cell_kind]
    cell = cls(2, 3).to(DT)
    x = torch.randn(2, 5, 2, dtype=DT)  # batch-first
    K = hidden_ntk(cell, x, batch_first=True)
    assert K.axes == ("batch", "time", "hidden") and K.state_shape == (2, 5, 3)
    # a cell's parameters are the single-layer module's ones without the _l0 suffix
    params = {f"{n}_l0": p.detach() for n, p in cell.named_parameters()}
    f0 = _reference_stack(cell_kind, 1, False, True, None, 3)
    f = lambda p, xx: f0({f"{n}_l0": v for n, v in p.items()}, xx)
    _check_against_reference(K, f, {n[:-3]: v for n, v in params.items()}, x, 1)


def test_step_function_with_input_and_readout_layers():
    torch.manual_seed(3)
    H, I, E, O = 4, 3, 2, 2
    enc, ro = nn.Linear(I, E).to(DT), nn.Linear(H, O).to(DT)
    p = {"W": torch.randn(H, H, dtype=DT) / 2, "U": torch.randn(H, E, dtype=DT), "b": torch.randn(H, dtype=DT)}

    def step(q, h, u):
        return torch.tanh(h @ q["W"].T + u @ q["U"].T + q["b"])

    x = torch.randn(6, 2, I, dtype=DT)
    h0 = torch.randn(2, H, dtype=DT)
    for state in ("hidden", "output"):
        K = step_ntk(step, p, x, h0, encoder=enc, readout=ro, state=state)
        assert K.axes == ("time", "batch", "hidden")
        allp = {f"step.{n}": v for n, v in p.items()}
        allp.update({f"encoder.{n}": v.detach() for n, v in enc.named_parameters()})
        if state == "output":
            allp.update({f"readout.{n}": v.detach() for n, v in ro.named_parameters()})
        assert sorted(K.param_names) == sorted(allp)

        def f(q, xx, state=state):
            u = xx @ q["encoder.weight"].T + q["encoder.bias"]
            h, hs = h0, []
            for t in range(xx.shape[0]):
                h = torch.tanh(h @ q["step.W"].T + u[t] @ q["step.U"].T + q["step.b"])
                hs.append(h)
            traj = torch.stack(hs)
            return traj @ q["readout.weight"].T + q["readout.bias"] if state == "output" else traj

        _check_against_reference(K, f, allp, x, 0)


def test_step_function_tuple_carry_and_int_h0():
    torch.manual_seed(4)
    cell = nn.LSTMCell(2, 3).to(DT)
    p = {n: v.detach() for n, v in cell.named_parameters()}
    x = torch.randn(4, 2, 2, dtype=DT)

    def step(q, hc, xt):
        return torch.func.functional_call(cell, q, (xt, hc))

    z = torch.zeros(2, 3, dtype=DT)
    K1 = step_ntk(step, p, x, (z, z))
    K2 = hidden_ntk(cell, x)
    assert ex.exact_trace(K1) == pytest.approx(ex.exact_trace(K2), rel=1e-12)
    K3 = step_ntk(lambda q, h, xt: torch.tanh(h + xt.sum(-1, keepdim=True) * q["a"]), {"a": torch.ones(3, dtype=DT)}, x, 3)
    assert K3.state_shape == (4, 2, 3)


def test_submodule_capture_with_input_layer_and_no_h0():
    torch.manual_seed(5)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(3, 4)
            self.rnn = nn.GRU(4, 3, batch_first=True)
            self.out = nn.Linear(3, 2)

        def forward(self, x):
            h, _ = self.rnn(torch.tanh(self.enc(x)))  # no h0: the module would make its own
            return self.out(h[:, -1])

    net = Net().to(DT)
    x = torch.randn(2, 5, 3, dtype=DT)
    K = hidden_ntk(net, x, submodule="rnn")
    assert K.axes == ("batch", "time", "hidden") and K.state_shape == (2, 5, 3)
    assert not net.rnn._forward_hooks and not net.rnn._forward_pre_hooks
    gru_ref = _reference_stack("gru", 1, False, True, None, 3)

    def f(q, xx):
        u = torch.tanh(xx @ q["enc.weight"].T + q["enc.bias"])
        return gru_ref({k[4:]: v for k, v in q.items() if k.startswith("rnn.")}, u)

    params = {n: p.detach() for n, p in net.named_parameters()}
    _check_against_reference(K, f, params, x, 1)
    # the readout does not move the hidden states: its Jacobian columns are zero
    J = ex.jacobian(K, side="jvp")
    cols = torch.split(J, K.param_numels, 1)
    assert all(float(c.abs().max()) == 0 for n, c in zip(K.param_names, cols) if n.startswith("out."))
    assert not net.rnn._forward_hooks and not net.rnn._forward_pre_hooks


def test_lstm_float32_onednn_forward_mode_fallback():
    """float32 LSTM on CPU: forward mode needs oneDNN off; the operator must get there itself."""
    torch.manual_seed(6)
    lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 3)
    for layer in (None, 0):
        K = hidden_ntk(lstm, x, layer=layer)
        g = torch.Generator().manual_seed(0)
        u = torch.randn(K.num_params, 3, generator=g)
        w = torch.randn(K.dim, 3, generator=g)
        Ju, Jtw = K.jvp(u), K.vjp(w)
        # adjoint identity ⟨Ju, w⟩ = ⟨u, Jᵀw⟩
        torch.testing.assert_close((Ju * w).sum(0), (u * Jtw).sum(0), rtol=1e-4, atol=1e-4)
        assert K.paths["jvp"] is not None and K.paths["vjp"] is not None
        # the LSTM rule needs no oneDNN kernel; without rules the operator finds the no-oneDNN path
        assert K.paths["jvp"] == "vmap-forward+rules"
        if torch.backends.mkldnn.is_available() and layer is None:
            K2 = hidden_ntk(lstm, x, layer=layer)
            K2._evaluator.rules_ok["jvp"] = False  # as if the rules had failed their check
            torch.testing.assert_close(K2.jvp(u), Ju, rtol=1e-4, atol=1e-4)
            assert "no-mkldnn" in K2.paths["jvp"] or "double-vjp" in K2.paths["jvp"]
        # the exact trace agrees through either side
        assert ex.exact_trace(K) == pytest.approx(float(ex.jacobian(K, side="vjp").double().square().sum()), rel=1e-4)


def test_estimators_agree_with_exact_on_gru_blocks():
    torch.manual_seed(7)
    gru = nn.GRU(2, 3, num_layers=2).to(DT)
    x = torch.randn(4, 3, 2, dtype=DT)
    K = hidden_ntk(gru, x, layer="all")
    ref = structure(K, "time", method="exact")
    for method, m in (("jvp", 300), ("vjp", 150)):
        s = structure(K, "time", method=method, num_probes=m, seed=11)
        for q in ("trace", "frobenius", "cross_trace"):
            a, b = getattr(s, q), getattr(ref, q)
            z = ((a.values - b.values) / a.stderr).abs().max()
            assert z < 4.5, (method, q, float(z))
        assert s.trace.jvp_passes == (m if method == "jvp" else 0)
        assert s.trace.vjp_passes == (0 if method == "jvp" else m * 4)
        zt = abs(s.total_effective_rank.value - ref.total_effective_rank.value) / s.total_effective_rank.stderr
        assert zt < 4.5


def test_analysis_leaves_model_and_rng_unchanged():
    torch.manual_seed(8)
    lstm = nn.LSTM(2, 3, num_layers=2, bidirectional=True).to(DT)
    lstm.train()
    before = copy.deepcopy(lstm.state_dict())
    flags = [p.requires_grad for p in lstm.parameters()]
    rng = torch.get_rng_state()
    x = torch.randn(4, 2, 2, dtype=DT)
    x0 = x.clone()
    rng = torch.get_rng_state()
    for layer in (None, 0, "all"):
        K = hidden_ntk(lstm, x, layer=layer)
        structure(K, "time", method="jvp", num_probes=5, seed=0)
        structure(K, "batch", method="vjp", num_probes=4, seed=0)
        nk.trace(K, method="vjp", num_probes=4, seed=0)
    assert torch.equal(torch.get_rng_state(), rng)
    after = lstm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in lstm.parameters()] == flags
    assert all(p.grad is None for p in lstm.parameters())
    assert lstm.training and torch.equal(x, x0)


def test_bad_inputs_raise_clear_errors():
    gru = nn.GRU(2, 3, num_layers=2).to(DT)
    x = torch.randn(4, 2, 2, dtype=DT)
    with pytest.raises(ValueError, match="layer"):
        hidden_ntk(gru, x, layer=5)
    with pytest.raises(ValueError, match="3-D"):
        hidden_ntk(gru, x[0])
    with pytest.raises(TypeError, match="not a recurrent module"):
        hidden_ntk(nn.Linear(2, 2), x)
    with pytest.raises(ValueError, match="no submodule"):
        hidden_ntk(nn.Sequential(gru), x, submodule="nope")
    with pytest.raises(ValueError, match="readout"):
        step_ntk(lambda q, h, u: h, {"a": torch.ones(1, dtype=DT)}, x, 3, state="output")
    drop = nn.GRU(2, 3, num_layers=2, dropout=0.5).to(DT).train()
    with pytest.raises(ValueError, match="dropout"):
        hidden_ntk(drop, x, layer=0)


def test_builtin_sequence_tasks_through_submodule():
    from ntkscope.tasks import RecurrentClassifier, RecurrentRegressor, flipflop, mnist1d_sequences

    X, y, _, _ = mnist1d_sequences(100, dtype=DT)
    assert X.shape[1:] == (40, 1) and int(y.max()) <= 9
    clf = RecurrentClassifier("gru", 1, 4, 10).to(DT)
    K1 = hidden_ntk(clf, X[:3, :8], submodule="rnn")
    K2 = hidden_ntk(clf.rnn, X[:3, :8])
    assert K1.axes == K2.axes == ("batch", "time", "hidden")
    # the readout does not move the trajectory, so both kernels are the same
    assert ex.exact_trace(K1) == pytest.approx(ex.exact_trace(K2), rel=1e-12)
    u, _ = flipflop(2, 6, dtype=DT)
    reg = RecurrentRegressor("lstm", 3, 4, 3, num_layers=2).to(DT)
    K3 = hidden_ntk(reg.rnn, u, layer="all")
    assert K3.state_shape == (2, 2, 6, 4) and K3.axes == ("layer", "batch", "time", "hidden")
    s = structure(K3, ("layer", "time"), method="exact")
    assert s.trace.values.shape == (2, 6)


def test_submodule_hidden_ntk_unbatched_dict_inputs_and_h0() -> None:
    """``hidden_ntk(model, x, submodule=)``: an unbatched sequence (T, features) is a batch of
    one (the injected zero state is 2-D, as nn.GRU expects); a dict of inputs is keyword
    arguments, as for NTK; an ``h0`` the model would override is refused, not ignored."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.out = nn.GRU(3, 4), nn.Linear(4, 1)

        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return self.out(self.rnn(x * scale)[0])

    torch.manual_seed(0)
    net = Net().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    one = nk.trace(nk.hidden_ntk(net, x, submodule="rnn"), method="exact").value
    batched = nk.trace(nk.hidden_ntk(net, x[:, None], submodule="rnn"), method="exact").value
    assert one == pytest.approx(batched, rel=1e-12)
    kw = nk.trace(nk.hidden_ntk(net, {"x": x[:, None], "scale": 2.0}, submodule="rnn"), method="exact").value
    assert kw == pytest.approx(nk.trace(nk.hidden_ntk(net, x[:, None] * 2.0, submodule="rnn"), method="exact").value, rel=1e-12)
    assert kw != pytest.approx(batched)

    class OwnState(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.h = nn.GRU(3, 4), nn.Parameter(torch.zeros(1, 1, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(x, self.h)[0]

    with pytest.raises(ValueError, match="passes its own initial state"):
        nk.hidden_ntk(OwnState().double(), x[:, None], submodule="rnn", h0=torch.ones(1, 1, 4, dtype=torch.float64))
