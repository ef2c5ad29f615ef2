"""The per-module batched-probe rules (ntkscope.operators.rules) equal the generic torch.func path, in
float64 to 1e-10: per module (every recurrent configuration, cells, Linear) and composed in
models as users write them (wrapped, stacked, with readouts, residuals, shared modules)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import ntkscope as nk
from ntkscope.operators import rules

DT = torch.float64


def _pair(model: nn.Module, inputs, output=None):  # type: ignore[no-untyped-def]
    return nk.NTK(model, inputs, output=output, rules=True), nk.NTK(model, inputs, output=output, rules=False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _check(Kr: nk.NTK, Kg: nk.NTK, m: int = 7) -> None:
    g = torch.Generator().manual_seed(1)
    U = torch.randn(Kr.num_params, m, generator=g, dtype=DT)
    V = torch.randn(Kr.dim, m, generator=g, dtype=DT)
    assert _rel(Kr.jvp(U), Kg.jvp(U)) < 1e-10
    assert _rel(Kr.vjp(V), Kg.vjp(V)) < 1e-10
    assert _rel(Kr.jvp(U[:, :1]), Kg.jvp(U[:, :1])) < 1e-10  # one probe (m = 1 layouts)
    assert _rel(Kr.vjp(V[:, :1]), Kg.vjp(V[:, :1])) < 1e-10
    assert Kr.paths == {"jvp": "vmap-forward+rules", "vjp": "vmap-reverse+rules"}
    assert Kg.paths["jvp"] is not None and "+rules" not in Kg.paths["jvp"]


RNNS = list(itertools.product([nn.RNN, nn.GRU, nn.LSTM], [1, 2], [False, True], [False, True]))


@pytest.mark.parametrize("cls, layers, bidirectional, batch_first", RNNS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_recurrent_layers(cls: type, layers: int, bidirectional: bool, batch_first: bool) -> None:
    torch.manual_seed(0)
    mod = cls(3, 4, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first).to(DT)
    x = torch.randn(5, 2, 3, dtype=DT)
    _check(*_pair(mod, x, output=0))


@pytest.mark.parametrize("cls", [nn.RNN, nn.GRU, nn.LSTM])
def test_recurrent_initial_state_bias_and_every_output(cls: type) -> None:
    """Given h0 (and c0), no biases, ReLU RNN, and the final states as part of the state."""
    torch.manual_seed(0)
    kw = {"nonlinearity": "relu"} if cls is nn.RNN else {}
    mod = cls(3, 4, num_layers=2, bidirectional=True, bias=False, **kw).to(DT)
    x = torch.randn(5, 2, 3, dtype=DT)
    h0 = torch.randn(4, 2, 4, dtype=DT)
    hx = (h0, torch.randn(4, 2, 4, dtype=DT)) if cls is nn.LSTM else h0

    def every(out):  # type: ignore[no-untyped-def]
        y, h = out
        hs = h if isinstance(h, tuple) else (h,)
        return torch.cat([y.reshape(-1)] + [t.reshape(-1) for t in hs])

    _check(*_pair(mod, (x, hx), output=every))


@pytest.mark.parametrize("cls", [nn.RNN, nn.GRU, nn.LSTM])
@pytest.mark.parametrize("frozen", [("weight_ih_l0", "bias_ih_l0"), ("bias_hh_l0",), ("weight_hh_l0", "bias_ih_l0"), ("bias_ih_l0", "bias_hh_l0")])
def test_recurrent_frozen_parameters(cls: type, frozen: tuple[str, ...]) -> None:
    """Only some of a layer's weights and biases analysed: the parameter adjoints (one shared GEMM
    over [x, h_prev, 1]) return exactly the requested gradients."""
    torch.manual_seed(0)
    mod = cls(3, 4).to(DT)
    for name in frozen:
        getattr(mod, name).requires_grad_(False)
    _check(*_pair(mod, torch.randn(5, 2, 3, dtype=DT), output=0))


def test_unbatched_sequence() -> None:
    torch.manual_seed(0)
    _check(*_pair(nn.LSTM(3, 4).to(DT), torch.randn(6, 3, dtype=DT), output=0))


class _Loop(nn.Module):
    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = None
        outs = []
        for t in range(x.shape[0]):
            h = self.cell(x[t], h)
            outs.append(h[0] if isinstance(h, tuple) else h)
        return torch.stack(outs)


@pytest.mark.parametrize("cell", [nn.RNNCell(3, 4), nn.RNNCell(3, 4, nonlinearity="relu"), nn.GRUCell(3, 4), nn.LSTMCell(3, 4, bias=False)])
def test_cells_in_a_loop(cell: nn.Module) -> None:
    torch.manual_seed(0)
    _check(*_pair(_Loop(cell.to(DT)), torch.randn(5, 2, 3, dtype=DT)))


@pytest.fixture
def linear_rule():  # type: ignore[no-untyped-def]
    """The opt-in nn.Linear rule, registered for one test."""
    rules.register_rule(nn.Linear, rules.linear_forward)
    yield
    rules.unregister_rule(nn.Linear)


@pytest.mark.parametrize("shape", [(9, 5), (2, 4, 5), (5,)])
def test_linear_any_leading_shape(shape: tuple[int, ...], linear_rule: None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4, bias=False), nn.ReLU(), nn.Linear(4, 3)).to(DT)
    _check(*_pair(model, torch.randn(*shape, dtype=DT)))


def test_linear_runs_natively_by_default() -> None:
    assert rules.rule_names(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))) == []


class _Composed(nn.Module):
    """Encoder, a residual, a shared (tied) Linear used twice, a 2-layer GRU and a readout of
    the last step; returns a tuple, of which the NTK takes one part."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(3, 4)
        self.mix = nn.Linear(4, 4)
        self.rnn = nn.GRU(4, 5, num_layers=2, batch_first=True)
        self.head = nn.Sequential(nn.LayerNorm(5), nn.Linear(5, 2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.enc(x))
        h = h + self.mix(self.mix(h))  # shared parameters
        y, hn = self.rnn(h)
        return self.head(y[:, -1]), hn


def test_composed_model_as_written() -> None:
    torch.manual_seed(0)
    model = _Composed().to(DT)
    Kr, Kg = _pair(model, torch.randn(3, 6, 3, dtype=DT), output=0)
    assert Kr.rules == ["rnn: GRU"]
    _check(Kr, Kg)


def test_composed_model_with_linear_rules(linear_rule: None) -> None:
    torch.manual_seed(0)
    model = _Composed().to(DT)
    Kr, Kg = _pair(model, torch.randn(3, 6, 3, dtype=DT), output=0)
    assert Kr.rules == ["enc: Linear", "mix: Linear", "rnn: GRU", "head.1: Linear"]
    _check(Kr, Kg)


def test_paper_gru_wrapped_and_hidden_ntk_use_rules() -> None:
    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(x)[0]

    torch.manual_seed(0)
    _check(*_pair(Wrapped().to(DT), torch.randn(5, 2, 3, dtype=DT)))
    K = nk.hidden_ntk(nn.LSTM(3, 4, num_layers=2).to(DT), torch.randn(5, 2, 3, dtype=DT), layer="all")
    K.vjp(torch.ones(K.dim, 2, dtype=DT))
    assert K.rules and K.paths["vjp"] == "vmap-reverse+rules"


def test_estimates_equal_and_model_untouched() -> None:
    torch.manual_seed(0)
    gru = nn.GRU(4, 6).to(DT)
    before = {n: p.detach().clone() for n, p in gru.named_parameters()}
    x = torch.randn(10, 3, 4, dtype=DT)
    Kr, Kg = _pair(gru, x, output=0)
    for method in ("vjp", "jvp", "hutchpp"):
        a, b = nk.trace(Kr, method=method, num_probes=24, seed=3), nk.trace(Kg, method=method, num_probes=24, seed=3)
        assert abs(a.value - b.value) <= 1e-10 * abs(b.value)
        assert (a.jvp_passes, a.vjp_passes) == (b.jvp_passes, b.vjp_passes)
    assert all(torch.equal(p, before[n]) for n, p in gru.named_parameters())
    assert all(p.grad is None for p in gru.parameters())
    assert type(gru) is nn.GRU  # the rules live on an analysis copy


def test_live_parameters_and_inputs() -> None:
    """Training in place (or editing the inputs) changes the operator: nothing is cached."""
    torch.manual_seed(0)
    model = nn.GRU(3, 4).to(DT)
    x = torch.randn(5, 2, 3, dtype=DT)
    Kr, Kg = _pair(model, x, output=0)
    _check(Kr, Kg)
    with torch.no_grad():
        model.weight_hh_l0.mul_(1.5)
        x.add_(0.25)
    _check(Kr, Kg)


def test_modules_without_rules_and_subclasses_run_as_written() -> None:
    class MyGRU(nn.GRU):  # its own forward computes something else: no rule may replace it
        def forward(self, x, h=None):  # type: ignore[no-untyped-def]
            y, hn = super().forward(x, h)
            return 2 * y, hn

    torch.manual_seed(0)
    assert rules.rule_names(MyGRU(3, 4)) == []
    assert rules.rule_names(nn.LSTM(3, 4, proj_size=2)) == []
    K = nk.NTK(MyGRU(3, 4), torch.randn(5, 2, 3), output=0)
    assert K.rules == []
    K.vjp(torch.ones(K.dim, 2))
    assert K.paths["vjp"] == "vmap-reverse"
    with pytest.raises(ValueError, match="rules=True: no submodule"):
        nk.NTK(MyGRU(3, 4), torch.randn(5, 2, 3), output=0, rules=True)


def test_a_wrong_rule_is_caught_and_the_generic_path_takes_over() -> None:
    class Broken(rules.BatchedOp):
        name = "broken"

        def primal(self, x, W, b):  # type: ignore[no-untyped-def, override]
            return torch.nn.functional.linear(x, W, b), None

        def tangent(self, inputs, state, tangents, m):  # type: ignore[no-untyped-def, override]
            return (torch.zeros(m, inputs[0].shape[0], inputs[1].shape[0], dtype=inputs[0].dtype),)

        def adjoint(self, inputs, state, cotangents, needs, m):  # type: ignore[no-untyped-def, override]
            return tuple(None if not n or t is None else torch.zeros(m, *t.shape, dtype=t.dtype) for n, t in zip(needs, inputs))

    class Odd(nn.Linear):
        pass

    rules.register_rule(Odd, lambda mod, orig, x: Broken()(x, mod.weight, mod.bias))
    try:
        torch.manual_seed(0)
        mod, x = Odd(3, 2).to(DT), torch.randn(4, 3, dtype=DT)
        K, Kg = nk.NTK(mod, x), nk.NTK(mod, x, rules=False)
        assert K.rules == ["(model): Odd"]
        U, V = torch.randn(K.num_params, 3, dtype=DT), torch.randn(K.dim, 3, dtype=DT)
        assert _rel(K.jvp(U), Kg.jvp(U)) < 1e-12 and _rel(K.vjp(V), Kg.vjp(V)) < 1e-12
        assert K.paths == {"jvp": "vmap-forward", "vjp": "vmap-reverse"}  # the rules failed their check
    finally:
        rules._RULES.pop(Odd)


def test_float32_rules_agree() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(10, 16, num_layers=2)
    K = nk.NTK(lstm, torch.randn(20, 5, 10), output=0)
    Kg = nk.NTK(lstm, torch.randn(20, 5, 10), output=0, rules=False)
    K.jvp(torch.ones(K.num_params, 3))
    K.vjp(torch.ones(K.dim, 3))
    assert K.paths == {"jvp": "vmap-forward+rules", "vjp": "vmap-reverse+rules"}
    assert Kg.chunk_size <= K.chunk_size  # the rules' working set is smaller than the saved activations


@pytest.mark.parametrize("m", [1, 3])
def test_probe_block_not_modified(m: int) -> None:
    torch.manual_seed(0)
    for mod in (nn.GRU(3, 4), nn.LSTM(3, 4), nn.RNN(3, 4)):
        K = nk.NTK(mod, torch.randn(5, 2, 3), output=0)
        V = torch.randn(K.dim, m)
        U = torch.randn(K.num_params, m)
        V0, U0 = V.clone(), U.clone()
        K.vjp(V)
        K.jvp(U)
        assert torch.equal(V, V0) and torch.equal(U, U0)


@pytest.mark.parametrize("side", ["jvp", "vjp"])
def test_sqnorms_equal_generic(side: str) -> None:
    torch.manual_seed(0)
    for model, x, out in [
        (nn.LSTM(5, 6).to(DT), torch.randn(9, 2, 5, dtype=DT), 0),
        (nn.GRU(3, 5).to(DT), torch.randn(6, 4, 3, dtype=DT), 0),
    ]:
        Kr, Kg = _pair(model, x, output=out)
        n = Kr.num_params if side == "jvp" else Kr.dim
        X = torch.randn(n, 70, dtype=DT)
        a, b = Kr.sqnorms(side, X), Kg.sqnorms(side, X)
        assert _rel(a, b) < 1e-10
        assert _rel(a, (Kg.jvp(X) if side == "jvp" else Kg.vjp(X)).square().sum(0)) < 1e-10
        assert getattr(Kr, f"{side}_count") == 70


def test_chunk_size_follows_memory() -> None:
    torch.manual_seed(0)
    K = nk.NTK(nn.GRU(10, 64), torch.randn(50, 15, 10), output=0)
    assert K.chunk_size > 10  # a memory budget, not a fixed small number
    assert nk.NTK(nn.GRU(10, 64), torch.randn(50, 15, 10), output=0, chunk_size=7).chunk_size == 7


def test_embedding_padding_row_has_one_jacobian() -> None:
    """PyTorch's backward never updates an Embedding's padding row; the JVP must not move it
    either, or J·u and Jᵀ·v describe different Jacobians (found on Hugging Face BERT)."""
    from ntkscope.estimators import exact as ex

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4, padding_idx=0), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    ids = torch.tensor([[0, 3, 5], [2, 0, 0]])
    K = nk.NTK(model, ids)
    Jf, Jr = ex.jacobian(K, "jvp"), ex.jacobian(K, "vjp")
    assert _rel(Jf, Jr) < 1e-12
    assert float(Jf[:, :4].abs().max()) == float(Jr[:, :4].abs().max()) == 0.0  # the padding row is not trained
    assert float(Jf[:, 4:28].abs().max()) > 0
    assert type(model[0]) is nn.Embedding


