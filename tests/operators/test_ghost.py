"""Ghost norms (ntkscope.operators.ghost): the VJP side's squared norms ``‖Jᵀv‖²`` with linear
layers' weight-gradient norms as ``⟨Δ, (XXᵀ + 11ᵀ)Δ⟩`` equal the generic torch.func path to 1e-10
in float64, and are used only where that is exact (shared, tied or otherwise read parameters,
parameter subsets and attention projections fall back)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ntkscope as nk
from model_zoo import Twice

DT = torch.float64


def _rel_sqnorms(model: nn.Module, inputs, m: int = 6, **kw) -> tuple[float, nk.NTK]:  # type: ignore[no-untyped-def]
    K, Kg = nk.NTK(model, inputs, **kw), nk.NTK(model, inputs, rules=False, **kw)
    V = torch.randn(K.dim, m, generator=torch.Generator().manual_seed(3), dtype=K.dtype)
    a, b = K.sqnorms("vjp", V), Kg.sqnorms("vjp", V)
    assert "vjp-norms" not in Kg.paths
    return float((a - b).abs().max() / b.abs().max()), K


class ReadsWeight(nn.Module):
    """A layer whose weight the forward also reads directly (a tied readout)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.head(torch.tanh(self.fc(x))))
        return h @ self.fc.weight


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(10, 10), nn.Linear(10, 10)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def test_ghost_mlp_float64_and_float32() -> None:
    torch.manual_seed(0)
    err, K = _rel_sqnorms(_mlp().double(), torch.randn(8, 20, dtype=DT))
    assert err < 1e-10
    assert K.ghosted == ["0", "2", "4"] and K.paths["vjp-norms"] == "vmap-reverse+ghost"
    err32, K32 = _rel_sqnorms(_mlp(), torch.randn(8, 20))
    assert err32 < 1e-5 and K32.ghosted


def test_ghost_shared_layer_residual_no_bias_and_3d_inputs() -> None:
    torch.manual_seed(1)
    err, K = _rel_sqnorms(Twice().double(), torch.randn(5, 12, dtype=DT))
    assert err < 1e-10 and set(K.ghosted) == {"inp", "shared", "out"}  # shared: 10 rows <= 16 inputs
    err, K = _rel_sqnorms(Twice().double(), torch.randn(2, 3, 12, dtype=DT))  # (batch, time, features)
    assert err < 1e-10 and set(K.ghosted) == {"inp", "shared", "out"}


def test_ghost_only_where_exact() -> None:
    torch.manual_seed(2)
    x = torch.randn(4, 8, dtype=DT)
    err, K = _rel_sqnorms(ReadsWeight().double(), x)
    assert err < 1e-10 and K.ghosted == ["head"]  # fc's weight is read outside its forward
    err, K = _rel_sqnorms(Tied().double(), torch.randn(4, 10, dtype=DT))
    assert err < 1e-10 and K.ghosted == []  # a tied weight's gradient sums over both layers
    net = _mlp().double()
    err, K = _rel_sqnorms(net, torch.randn(8, 20, dtype=DT), params=["0.weight", "2.weight", "2.bias"])
    assert err < 1e-10 and K.ghosted == ["2"]  # layer 0's bias is not analysed
    err, K = _rel_sqnorms(net, torch.randn(24, 20, dtype=DT))
    assert err < 1e-10 and K.ghosted == ["2", "4"]  # 24 rows > 20 inputs: layer 0's weight gradient is cheaper


def test_ghost_attention_and_recurrent_models() -> None:
    torch.manual_seed(3)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1).double().eval()
    err, K = _rel_sqnorms(enc, torch.randn(1, 6, 16, dtype=DT))
    assert err < 1e-10
    assert K.ghosted and not any("self_attn" in n for n in K.ghosted)  # out_proj is read by the attention

    class Readout(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.fc = nn.GRU(4, 24), nn.Linear(24, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.rnn(x)[0][-1])  # the last step: 3 rows into 24 inputs

    err, K = _rel_sqnorms(Readout().double(), torch.randn(5, 3, 4, dtype=DT))
    assert err < 1e-10 and K.ghosted == ["fc"] and K.paths["vjp-norms"] == "vmap-reverse+rules+ghost"


def test_ghost_trace_is_the_exact_trace_and_model_untouched() -> None:
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(30, 64), nn.PReLU(), nn.Linear(64, 40)).double()  # PReLU's parameter: no per-example blocks
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    x = torch.randn(6, 30, dtype=DT)
    K = nk.NTK(net, x)
    est = nk.trace(K, method="vjp", num_probes=200, seed=0)  # < D = 240: estimated
    params = {n: p.detach() for n, p in net.named_parameters()}
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(net, p, (x,)))(params)
    exact = sum(float(j.square().sum()) for j in jac.values())
    assert K.ghosted == ["0", "2"]
    assert abs(est.value - exact) < 4 * est.stderr
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters()) and all(p.grad is None for p in net.parameters())


def test_ghost_falls_back_when_it_disagrees(monkeypatch: pytest.MonkeyPatch) -> None:
    from ntkscope.operators import ghost

    monkeypatch.setattr(ghost.GhostNorms, "sqnorms", lambda self, p, rows: torch.ones(rows.shape[0], dtype=DT))
    torch.manual_seed(5)
    err, K = _rel_sqnorms(_mlp().double(), torch.randn(8, 20, dtype=DT))
    assert err < 1e-10 and K.ghosted == [] and "vjp-norms" not in K.paths


