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

from ...core.memory import scratch
from .core import BatchedOp

__all__ = ["RecurrenceOp", "rnn_forward", "cell_forward"]

Opt = torch.Tensor | None


def _per_step(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gate values ``(T, B, k)`` as ``(T, B, 1, k)``: step t's slice broadcasts over the probe axis
    of a ``(B, m, k)`` block without a view op per use (``Hprev`` stays ``(T, B, H)``)."""
    return {k: v if k == "Hprev" else v.unsqueeze(2) for k, v in state.items()}


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
            return (Y, x.new_empty(0)), _per_step(st)
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
            return (Y, c), _per_step(st)
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
        return (Y, x.new_empty(0)), _per_step(dict(Hprev=Hprev, D=D))

    # -- tangent -------------------------------------------------------------------------------

    def tangent(self, inputs: Sequence[Opt], state: Any, tangents: Sequence[Opt], m: int) -> tuple[torch.Tensor, ...]:
        x, h0, c0, Wih, Whh, bih, bhh = inputs
        dx, dh0, dc0, dWih, dWhh, dbih, dbhh = tangents
        assert x is not None and Wih is not None and Whh is not None
        T, B, I = x.shape
        H = Whh.shape[1]
        GH = self.gates * H
        st = state
        DI, DGn = self._preactivation_tangents(x, st["Hprev"], Wih, tangents, m)
        S = x.new_empty(T, B, m, H)
        prev = None if dh0 is None else dh0.permute(1, 0, 2).contiguous()  # (B, m, H)
        cprev = None if dc0 is None else dc0.permute(1, 0, 2).contiguous()
        k = self.kind
        for t in range(T):
            o = S[t]
            if k == "gru":
                assert DGn is not None
                di, dgn = DI[t], DGn[t]
                drz = di[..., : 2 * H]
                if prev is not None:
                    p2 = prev.reshape(B * m, H)
                    drz.view(B * m, 2 * H).addmm_(p2, Whh[: 2 * H].T)  # r, z: input and hidden terms add
                    dgn.view(B * m, H).addmm_(p2, Whh[2 * H :].T)  # n: the hidden term, scaled by r below
                drz.mul_(st["dRZ"][t])
                dn = di[..., 2 * H :]
                dn.addcmul_(drz[..., :H], st["GN"][t]).addcmul_(st["R"][t], dgn).mul_(st["dN"][t])
                torch.mul(dn, st["OMZ"][t], out=o)
                o.addcmul_(drz[..., H:], st["HMN"][t])
                if prev is not None:
                    o.addcmul_(st["Z"][t], prev)
            else:
                da = DI[t]
                if prev is not None:
                    da.view(B * m, GH).addmm_(prev.reshape(B * m, H), Whh.T)
                if k == "lstm":
                    da.mul_(st["dA"][t])
                    di_, df, dg_, do = da[..., :H], da[..., H : 2 * H], da[..., 2 * H : 3 * H], da[..., 3 * H :]
                    dc = df * st["Cprev"][t]
                    dc.addcmul_(di_, st["G"][t]).addcmul_(dg_, st["I"][t])
                    if cprev is not None:
                        dc.addcmul_(cprev, st["F"][t])
                    torch.mul(do, st["TC"][t], out=o)
                    o.addcmul_(dc, st["OdTC"][t])
                    cprev = dc
                else:
                    torch.mul(da, st["D"][t], out=o)
            prev = o
        Yt = S.permute(2, 0, 1, 3)  # (m, T, B, H)
        if k == "lstm":
            assert cprev is not None
            return Yt, cprev.permute(1, 0, 2)
        return Yt, x.new_zeros(m, 0)

    def _preactivation_tangents(
        self, x: torch.Tensor, Hprev: torch.Tensor, Wih: torch.Tensor, tangents: Sequence[Opt], m: int
    ) -> tuple[torch.Tensor, Opt]:
        """Tangents of every step's pre-activations from the parameters and the input, ``(T, B, m, G·H)``.

        The parameter terms of all T·B steps and m probes are one GEMM ``[x, h_prev, 1] · [dW_ih;
        dW_hh; db]`` written straight into the block (one K = I + H + 1 product instead of two thin
        ones into a zeroed block).  The GRU's candidate gate keeps its hidden term ``W_hn h + b_hn``
        apart (r multiplies it): returned as a second block ``(T, B, m, H)``; None otherwise."""
        dx, _, _, dWih, dWhh, dbih, dbhh = tangents
        T, B, I = x.shape
        H = Hprev.shape[-1]
        GH = self.gates * H
        gru = self.kind == "gru"
        split = 2 * H if gru else GH  # columns of the hidden terms that add to the input terms

        def cols(w: torch.Tensor, width: int) -> torch.Tensor:  # (m, width, k) -> (k, m·width)
            return w.permute(2, 0, 1).reshape(w.shape[-1], m * width)

        def hidden_part(w: torch.Tensor) -> torch.Tensor:  # W_hh's (or b_hh's) rows that add to the input terms
            if not gru:
                return w
            return torch.cat([w[:, :split], w.new_zeros(m, GH - split, *w.shape[2:])], 1)

        feats, weights = [], []
        if dWih is not None:
            feats.append(x.reshape(T * B, I))
            weights.append(cols(dWih, GH))
        if dWhh is not None:
            feats.append(Hprev.reshape(T * B, H))
            weights.append(cols(hidden_part(dWhh), GH))
        bias = [b for b in (dbih, None if dbhh is None else hidden_part(dbhh)) if b is not None]
        if bias:
            feats.append(x.new_ones(T * B, 1))
            weights.append(sum(bias[1:], bias[0]).reshape(1, m * GH))  # type: ignore[arg-type]
        DI = scratch("rnn.DI", (T, B, m, GH), x)
        if feats:
            torch.mm(torch.cat(feats, 1), torch.cat(weights, 0), out=DI.view(T * B, m * GH))
        else:
            DI.zero_()
        if dx is not None:
            # (m, T, B, I) → (T, B, m, I) rows (a view when dx is a lower layer's tangent), added by one GEMM
            DI.view(T * B * m, GH).addmm_(dx.permute(1, 2, 0, 3).reshape(T * B * m, I), Wih.T)
        DGn = None
        if gru:
            hf, hw = [], []
            if dWhh is not None:
                hf.append(Hprev.reshape(T * B, H))
                hw.append(cols(dWhh[:, split:], H))
            if dbhh is not None:
                hf.append(x.new_ones(T * B, 1))
                hw.append(dbhh[:, split:].reshape(1, m * H))
            DGn = scratch("rnn.DGn", (T, B, m, H), x)
            if hf:
                torch.mm(torch.cat(hf, 1), torch.cat(hw, 0), out=DGn.view(T * B, m * H))
            else:
                DGn.zero_()
        return DI, DGn

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
        # gY read through a strided view, never written: each step's carry is a fresh GEMM output,
        # and the step's cotangent is added into it
        V = None if gY is None else gY.permute(1, 2, 0, 3)
        GI = scratch("rnn.GI", (T, B, m, GH), x)  # adjoints of the input pre-activations W_ih x + b_ih
        # those of W_hh h + b_hh are GI's too, but for the GRU's candidate gate (r ⊙ (…)): kept apart
        GGn = scratch("rnn.GGn", (T, B, m, H), x) if k == "gru" else None
        carry: torch.Tensor | None = None
        ccarry = None if (k != "lstm" or gc is None or gc.numel() == 0) else gc.permute(1, 0, 2).contiguous()
        need_h0 = bool(needs[1]) and h0 is not None
        for t in range(T - 1, -1, -1):
            if carry is None:
                gh = x.new_zeros(B, m, H) if V is None else V[t]
            else:
                gh = carry if V is None else carry.add_(V[t])
            gi = GI[t]
            if k == "gru":
                assert GGn is not None
                an = torch.mul(gh, st["CN"][t], out=gi[..., 2 * H :])
                torch.mul(gh, st["CZ"][t], out=gi[..., H : 2 * H])
                torch.mul(an, st["CR"][t], out=gi[..., :H])
                ggn = torch.mul(an, st["R"][t], out=GGn[t])
                if t > 0 or need_h0:
                    # two GEMMs on strided views, so no step copies GI's update gates into a second block
                    carry = (gi[..., : 2 * H].view(B * m, 2 * H) @ Whh[: 2 * H]).addmm_(ggn.view(B * m, H), Whh[2 * H :])
                    carry = carry.view(B, m, H).addcmul_(gh, st["Z"][t])
            elif k == "lstm":
                gcell = gh * st["OdTC"][t]
                if ccarry is not None:
                    gcell.add_(ccarry)
                torch.mul(gh, st["TC"][t], out=gi[..., 3 * H :])
                torch.mul(gcell, st["G"][t], out=gi[..., :H])
                torch.mul(gcell, st["Cprev"][t], out=gi[..., H : 2 * H])
                torch.mul(gcell, st["I"][t], out=gi[..., 2 * H : 3 * H])
                gi.mul_(st["dA"][t])
                ccarry = gcell * st["F"][t]
                if t > 0 or need_h0:
                    carry = (gi.view(B * m, GH) @ Whh).view(B, m, H)
            else:
                torch.mul(gh, st["D"][t], out=gi[..., :])
                if t > 0 or need_h0:
                    carry = (gi.view(B * m, GH) @ Whh).view(B, m, H)
        gx = (GI.view(T * B * m, GH) @ Wih).view(T, B, m, I).permute(2, 0, 1, 3) if needs[0] else None
        gh0 = carry.permute(1, 0, 2) if need_h0 and carry is not None else None
        gc0 = ccarry.permute(1, 0, 2) if k == "lstm" and c0 is not None and needs[2] and ccarry is not None else None
        wanted = (bool(needs[3]), bool(needs[4]), bool(needs[5]) and bih is not None, bool(needs[6]) and bhh is not None)
        return (gx, gh0, gc0, *self._parameter_adjoints(x, st["Hprev"], GI, GGn, wanted, m))

    def _parameter_adjoints(
        self, x: torch.Tensor, Hprev: torch.Tensor, GI: torch.Tensor, GGn: Opt, wanted: tuple[bool, bool, bool, bool], m: int
    ) -> tuple[Opt, Opt, Opt, Opt]:
        """Every probe's weight and bias gradients from the stored pre-activation adjoints.

        One GEMM ``[x, h_prev, 1]ᵀ · GI`` over all T·B steps gives ``W_ih``'s, ``W_hh``'s and the
        biases' gradients at once (GI is read once), in the orientation whose output is wide:
        ``GIᵀ · x`` with its few input columns ran 4× slower.  The GRU's candidate gate adds one
        GEMM ``[h_prev, 1]ᵀ · GG_n``.  ``wanted`` says which of ``W_ih, W_hh, b_ih, b_hh`` are
        wanted (False for an absent bias); gradients come back as strided views ``(m, G·H, ·)``."""
        T, B, I = x.shape
        H, GH = Hprev.shape[-1], GI.shape[-1]
        w_ih, w_hh, b_ih, b_hh = wanted
        ones = x.new_ones(T * B, 1)
        feats = [(x.reshape(T * B, I), w_ih), (Hprev.reshape(T * B, H), w_hh), (ones, b_ih or b_hh)]
        A = (torch.cat([f for f, w in feats if w], 1).T @ GI.view(T * B, m * GH)).view(-1, m, GH)
        gWih = A[:I].permute(1, 2, 0) if w_ih else None
        gWhh = A[I * w_ih : I * w_ih + H].permute(1, 2, 0) if w_hh else None
        gb = A[-1] if b_ih or b_hh else None
        gbhh = gb
        if GGn is not None and (w_hh or b_hh):  # the GRU: W_hn h + b_hn sits inside r ⊙ (…)
            An = (torch.cat([f for f, w in feats[1:] if w], 1).T @ GGn.view(T * B, m * H)).view(-1, m, H)
            if gWhh is not None:
                gWhh = torch.cat([gWhh[:, : 2 * H], An[:H].permute(1, 2, 0)], 1)
            if b_hh and gb is not None:
                gbhh = torch.cat([gb[:, : 2 * H], An[-1]], 1)
        gbih = gb if b_ih else None
        if not b_hh:
            gbhh = None
        elif gb is not None and gbhh is gb and b_ih:
            gbhh = gb.clone()  # two inputs, two tensors
        return gWih, gWhh, gbih, gbhh


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
