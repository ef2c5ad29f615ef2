"""NTK statistics as differentiable functions of the parameters: NTK terms in a training loss.

The metrics in :mod:`ntkscope.metrics` return numbers.  Here the same one-sided estimators are
built as *tensors in the autograd graph*, so ``loss.backward()`` (or ``torch.func.grad``) gives
their gradient with respect to the parameters.  A VJP computed with :func:`torch.func.vjp`
inside a function of the parameters is itself differentiable (torch.func composes with regular
autograd: the "create_graph" of a double backward), and likewise a :func:`torch.func.jvp`.

For a fixed probe block ``W = [w_1 … w_m]`` (drawn independently of θ) and ``a_i = J(θ)ᵀ w_i``
(VJP side, ``w_i ∈ R^D``) or ``a_i = J(θ) u_i`` (JVP side, ``u_i ∈ R^P``):

* trace: ``T̂ = (1/m) Σ_i ‖a_i‖²`` — ``E T̂ = tr K``.
* squared Frobenius norm: ``F̂ = mean_{i≠j} (a_i·a_j)²`` — a U-statistic, ``E F̂ = ‖K‖_F²``
  (``‖JᵀJ‖_F = ‖K‖_F`` on the JVP side).
* inner product of two NTKs over the same inputs (VJP side, shared probes):
  ``Î = mean_{i≠j} (a_i·a_j)(b_i·b_j)`` with ``b_i = J₂ᵀ w_i`` — ``E Î = tr(K₁K₂)``.
* alignment: ``Î / √(F̂₁ F̂₂)``.

**Bias of gradients.**  T̂, F̂ and Î are polynomials in θ-dependent quantities averaged over
θ-independent probes, so ``E ∇θ T̂ = ∇θ E T̂ = ∇ tr K`` (expectation and gradient commute for a
fixed probe distribution): their gradients are unbiased.  The alignment is a *ratio* of
estimates: it and its gradient are biased at finite m (delta-method bias ``O(1/m)``, shrinking
as the probe count grows).  For an unbiased alignment-type loss use the linear terms
(e.g. ``-Î / c`` with a constant c, or ``F̂ − 2Î`` = ‖K₁ − K₂‖_F² − ‖K₂‖_F² when K₂ is fixed).

Normalisation layers (``layer_norm``, ``batch_norm``, ``instance_norm``, ``rms_norm``) run as
elementary operations here: PyTorch's fused kernels have wrong second derivatives under
``torch.func`` (:mod:`ntkscope.operators.rules.norms`).

All functions take tensors and return 0-d tensors in the graph; nothing here calls ``.item()``
or detaches, so nothing is retained between training steps once the loss is back-propagated.

References: Hazelden, Nagireddy, Shea-Brown, "Fast generalized NTK statistics via trace
estimation" (v2 of arXiv 2511.10796) — NTK alignment as a distillation regulariser;
Hutchinson (1989) for the trace estimator; Hoeffding (1948) for U-statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vjp

from .core.probes import Probe, ProbeStream, parse_probe
from .operators.evaluators import jvp_rows, pullback_rows, unflatten_rows
from .operators.modules import analysis_module, check_no_dropout, select_output, split_inputs
from .operators.rules import math_attention
from .operators.rules.norms import elementary_norms

__all__ = [
    "draw_probes",
    "ntk_vectors",
    "function_vectors",
    "trace_estimate",
    "frobenius_sq_estimate",
    "inner_estimate",
    "alignment_estimate",
    "offdiag_mean",
]


def draw_probes(
    dim: int,
    num_probes: int,
    seed: int,
    *,
    kind: str | Probe = "rademacher",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    stream: int = 0,
) -> torch.Tensor:
    """A reproducible ``(dim, num_probes)`` probe block (the same streams as the metrics use).

    Draw a fresh block per training step (e.g. ``seed=step``) for stochastic-gradient training;
    keep one fixed block to optimise a fixed (deterministic) estimate.
    """
    probe = parse_probe(kind)
    if probe is Probe.ORTHOGONAL:
        raise ValueError("the U-statistics need independent probes; orthogonal probes are dependent")
    return ProbeStream(int(dim), probe, int(seed), stream, dtype, device).columns(0, int(num_probes))


def function_vectors(
    fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    probes: torch.Tensor,
    *,
    side: str = "vjp",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Rows ``a_i`` of a one-sided estimator for a function ``fn(params) -> state``, in the graph.

    ``side="vjp"``: probes ``(D, m)`` in state space, rows ``Jᵀw_i`` (``(m, P)``).
    ``side="jvp"``: probes ``(P, m)`` in parameter space (parameters concatenated in ``params``
    order), rows ``J u_i`` (``(m, D)``).  The result is differentiable with respect to the values
    of ``params`` (leaf tensors requiring grad, or ``torch.func.grad``'s inputs).  ``chunk_size``
    probes are vmapped at a time (the graph of every chunk is kept until the loss is used), with
    the chunk evaluation :class:`~ntkscope.NTK` uses (:func:`~ntkscope.operators.evaluators.pullback_rows`,
    :func:`~ntkscope.operators.evaluators.jvp_rows`).
    """
    if side not in ("vjp", "jvp"):
        raise ValueError(f"side must be 'vjp' or 'jvp', got {side!r}")
    names = list(params)
    if not names:
        raise ValueError("no parameters given")
    values = tuple(params[n] for n in names)

    def f(*ts: torch.Tensor) -> torch.Tensor:
        with elementary_norms():  # the fused norm kernels' second derivatives are wrong (rules.norms)
            return fn(dict(zip(names, ts))).reshape(-1)

    if probes.dim() != 2:
        raise ValueError(f"probes must be a (dim, m) block, got shape {tuple(probes.shape)}")
    m = probes.shape[1]
    chunk = chunk_size or m
    rows = probes.T.to(values[0].dtype)
    outs = []
    if side == "vjp":
        z, pullback = vjp(f, *values)[:2]
        if rows.shape[1] != z.numel():
            raise ValueError(f"VJP probes must have the state dimension D={z.numel()}, got {rows.shape[1]}")
        for s in range(0, m, chunk):
            outs.append(torch.cat(pullback_rows(pullback, rows[s : s + chunk]), 1))
    else:
        num_params = sum(v.numel() for v in values)
        if rows.shape[1] != num_params:
            raise ValueError(f"JVP probes must have the parameter dimension P={num_params}, got {rows.shape[1]}")
        shapes = [v.shape for v in values]
        for s in range(0, m, chunk):
            outs.append(jvp_rows(f, values, unflatten_rows(rows[s : s + chunk], shapes)))
    return torch.cat(outs, 0) if len(outs) > 1 else outs[0]