def test_ghost_gpt2_conv1d() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(6)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=16, vocab_size=50, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2Model(cfg).double().eval()
    err, K = _rel_sqnorms(model, {"input_ids": torch.randint(0, 50, (1, 8))}, output="last_hidden_state")
    assert err < 1e-10
    assert set(K.ghosted) == {"h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj"}


def test_ghost_gram_rows_are_isometric_and_estimates_agree() -> None:
    """The VJP side's Gram-based statistics (‖K‖_F², effective rank, alignment) take the ghost
    rows A^½Δ in place of the weight gradients: the same estimates, from shorter rows."""
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(30, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 20)).double()
    x = torch.randn(6, 30, dtype=DT)
    K, Kg = nk.NTK(net, x), nk.NTK(net, x, rules=False)
    V = torch.randn(K.dim, 9, generator=torch.Generator().manual_seed(0), dtype=DT)
    E, A = K.gram_rows("vjp", V), Kg.gram_rows("vjp", V)
    assert E.shape[1] < A.shape[1] == K.num_params  # 6 rows per layer instead of 31 or 49 inputs
    assert _rel(E @ E.T, A @ A.T) < 1e-10
    for f in (nk.frobenius_norm, nk.effective_rank):
        a, b = f(K, method="vjp", num_probes=40, seed=1), f(Kg, method="vjp", num_probes=40, seed=1)
        assert abs(a.value - b.value) < 1e-9 * abs(b.value) and abs(a.stderr - b.stderr) < 1e-7 * b.stderr
    moved = nn.Sequential(*[type(m)(m.in_features, m.out_features) if isinstance(m, nn.Linear) else m for m in net]).double()
    K2, K2g = nk.NTK(moved, x), nk.NTK(moved, x, rules=False)
    a, b = nk.alignment(K, K2, method="vjp", num_probes=40, seed=2), nk.alignment(Kg, K2g, method="vjp", num_probes=40, seed=2)
    assert abs(a.value - b.value) < 1e-9 and K.ghosted and K2.ghosted
    assert K.counts()[:2] == (0, 9 + 3 * 40)  # every pass is counted, as a VJP


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def test_ghost_rows_raise_the_stored_probe_limit() -> None:
    """A stored probe costs its Gram row, not P numbers: 60 probes of a 4 × 512 MLP (P = 845k,
    limit 59 probes with weight gradients) fit with ghost rows (66k numbers each)."""
    torch.manual_seed(8)
    net = nn.Sequential(*[m for i in range(4) for m in (nn.Linear(100 if i == 0 else 512, 512), nn.ReLU())], nn.Linear(512, 10))
    x = torch.randn(32, 100)
    with pytest.raises(ValueError, match=r"keeps every probe's product \(m × P numbers\).*memory limit of 59 probes"):
        nk.frobenius_norm(nk.NTK(net, x, ghost=False), method="vjp", num_probes=60, seed=0)
    K = nk.NTK(net, x)
    assert K.gram_width("vjp") == 32 * (4 * 512 + 10) and K.gram_width("vjp") < K.num_params // 12
    assert nk.frobenius_norm(K, method="vjp", num_probes=60, seed=0).value > 0


def test_exact_values_from_ghost_rows() -> None:
    """method="exact" forms K = E Eᵀ from the D basis vectors' Gram rows where layers are
    ghosted: the same values as the Jacobian's, for D VJPs."""
    torch.manual_seed(9)
    net = nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 4)).double()
    net2 = nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 4)).double()
    x = torch.randn(5, 30, dtype=DT)
    y = torch.randn(20, dtype=DT)
    K, Kg, K2, K2g = nk.NTK(net, x), nk.NTK(net, x, ghost=False), nk.NTK(net2, x), nk.NTK(net2, x, ghost=False)
    assert K.gram_width("vjp") == 5 * (40 + 4) < K.num_params
    for f in (nk.trace, nk.frobenius_norm, nk.effective_rank):
        a, b = f(K, method="exact"), f(Kg, method="exact")
        assert abs(a.value - b.value) < 1e-12 * abs(b.value) and b.vjp_passes == K.dim
        assert a.vjp_passes == (4 if f is nk.trace else K.dim)  # the trace: 4 VJPs over 5 per-example blocks
    a, b = nk.alignment(K, K2, method="exact"), nk.alignment(Kg, K2g, method="exact")
    assert abs(a.value - b.value) < 1e-12
    a, b = nk.target_alignment(K, y, method="exact"), nk.target_alignment(Kg, y, method="exact")
    assert abs(a.value - b.value) < 1e-12 * abs(b.value)
    assert K.ghosted == ["0", "2"]


def test_failed_gram_rows_check_stores_full_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gram rows that fail their check fall back to the products, and the stored-probe width
    (the memory limit) says so: P numbers again, not the ghost rows' width."""
    from ntkscope.operators import ghost

    monkeypatch.setattr(ghost.GhostNorms, "gram_rows", lambda self, p, rows: torch.ones(rows.shape[0], 3, dtype=DT))
    torch.manual_seed(10)
    net, x = _mlp().double(), torch.randn(8, 20, dtype=DT)
    K, Kg = nk.NTK(net, x), nk.NTK(net, x, ghost=False)
    assert K.gram_width("vjp") < K.num_params
    a, b = nk.frobenius_norm(K, method="vjp", num_probes=12, seed=0), nk.frobenius_norm(Kg, method="vjp", num_probes=12, seed=0)
    assert abs(a.value - b.value) < 1e-10 * b.value and K.gram_width("vjp") == K.num_params