class _Attend(nn.Module):
    """Attention as users call it: self- or cross-attention, masks, weights returned or not."""

    def __init__(self, mha: nn.MultiheadAttention, cross: bool, masks: bool, weights: bool) -> None:
        super().__init__()
        self.mha, self.cross, self.masks, self.weights = mha, cross, masks, weights

    def forward(self, x: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        kv = mem if self.cross else x
        kw: dict = {}
        if self.masks:
            L, S = (x.shape[1], kv.shape[1]) if self.mha.batch_first else (x.shape[0], kv.shape[0])
            kw["attn_mask"] = torch.triu(torch.ones(L, S, dtype=torch.bool), 1)
            pad = torch.zeros(2, S, dtype=torch.bool)
            pad[1, -1] = True
            kw["key_padding_mask"] = pad
        out, w = self.mha(x, kv, kv, need_weights=self.weights, **kw)
        return out if w is None else torch.cat([out.reshape(-1), w.reshape(-1)])


MHAS = [
    dict(batch_first=True),
    dict(batch_first=False, bias=False),
    dict(batch_first=True, kdim=3, vdim=5, cross=True),
    dict(batch_first=True, add_bias_kv=True, add_zero_attn=True, masks=True, weights=True),
    dict(batch_first=False, masks=True, cross=True),
]


@pytest.mark.parametrize("cfg", MHAS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_multihead_attention(cfg: dict) -> None:
    """The MHA rule (2-D input projections inside the module's own forward) equals the generic
    path for packed and separate projection weights, biases or none, bias_kv / zero attention,
    boolean masks, returned attention weights and either layout."""
    torch.manual_seed(0)
    cfg = dict(cfg)
    cross, masks, weights = cfg.pop("cross", False), cfg.pop("masks", False), cfg.pop("weights", False)
    mha = nn.MultiheadAttention(8, 2, **cfg).to(DT).eval()
    model = _Attend(mha, cross, masks, weights)
    bf = cfg.get("batch_first", False)
    x = torch.randn(2, 4, 8, dtype=DT) if bf else torch.randn(4, 2, 8, dtype=DT)
    kdim = cfg.get("kdim", 8)
    mem = torch.randn(2, 3, kdim, dtype=DT) if bf else torch.randn(3, 2, kdim, dtype=DT)
    if "vdim" in cfg:  # key and value of different widths: project value from its own tensor
        mv = torch.randn(*mem.shape[:-1], cfg["vdim"], dtype=DT)

        class _KV(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.mha = mha

            def forward(self, x: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
                return self.mha(x, mem, mv, need_weights=False)[0]

        model = _KV()  # type: ignore[assignment]
    _check(*_pair(model, (x, mem)))


def test_transformer_encoder_with_causal_mask() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).to(DT).eval()
    mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=DT)

    class _Causal(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = enc

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.enc(x, mask=mask, is_causal=True)

    K, Kg = _pair(_Causal(), torch.randn(2, 5, 8, dtype=DT))
    assert K.rules == ["enc.layers.0.self_attn: MultiheadAttention", "enc.layers.1.self_attn: MultiheadAttention"]
    _check(K, Kg)


def test_multihead_attention_leaves_functional_as_it_was() -> None:
    before = torch.nn.functional.multi_head_attention_forward
    model = _Attend(nn.MultiheadAttention(8, 2, batch_first=True).to(DT), False, False, False)
    K = nk.NTK(model, (torch.randn(2, 4, 8, dtype=DT), torch.randn(2, 3, 8, dtype=DT)), rules=True)
    K.jvp(torch.randn(K.num_params, 2, dtype=DT))
    assert torch.nn.functional.multi_head_attention_forward is before


def test_hf_gelu_new_rule_matches_the_generic_path() -> None:
    """Hugging Face's NewGELUActivation (GPT-2's element-wise tanh GELU) runs as F.gelu(tanh):
    the same function, J·U and Jᵀ·V equal to 1e-10 in float64; the user's module is untouched."""
    transformers = pytest.importorskip("transformers")
    from transformers.activations import NewGELUActivation

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=16, vocab_size=50, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2Model(cfg).double().eval()
    ids = {"input_ids": torch.randint(0, 50, (1, 8))}
    Kr, Kg = _pair(model, ids, output="last_hidden_state")
    assert Kr.rules == ["h.0.mlp.act: NewGELUActivation"]
    _check(Kr, Kg)
    assert type(model.h[0].mlp.act) is NewGELUActivation
    x = torch.randn(5, 7, dtype=DT)
    assert torch.allclose(rules.gelu_tanh_forward(NewGELUActivation(), None, x), NewGELUActivation()(x), rtol=1e-14, atol=1e-15)
