"""Every method works on eval-mode attention through NTK(...): the fused kernels (MHA fast path,
flash SDPA), which have no forward-mode rule, are replaced by math attention for the analysis
only, and the user's global settings are left as they were."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ntkscope as nk

DT = torch.float64
METHODS = ["jvp", "hutchpp", "xtrace", "hutchinson", "vjp"]


class _SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def _encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def _gpt2() -> tuple[nn.Module, dict[str, torch.Tensor], str]:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=8, vocab_size=11, attn_implementation="sdpa")
    return transformers.GPT2Model(cfg), {"input_ids": torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(0))}, "last_hidden_state"


def _bert() -> tuple[nn.Module, dict[str, torch.Tensor], str]:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, intermediate_size=16, vocab_size=11,
                                  max_position_embeddings=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    return transformers.BertModel(cfg), {"input_ids": torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(0))}, "last_hidden_state"


def _case(name: str) -> tuple[nn.Module, object, object]:
    torch.manual_seed(0)
    if name == "mha":
        return _SelfAttention().to(DT).eval(), torch.randn(2, 5, 8, dtype=DT), None
    if name == "encoder":
        return _encoder().to(DT).eval(), torch.randn(2, 5, 8, dtype=DT), None
    model, inputs, output = _gpt2() if name == "gpt2" else _bert()
    return model.to(DT).eval(), inputs, output


@pytest.mark.parametrize("name", ["mha", "encoder", "gpt2", "bert"])
def test_every_method_on_eval_attention(name: str) -> None:
    model, inputs, output = _case(name)
    fast = torch.backends.mha.get_fastpath_enabled()
    K = nk.NTK(model, inputs, output=output)
    exact = nk.trace(K, method="exact").value
    for method in METHODS:
        est = nk.trace(K, method=method, num_probes=24, seed=1)
        assert est.stderr is not None and est.stderr > 0
        assert abs(est.value - exact) <= 4 * est.stderr + 1e-9 * abs(exact), (method, est.value, exact, est.stderr)
    assert K.paths["jvp"] is not None and K.paths["vjp"] is not None
    assert torch.backends.mha.get_fastpath_enabled() == fast  # the user's setting is restored
    with torch.no_grad():  # and the model still takes its own fast path afterwards
        model(**inputs) if isinstance(inputs, dict) else model(inputs)


def test_jvp_agrees_with_vjp_on_fused_path_model() -> None:
    """float32 eval MHA (the fused kernels would be taken): J u and Jᵀ w satisfy the adjoint identity."""
    torch.manual_seed(0)
    model = _SelfAttention().eval()
    K = nk.NTK(model, torch.randn(3, 4, 8))
    g = torch.Generator().manual_seed(0)
    u, w = torch.randn(K.num_params, 3, generator=g), torch.randn(K.dim, 3, generator=g)
    torch.testing.assert_close((K.jvp(u) * w).sum(0), (u * K.vjp(w)).sum(0), rtol=1e-4, atol=1e-4)
