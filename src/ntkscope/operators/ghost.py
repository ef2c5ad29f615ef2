"""Ghost norms: ``‖Jᵀv‖²`` without forming the weight gradients of linear layers.

A linear layer ``y = x Wᵀ + b`` whose calls see the input rows ``X`` (``N × in``, every call of
the layer stacked) contributes to ``Jᵀv`` the gradients ``G = Δᵀ X`` and ``g = Δᵀ 1``, with ``Δ``
(``N × out``) the cotangent of ``⟨v, z⟩`` at ``y``.  Their inner products between two probes are

    ⟨G_i, G_j⟩ + ⟨g_i, g_j⟩ = ⟨Δ_i, A Δ_j⟩,    A = X Xᵀ + 1 1ᵀ   (N × N, once per pass),

so the squared norm costs ``N² · out`` multiply-adds per probe instead of ``N · in · out``, and
the Gram statistics can keep ``A^½ Δ`` (``N · out`` numbers) instead of the gradients
(``(in + 1) · out``).  It pays where the layer sees fewer rows than it has inputs, ``N ≤ in``:
the wide layers and small batches of NTK analysis (the trick is Goodfellow's, "Efficient
per-example gradient computations", arXiv 1510.01799, the "ghost clipping" of differentially
private training, Li et al., arXiv 2110.05679).

Only squared norms and Gram rows are made this way — the one-sided trace ``E‖Jᵀv‖² = tr K`` and
the U-statistics of ``‖K‖_F²`` and alignment — never the vectors ``Jᵀv`` themselves (Hutchinson,
Hutch++ and per-block kernels need those).  The cotangents ``Δ`` are read off zero "taps" added
to each layer's output, which the pass differentiates in place of the layer's parameters; every
other parameter is differentiated as usual.  A layer is ghosted only where that is exact: it is
an ``nn.Linear`` (or a subclass keeping its forward) or Hugging Face's ``Conv1D``, both its weight
and its bias (if any) are analysed, no other module shares its parameters, and no code outside
its forward reads them (checked on one forward with a :class:`~torch.overrides.TorchFunctionMode`;
``nn.MultiheadAttention``'s ``out_proj``, whose weight the attention reads directly, is never
ghosted).  The evaluator checks each kind of result once against the generic path
(two probes) before trusting it.

Per-example blocks (:meth:`GhostNorms.find_blocks`, :meth:`GhostNorms.block_sqnorms`): where
every analysed parameter is ghosted and each row's cotangent comes from one example, the
example's share of the gradient has the ghost norm ``⟨Δ_b Δ_bᵀ, A_b⟩`` over its own rows, so
one pass gives ``Σ_b ‖J_bᵀv_b‖²`` — the one-sided trace without cross-example terms, and
exact in ``D / G`` passes (:meth:`ntkscope.NTK.trace_blocks`).  There every linear layer is
ghosted, ``N > in`` too: the blocks cost ``T² · out`` per example (``T`` rows each), never ``A``;
``nn.LayerNorm``/``nn.RMSNorm`` with their affine parameters are tapped as well (their
per-example gradients ``Σ_{r∈b} Δ_r ⊙ x̂_r`` and ``Σ_{r∈b} Δ_r`` are formed directly from the
normalised rows ``x̂``), and ``nn.Embedding`` (an example's gradient rows are its cotangents
summed per token: ``N · d`` per probe).  An embedding called once and broadcast over
the batch (position embeddings of ``arange(L)``) has rows fed by every example, and is refused
by the probes.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vjp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..core.linalg import sqnorms
from .rules import (
    _ruled_class,  # noqa: PLC2701 — the same class swap the rules use
    shared_copy,
)

__all__ = ["GhostNorms", "GhostPass", "build_ghost"]

#: the calls of one forward, while one is being recorded or evaluated
_SESSION: contextvars.ContextVar[_Session | None] = contextvars.ContextVar("ntkscope_ghost", default=None)


@dataclass
class _Session:
    taps: Sequence[torch.Tensor] = ()
    inputs: list[torch.Tensor] = field(default_factory=list)  # each call's input rows
    calls: list[tuple[str, torch.Size, int]] = field(default_factory=list)  # (layer, output shape, rows)
    inside: bool = False  # within a ghosted forward (reads of the parameters there are its own)


def _ghost_forward(module: nn.Module, original: Callable[..., Any], input: Any) -> Any:
    s = _SESSION.get()
    if s is None or not isinstance(input, torch.Tensor) or input.dim() == 0:
        return original(input)
    s.inside = True
    try:
        y = _primal(module, input)
    finally:
        s.inside = False
    i = len(s.calls)
    if isinstance(module, _NORMS):  # rows of the normalised input x̂, y = x̂ ⊙ w (+ b) over the trailing `width` numbers
        width = math.prod(module.normalized_shape)  # type: ignore[arg-type]
        with torch.no_grad():
            rows = _primal(module, input.detach(), affine=False).reshape(-1, width)
    elif isinstance(module, nn.Embedding):  # each row's token id
        width, rows = y.shape[-1], input.detach().reshape(-1, 1)
    else:
        width, rows = y.shape[-1], input.detach().reshape(-1, input.shape[-1])
    s.calls.append((module._ntkscope_ghost, y.shape, y.numel() // width))  # type: ignore[arg-type]
    s.inputs.append(rows)
    if s.taps:
        if i >= len(s.taps) or s.taps[i].shape != y.shape:
            raise RuntimeError("the ghosted layers were called differently from the recorded forward")
        y = y + s.taps[i]
    return y


class _OutsideReads(TorchFunctionMode):
    """Which watched parameters a forward reads outside their own ghosted layer."""

    def __init__(self, session: _Session, watched: dict[int, str]) -> None:
        super().__init__()
        self.session, self.watched = session, watched
        self.found: set[str] = set()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not self.session.inside:
            for a in tree_flatten((args, kwargs))[0]:
                if isinstance(a, torch.Tensor) and id(a) in self.watched:
                    self.found.add(self.watched[id(a)])
        return func(*args, **kwargs)


@contextlib.contextmanager
def _session(s: _Session) -> Iterator[_Session]:
    token = _SESSION.set(s)
    try:
        yield s
    finally:
        _SESSION.reset(token)


@dataclass
class _Layer:
    name: str
    calls: list[int]  # indices of its calls in the forward's order
    out: int  # numbers per row of its output (and of its taps)
    bias: bool
    kind: str = "linear"  # or, for per-example blocks only: "norm" (LayerNorm, RMSNorm), "embedding"


class GhostNorms:
    """``‖Jᵀv‖²`` for blocks of probe rows, with the ghosted layers' norms as ``⟨Δ, AΔ⟩``.

    ``call(net, values)`` is the flat state of ``net`` under the parameter/buffer ``values``;
    ``names``/``primals`` the analysed parameters, ``base`` the values fixed around them.
    """

    def __init__(
        self,
        net: nn.Module,
        call: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor],
        names: Sequence[str],
        primals: Sequence[torch.Tensor],
        base: dict[str, torch.Tensor],
        layers: dict[str, tuple[str, str | None]],
        calls: list[tuple[str, torch.Size, int]],
        kinds: dict[str, str] | None = None,
    ) -> None:
        kinds = kinds or {}
        self.net, self.call = net, call
        self.names, self.primals, self.base = list(names), tuple(primals), base
        ghosted = {p for w, b in layers.values() for p in (w, b) if p is not None}
        self.free = [i for i, n in enumerate(self.names) if n not in ghosted]  # differentiated as usual
        self.tap_shapes = [shape for _, shape, _ in calls]
        self.layers: list[_Layer] = []
        for name, (_w, b) in layers.items():
            idx = [i for i, c in enumerate(calls) if c[0] == name]
            shape, rows = calls[idx[0]][1], calls[idx[0]][2]
            self.layers.append(_Layer(name, idx, math.prod(shape) // rows, b is not None, kinds.get(name, "linear")))
        self.names_ghosted = [layer.name for layer in self.layers]
        # one probe's result numbers: the free parameters' gradients and the layers' Δ
        self.probe_numel = sum(self.primals[i].numel() for i in self.free) + sum(math.prod(s) for s in self.tap_shapes)
        self.chunk_size: int | None = None  # probes per chunk; None: the evaluator's
        self.blocks: list[_RowBlocks] | None = None  # per layer, once find_blocks has succeeded

    def pullback(self) -> GhostPass:
        """One forward: the pullback to (free parameters, taps) and each layer's ``A``."""
        free = [self.primals[i] for i in self.free]
        dtype, device = self.primals[0].dtype, self.primals[0].device
        taps = [torch.zeros(s, dtype=dtype, device=device) for s in self.tap_shapes]
        inputs: list[torch.Tensor] = []

        def fn(*diff: torch.Tensor) -> torch.Tensor:
            values = dict(self.base)
            values.update(zip(self.names, self.primals))
            values.update(zip((self.names[i] for i in self.free), diff[: len(free)]))
            with _session(_Session(taps=diff[len(free) :])) as s:
                z = self.call(self.net, values).reshape(-1)
            inputs.extend(s.inputs)
            return z

        pull = vjp(fn, *free, *taps)[1]
        acc = _accumulation_dtype(dtype)
        rows = [torch.cat([inputs[i] for i in layer.calls]) for layer in self.layers]
        rows = [X if layer.kind == "embedding" else X.to(acc) for X, layer in zip(rows, self.layers)]  # token ids stay integers
        return GhostPass(pull, rows, [layer.bias for layer in self.layers])

    def _deltas(self, p: GhostPass, rows: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A chunk's free-parameter gradients ``(m, ·)`` and each layer's ``Δ`` ``(m, N, out)``."""
        m = rows.shape[0]
        parts = vmap(p.pull)(rows)
        k = len(self.free)
        deltas = []
        acc = _accumulation_dtype(rows.dtype)
        for layer in self.layers:
            blocks = [parts[k + i].reshape(m, -1, layer.out) for i in layer.calls]
            deltas.append((blocks[0] if len(blocks) == 1 else torch.cat(blocks, 1)).to(acc))
        return [g.reshape(m, -1) for g in parts[:k]], deltas

    def sqnorms(self, p: GhostPass, rows: torch.Tensor) -> torch.Tensor:
        """``‖Jᵀv_i‖²`` (float64) of a chunk of probe rows ``(m, D)``."""
        m = rows.shape[0]
        free, deltas = self._deltas(p, rows)
        total = sqnorms(free) if free else torch.zeros(m, dtype=torch.float64, device=rows.device)
        for delta, A in zip(deltas, p.grams):
            # Σ (Δ Δᵀ) ⊙ A: one batched Gram and one matrix-vector product, 2.4× faster than
            # ⟨Δ, AΔ⟩ (a broadcast bmm and a separate multiply-and-sum over the larger block)
            total += (torch.bmm(delta, delta.transpose(1, 2)).reshape(m, -1) @ A.reshape(-1)).to(torch.float64)
        return total

    def gram_rows(self, p: GhostPass, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``e_i = [free gradients, A^½ Δ_i per layer]``, with ``e_i · e_j = (Jᵀv_i)·(Jᵀv_j)``
        (as ``⟨G_i, G_j⟩ + ⟨g_i, g_j⟩ = ⟨Δ_i, A Δ_j⟩``): ``N · out`` numbers per layer instead of
        ``(in + 1) · out``.  The symmetric root is unique, so every rank of a distributed run
        embeds its probes alike."""
        free, deltas = self._deltas(p, rows)
        dtype = rows.dtype
        return torch.cat([*(g.to(dtype) for g in free), *(torch.matmul(S, d).reshape(rows.shape[0], -1).to(dtype) for d, S in zip(deltas, p.roots()))], 1)

    # -- per-example blocks ---------------------------------------------------------------------

    def find_blocks(self, p: GhostPass, blocks: torch.Tensor, G: int, step: int = 8) -> bool:
        """Whether every ghosted layer's rows each take their cotangent from one block of the
        state only (``blocks``: each state entry's block, ``0 … G−1``), and which; kept for
        :meth:`block_sqnorms`.  Only where every analysed parameter is ghosted (``free`` empty).

        With ``L`` bits per block index, ``2L`` probes: Gaussian values on the entries whose
        block has bit ``j`` equal to ``s``.  A row fed by two blocks differs from them in some
        bit, so it is nonzero under both halves of that bit and the kernel is refused; a row fed
        by one block is nonzero exactly under the halves holding it, which spell its index.  A
        row that is zero under every probe carries no cotangent at all (the check is exact: a
        block's cotangent does not leak into another's rows, even by rounding, unless the model
        mixes examples — train-mode BatchNorm, attention over the batch).  The probes go
        ``step`` at a time.  Refused too where a block has more rows ``T`` than a layer has
        inputs: its ``T² · out`` per example would cost more than the weight gradient's
        ``T · in · out`` (long sequences through a narrow layer).

        The rows' blocks belong to the parameters they were found at (a row dead at one point can
        carry a cotangent at another): the caller finds them again when the parameters change."""
        self.blocks = None
        if self.free or G < 2:
            return False
        L = (G - 1).bit_length()
        dev = blocks.device
        gen = torch.Generator().manual_seed(0x6E746B)
        values = torch.randn(blocks.numel(), generator=gen, dtype=torch.float64).to(device=dev, dtype=self.primals[0].dtype)
        bits = (blocks[None, :] >> torch.arange(L, device=dev)[:, None]) & 1
        probes = torch.cat([values * (bits == 1), values * (bits == 0)])
        masks = [(delta != 0).any(-1) for delta in self._deltas(p, probes[:step])[1]]  # per layer (probes, N)
        for start in range(step, len(probes), step):
            masks = [torch.cat([a, (d != 0).any(-1)]) for a, d in zip(masks, self._deltas(p, probes[start : start + step])[1])]
        found = []
        for nonzero, X, layer in zip(masks, p.rows, self.layers):
            on, off = nonzero[:L], nonzero[L:]
            fed = on | off
            live = fed.any(0)
            if (on & off).any() or (fed != live[None]).any():
                return False
            block = (on.long() << torch.arange(L, device=dev)[:, None]).sum(0)
            if (block[live] >= G).any():
                return False
            rb = _RowBlocks.of(block, live, G)
            if layer.kind == "linear" and rb.order is not None and rb.order.shape[1] > X.shape[1]:
                return False
            found.append(rb)
        self.blocks = found
        return True

    def block_sqnorms(self, p: GhostPass, rows: torch.Tensor) -> torch.Tensor:
        """``Σ_b ‖J_bᵀv_b‖²`` (float64) of a chunk of probe rows, ``J_b`` the rows of J of block
        ``b``: each linear layer's ``Σ_b ⟨Δ_b Δ_bᵀ, A_b⟩`` over its blocks' rows
        (:meth:`find_blocks`), ``G · T² · out`` multiply-adds per probe for ``T`` rows per block
        (one row per block, an MLP: ``‖δ_r‖²`` per row); each norm's and embedding's per-example
        gradients formed directly, ``N · width`` per probe."""
        assert self.blocks is not None
        m = rows.shape[0]
        _, deltas = self._deltas(p, rows)
        if p._block_grams is None:  # this pass's inputs: the parameters may have moved since find_blocks
            p._block_grams = [
                rb.rows(X) if layer.kind == "norm" else rb.segments(X) if layer.kind == "embedding" else rb.grams(X, b)
                for rb, X, b, layer in zip(self.blocks, p.rows, p.bias, self.layers)
            ]
        total = torch.zeros(m, dtype=torch.float64, device=rows.device)
        for delta, rb, A, layer in zip(deltas, self.blocks, p._block_grams, self.layers):
            if layer.kind == "embedding":  # the examples' gradient rows: cotangents summed per (example, token)
                rows_b = delta.new_zeros(m, int(A.max()) + 1, delta.shape[-1]).index_add_(1, A, delta)
                total += torch.linalg.vector_norm(rows_b.reshape(m, -1), dim=1).square().to(torch.float64)
                continue
            if layer.kind == "norm":  # the example's gradients themselves: Σ_r Δ_r ⊙ x̂_r (weight) and Σ_r Δ_r (bias)
                d = rb.rows(delta, dim=1)
                w = (d * A).sum(2) if rb.order is not None else d * A  # (m, G, width); A: x̂ rows in block order
                total += torch.linalg.vector_norm(w.reshape(m, -1), dim=1).square().to(torch.float64)
                if layer.bias:
                    g = d.sum(2) if rb.order is not None else d
                    total += torch.linalg.vector_norm(g.reshape(m, -1), dim=1).square().to(torch.float64)
                continue
            if rb.order is None:  # one live row per block, in block order
                total += (torch.linalg.vector_norm(delta, dim=-1).square() @ A).to(torch.float64)
                continue
            d = rb.rows(delta, dim=1)  # (m, G, T, out); pads read a zero row
            T, out = d.shape[2], d.shape[3]
            if T == 1:
                total += (torch.linalg.vector_norm(d[:, :, 0], dim=-1).square() @ A.reshape(-1)).to(torch.float64)
            elif T <= out:  # the probes' Grams (m, G, T, T) are the smaller block
                total += (torch.matmul(d, d.transpose(-1, -2)).reshape(m, -1) @ A.reshape(-1)).to(torch.float64)
            else:  # ⟨Δ_b, A_b Δ_b⟩: no block larger than Δ
                total += (torch.matmul(A, d) * d).sum((1, 2, 3)).to(torch.float64)
        return total


@dataclass
class _RowBlocks:
    """One layer's rows grouped by the state block their cotangent comes from: ``order``
    (``G × T`` row indices, ``N`` padding to a zero row; None where the rows are the blocks,
    one each in order)."""

    order: torch.Tensor | None

    @staticmethod
    def of(block: torch.Tensor, live: torch.Tensor, G: int) -> _RowBlocks:
        """From each row's block (``live``: rows with a cotangent; the others are left out)."""
        N = block.shape[0]
        if N == G and bool(live.all()) and bool((block == torch.arange(G, device=block.device)).all()):
            return _RowBlocks(None)
        rows = torch.nonzero(live).squeeze(1)
        b = block[rows]
        counts = torch.bincount(b, minlength=G)
        T = max(1, int(counts.max()))
        sort = torch.argsort(b, stable=True)
        rows, b = rows[sort], b[sort]
        pos = torch.arange(len(rows), device=rows.device) - (torch.cumsum(counts, 0) - counts)[b]
        order = torch.full((G, T), N, dtype=torch.long, device=rows.device)
        order[b, pos] = rows
        return _RowBlocks(order)

    def rows(self, X: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """``X``'s rows (along ``dim``) in block order (``G × T`` there, pads zero; ``X`` itself
        where the rows are the blocks)."""
        if self.order is None:
            return X
        pad = X.new_zeros(*X.shape[:dim], 1, *X.shape[dim + 1 :])
        return torch.cat([X, pad], dim).index_select(dim, self.order.reshape(-1)).unflatten(dim, tuple(self.order.shape))

    def segments(self, ids: torch.Tensor) -> torch.Tensor:
        """An embedding's rows numbered by (example, token): rows of one example holding the same
        token share a number, so summing the cotangents per number gives every example's
        gradient rows (``ids``: the token ids, ``N × 1``)."""
        tok = ids[:, 0]
        N = tok.shape[0]
        block = torch.full((N + 1,), -1, dtype=torch.long, device=tok.device)
        if self.order is None:
            block[:N] = torch.arange(N, device=tok.device)
        else:
            block[self.order] = torch.arange(self.order.shape[0], device=tok.device)[:, None].expand_as(self.order)
        key = (block[:N] + 1) * (int(tok.max()) + 1) + tok  # rows without a cotangent (block -1) carry zeros
        return torch.unique(key, return_inverse=True)[1]

    def grams(self, X: torch.Tensor, bias: bool) -> torch.Tensor:
        """The diagonal blocks ``A_b = X_b X_bᵀ (+ 11ᵀ)`` of this pass's ``A`` (``G × T × T``, or
        ``G`` where the rows are the blocks), never the whole ``N × N`` ``A``."""
        if self.order is None:
            return X.square().sum(1) + (1 if bias else 0)
        N = X.shape[0]
        Xb = self.rows(X)  # (G, T, in); pads are zero rows
        A = Xb @ Xb.transpose(1, 2)
        if bias:
            real = (self.order < N).to(X.dtype)
            A += real[:, :, None] * real[:, None, :]
        return A


@dataclass
class GhostPass:
    """One forward's pullback (to the free parameters and the taps), each layer's input rows
    ``X`` and whether it has a bias; ``A = XXᵀ (+ 11ᵀ)`` per layer on first use (the per-example
    blocks need only its diagonal blocks)."""

    pull: Callable[..., tuple[torch.Tensor, ...]]
    rows: list[torch.Tensor]
    bias: list[bool]
    _grams: list[torch.Tensor] | None = None
    _roots: list[torch.Tensor] | None = None
    _block_grams: list[torch.Tensor] | None = None

    @property
    def grams(self) -> list[torch.Tensor]:
        if self._grams is None:
            self._grams = [X @ X.T + (1 if b else 0) for X, b in zip(self.rows, self.bias)]
        return self._grams

    def roots(self) -> list[torch.Tensor]:
        """``A^½`` per layer (float64 eigendecomposition, negative rounding clipped)."""
        if self._roots is None:
            self._roots = []
            for A in self.grams:
                lam, Q = torch.linalg.eigh(A.to(torch.float64))
                self._roots.append(((Q * lam.clamp(min=0).sqrt()) @ Q.T).to(A.dtype))
        return self._roots


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ghost Grams and cotangents are formed in: float32 at least."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _is_conv1d(m: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2 and its kin): a linear layer with the weight stored ``in × out``."""
    return any(c.__name__ == "Conv1D" and c.__module__ == "transformers.pytorch_utils" and type(m).forward is c.forward for c in type(m).__mro__)  # type: ignore[attr-defined]


def _is_embedding(m: nn.Module) -> bool:
    """``nn.Embedding`` as written, whose rows' gradients are the cotangents scattered by token
    (not renormalised by ``max_norm``, not scaled by the batch's token counts, not sparse; one
    with a ``padding_idx`` runs as :func:`ntkscope.operators.rules.analysis_copy` rewrites it, and
    stays out)."""
    return (
        isinstance(m, nn.Embedding)
        and type(m).forward is nn.Embedding.forward
        and m.max_norm is None
        and not m.scale_grad_by_freq
        and not m.sparse
        and m.padding_idx is None
    )


def _is_norm(m: nn.Module) -> bool:
    """``nn.LayerNorm`` or ``nn.RMSNorm`` with its element-wise affine parameters, as written."""
    return any(isinstance(m, c) and type(m).forward is c.forward for c in _NORMS) and bool(getattr(m, "elementwise_affine", False))


_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def _primal(module: nn.Module, x: torch.Tensor, affine: bool = True) -> torch.Tensor:
    if isinstance(module, nn.Embedding):
        return F.embedding(x, module.weight)
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, module.weight if affine else None, module.bias if affine else None, module.eps)
    if hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm):
        return F.rms_norm(x, module.normalized_shape, module.weight if affine else None, module.eps)
    if isinstance(module, nn.Linear):
        return F.linear(x, module.weight, module.bias)
    # Conv1D, exactly as it computes itself
    w, b = module.weight, module.bias
    assert isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor)
    return torch.addmm(b, x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], -1)


