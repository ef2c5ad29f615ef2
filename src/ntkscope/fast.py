"""Fast paths: ``J U`` and ``Jᵀ V`` for a whole block of probes as large matrix products.

The generic :class:`~ntkscope.operators.NTK` evaluates a block of m probes with
``torch.func.vmap`` around ``jvp``/``vjp`` of the user's module.  For two common structures that
leaves most of the machine idle (``nn.GRU`` on CPU runs far below the GEMM rate, and ``vmap``
over it cannot fuse the probes into its kernels), so this module evaluates them by hand:

* :class:`SequentialMLP` — an ``nn.Sequential`` of ``nn.Linear`` and element-wise activations
  (ReLU, Tanh, Sigmoid, Identity) on a 2-D input ``X`` (N × d), state = the network output.
* :class:`GRUPath` — a single-layer, unidirectional ``nn.GRU`` (either layout, optional
  explicit ``h0`` input), state = the output sequence (``output=0``).

Both are the textbook forward-mode (tangent) and reverse-mode (adjoint) recurrences of the same
function, with the probe index folded into the matrix dimension so that each layer / time step
is one GEMM over *all* probes, and the weight gradients of all probes come from one GEMM per
weight over the stored per-step adjoints (the per-example-gradient trick of Goodfellow 2015,
"Efficient per-example gradient computations", and of BackPACK/Opacus).  For a Linear layer
``a = h Wᵀ + b``:

    tangent:   da = h dWᵀ + db + dh Wᵀ               (dW of every probe side by side)
    adjoint:   dW = gᵀ h,  db = Σ_n g,  dh = g W     (g of every probe side by side)

and for the GRU (PyTorch's gate order r, z, n, with ``b_hn`` inside ``r ⊙ (W_hn h + b_hn)``)

    r = σ(i_r + g_r),  z = σ(i_z + g_z),  n = tanh(i_n + r ⊙ g_n),  h' = (1 − z) ⊙ n + z ⊙ h,
    i = W_ih x + b_ih,  g = W_hh h + b_hh,

differentiated step by step.  :func:`build` recognises a supported model; the NTK checks the
fast path against the generic ``torch.func`` path on the first probes of each mode before it
trusts it (float64: agreement to ~1e-12), and falls back silently when the check fails.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["FastPath", "SequentialMLP", "GRUPath", "build"]


class FastPath:
    """A hand-written evaluator of ``J U`` (``(P, m) → (D, m)``) and ``Jᵀ V`` (``(D, m) → (P, m)``).

    Parameter order and flattening follow ``names`` (row-major per tensor), state order follows
    the flattened model output — exactly the layout of :class:`~ntkscope.operators.NTK`.
    """

    name = "fast"

    def __init__(self, names: Sequence[str], primals: Sequence[torch.Tensor]) -> None:
        self.names = list(names)
        self.values = dict(zip(names, primals))
        self.offsets: dict[str, tuple[int, int]] = {}
        off = 0
        for n, p in zip(names, primals):
            self.offsets[n] = (off, p.numel())
            off += p.numel()
        self.num_params = off
        self._watch: list[tuple[torch.Tensor, int]] = [(p, p._version) for p in primals]

    def watch(self, *tensors: torch.Tensor | None) -> None:
        """Also treat in-place changes of these (the inputs) as making the cached forward stale."""
        self._watch += [(t, t._version) for t in tensors if t is not None]

    def stale(self) -> bool:
        """Whether a watched tensor changed in place (e.g. an optimizer step) since the forward."""
        return any(t._version != v for t, v in self._watch)

    def view(self, block: torch.Tensor, name: str) -> torch.Tensor:
        """Rows of ``block`` (P, m) belonging to parameter ``name``, as ``(*shape, m)``."""
        off, n = self.offsets[name]
        return block[off : off + n].view(*self.values[name].shape, block.shape[1])

    def _put(self, rows: torch.Tensor, name: str, value: torch.Tensor) -> None:
        """Write ``value`` (m, ...) into the columns of ``rows`` (m, P) that belong to ``name``."""
        off, n = self.offsets[name]
        rows[:, off : off + n].copy_(value.reshape(rows.shape[0], n))

    #: axis of the probe index in the internal state layout of :meth:`_tangent`
    probe_axis = 1

    def _tangent(self, U: torch.Tensor) -> torch.Tensor:
        """``J U`` in the internal layout (probes along :attr:`probe_axis`)."""
        raise NotImplementedError

    def _layout(self, S: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """Internal state layout → ``(D, m)`` columns (into ``out`` when given)."""
        raise NotImplementedError

    def _adjoint(self, V: torch.Tensor, emit: Callable[[str, torch.Tensor], object]) -> None:
        """``Jᵀ V``: calls ``emit(name, grads)`` with every probe's gradient ``(m, *shape)`` per parameter."""
        raise NotImplementedError

    def jvp(self, U: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``J U``: ``(P, m) → (D, m)``; written into ``out`` (a ``(D, m)`` view) when given."""
        return self._layout(self._tangent(U), out)

    def vjp(self, V: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``Jᵀ V``: ``(D, m) → (P, m)``, returned as the transpose of probe-major ``(m, P)`` rows
        (written into ``out``, a contiguous ``(m, P)`` block, when given)."""
        rows = V.new_empty(V.shape[1], self.num_params) if out is None else out
        self._adjoint(V, lambda name, g: self._put(rows, name, g))
        return rows.T

    def jvp_sqnorms(self, U: torch.Tensor) -> torch.Tensor:
        """``‖J u_i‖²`` per column (float64), without laying out the ``(D, m)`` block."""
        S = self._tangent(U)
        dims = tuple(i for i in range(S.dim()) if i != self.probe_axis)
        return S.square().sum(dims, dtype=torch.float64)

    def vjp_sqnorms(self, V: torch.Tensor) -> torch.Tensor:
        """``‖Jᵀ v_i‖²`` per column (float64): each parameter's per-probe gradients are reduced
        as soon as they exist, so the ``(m, P)`` block is never written (the way per-example
        gradient libraries take per-sample gradient norms)."""
        m = V.shape[1]
        acc = torch.zeros(m, dtype=torch.float64, device=V.device)
        self._adjoint(V, lambda name, g: acc.add_(g.reshape(m, -1).square().sum(1, dtype=torch.float64)))
        return acc


# --------------------------------------------------------------------------------------------
# MLP: nn.Sequential of Linear + element-wise activations

_ACTS: dict[type, str] = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Identity: "identity"}


