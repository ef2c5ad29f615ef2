"""A zoo of tiny models for the tests: every structure the core must handle, in float32 and float64.

Each factory returns a :class:`Case`, which unpacks as ``(model, inputs, output)`` — the three
arguments of :class:`ntkscope.NTK` — and also carries

* ``ntk(**kw)``: the case's NTK (``NTK.from_function`` for the hand-written GRU loop);
* ``reference(params)``: the flattened state as a function of a parameter dict, written
  independently of ntkscope (plain ``torch.nn.functional`` / ``functional_call`` on a private
  copy), for ``torch.func.jacrev`` reference Jacobians;
* ``params``: the parameter dict (name → tensor) in the NTK's parameter order.

Sizes are kept tiny (D and P in the tens to low hundreds) so exact kernels are instant.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

import ntkscope as nk

__all__ = [
    "Case",
    "mlp",
    "cnn_bn",
    "rnn",
    "gru",
    "lstm",
    "gru_loop",
    "FACTORIES",
    "all_cases",
    "reference_jacobian",
    "gru_loop_fn",
    "Twice",
]


class Twice(nn.Module):
    """One linear layer called twice (parameter sharing: two rows per example in its Gram), a
    residual and a bias-free layer (the ghost-norm and per-example-block tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.shared = nn.Linear(16, 16)
        self.out = nn.Linear(16, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = h + torch.tanh(self.shared(h))
        return self.out(torch.tanh(self.shared(h)))


@dataclass
class Case:
    """One zoo model: unpacks as ``(model, inputs, output)``."""

    name: str
    model: nn.Module
    inputs: Any
    output: int | None
    reference: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    fn: Callable[[dict[str, torch.Tensor], Any], torch.Tensor] | None = None  # from_function cases
    tags: set[str] = field(default_factory=set)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.inputs, self.output))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def ntk(self, **kw: Any) -> nk.NTK:
        if self.fn is not None:
            return nk.NTK.from_function(self.fn, self.params, self.inputs, output=self.output, **kw)
        return nk.NTK(self.model, self.inputs, output=self.output, **kw)

    def __repr__(self) -> str:
        return f"Case({self.name}, {self.dtype})"