def _linear_layers(net: nn.Module) -> dict[str, nn.Module]:
    """Layers computing ``x Wᵀ + b`` as written: ``nn.Linear`` (or a subclass keeping its forward)
    and Hugging Face's ``Conv1D``."""
    return {
        n: m for n, m in net.named_modules() if (isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward) or (_is_conv1d(m) and m.bias is not None)
    }


def build_ghost(
    net: nn.Module,
    call: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    names: Sequence[str],
    primals: Sequence[torch.Tensor],
    base: dict[str, torch.Tensor],
    every: bool = False,
) -> GhostNorms | None:
    """A :class:`GhostNorms` for ``net``, or None where no layer is worth ghosting.

    One forward (no gradients) records each linear layer's calls and whether its parameters are
    read anywhere else; a layer is kept where ``N ≤ in`` (see the module docstring), or wherever
    it is exact with ``every`` (the per-example blocks of :meth:`GhostNorms.find_blocks`, which
    cost ``T ≤ N`` rows per example and need every parameter ghosted).
    """
    analysed = set(names)
    counts: dict[int, int] = {}
    for _, p in net.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    layers: dict[str, tuple[str, str | None]] = {}
    # per-example blocks only: norms and embeddings
    kinds = {n: "norm" if _is_norm(m) else "embedding" for n, m in net.named_modules() if every and (_is_norm(m) or _is_embedding(m))}
    for name, m in {**_linear_layers(net), **{n: net.get_submodule(n) for n in kinds}}.items():
        bias = getattr(m, "bias", None)
        w, b = f"{name}.weight" if name else "weight", (f"{name}.bias" if name else "bias") if bias is not None else None
        own = [m.weight] + ([bias] if bias is not None else [])
        if w in analysed and (b is None or b in analysed) and all(counts.get(id(p), 0) == 1 for p in own):
            layers[name] = (w, b)
    if not layers or (every and analysed - {p for w, b in layers.values() for p in (w, b)}):  # per-example blocks need them all
        return None
    try:
        clone = shared_copy(net)
    except Exception:  # something in the model cannot be copied
        return None
    for name, m in clone.named_modules():
        if name in layers:
            m.__class__ = _ruled_class(type(m), _ghost_forward)
            m._ntkscope_ghost = name  # type: ignore[assignment]
    values = dict(base)
    values.update(zip(names, primals))
    watched = {id(values[p]): layer for layer, ps in layers.items() for p in ps if p is not None}
    sess = _Session()
    reads = _OutsideReads(sess, watched)
    with torch.no_grad(), _session(sess), reads:
        call(clone, values)
    for layer in reads.found:
        layers.pop(layer, None)
    rows: dict[str, int] = {}
    ins: dict[str, int] = {}
    for (layer, _, n), x in zip(sess.calls, sess.inputs):
        rows[layer] = rows.get(layer, 0) + n
        ins[layer] = x.shape[-1]
    layers = {k: v for k, v in layers.items() if k in rows and (every or rows[k] <= ins[k])}
    if not layers:
        return None
    # layers dropped above still run their ghost forward: they must then read no taps
    for name, m in clone.named_modules():
        if getattr(m, "_ntkscope_ghost", None) is not None and name not in layers:
            m.__class__ = type(m).__mro__[1]
            del m._ntkscope_ghost
    calls = [c for c in sess.calls if c[0] in layers]
    return GhostNorms(clone, call, names, primals, base, layers, calls, {n: k for n, k in kinds.items() if n in layers})
