"""Transformer NTK statistics against an exact, independent computation (float64, tiny configs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ntkscope import frobenius_norm, trace
from ntkscope.core.probes import Probe, ProbeStream
from ntkscope.estimators import exact as ex
from ntkscope.models.axes import select_axes
from ntkscope.models.transformer import transformer_ntk


def dense_jacobian(f, params: list[torch.Tensor]) -> torch.Tensor:
    """J = ∂f/∂θ row by row with plain autograd (independent of torch.func and of ntkscope)."""
    z = f().reshape(-1)
    rows = []
    for i in range(z.numel()):
        g = torch.autograd.grad(z[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1) for gi, p in zip(g, params)]))
    return torch.stack(rows)


def check_against_dense(K, J: torch.Tensor) -> None:
    assert K.dim == J.shape[0] and K.num_params == J.shape[1]
    Kd = J @ J.T
    tr, fro2 = float(Kd.trace()), float(Kd.square().sum())
    assert ex.exact_trace(K) == pytest.approx(tr, rel=1e-10)
    assert ex.exact_frobenius_sq(K) == pytest.approx(fro2, rel=1e-10)
    m = 12
    # Same probes through the dense Jacobian: the estimates must agree to rounding.
    W = ProbeStream(K.dim, Probe.RADEMACHER, 3, 0, torch.float64).columns(0, m)
    U = ProbeStream(K.num_params, Probe.RADEMACHER, 3, 0, torch.float64).columns(0, m)
    est_v = trace(K, method="vjp", num_probes=m, seed=3)
    est_j = trace(K, method="jvp", num_probes=m, seed=3)
    assert est_v.value == pytest.approx(float((J.T @ W).square().sum(0).mean()), rel=1e-10)
    assert est_j.value == pytest.approx(float((J @ U).square().sum(0).mean()), rel=1e-10)
    assert est_v.vjp_passes == m and est_j.jvp_passes == m
    A = (J.T @ W).T
    G = A @ A.T
    ustat = float((G.square().sum() - G.diagonal().square().sum()) / (m * (m - 1)))
    assert frobenius_norm(K, method="vjp", num_probes=m, seed=3, squared=True).value == pytest.approx(ustat, rel=1e-10)
    # and the stochastic estimate is consistent with the exact value
    for e in (est_v, est_j):
        assert abs(e.value - tr) < 5 * e.stderr


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).double()


def test_encoder_output_and_selection_against_dense(encoder):
    x = torch.randn(2, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert encoder.training  # dropout active: the analysis must run it in eval mode without changing it
    K = transformer_ntk(encoder, x, select={"time": [0, 3], "hidden": slice(0, 5)})
    assert K.axes == ("batch", "time", "hidden") and K.state_shape == (2, 2, 5)
    assert encoder.training and not encoder._forward_hooks
    ref = encoder.eval()
    params = [p for p in ref.parameters()]
    J = dense_jacobian(lambda: ref(x)[:, [0, 3], :5], params)  # grad enabled: the fused fast path is not taken
    encoder.train()
    check_against_dense(K, J)
    assert K.paths["jvp"] == "vmap-forward"  # the fused fast path is off during analysis


def test_encoder_heads_recompose_the_attention_output(encoder):
    x = torch.randn(2, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    K = transformer_ntk(encoder, x, state="heads", layer=1)
    assert K.axes == ("batch", "time", "head", "hidden") and K.state_shape == (2, 4, 2, 4)
    layer = encoder.layers[1]
    encoder.eval()
    with torch.no_grad():
        h = encoder.layers[0](x)
        attn_in = layer.norm1(h) if layer.norm_first else h
        mha_out = layer.self_attn(attn_in, attn_in, attn_in, need_weights=False)[0]
    encoder.train()
    heads = K.state.reshape(2, 4, 8)
    torch.testing.assert_close(
        nn.functional.linear(heads, layer.self_attn.out_proj.weight, layer.self_attn.out_proj.bias), mha_out
    )


def test_heads_take_a_per_head_attention_mask(encoder):
    """A (batch·heads, L, S) mask, one of nn.MultiheadAttention's documented shapes, was added to
    (batch, heads, L, S) scores and rejected (a QA repro)."""
    x = torch.randn(2, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    causal = nn.Transformer.generate_square_subsequent_mask(4, dtype=torch.float64)
    K2 = transformer_ntk(encoder, {"src": x, "mask": causal}, state="heads", layer=0)
    K3 = transformer_ntk(encoder, {"src": x, "mask": causal.expand(2 * 2, 4, 4)}, state="heads", layer=0)
    torch.testing.assert_close(K3.state, K2.state)
    assert trace(K3, method="exact").value == pytest.approx(trace(K2, method="exact").value, rel=1e-12)


def test_decoder_last_position_against_dense():
    torch.manual_seed(3)
    dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(8, 2, 12, dropout=0.0), 1).double().eval()  # sequence-first
    g = torch.Generator().manual_seed(4)
    tgt, memory = torch.randn(3, 2, 8, dtype=torch.float64, generator=g), torch.randn(5, 2, 8, dtype=torch.float64, generator=g)
    causal = nn.Transformer.generate_square_subsequent_mask(3, dtype=torch.float64)
    K = transformer_ntk(dec, {"tgt": tgt, "memory": memory, "tgt_mask": causal}, select={"time": -1})
    assert K.axes == ("batch", "hidden") and K.state_shape == (2, 8)
    J = dense_jacobian(lambda: dec(tgt, memory, tgt_mask=causal)[-1], list(dec.parameters()))
    check_against_dense(K, J)
    Kh = transformer_ntk(dec, {"tgt": tgt, "memory": memory, "tgt_mask": causal}, state="heads", layer=0)
    assert Kh.axes == ("batch", "time", "head", "hidden") and Kh.state_shape == (2, 3, 2, 4)


def test_select_axes_errors_and_aliases():
    z = torch.arange(24.0).reshape(2, 3, 4)
    out, names = select_axes(z, ("batch", "token", "feature"), {"position": -1})
    assert names == ("batch", "hidden") and torch.equal(out, z[:, -1])
    with pytest.raises(ValueError, match="unknown axes"):
        select_axes(z, ("batch", "time", "hidden"), {"head": 0})
    with pytest.raises(IndexError):
        select_axes(z, ("batch", "time", "hidden"), {"time": 3})


def test_memory_plan_picks_side_and_chunk(encoder):
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    with pytest.warns(UserWarning, match="not even 1 probe fits the 0.0 MiB budget") as record:
        K = transformer_ntk(encoder, x, memory_budget=1)
    assert record[0].filename == __file__  # the warning points at the user's line
    assert K.plan["side"] == "vjp" and K.chunk_size == 1 and K.method == "vjp"
    assert K.plan["estimated_peak_bytes"] > K.plan["memory_budget"] and "running 1 at a time" in K.plan["reason"]
    K2 = transformer_ntk(encoder, x, params=["layers.1.linear2.bias"])
    assert K2.plan["side"] == "jvp"  # P = 8 < D = 64
    assert K2.plan["activation_bytes"] > 0


@pytest.fixture(scope="module")
def gpt2():
    transformers = pytest.importorskip("transformers")  # the optional `hf` extra
    cfg = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=8, vocab_size=11, n_positions=8, bos_token_id=0, eos_token_id=0, attn_implementation="sdpa"
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).double()


def test_gpt2_logits_against_dense(gpt2):
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in gpt2.named_parameters()}
    K = transformer_ntk(gpt2, ids, select={"time": [1, 4]})
    assert K.axes == ("batch", "time", "vocab") and K.state_shape == (2, 2, 11)
    assert K.plan["side"] == "vjp"
    gpt2.eval()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        J = dense_jacobian(lambda: gpt2(ids).logits[:, [1, 4]], list(gpt2.parameters()))
    gpt2.train()
    check_against_dense(K, J)
    assert all(torch.equal(before[n], p) for n, p in gpt2.named_parameters())


def test_gpt2_heads_and_hidden_states(gpt2):
    ids = torch.randint(0, 11, (1, 6), generator=torch.Generator().manual_seed(1))
    Kh = transformer_ntk(gpt2, ids, state="heads", layer=-1, select={"head": 1})
    assert Kh.axes == ("batch", "time", "hidden") and Kh.state_shape == (1, 6, 4)
    Ks = transformer_ntk(gpt2, ids, state="hidden", layer=0)
    gpt2.eval()
    with torch.no_grad():
        hs = gpt2(ids, output_hidden_states=True).hidden_states
    gpt2.train()
    torch.testing.assert_close(Ks.state, hs[1])
    # per-head kernels: every head's trace is a partial trace of the all-heads kernel
    Kall = transformer_ntk(gpt2, ids, state="heads", layer=-1)
    parts = [ex.exact_trace(transformer_ntk(gpt2, ids, state="heads", layer=-1, select={"head": h})) for h in range(2)]
    assert sum(parts) == pytest.approx(ex.exact_trace(Kall), rel=1e-10)
    assert parts[1] == pytest.approx(ex.exact_trace(Kh), rel=1e-12)


def test_named_axes_feed_the_structure_module(gpt2):
    """Transformer axes use the recurrent vocabulary, so per-head / per-token partial traces work."""
    from ntkscope.metrics.structure import structure

    ids = torch.randint(0, 11, (1, 4), generator=torch.Generator().manual_seed(2))
    K = transformer_ntk(gpt2, ids, state="heads", layer=0)
    s = structure(K, keep="head", method="exact", pairs=False, cross=False)
    per_head = [ex.exact_trace(transformer_ntk(gpt2, ids, state="heads", layer=0, select={"head": h})) for h in range(2)]
    torch.testing.assert_close(s.trace.values, torch.tensor(per_head, dtype=torch.float64))
    st = structure(K, keep="time", method="exact", pairs=False, cross=False)
    assert float(st.trace.values.sum()) == pytest.approx(ex.exact_trace(K), rel=1e-10)


def test_module_capture_and_clear_errors(encoder):
    x = torch.randn(2, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    K = transformer_ntk(encoder, x, module="layers.0.linear1")
    assert K.axes == ("batch", "time", "hidden") and K.state_shape == (2, 4, 12)
    Kin = transformer_ntk(encoder, x, module="layers.1.linear1", capture="input", select={"batch": 0})
    assert Kin.state_shape == (4, 8)
    with pytest.raises(ValueError, match="no submodule"):
        transformer_ntk(encoder, x, module="layers.9")
    with pytest.raises(ValueError, match="layer="):
        transformer_ntk(encoder, x, state="heads")
    with pytest.raises(ValueError, match="NaN"):
        transformer_ntk(encoder, torch.full((1, 2, 8), float("nan"), dtype=torch.float64))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in encoder.modules())


def test_planned_chunk_is_the_chunk_that_runs() -> None:
    """transformer_ntk plans a chunk from memory; the evaluator must push that many probes per
    vmap batch, not one (setting ``K.chunk_size`` sets every path's batch)."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    K = transformer_ntk(layer, torch.randn(2, 5, 16))
    assert K.chunk_size == K.plan["chunk_size"] > 1
    assert K._evaluator.chunk_size == K._evaluator.ruled_chunk_size == K.chunk_size
    K.chunk_size = 3
    assert K._evaluator.chunk_size == 3
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        K.chunk_size = 0