def ntk_vectors(
    model: nn.Module,
    inputs: Any,
    probes: torch.Tensor,
    *,
    side: str = "vjp",
    output: int | str | Callable[[Any], torch.Tensor] | None = None,
    params: Mapping[str, torch.Tensor] | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """:func:`function_vectors` for a model: ``a_i = J(θ)ᵀw_i`` (or ``J(θ)u_i``), differentiable.

    ``params`` defaults to the model's own trainable parameters (so ``loss.backward()`` fills
    their ``.grad``); pass a dict (e.g. ``torch.func.grad``'s argument) to differentiate with
    respect to other values.  Parameters not in ``params`` and buffers are the model's.
    ``output`` picks the state as in :class:`ntkscope.NTK`.  Dropout must be off (eval mode):
    the NTK of a random map is not defined.  Attention runs on the ``MATH`` SDPA backend (the
    fused kernels have no double backward), see :mod:`ntkscope.models.transformer`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_no_dropout(model)
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention) and m.training and m.dropout > 0:
            raise ValueError(
                f"attention dropout of {name!r} is active: call model.eval() first (the NTK of a random map is undefined)"
            )
    if params is None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    args, kwargs = split_inputs(inputs)
    net = analysis_module(model)  # sharing the Parameters (their .grad fills), never rebinding the model's

    def fn(values: dict[str, torch.Tensor]) -> torch.Tensor:
        # fused attention kernels have no double backward / forward AD: use the MATH backend
        with math_attention():
            out = functional_call(net, values, args, kwargs, strict=False)
        return select_output(out, output)

    return function_vectors(fn, params, probes, side=side, chunk_size=chunk_size)


def offdiag_mean(H: torch.Tensor) -> torch.Tensor:
    """``mean_{i≠j} H_ij`` of a square ``(m, m)`` matrix (the U-statistic over probe pairs)."""
    m = H.shape[0]
    if H.dim() != 2 or H.shape[1] != m:
        raise ValueError(f"expected a square matrix, got shape {tuple(H.shape)}")
    if m < 2:
        raise ValueError("a U-statistic over probe pairs needs at least 2 probes")
    return (H.sum() - H.diagonal().sum()) / (m * (m - 1))


def trace_estimate(A: torch.Tensor) -> torch.Tensor:
    """``(1/m) Σ‖a_i‖²`` from rows ``A`` (``(m, ·)``): unbiased for ``tr K``, unbiased gradient.

    Variance that of the one-sided trace (:func:`ntkscope.estimators.onesided`): for VJP rows
    with Rademacher probes ``2(‖K‖_F² − Σᵢ Kᵢᵢ²)/m``.  Cost: the m rows (one VJP or JVP each in
    the forward pass, and one more reverse pass through them in ``backward()``).
    """
    return A.square().sum(1).mean()


def frobenius_sq_estimate(A: torch.Tensor, B: torch.Tensor | None = None) -> torch.Tensor:
    """``‖K‖_F²`` from one-sided rows: unbiased, with an unbiased gradient.

    With one block ``A``: the U-statistic ``mean_{i≠j} (a_i·a_j)²``.  With a second block ``B``
    from an *independent* probe set on the same side: ``mean_{i,j} (a_i·b_j)²`` (all pairs).
    Leading variance ``8‖K²‖_F²/m`` for Gaussian probes (see
    :func:`ntkscope.core.jackknife.pair_mean_loo`); ``O(m²·P)`` for the Gram, no extra AD passes.
    """
    if B is None:
        return offdiag_mean((A @ A.T).square())
    return (A @ B.T).square().mean()


def inner_estimate(A: torch.Tensor, B: torch.Tensor | None = None, *, gram2: torch.Tensor | None = None) -> torch.Tensor:
    """``⟨K₁, K₂⟩_F = tr(K₁K₂)`` from VJP rows of two kernels over the same inputs.

    ``A`` and ``B`` are ``J₁ᵀw_i`` and ``J₂ᵀw_i`` for the *same* state-space probes ``w_i``
    (parameter counts may differ); ``gram2`` may replace ``B`` by the ``(m, m)`` matrix
    ``w_iᵀK₂w_j`` (e.g. a fixed teacher's kernel, computed once).  U-statistic
    ``mean_{i≠j} (w_iᵀK₁w_j)(w_iᵀK₂w_j)``: unbiased, unbiased gradient.
    """
    G2 = gram2 if gram2 is not None else (B @ B.T if B is not None else None)
    if G2 is None:
        raise ValueError("pass the second kernel's rows B or its probe Gram gram2")
    return offdiag_mean((A @ A.T) * G2)


def alignment_estimate(
    A: torch.Tensor, B: torch.Tensor | None = None, *, gram2: torch.Tensor | None = None, eps: float = 0.0
) -> torch.Tensor:
    """Uncentred kernel alignment ``tr(K₁K₂) / (‖K₁‖_F ‖K₂‖_F)`` from shared VJP probes.

    The ratio of the U-statistics of :func:`inner_estimate` and :func:`frobenius_sq_estimate`.
    **Biased** (it is a ratio): the bias and the bias of its gradient are ``O(1/m)``; see the
    module docstring for unbiased linear alternatives.  ``eps`` guards a vanishing norm.
    """
    G1 = A @ A.T
    G2 = gram2 if gram2 is not None else (B @ B.T if B is not None else None)
    if G2 is None:
        raise ValueError("pass the second kernel's rows B or its probe Gram gram2")
    num = offdiag_mean(G1 * G2)
    n1 = offdiag_mean(G1.square())
    n2 = offdiag_mean(G2.square())
    return num / torch.sqrt(n1 * n2 + eps)
