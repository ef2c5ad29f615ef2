"""Rules for recurrent layers: one layer and direction of ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``.

A :class:`RecurrenceOp` is one single-layer, one-direction recurrence over a sequence
``x (T, B, I)`` from ``h0`` (and ``c0``), in PyTorch's gate order and bias placement:

* RNN:  ``h' = act(W_ih x + b_ih + W_hh h + b_hh)``, act = tanh or relu;
* GRU:  ``r, z = σ(i_rz + g_rz)``, ``n = tanh(i_n + r ⊙ g_n)``, ``h' = (1 − z) ⊙ n + z ⊙ h``
  with ``i = W_ih x + b_ih``, ``g = W_hh h + b_hh`` (so ``b_hn`` sits inside ``r ⊙ (…)``);
* LSTM: ``i, f, o = σ(·)``, ``g = tanh(·)``, ``c' = f ⊙ c + i ⊙ g``, ``h' = o ⊙ tanh(c')``.

Both rules are the textbook tangent (forward-mode) and adjoint (reverse-mode) recurrences,
with the probes folded into the matrix rows: per time step one GEMM ``(B·m, H) @ W_hhᵀ`` carries
every probe's tangent (or ``(B·m, G·H) @ W_hh`` its adjoint), the parameter terms of all steps
and probes are two large GEMMs ``[x_t, h_{t-1}] @ [dW_ih, dW_hh]``, and every probe's weight
gradient is one GEMM over the stored pre-activation adjoints of all T·B steps.  Internally a
probe block is laid out ``(T, B, m, ·)`` so that each step's slice is contiguous.

Multi-layer and bidirectional modules, ``batch_first``, unbatched inputs and given initial
states are glue around these ops (:func:`rnn_forward`), differentiated by ``torch.func``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .core import BatchedOp

__all__ = ["RecurrenceOp", "rnn_forward", "cell_forward"]

Opt = torch.Tensor | None


def _lead(t: torch.Tensor, m: int) -> torch.Tensor:
    """``(m, T, B, k)`` → ``(T, B, m, k)`` contiguous."""
    return t.permute(1, 2, 0, 3).contiguous()


class RecurrenceOp(BatchedOp):
    """One layer, one direction.  Inputs ``(x, h0, c0, W_ih, W_hh, b_ih, b_hh)`` (``h0``/``c0``/biases
    may be None; ``c0`` only for LSTM); outputs ``(Y, c_T)``: the hidden sequence ``(T, B, H)`` and,
    for LSTM, the last cell state (for other kinds a zero-size placeholder)."""

    _single = False

    def __init__(self, kind: str) -> None:
        assert kind in ("rnn_tanh", "rnn_relu", "gru", "lstm")
        self.kind = kind
        self.name = kind
        self.gates = {"gru": 3, "lstm": 4}.get(kind, 1)

    def probe_numel(self, inputs: Sequence[Opt], outputs: Sequence[torch.Tensor]) -> int:
        x, Whh = inputs[0], inputs[4]
        assert x is not None and Whh is not None
        T, B, _ = x.shape
        # the pre-activation blocks (two for the GRU), the state block, and the weight gradients
        return T * B * Whh.shape[1] * (2 * self.gates + 2) + 2 * sum(w.numel() for w in inputs[3:] if w is not None)

    def probe_cap(self, inputs: Sequence[Opt]) -> int:
        # one step's pre-activation block (B·m·G·H numbers) within ~1 MB of cache: beyond it the
        # per-step element-wise work is memory-bound and larger chunks run slower, not faster
        x, Whh = inputs[0], inputs[4]
        assert x is not None and Whh is not None
        per_probe = x.shape[1] * self.gates * Whh.shape[1] * x.element_size()
        return max(8, 1 << max(0, (2**20 // per_probe).bit_length() - 1))

    # -- primal --------------------------------------------------------------------------------

    def primal(self, *inputs: Opt) -> tuple[Any, Any]:
        x, h0, c0, Wih, Whh, bih, bhh = inputs
        assert x is not None and Wih is not None and Whh is not None
        T, B, _ = x.shape
        H = Whh.shape[1]
        h = h0 if h0 is not None else x.new_zeros(B, H)
        gi_all = x @ Wih.T
        if bih is not None:
            gi_all = gi_all + bih
        Y = x.new_empty(T, B, H)
        st: dict[str, torch.Tensor] = {}
        k = self.kind
        if k == "gru":
            R, Z, N, GN = (x.new_empty(T, B, H) for _ in range(4))
            for t in range(T):
                gh = h @ Whh.T
                if bhh is not None:
                    gh = gh + bhh
                gi = gi_all[t]
                r = torch.sigmoid(gi[:, :H] + gh[:, :H])
                z = torch.sigmoid(gi[:, H : 2 * H] + gh[:, H : 2 * H])
                n = torch.tanh(gi[:, 2 * H :] + r * gh[:, 2 * H :])
                R[t], Z[t], N[t], GN[t] = r, z, n, gh[:, 2 * H :]
                h = (1 - z) * n + z * h
                Y[t] = h
            Hprev = torch.cat([(h0 if h0 is not None else x.new_zeros(B, H))[None], Y[:-1]])
            dR, dZ, dN = R * (1 - R), Z * (1 - Z), 1 - N * N
            st = dict(Hprev=Hprev, R=R, Z=Z, GN=GN, dRZ=torch.cat([dR, dZ], -1), dN=dN, OMZ=1 - Z, HMN=Hprev - N)
            st.update(CN=st["OMZ"] * dN, CZ=st["HMN"] * dZ, CR=GN * dR)
            return (Y, x.new_empty(0)), st
        if k == "lstm":
            c = c0 if c0 is not None else x.new_zeros(B, H)
            I_, F_, G_, O_, C, TC = (x.new_empty(T, B, H) for _ in range(6))
            Cprev = x.new_empty(T, B, H)
            for t in range(T):
                a = gi_all[t] + h @ Whh.T
                if bhh is not None:
                    a = a + bhh
                i = torch.sigmoid(a[:, :H])
                f = torch.sigmoid(a[:, H : 2 * H])
                g = torch.tanh(a[:, 2 * H : 3 * H])
                o = torch.sigmoid(a[:, 3 * H :])
                Cprev[t] = c
                c = f * c + i * g
                tc = torch.tanh(c)
                h = o * tc
                I_[t], F_[t], G_[t], O_[t], C[t], TC[t], Y[t] = i, f, g, o, c, tc, h
            Hprev = torch.cat([(h0 if h0 is not None else x.new_zeros(B, H))[None], Y[:-1]])
            dA = torch.cat([I_ * (1 - I_), F_ * (1 - F_), 1 - G_ * G_, O_ * (1 - O_)], -1)
            st = dict(Hprev=Hprev, Cprev=Cprev, I=I_, F=F_, G=G_, O=O_, TC=TC, dA=dA, OdTC=O_ * (1 - TC * TC))
            return (Y, c), st
        relu = k == "rnn_relu"
        D = x.new_empty(T, B, H)
        for t in range(T):
            a = gi_all[t] + h @ Whh.T
            if bhh is not None:
                a = a + bhh
            h = torch.relu(a) if relu else torch.tanh(a)
            D[t] = (a > 0).to(a.dtype) if relu else 1 - h * h
            Y[t] = h
        Hprev = torch.cat([(h0 if h0 is not None else x.new_zeros(B, H))[None], Y[:-1]])
        return (Y, x.new_empty(0)), dict(Hprev=Hprev, D=D)

    # -- tangent -------------------------------------------------------------------------------

    def tangent(self, inputs: Sequence[Opt], state: Any, tangents: Sequence[Opt], m: int) -> tuple[torch.Tensor, ...]:
        x, h0, c0, Wih, Whh, bih, bhh = inputs
        dx, dh0, dc0, dWih, dWhh, dbih, dbhh = tangents
        assert x is not None and Wih is not None and Whh is not None
        T, B, I = x.shape
        H = Whh.shape[1]
        GH = self.gates * H
        st = state
        # pre-activation tangents of every step and probe from the parameters and the input
        DI = x.new_zeros(T, B, m, GH)
        if dWih is not None:
            DI += (x.reshape(T * B, I) @ dWih.permute(2, 0, 1).reshape(I, m * GH)).view(T, B, m, GH)
        if dx is not None:
            DI += _lead(dx @ Wih.T, m)
        if dbih is not None:
            DI += dbih
        # r multiplies g_n in the GRU: its hidden pre-activation tangents are kept apart (DG)
        DG = x.new_zeros(T, B, m, GH) if self.kind == "gru" else DI
        if dWhh is not None:
            DG += (st["Hprev"].reshape(T * B, H) @ dWhh.permute(2, 0, 1).reshape(H, m * GH)).view(T, B, m, GH)
        if dbhh is not None:
            DG += dbhh
        S = x.new_empty(T, B, m, H)
        prev = None if dh0 is None else dh0.permute(1, 0, 2).contiguous()  # (B, m, H)
        cprev = None if dc0 is None else dc0.permute(1, 0, 2).contiguous()
        k = self.kind
        for t in range(T):
            o = S[t]
            if k == "gru":
                dg, di = DG[t], DI[t]
                if prev is not None:
                    dg.view(B * m, GH).addmm_(prev.reshape(B * m, H), Whh.T)
                drz = di[..., : 2 * H]
                drz.add_(dg[..., : 2 * H]).mul_(st["dRZ"][t][:, None])
                dn = di[..., 2 * H :]
                dn.addcmul_(drz[..., :H], st["GN"][t][:, None]).addcmul_(st["R"][t][:, None], dg[..., 2 * H :]).mul_(st["dN"][t][:, None])
                torch.mul(dn, st["OMZ"][t][:, None], out=o)
                o.addcmul_(drz[..., H:], st["HMN"][t][:, None])
                if prev is not None:
                    o.addcmul_(st["Z"][t][:, None], prev)
            else:
                da = DI[t]
                if prev is not None:
                    da.view(B * m, GH).addmm_(prev.reshape(B * m, H), Whh.T)
                if k == "lstm":
                    da.mul_(st["dA"][t][:, None])
                    di_, df, dg_, do = da[..., :H], da[..., H : 2 * H], da[..., 2 * H : 3 * H], da[..., 3 * H :]
                    dc = df * st["Cprev"][t][:, None]
                    dc.addcmul_(di_, st["G"][t][:, None]).addcmul_(dg_, st["I"][t][:, None])
                    if cprev is not None:
                        dc.addcmul_(cprev, st["F"][t][:, None])
                    torch.mul(do, st["TC"][t][:, None], out=o)
                    o.addcmul_(dc, st["OdTC"][t][:, None])
                    cprev = dc
                else:
                    torch.mul(da, st["D"][t][:, None], out=o)
            prev = o
        Yt = S.permute(2, 0, 1, 3)  # (m, T, B, H)
        if k == "lstm":
            assert cprev is not None
            return Yt, cprev.permute(1, 0, 2)
        return Yt, x.new_zeros(m, 0)

    # -- adjoint -------------------------------------------------------------------------------

    def adjoint(
        self, inputs: Sequence[Opt], state: Any, cotangents: Sequence[Opt], needs: Sequence[bool], m: int
    ) -> tuple[torch.Tensor | None, ...]:
        x, h0, c0, Wih, Whh, bih, bhh = inputs
        gY, gc = cotangents
        assert x is not None and Wih is not None and Whh is not None
        T, B, I = x.shape
        H = Whh.shape[1]
        GH = self.gates * H
        st = state
        k = self.kind
        # a copy, never a view of gY (with m = 1 a permuted tensor can be contiguous already):
        # the carries are added into it in place
        V = x.new_zeros(T, B, m, H) if gY is None else gY.permute(1, 2, 0, 3).clone(memory_format=torch.contiguous_format)
        GI = x.new_empty(T, B, m, GH)  # adjoints of the input pre-activations W_ih x + b_ih
        GG = x.new_empty(T, B, m, GH) if k == "gru" else GI  # of W_hh h + b_hh (the same but for the GRU)
        carry: torch.Tensor | None = None
        ccarry = None if (k != "lstm" or gc is None or gc.numel() == 0) else gc.permute(1, 0, 2).contiguous()
        need_h0 = bool(needs[1]) and h0 is not None
        for t in range(T - 1, -1, -1):
            gh = V[t]
            if carry is not None:
                gh.add_(carry)
            gi = GI[t]
            if k == "gru":
                gg = GG[t]
                an = torch.mul(gh, st["CN"][t][:, None], out=gi[..., 2 * H :])
                torch.mul(gh, st["CZ"][t][:, None], out=gi[..., H : 2 * H])
                torch.mul(an, st["CR"][t][:, None], out=gi[..., :H])
                gg[..., : 2 * H].copy_(gi[..., : 2 * H])
                torch.mul(an, st["R"][t][:, None], out=gg[..., 2 * H :])
                if t > 0 or need_h0:
                    carry = (gg.view(B * m, GH) @ Whh).view(B, m, H).addcmul_(gh, st["Z"][t][:, None])
            elif k == "lstm":
                gcell = gh * st["OdTC"][t][:, None]
                if ccarry is not None:
                    gcell.add_(ccarry)
                torch.mul(gh, st["TC"][t][:, None], out=gi[..., 3 * H :])
                torch.mul(gcell, st["G"][t][:, None], out=gi[..., :H])
                torch.mul(gcell, st["Cprev"][t][:, None], out=gi[..., H : 2 * H])
                torch.mul(gcell, st["I"][t][:, None], out=gi[..., 2 * H : 3 * H])
                gi.mul_(st["dA"][t][:, None])
                ccarry = gcell * st["F"][t][:, None]
                if t > 0 or need_h0:
                    carry = (gi.view(B * m, GH) @ Whh).view(B, m, H)
            else:
                torch.mul(gh, st["D"][t][:, None], out=gi[..., :])
                if t > 0 or need_h0:
                    carry = (gi.view(B * m, GH) @ Whh).view(B, m, H)
        GI2, GG2 = GI.view(T * B, m * GH), GG.view(T * B, m * GH)
        gx = (GI.view(T * B * m, GH) @ Wih).view(T, B, m, I).permute(2, 0, 1, 3) if needs[0] else None
        gh0 = carry.permute(1, 0, 2) if need_h0 and carry is not None else None
        gc0 = ccarry.permute(1, 0, 2) if k == "lstm" and c0 is not None and needs[2] and ccarry is not None else None
        gWih = (GI2.T @ x.reshape(T * B, I)).view(m, GH, I) if needs[3] else None
        gWhh = (GG2.T @ st["Hprev"].reshape(T * B, H)).view(m, GH, H) if needs[4] else None
        gbih = GI2.sum(0).view(m, GH) if bih is not None and needs[5] else None
        gbhh = GG2.sum(0).view(m, GH) if bhh is not None and needs[6] else None
        return gx, gh0, gc0, gWih, gWhh, gbih, gbhh


_OPS = {k: RecurrenceOp(k) for k in ("rnn_tanh", "rnn_relu", "gru", "lstm")}


def _kind(module: nn.Module) -> str:
    if isinstance(module, (nn.GRU, nn.GRUCell)):
        return "gru"
    if isinstance(module, (nn.LSTM, nn.LSTMCell)):
        return "lstm"
    return "rnn_relu" if getattr(module, "nonlinearity", "tanh") == "relu" else "rnn_tanh"


def supports_rnn(module: nn.Module) -> bool:
    return not getattr(module, "proj_size", 0)


def rnn_forward(module: nn.RNNBase, original: Any, input: Any, hx: Any = None) -> Any:
    """``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` forward as single-layer recurrences (the rule)."""
    if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3):  # PackedSequence, ...
        return original(input, hx)
    k = _kind(module)
    unbatched = input.dim() == 2
    x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if module.batch_first else input)
    L, dirs = module.num_layers, 2 if module.bidirectional else 1
    h0s: list[Opt] = [None] * (L * dirs)
    c0s: list[Opt] = [None] * (L * dirs)
    if hx is not None:
        h_, c_ = hx if k == "lstm" else (hx, None)
        if unbatched:
            h_ = h_.unsqueeze(1)
            c_ = None if c_ is None else c_.unsqueeze(1)
        h0s = list(h_.unbind(0))
        if c_ is not None:
            c0s = list(c_.unbind(0))
    op = _OPS[k]
    hn, cn = [], []
    layer_in = x
    for layer in range(L):
        outs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w = [getattr(module, f"{n}{sfx}") if module.bias or n.startswith("weight") else None for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            xin = layer_in if d == 0 else layer_in.flip(0)
            i = layer * dirs + d
            Y, cT = op(xin, h0s[i], c0s[i] if k == "lstm" else None, *w)
            hn.append(Y[-1])
            cn.append(cT)
            outs.append(Y if d == 0 else Y.flip(0))
        layer_in = torch.cat(outs, -1) if dirs == 2 else outs[0]
        if module.training and module.dropout > 0 and layer < L - 1:
            layer_in = torch.nn.functional.dropout(layer_in, module.dropout, True)
    out = layer_in
    h_n = torch.stack(hn)
    c_n = torch.stack(cn) if k == "lstm" else None
    if unbatched:
        out, h_n = out.squeeze(1), h_n.squeeze(1)
        c_n = None if c_n is None else c_n.squeeze(1)
    elif module.batch_first:
        out = out.transpose(0, 1)
    return (out, (h_n, c_n)) if k == "lstm" else (out, h_n)


def cell_forward(module: nn.RNNCellBase, original: Any, input: Any, hx: Any = None) -> Any:
    """``nn.RNNCell`` / ``nn.GRUCell`` / ``nn.LSTMCell``: one step of the recurrence (the rule)."""
    if not isinstance(input, torch.Tensor) or input.dim() not in (1, 2):
        return original(input, hx)
    k = _kind(module)
    unbatched = input.dim() == 1
    x = (input.unsqueeze(0) if unbatched else input)[None]  # (1, B, I)
    h0 = c0 = None
    if hx is not None:
        h0, c0 = hx if k == "lstm" else (hx, None)
        if unbatched:
            h0 = h0.unsqueeze(0)
            c0 = None if c0 is None else c0.unsqueeze(0)
    w = [module.weight_ih, module.weight_hh, module.bias_ih if module.bias else None, module.bias_hh if module.bias else None]
    Y, cT = _OPS[k](x, h0, c0 if k == "lstm" else None, *w)
    h = Y[0]
    if unbatched:
        h = h.squeeze(0)
        cT = cT.squeeze(0) if k == "lstm" else cT
    return (h, cT) if k == "lstm" else h
