"""Per-example blocks of the VJP trace (``NTK.trace_blocks``): where every analysed parameter sits
in a ghosted linear layer, a LayerNorm/RMSNorm or a token embedding and the model keeps its examples apart, ``tr K = Σ_b tr K_bb`` is
sampled as ``Σ_b ‖J_bᵀv_b‖²`` and is exact in ``R = D / G`` passes.  Checked against the dense
kernel from ``jacrev``: the samples to 1e-10 in float64, their mean and variance over many probes,
the exact value and its pass count, and the models that must be refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ntkscope as nk
from model_zoo import Twice
from ntkscope.estimators import exact as ex
from ntkscope.estimators.onesided import onesided

DT = torch.float64


def _mlp(out: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, out))


class Mixes(nn.Module):
    """Linear layers only, but each example's output reads its neighbour's features."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(10, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.b(h + 0.1 * h.roll(1, 0))


def _block_reference(K: nk.NTK, V: torch.Tensor) -> torch.Tensor:
    """``Σ_b v_bᵀ K_bb v_b`` per column, from the dense kernel (batch axis first)."""
    G = K.state_shape[0]
    Kd = ex.kernel(K).double().reshape(G, -1, G, K.dim // G)
    Vb = V.double().T.reshape(V.shape[1], G, -1)
    return torch.stack([sum(Vb[j, b] @ Kd[b, :, b, :] @ Vb[j, b] for b in range(G)) for j in range(V.shape[1])])  # type: ignore[misc]


class Norm2(nn.Module):
    """A LayerNorm over two trailing axes between linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.n, self.b = nn.Linear(12, 12), nn.LayerNorm((3, 4)), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.n(self.a(x).reshape(*x.shape[:-1], 3, 4))))


class Tokens(nn.Module):
    """Token embeddings (repeated tokens within an example), a LayerNorm and a readout; with
    ``positions``, position embeddings of ``arange(L)`` broadcast over the batch."""

    def __init__(self, positions: bool = False) -> None:
        super().__init__()
        self.tok, self.norm, self.out = nn.Embedding(20, 8), nn.LayerNorm(8), nn.Linear(8, 3)
        self.pos = nn.Embedding(6, 8) if positions else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids)
        if self.pos is not None:
            h = h + self.pos(torch.arange(ids.shape[-1]))
        return self.out(torch.tanh(self.norm(h)))


def _ids() -> torch.Tensor:
    ids = torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(0))
    ids[0, :3] = 5  # a token three times in one example
    ids[1:, 0] = 5  # and in every other
    return ids


def _normed(norm: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(12, 16), norm, nn.GELU(), nn.Linear(16, 3))


@pytest.mark.parametrize(
    ("make", "x_shape"),
    [
        (_mlp, (7, 10)),  # one row per example
        (Twice, (5, 12)),  # a layer called twice
        (Twice, (2, 3, 12)),  # (batch, time, features)
        (lambda: _normed(nn.LayerNorm(16)), (6, 12)),  # LayerNorm's weight and bias: the example's gradients themselves
        (lambda: _normed(nn.LayerNorm(16, bias=False)), (2, 5, 12)),
        (lambda: _normed(nn.RMSNorm(16)), (6, 12)),
        (Norm2, (5, 12)),
        (Tokens, (4, 6)),  # an embedding: the example's cotangents summed per token
    ],
)
def test_block_samples_match_the_dense_kernel(make, x_shape) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    K = nk.NTK(make().double(), _ids() if make is Tokens else torch.randn(*x_shape, dtype=DT))
    R = K.trace_blocks()
    assert R == K.dim // x_shape[0] and K._evaluator.blocks is not None and not K._evaluator.blocks.free
    V = torch.randn(K.dim, 5, generator=torch.Generator().manual_seed(1), dtype=DT)
    ref = _block_reference(K, V)
    assert float((K.block_sqnorms(V) - ref).abs().max() / ref.abs().max()) < 1e-10
    assert float(K.block_sqnorms(K.block_basis(0, R)).sum()) == pytest.approx(float(ex.kernel(K).trace()), rel=1e-12)
    assert K.paths["vjp-trace"].startswith(f"per-example blocks ({x_shape[0]} ")


def test_block_samples_float32() -> None:
    torch.manual_seed(0)
    K = nk.NTK(_mlp(), torch.randn(9, 10))
    assert K.trace_blocks() == 3
    V = torch.randn(K.dim, 4, generator=torch.Generator().manual_seed(1))
    ref = _block_reference(K, V)
    assert float((K.block_sqnorms(V) - ref).abs().max() / ref.abs().max()) < 1e-5


def test_exact_trace_in_R_passes_and_model_untouched() -> None:
    torch.manual_seed(2)
    net = _mlp(out=4).double()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    K = nk.NTK(net, torch.randn(11, 10, dtype=DT))
    truth = float(ex.kernel(nk.NTK(net, K.inputs, ghost=False)).trace())
    for kw in ({"method": "exact"}, {"method": "vjp", "num_probes": 4}, {"num_probes": 8}):
        est = nk.trace(K, seed=0, **kw)  # type: ignore[arg-type]
        assert est.exact and est.value == pytest.approx(truth, rel=1e-12)
        assert (est.jvp_passes, est.vjp_passes) == (0, 4), kw  # R = 4 basis probes, not D = 44
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_block_samples_unbiased_with_the_block_variance() -> None:
    """Mean within 4 standard errors of tr K over 4,000 Rademacher probes; sample variance within
    20% of ``2 Σ_b (‖K_bb‖_F² − Σ_{i∈b} K_ii²)`` (its own standard error is ~6% here), and below
    the plain ``‖Jᵀv‖²`` variance ``2(‖K‖_F² − Σ K_ii²)``."""
    torch.manual_seed(3)
    K = nk.NTK(_mlp(out=6).double(), torch.randn(12, 10, dtype=DT))
    assert K.trace_blocks() == 6
    Kd = ex.kernel(K)
    G = 12
    blocks = Kd.reshape(G, 6, G, 6)
    var_block = 2 * sum(float(blocks[b, :, b, :].square().sum()) for b in range(G)) - 2 * float(Kd.diagonal().square().sum())
    var_plain = 2 * float(Kd.square().sum()) - 2 * float(Kd.diagonal().square().sum())
    stream = nk.core.probes.ProbeStream(K.dim, nk.Probe.RADEMACHER, 7, nk.core.probes.Stream.MAIN, DT)
    s = onesided(K, "vjp", stream.columns, 4000, keep=False, per_block=True)
    tr = float(Kd.trace())
    assert abs(float(s.mean()) - tr) < 4 * float(s.std()) / 4000**0.5
    assert float(s.var()) == pytest.approx(var_block, rel=0.2)
    assert var_block < 0.5 * var_plain
    sampled = nk.trace(K, method="vjp", num_probes=5, seed=0)  # below R = 6: samples, not the exact value
    assert not sampled.exact and sampled.vjp_passes == 5
    assert "per-example blocks" in " ".join(sampled.info["variants"])


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16, affine=False), nn.Linear(16, 3)).train(),  # batch statistics
        Mixes,  # reads another example
        lambda: nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16).eval(), nn.Linear(16, 3)),  # BatchNorm's own parameters
        lambda: nn.Sequential(nn.Linear(10, 16), nn.PReLU(), nn.Linear(16, 3)),  # PReLU's
        lambda: Tokens(positions=True),  # position embeddings computed once for the whole batch
    ],
)
def test_models_that_mix_examples_or_have_other_parameters_are_refused(make) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(4)
    net = make().double()
    K = nk.NTK(net, _ids() if isinstance(net, Tokens) else torch.randn(7, 10, dtype=DT))
    assert K.trace_blocks() is None and "vjp-trace" not in K.paths
    with pytest.raises(RuntimeError, match="per-example blocks"):
        K.block_sqnorms(torch.ones(K.dim, 1, dtype=DT))
    truth = float(ex.kernel(nk.NTK(net, K.inputs, ghost=False)).trace())
    assert nk.trace(K, method="exact").value == pytest.approx(truth, rel=1e-10)


def test_failed_blocks_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the per-example ghost norms fail after their check, the exact value takes the plain
    basis and the samples the plain ``‖Jᵀv‖²`` (same mean)."""
    torch.manual_seed(5)
    K = nk.NTK(_mlp().double(), torch.randn(6, 10, dtype=DT))
    assert K.trace_blocks() == 3
    monkeypatch.setattr(K._evaluator, "block_sqnorms", lambda rows: None)
    truth = float(ex.kernel(K).trace())
    assert ex.exact_trace(K) == pytest.approx(truth, rel=1e-12)
    V = torch.randn(K.dim, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    plain = K.sqnorms("vjp", V)
    assert torch.equal(onesided(K, "vjp", lambda s, e: V[:, s:e], 3, keep=False, per_block=True), plain)


def test_an_example_without_cotangent_rows_pads_its_block() -> None:
    """An example whose hidden units are all dead has no live rows at that layer: its block is
    padded with a zero row (uneven rows per block), and the samples still match the kernel."""
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    with torch.no_grad():
        net[0].bias.fill_(-1.0)
    x = 3 * torch.randn(6, 10, dtype=DT)
    x[2] = 0  # every pre-activation of example 2 is -1: no cotangent reaches layer 0's rows for it
    K = nk.NTK(net, x)
    assert K.trace_blocks() == 3
    ghost = K._evaluator.blocks
    assert ghost is not None and ghost.blocks is not None and ghost.blocks[0].order is not None  # the padded layout
    V = torch.randn(K.dim, 4, generator=torch.Generator().manual_seed(2), dtype=DT)
    ref = _block_reference(K, V)
    assert float((K.block_sqnorms(V) - ref).abs().max() / ref.abs().max()) < 1e-10


class GatedMix(nn.Module):
    """Mixes examples only where a ReLU gate is open (closed at first: bias -100)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.g, self.b = nn.Linear(4, 4), nn.Linear(4, 1), nn.Linear(4, 2)
        with torch.no_grad():
            self.g.bias.fill_(-100.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.b(h + torch.relu(self.g(h)) * h.mean(0, keepdim=True))


def test_blocks_follow_parameters_changed_in_place_and_renamed_axes() -> None:
    """An NTK reads its model's parameters live: after in-place training its blocks' Grams, and
    whether examples still separate, are found again (they were kept from the first call and
    gave 70.0 as "exact" for a trace of 306.0); renaming the state's axes re-finds them too."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    X = torch.randn(6, 10, dtype=DT)
    K = nk.NTK(net, X)
    assert nk.trace(K, method="exact").vjp_passes == 3
    opt = torch.optim.SGD(net.parameters(), lr=0.3)
    for _ in range(5):
        opt.zero_grad()
        (net(X) - 1).square().sum().backward()
        opt.step()
    truth = float(ex.kernel(nk.NTK(net, X, ghost=False)).trace())
    for kw in ({"method": "exact"}, {"method": "vjp", "num_probes": 3}):
        e = nk.trace(K, seed=0, **kw)  # type: ignore[arg-type]
        assert e.exact and e.value == pytest.approx(truth, rel=1e-12), kw
    gated = GatedMix().double()
    Kg = nk.NTK(gated, torch.randn(6, 4, dtype=DT))
    assert Kg.trace_blocks() == 2
    with torch.no_grad():
        gated.g.bias.fill_(3.0)  # the gate opens: the model now mixes its examples
    assert Kg.trace_blocks() is None
    assert nk.trace(Kg, method="exact").value == pytest.approx(float(ex.kernel(nk.NTK(gated, Kg.inputs, ghost=False)).trace()), rel=1e-12)
    seq = nk.NTK(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double(), torch.randn(3, 5, 6, dtype=DT))
    assert seq.trace_blocks() == 20  # 3 blocks over the first axis
    seq.axes = ("time", "batch", "hidden")
    assert seq.trace_blocks() == 12 and "over state axis 1" in seq.paths["vjp-trace"]
    assert nk.trace(seq, method="exact").value == pytest.approx(float(ex.kernel(seq).trace()), rel=1e-12)


def test_long_examples_scalar_states_and_costly_blocks_take_the_plain_path() -> None:
    """A block with more rows than a layer's inputs (a token-wise layer over a long sequence)
    would cost more per probe than the weight gradient (and held G·T² numbers): refused, so the
    exact trace stays min(D, P) passes (it spent R = 400 VJPs where 90 JVPs did, past
    max_passes).  A scalar state has no example axis (it raised IndexError)."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    K = nk.NTK(net, torch.randn(2, 200, 8, dtype=DT))  # D = 800, P = 90, 200 rows per example into 8 inputs
    assert K.trace_blocks() is None
    e = nk.trace(K, method="exact", max_passes=100)
    assert e.passes == 90 and e.value == pytest.approx(float(ex.kernel(K).trace()), rel=1e-12)

    class Sum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x).sum()

    S = nk.NTK(Sum().double(), torch.randn(4, 8, dtype=DT))
    assert S.state_shape == () and S.trace_blocks() is None
    assert nk.trace(S, method="exact").value == pytest.approx(float(ex.kernel(S).trace()), rel=1e-12)


def test_blocks_follow_data_writes_and_inputs_written_in_place() -> None:
    """``p.data`` writes (manual SGD, loading weights) bump no version counter, and inputs written
    in place are read live: the blocks' key is the values themselves (both gave a wrong "exact"
    trace from blocks found when every unit of a layer was dead)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.LayerNorm(6), nn.Linear(6, 2)).double()
    with torch.no_grad():
        net[0].bias.fill_(-100.0)  # every hidden unit dead
    X = torch.randn(6, 4, dtype=DT)
    K = nk.NTK(net, X)
    assert nk.trace(K, method="exact").vjp_passes == 2
    net[0].bias.data.fill_(1.0)
    assert nk.trace(K, method="exact").value == pytest.approx(float(ex.kernel(nk.NTK(net, X, ghost=False)).trace()), rel=1e-12)
    X.copy_(torch.randn(6, 4, dtype=DT) - 3.0)  # a new batch in the same buffer
    assert nk.trace(K, method="exact").value == pytest.approx(float(ex.kernel(nk.NTK(net, X.clone(), ghost=False)).trace()), rel=1e-12)


def test_a_tolerance_takes_the_exact_trace_when_the_first_round_costs_as_much() -> None:
    torch.manual_seed(1)
    K = nk.NTK(_mlp(out=5).double(), torch.randn(8, 10, dtype=DT))
    e = nk.trace(K, method="vjp", rtol=0.05, seed=0)  # R = 5 passes, below the first round's 32
    assert e.exact and e.vjp_passes == 5 and e.info["adaptive"]["stop"] == "the exact value cost less than the first round"