def reference_jacobian(case: Case, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``J`` (D × P) by ``torch.func.jacrev`` of ``case.reference``, columns in parameter order."""
    p = {n: t.detach() for n, t in (params or case.params).items()}
    jac = jacrev(case.reference)(p)
    D = case.reference(p).numel()
    return torch.cat([jac[n].reshape(D, -1) for n in p], 1).detach()


def sampled_budget(K: Any, method: str, want: int, quantity: str = "trace") -> int:
    """The largest budget ``≤ want`` at which ``method`` still samples on the NTK ``K``: from the
    exact cost on (one-sided: ``D`` VJP or ``P`` JVP passes; two-sided: ``min(D, P)`` passes at
    two per product, XTrace's ``‖K‖²`` two products per probe) the exact value runs instead, and a
    statistical test there could not fail.  A VJP trace over per-example blocks is exact from
    ``R = D / G`` passes (``K.trace_blocks()``)."""
    if method in ("vjp", "vjp_proj"):
        blocks = K.trace_blocks() if method == "vjp" and quantity == "trace" else None
        cap = K.dim - 1 if blocks is None else blocks - 1
    elif method in ("jvp", "jvp_proj"):
        cap = K.num_params - 1
    else:
        order = 2 if method == "xtrace" and quantity != "trace" else 1
        cap = (min(K.dim, K.num_params) - 1) // (2 * order)
    return max(2, min(want, cap))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _init(model: nn.Module, seed: int, dtype: torch.dtype) -> nn.Module:
    g = _gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return model.to(dtype)


def mlp(dtype: torch.dtype = torch.float64) -> Case:
    """``Linear(4,6)–tanh–Linear(6,3)`` on 5 samples: D = 15, P = 51."""
    model = _init(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), 1, dtype)
    X = torch.randn(5, 4, generator=_gen(11), dtype=torch.float64).to(dtype)

    def reference(p: dict[str, torch.Tensor]) -> torch.Tensor:
        h = torch.tanh(X @ p["0.weight"].T + p["0.bias"])
        return (h @ p["2.weight"].T + p["2.bias"]).reshape(-1)

    return Case(f"mlp-{_dt(dtype)}", model, X, None, reference, tags={"fast"})


def cnn_bn(dtype: torch.dtype = torch.float64, train: bool = False) -> Case:
    """``Conv2d(2,3,3)–BatchNorm2d–ReLU–Flatten–Linear(48,3)`` on 4 images 4×4: D = 12, P = 214.

    BatchNorm's running stats are set away from their defaults so that eval mode (running
    stats) and train mode (batch statistics, coupling the samples) give different kernels.
    """
    model = _init(
        nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3)), 2, dtype
    )
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm2d)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1], dtype=dtype))
        bn.running_var.copy_(torch.tensor([1.5, 0.7, 2.0], dtype=dtype))
        bn.num_batches_tracked.fill_(7)
        bn.weight.add_(1.0)  # keep the BN scale away from zero
    model.train(train)
    X = torch.randn(4, 2, 4, 4, generator=_gen(12), dtype=torch.float64).to(dtype)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()

    def reference(p: dict[str, torch.Tensor]) -> torch.Tensor:
        h = F.conv2d(X, p["0.weight"], p["0.bias"], padding=1)
        if train:  # batch statistics, no running stats touched
            h = F.batch_norm(h, None, None, p["1.weight"], p["1.bias"], training=True, eps=bn.eps)
        else:
            h = F.batch_norm(h, rm, rv, p["1.weight"], p["1.bias"], training=False, eps=bn.eps)
        h = torch.relu(h).flatten(1)
        return (h @ p["4.weight"].T + p["4.bias"]).reshape(-1)

    mode = "train" if train else "eval"
    return Case(f"cnn-bn-{mode}-{_dt(dtype)}", model, X, None, reference, tags={"bn", mode})


def _rnn_case(kind: str, module: nn.RNNBase, seed: int, dtype: torch.dtype) -> Case:
    model = _init(module, seed, dtype)
    X = torch.randn(4, 2, 3, generator=_gen(seed + 10), dtype=torch.float64).to(dtype)  # (T, B, in), sequence-first
    private = copy.deepcopy(model)  # the reference never touches the model the NTK sees

    def reference(p: dict[str, torch.Tensor]) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TF32 acceleration on top of oneDNN.*")
            with torch.backends.mkldnn.flags(enabled=False):
                return functional_call(private, p, (X,))[0].reshape(-1)

    return Case(f"{kind}-{_dt(dtype)}", model, X, 0, reference, tags={"rnn", kind})


def rnn(dtype: torch.dtype = torch.float64) -> Case:
    """``nn.RNN(3, 5)`` (tanh) on (T=4, B=2, 3), state = the hidden trajectory: D = 40, P = 50."""
    return _rnn_case("rnn", nn.RNN(3, 5), 3, dtype)


def gru(dtype: torch.dtype = torch.float64) -> Case:
    """``nn.GRU(3, 4)`` on (T=4, B=2, 3), state = the hidden trajectory: D = 32, P = 108."""
    return _rnn_case("gru", nn.GRU(3, 4), 4, dtype)


def lstm(dtype: torch.dtype = torch.float64) -> Case:
    """``nn.LSTM(3, 4)`` on (T=4, B=2, 3), state = the hidden trajectory: D = 32, P = 144."""
    return _rnn_case("lstm", nn.LSTM(3, 4), 5, dtype)


def gru_loop_fn(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """A hand-written GRU over a sequence-first input (T, B, in); returns the (T, B, H) trajectory.

    PyTorch's gate order (r, z, n) with ``b_hn`` inside ``r ⊙ (W_hn h + b_hn)``.
    """
    W_ih, W_hh, b_ih, b_hh = p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"]
    H = W_hh.shape[1]
    h = x.new_zeros(x.shape[1], H)
    hs = []
    for t in range(x.shape[0]):
        gi = x[t] @ W_ih.T + b_ih
        gh = h @ W_hh.T + b_hh
        r = torch.sigmoid(gi[:, :H] + gh[:, :H])
        z = torch.sigmoid(gi[:, H : 2 * H] + gh[:, H : 2 * H])
        n = torch.tanh(gi[:, 2 * H :] + r * gh[:, 2 * H :])
        h = (1 - z) * n + z * h
        hs.append(h)
    return torch.stack(hs)


class _GRUParams(nn.Module):
    def __init__(self, inp: int, hidden: int) -> None:
        super().__init__()
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden, inp))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden, hidden))
        self.bias_ih = nn.Parameter(torch.empty(3 * hidden))
        self.bias_hh = nn.Parameter(torch.empty(3 * hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gru_loop_fn(dict(self.named_parameters()), x)


def gru_loop(dtype: torch.dtype = torch.float64) -> Case:
    """The hand-written GRU loop through ``NTK.from_function``: D = 32, P = 108."""
    model = _init(_GRUParams(3, 4), 6, dtype)
    X = torch.randn(4, 2, 3, generator=_gen(16), dtype=torch.float64).to(dtype)

    def reference(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return gru_loop_fn(p, X).reshape(-1)

    return Case(f"gru-loop-{_dt(dtype)}", model, X, None, reference, fn=gru_loop_fn, tags={"rnn", "function"})


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


FACTORIES: dict[str, Callable[[torch.dtype], Case]] = {
    "mlp": mlp,
    "cnn-bn-eval": lambda dt: cnn_bn(dt, train=False),
    "cnn-bn-train": lambda dt: cnn_bn(dt, train=True),
    "rnn": rnn,
    "gru": gru,
    "lstm": lstm,
    "gru-loop": gru_loop,
}


def all_cases(dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32)) -> list[Case]:
    """Every zoo model in every dtype (fresh instances)."""
    return [f(dt) for dt in dtypes for f in FACTORIES.values()]