def _act_forward(kind: str, a: torch.Tensor) -> torch.Tensor:
    if kind == "relu":
        return torch.relu(a)
    if kind == "tanh":
        return torch.tanh(a)
    if kind == "sigmoid":
        return torch.sigmoid(a)
    return a


def _act_deriv(kind: str, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """σ'(a) from input a and output y (None: identity)."""
    if kind == "relu":
        return (a > 0).to(a.dtype)
    if kind == "tanh":
        return 1 - y * y
    if kind == "sigmoid":
        return y * (1 - y)
    return None


class SequentialMLP(FastPath):
    """``nn.Sequential(Linear, act, Linear, …)`` on ``X`` (N × d): all probes per layer in one GEMM.

    Tangents and adjoints are kept as ``(N, m, width)`` so that ``h @ dW`` (all probes' weight
    tangents side by side, ``(d_in, m·d_out)``) and ``dh @ Wᵀ`` (``(N·m, d_in)``) are both
    plain 2-D GEMMs without transposing the activations.
    """

    name = "fast-mlp"

    def __init__(self, layers: list[tuple[str, Any]], x: torch.Tensor, names: Sequence[str], primals: Sequence[torch.Tensor]) -> None:
        super().__init__(names, primals)
        self.layers = layers  # ("linear", (wname, bname|None)) or (act kind, None)
        self.cache: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # per layer: (input, σ'(a) or None)
        h = x
        with torch.no_grad():
            for kind, spec in layers:
                if kind == "linear":
                    wn, bn = spec
                    W = self.values[wn]
                    out = h @ W.T
                    if bn is not None:
                        out = out + self.values[bn]
                    self.cache.append((h, None))
                else:
                    out = _act_forward(kind, h)
                    self.cache.append((h, _act_deriv(kind, h, out)))
                h = out
        self.out_shape = tuple(h.shape)
        self.N = h.shape[0]

    def _tangent(self, U: torch.Tensor) -> torch.Tensor:
        m = U.shape[1]
        dh: torch.Tensor | None = None  # (N, m, d); None = zero (inputs are constants)
        for (kind, spec), (h, d) in zip(self.layers, self.cache):
            if kind == "linear":
                wn, bn = spec
                W = self.values[wn]
                dout, din = W.shape
                dW = self.view(U, wn).permute(1, 2, 0).reshape(din, m * dout)  # (din, m·dout)
                da = (h @ dW).view(self.N, m, dout)
                if bn is not None:
                    da += self.view(U, bn).T
                if dh is not None:
                    da += (dh.reshape(-1, din) @ W.T).view(self.N, m, dout)
                dh = da
            elif d is not None and dh is not None:
                dh = dh * d[:, None, :]
        if dh is None:  # no parameters before the output: impossible for a valid selection
            dh = U.new_zeros(self.N, m, self.out_shape[1])
        return dh

    def _layout(self, S: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        m = S.shape[1]
        if out is not None:
            out.view(self.N, -1, m).copy_(S.permute(0, 2, 1))
            return out
        return S.permute(0, 2, 1).reshape(-1, m)

    def _adjoint(self, V: torch.Tensor, emit: Callable[[str, torch.Tensor], object]) -> None:
        m = V.shape[1]
        g = V.view(self.N, -1, m).permute(0, 2, 1).contiguous()  # (N, m, d)
        first = next(i for i, (k, _) in enumerate(self.layers) if k == "linear")
        for i in range(len(self.layers) - 1, first - 1, -1):
            (kind, spec), (h, d) = self.layers[i], self.cache[i]
            if kind != "linear":
                if d is not None:
                    g = g * d[:, None, :]
                continue
            wn, bn = spec
            W = self.values[wn]
            dout, din = W.shape
            g2 = g.view(self.N, m * dout)
            emit(wn, g2.T @ h)  # (m·dout, din): every probe's weight gradient at once
            if bn is not None:
                emit(bn, g2.sum(0))
            if i > first:
                g = (g.view(-1, dout) @ W).view(self.N, m, din)


def _mlp_layers(model: nn.Module, names: Sequence[str]) -> list[tuple[str, Any]] | None:
    if not isinstance(model, nn.Sequential):
        return None
    layers: list[tuple[str, Any]] = []
    owned: list[str] = []
    for key, mod in model.named_children():
        if type(mod) is nn.Linear:
            bn = f"{key}.bias" if mod.bias is not None else None
            layers.append(("linear", (f"{key}.weight", bn)))
            owned += [f"{key}.weight"] + ([bn] if bn else [])
        elif type(mod) in _ACTS:
            layers.append((_ACTS[type(mod)], None))
        else:
            return None
    if sorted(owned) != sorted(names) or not owned:
        return None
    return layers


# --------------------------------------------------------------------------------------------
# GRU


class GRUPath(FastPath):
    """Single-layer unidirectional ``nn.GRU``; state = the output sequence.

    Per time step the tangent recurrence is one GEMM ``(B·m, H) @ W_hhᵀ`` plus the parameter
    terms ``[x_t, h_{t-1}] @ [dW_ih, dW_hh]`` for all probes at once; the adjoint recurrence is
    one GEMM ``(B·m, 3H) @ W_hh`` per step, and the weight gradients of every probe come from
    one GEMM per weight over all T·B stored gate adjoints.
    """

    name = "fast-gru"

    def __init__(self, gru: nn.GRU, x: torch.Tensor, h0: torch.Tensor | None, names: Sequence[str], primals: Sequence[torch.Tensor]) -> None:
        super().__init__(names, primals)
        self.batch_first = gru.batch_first
        self.bias = gru.bias
        X = x.transpose(0, 1) if gru.batch_first else x  # (T, B, I)
        self.X = X.contiguous()
        T, B, _ = X.shape
        H = gru.hidden_size
        self.T, self.B, self.H = T, B, H
        Wih, Whh = self.values["weight_ih_l0"], self.values["weight_hh_l0"]
        bih = self.values["bias_ih_l0"] if self.bias else None
        bhh = self.values["bias_hh_l0"] if self.bias else None
        h = h0[0] if h0 is not None else X.new_zeros(B, H)
        Hprev, R, Z, N, GN = [], [], [], [], []
        with torch.no_grad():
            gi_all = X @ Wih.T
            if bih is not None:
                gi_all = gi_all + bih
            for t in range(T):
                gh = h @ Whh.T
                if bhh is not None:
                    gh = gh + bhh
                gi = gi_all[t]
                r = torch.sigmoid(gi[:, :H] + gh[:, :H])
                z = torch.sigmoid(gi[:, H : 2 * H] + gh[:, H : 2 * H])
                n = torch.tanh(gi[:, 2 * H :] + r * gh[:, 2 * H :])
                Hprev.append(h)
                R.append(r)
                Z.append(z)
                N.append(n)
                GN.append(gh[:, 2 * H :])
                h = (1 - z) * n + z * h
        self.Hprev = torch.stack(Hprev)  # (T, B, H)
        self.R, self.Z, self.N, self.GN = (torch.stack(a) for a in (R, Z, N, GN))
        # derivatives of the gate nonlinearities, reused by both modes
        self.dR = self.R * (1 - self.R)
        self.dZ = self.Z * (1 - self.Z)
        self.dN = 1 - self.N * self.N
        self.dRZ = torch.cat([self.dR, self.dZ], -1)
        self.OMZ = 1 - self.Z
        self.HMN = self.Hprev - self.N
        # adjoint coefficients: ∂h'/∂(n pre-act), ∂h'/∂(z pre-act), ∂(n pre-act)/∂(r pre-act)
        self.CN = self.OMZ * self.dN
        self.CZ = self.HMN * self.dZ
        self.CR = self.GN * self.dR

    def _state_cols(self, S: torch.Tensor) -> torch.Tensor:
        """``(T, B, m, H)`` → ``(D, m)`` in the module's output layout."""
        m = S.shape[2]
        if self.batch_first:
            return S.permute(1, 0, 3, 2).reshape(-1, m)
        return S.permute(0, 1, 3, 2).reshape(-1, m)

    probe_axis = 2

    def _tangent(self, U: torch.Tensor) -> torch.Tensor:
        T, B, H = self.T, self.B, self.H
        m = U.shape[1]
        I = self.X.shape[2]
        Whh = self.values["weight_hh_l0"]
        dWih = self.view(U, "weight_ih_l0").permute(1, 2, 0).reshape(I, m * 3 * H)
        dWhh = self.view(U, "weight_hh_l0").permute(1, 2, 0).reshape(H, m * 3 * H)
        # the parameter terms of every step and probe in two large GEMMs: (T·B, m·3H)
        DI = (self.X.reshape(T * B, I) @ dWih).view(T, B, m, 3 * H)
        DG = (self.Hprev.reshape(T * B, H) @ dWhh).view(T, B, m, 3 * H)
        if self.bias:
            DI += self.view(U, "bias_ih_l0").T
            DG += self.view(U, "bias_hh_l0").T
        S = U.new_empty(T, B, m, H)
        H2 = 2 * H
        for t in range(T):  # in place on DI/DG (ours): no temporaries of size B·m·3H per step
            dg, di, o = DG[t], DI[t], S[t]
            if t > 0:
                dg.view(B * m, 3 * H).addmm_(S[t - 1].view(B * m, H), Whh.T)
            drz = di[..., :H2]
            drz.add_(dg[..., :H2]).mul_(self.dRZ[t][:, None])  # [dr, dz]
            dn = di[..., H2:]
            dn.addcmul_(drz[..., :H], self.GN[t][:, None]).addcmul_(self.R[t][:, None], dg[..., H2:]).mul_(self.dN[t][:, None])
            torch.mul(dn, self.OMZ[t][:, None], out=o)
            o.addcmul_(drz[..., H:], self.HMN[t][:, None])
            if t > 0:
                o.addcmul_(self.Z[t][:, None], S[t - 1])
        return S

    def _layout(self, S: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        T, B, m, H = S.shape
        if out is None:
            return self._state_cols(S)
        if self.batch_first:
            out.view(B, T, H, m).copy_(S.permute(1, 0, 3, 2))
        else:
            out.view(T, B, H, m).copy_(S.permute(0, 1, 3, 2))
        return out

    def _adjoint(self, V: torch.Tensor, emit: Callable[[str, torch.Tensor], object]) -> None:
        T, B, H = self.T, self.B, self.H
        m = V.shape[1]
        I = self.X.shape[2]
        Whh = self.values["weight_hh_l0"]
        if self.batch_first:
            Vt = V.view(B, T, H, m).permute(1, 0, 3, 2).clone(memory_format=torch.contiguous_format)
        else:
            # a copy, never a view of V (with m = 1 .contiguous() aliases V, and V is modified below)
            Vt = V.view(T, B, H, m).permute(0, 1, 3, 2).clone(memory_format=torch.contiguous_format)  # (T, B, m, H)
        GI = V.new_empty(T, B, m, 3 * H)  # adjoints of the input pre-activations i = W_ih x + b_ih
        GG = V.new_empty(T, B, m, 3 * H)  # adjoints of the hidden pre-activations g = W_hh h + b_hh
        H2 = 2 * H
        carry: torch.Tensor | None = None  # adjoint of h_t flowing back from step t+1
        for t in range(T - 1, -1, -1):
            gh = Vt[t]
            if carry is not None:
                gh.add_(carry)
            gi, gg = GI[t], GG[t]
            an = torch.mul(gh, self.CN[t][:, None], out=gi[..., H2:])
            torch.mul(gh, self.CZ[t][:, None], out=gi[..., H:H2])
            torch.mul(an, self.CR[t][:, None], out=gi[..., :H])
            gg[..., :H2].copy_(gi[..., :H2])
            torch.mul(an, self.R[t][:, None], out=gg[..., H2:])
            if t > 0:
                carry = (gg.view(B * m, 3 * H) @ Whh).view(B, m, H).addcmul_(gh, self.Z[t][:, None])
        # every probe's weight gradients, probe-major: (m·3H, T·B) @ (T·B, in) = (m, 3H, in)
        GI2, GG2 = GI.view(T * B, m * 3 * H), GG.view(T * B, m * 3 * H)
        emit("weight_ih_l0", GI2.T @ self.X.reshape(T * B, I))
        emit("weight_hh_l0", GG2.T @ self.Hprev.reshape(T * B, H))
        if self.bias:
            ones = V.new_ones(T * B)
            emit("bias_ih_l0", GI2.T @ ones)
            emit("bias_hh_l0", GG2.T @ ones)


def _gru_args(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], output: Any, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    if type(model) is not nn.GRU or model.num_layers != 1 or model.bidirectional or getattr(model, "proj_size", None):
        return None
    if output != 0 or kwargs:
        return None
    expected = ["weight_ih_l0", "weight_hh_l0"] + (["bias_ih_l0", "bias_hh_l0"] if model.bias else [])
    if sorted(names) != sorted(expected):
        return None
    if len(args) not in (1, 2) or not isinstance(args[0], torch.Tensor) or args[0].dim() != 3:
        return None
    h0 = args[1] if len(args) == 2 else None
    if h0 is not None and (not isinstance(h0, torch.Tensor) or h0.dim() != 3 or h0.shape[0] != 1):
        return None
    return args[0], h0


# --------------------------------------------------------------------------------------------


def build(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    output: int | str | Callable[[Any], torch.Tensor] | None,
    names: Sequence[str],
    primals: Sequence[torch.Tensor],
) -> FastPath | None:
    """A fast path for ``model`` on these inputs, or None when its structure is not supported.

    Supported: see the module docstring.  Anything else (hooks, subclasses, other layers,
    parameter subsets, custom ``output=``) returns None and the generic path is used.
    """
    if model._forward_hooks or model._forward_pre_hooks or any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return None
    dtypes = {p.dtype for p in primals}
    ts = [a for a in args if isinstance(a, torch.Tensor)]
    if len(dtypes) != 1 or any(t.dtype not in dtypes or t.device != primals[0].device for t in ts):
        return None
    layers = _mlp_layers(model, names)
    if layers is not None:
        if output is not None or kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor) or args[0].dim() != 2:
            return None
        if layers[0][0] != "linear" and all(k != "linear" for k, _ in layers):
            return None
        fp: FastPath = SequentialMLP(layers, args[0], names, primals)
        fp.watch(args[0])
        return fp
    g = _gru_args(model, args, kwargs, output, names)
    if g is not None:
        assert isinstance(model, nn.GRU)
        fp = GRUPath(model, g[0], g[1], names, primals)
        fp.watch(g[0], g[1])
        return fp
    return None
