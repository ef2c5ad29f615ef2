"""The NTK of Transformer models: states that are higher-order tensors, chosen by named axes.

A Transformer's state is a tensor such as ``batch × time × vocab`` (language-model logits),
``batch × time × hidden`` (a layer's hidden states) or ``batch × time × head × hidden`` (the
per-head attention outputs of a layer, before the heads are mixed by the output projection).
:func:`transformer_ntk` builds the matrix-free :class:`~ntkscope.NTK` of such a state for

* PyTorch's own ``nn.TransformerEncoder`` / ``nn.TransformerDecoder`` / ``nn.Transformer`` and
  any model built from ``nn.MultiheadAttention`` blocks, and
* Hugging Face ``transformers`` models built from a config with random weights (an optional
  extra: ``pip install ntkscope[hf]``), e.g. ``GPT2LMHeadModel(GPT2Config(...))``.

**Axes** use the vocabulary of :mod:`ntkscope.models.axes`, shared with the recurrent states:
``batch``, ``time`` (token position), ``hidden`` (features), plus ``vocab`` (logits) and ``head``.  ``select={"time": -1}`` keeps the
last position (the axis disappears), ``select={"time": slice(0, 4), "head": [0, 2]}`` keeps a
block; aliases ``token``/``position`` → ``time`` and ``feature`` → ``hidden`` are accepted.

**Inputs** may hold integer token ids (embeddings): only floating-point parameters are
differentiated; ids pass through unchanged.

**Evaluation mode.**  The NTK of a random map is undefined, so the analysis runs the model as in
``eval()`` (attention and residual dropout off) on a shallow copy that shares every parameter and
buffer with the model — the model itself, its mode and its hooks are never changed.

**Attention kernel.**  PyTorch's fused CPU/GPU attention kernels (flash / memory-efficient SDPA,
and the eval-mode "fast path" of ``nn.TransformerEncoderLayer``) have no forward-mode AD rule and
no double backward, so JVPs and the differentiable statistics of
:mod:`ntkscope.differentiable` would fail.  The analysis runs attention with the ``MATH`` SDPA
backend (plain matrix products, every AD mode) with the fast path off: the same function.

**Memory.**  :func:`plan_memory` picks the AD side and chunk size from a memory budget: the
probe space of the smaller side (VJP when ``D ≤ P`` — the usual case for large models), and as
many probes per vectorised chunk as fit next to the forward's saved activations.  The plan is in
``ntk.plan``; with ``P`` = 10⁸ parameters one probe's ``Jᵀw`` alone is 0.4 GB in float32, so the
chunk drops to 1 and memory stays ``O(activations + P)`` whatever the number of probes.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..core.callers import user_stacklevel
from ..core.memory import available_bytes
from ..operators.modules import analysis_module, saved_activations, select_params, split_inputs, tensors, unwrap_parallel
from ..operators.ntk import NTK
from ..operators.rules import math_attention
from .axes import BATCH, HEAD, HIDDEN, TIME, VOCAB, Index, canonical_axis, select_axes

__all__ = ["transformer_ntk", "TransformerNTK", "plan_memory"]


# -- finding the parts of a Transformer -----------------------------------------------------------


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The stack of Transformer blocks (``layers`` of nn.TransformerEncoder/Decoder, ``h`` of GPT-2…)."""
    if isinstance(model, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return model.layers
    if isinstance(model, nn.Transformer):
        raise ValueError("nn.Transformer has an encoder and a decoder stack: pass module='encoder.layers.0' (or a decoder layer)")
    n = _config_int(model, ("num_hidden_layers", "n_layer", "num_layers"))
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if n is not None:
        lists = [m for m in lists if len(m) == n] or lists
    if not lists:
        raise ValueError(f"cannot find the Transformer blocks of {type(model).__name__}: pass module= (a submodule name)")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def _config_int(model: nn.Module, keys: Sequence[str]) -> int | None:
    cfg = getattr(model, "config", None)
    for k in keys:
        v = getattr(cfg, k, None) if cfg is not None else None
        if isinstance(v, int):
            return v
    return None


def _batch_first(model: nn.Module) -> bool:
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            return bool(m.batch_first)
    return True  # Hugging Face and most modern code


def _main_output(out: Any) -> tuple[torch.Tensor, str]:
    """The model's main output, and the name of its feature axis."""
    if isinstance(out, torch.Tensor):
        return out, HIDDEN
    for key, axis in (("logits", VOCAB), ("last_hidden_state", HIDDEN), ("prediction_logits", VOCAB)):
        v = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v, axis
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0], HIDDEN
    raise ValueError(f"cannot find the main output in a {type(out).__name__}: pass state= a callable out -> Tensor")


def _first_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    v = getattr(x, "last_hidden_state", None)
    if isinstance(v, torch.Tensor):
        return v
    raise ValueError(f"the captured module returned a {type(x).__name__}, not a tensor")


def _mha_heads(mha: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """Per-head outputs ``softmax(QKᵀ/√d + mask) V`` of an nn.MultiheadAttention call, (B, T, H, d).

    nn.MultiheadAttention applies its output projection functionally (no module call to hook),
    so the per-head outputs are recomputed from the call's inputs and the module's own weights:
    the same function up to the head-mixing projection.
    """
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("per-head states support nn.MultiheadAttention with one embedding size, no bias_k/add_zero_attn")
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")
    call = dict(zip(names, args))
    call.update(kwargs)
    q, k, v = call["query"], call["key"], call["value"]
    if mha.batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    E, H = mha.embed_dim, mha.num_heads
    w, b = mha.in_proj_weight, mha.in_proj_bias
    wq, wk, wv = w.chunk(3)
    bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
    L, B = q.shape[0], q.shape[1]
    S = k.shape[0]
    Q = nn.functional.linear(q, wq, bq).reshape(L, B, H, E // H).permute(1, 2, 0, 3)
    K = nn.functional.linear(k, wk, bk).reshape(S, B, H, E // H).permute(1, 2, 0, 3)
    V = nn.functional.linear(v, wv, bv).reshape(S, B, H, E // H).permute(1, 2, 0, 3)
    mask = call.get("attn_mask")
    scores = Q @ K.transpose(-1, -2) / math.sqrt(E // H)
    if call.get("is_causal") and mask is None:
        mask = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
    if mask is not None:
        if mask.dim() == 3:  # (B·H, L, S), nn.MultiheadAttention's per-head layout
            mask = mask.reshape(B, H, L, S)
        scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    kpm = call.get("key_padding_mask")
    if kpm is not None:
        kpm = kpm[:, None, None, :]
        scores = scores.masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else scores + kpm
    out = torch.softmax(scores, -1) @ V  # (B, H, L, d); attention dropout is off in eval mode
    return out.permute(0, 2, 1, 3)  # (B, L, H, d)


def _attention_projection(block: nn.Module) -> tuple[nn.Module, int]:
    """In a Hugging Face-style block, the attention's output projection and the head count."""
    for name, m in block.named_modules():
        if name and ("attn" in name.split(".")[-1].lower() or "attention" in name.split(".")[-1].lower()):
            heads = next(
                (
                    getattr(m, a)
                    for a in ("num_heads", "num_attention_heads", "n_head", "n_heads")
                    if isinstance(getattr(m, a, None), int)
                ),
                None,
            )
            if heads is None:
                cfg = getattr(m, "config", None)
                heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
            for proj in ("c_proj", "o_proj", "out_proj", "dense"):
                sub = getattr(m, proj, None)
                if isinstance(sub, nn.Module) and isinstance(heads, int):
                    return sub, heads
    raise ValueError(f"cannot find the attention output projection in {type(block).__name__}: pass module= and capture='input'")


# -- the NTK ------------------------------------------------------------------------------------


class TransformerNTK(NTK):
    """An :class:`~ntkscope.NTK` over a Transformer state, with its axis names and memory plan.

    Attributes:
        axes: names of the state's axes after selection (``state_shape`` gives their lengths).
        plan: the AD side and chunk size chosen for the memory budget (see :func:`plan_memory`).
        state_kind: which state was taken (``"output"``, ``"hidden"``, ``"heads"``, ``"module"``).
    """

    axes: tuple[str, ...]
    plan: dict[str, Any]
    state_kind: str

    @property
    def method(self) -> str:
        """The one-sided method of the plan (``"vjp"`` or ``"jvp"``), for ``ntkscope.trace(K, method=...)``."""
        return str(self.plan["side"])


def transformer_ntk(
    model: nn.Module,
    inputs: Any,
    *,
    state: str | Callable[[Any], torch.Tensor] = "output",
    layer: int | None = None,
    module: str | None = None,
    capture: str = "output",
    axes: Sequence[str] | None = None,
    select: Mapping[str, Index] | Callable[[torch.Tensor], torch.Tensor] | None = None,
    params: Mapping[str, torch.Tensor] | Sequence[str] | None = None,
    memory_budget: int | None = None,
    chunk_size: int | None = None,
) -> TransformerNTK:
    """The NTK of a Transformer's state over fixed inputs, with named axes and a memory plan.

    Args:
        model: an ``nn.Module`` (PyTorch Transformer modules, a Hugging Face model, your own).
        inputs: a tensor (e.g. ``(batch, time)`` token ids or ``(batch, time, hidden)`` floats), a
            tuple of positional arguments, or a dict of keyword arguments (``input_ids``,
            ``attention_mask``, …).
        state: ``"output"`` — the model's main output (``logits`` of an LM head: axes
            ``batch, time, vocab``; ``last_hidden_state`` or a plain tensor: ``batch, time,
            hidden``); ``"hidden"`` — the output of block ``layer`` as the block returns it (for
            ``layer=-1`` on GPT-2/Llama-style models this is before the final LayerNorm, unlike
            Hugging Face's ``hidden_states[-1]``; ``state="output"`` includes it); ``"heads"`` — the per-head
            attention outputs of block ``layer`` (``batch, time, head, hidden``); or a callable
            ``out -> Tensor`` applied to the model's return value (then give ``axes``).
        layer: the block index for ``"hidden"``/``"heads"`` (negative counts from the end).
        module: instead of ``state``: capture a named submodule's output (or, with
            ``capture="input"``, its first positional input).
        axes: names of the state's axes before selection (defaults from the state kind and the
            model's layout: sequence-first ``nn.MultiheadAttention`` gives ``time, batch, …``).
        select: ``{axis: index}`` (see :func:`~ntkscope.models.axes.select_axes`) or a callable ``state -> Tensor``.
        params: parameter names (or a dict name → tensor that replaces the model's values) to
            differentiate; default: every floating-point parameter with ``requires_grad``.
        memory_budget: bytes for probe chunks (default: a quarter of the available memory,
            at most 4 GiB); ignored when ``chunk_size`` is given.

    Cost: a VJP costs about one backward pass of the model, a JVP about one forward pass with
    tangents; one-sided estimators need one pass per probe on the planned side (``K.method``).
    Hazelden, Nagireddy & Shea-Brown (v2 of arXiv 2511.10796) measure these statistics on
    Transformer language models; ``D = batch·time·vocab`` logits make ``D ≤ P`` the usual case.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if capture not in ("output", "input"):
        raise ValueError(f"capture must be 'output' or 'input', got {capture!r}")
    model, params = unwrap_parallel(model, params)
    clone = analysis_module(model, eval_mode=True)
    names, primals, _ = select_params(clone, params)
    chosen = dict(zip(names, primals))
    hook = _hook_state(clone, state, layer, module, capture)
    raw_state = _raw_state_function(clone, inputs, hook, state, module)
    # One pass without grad: the raw state's shape, hence its axis names.
    try:
        with torch.no_grad():
            raw = raw_state(chosen)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise ValueError(f"{type(model).__name__} failed on the given inputs: {e}") from e
    fn, final_axes = _selected_state(raw_state, raw, _state_axes(raw, hook, axes), select)
    return _build_ntk(model, fn, chosen, inputs, hook.kind, final_axes, memory_budget, chunk_size)


# -- the steps of transformer_ntk ------------------------------------------------------------------


@dataclass
class _StateHook:
    """Where the state comes from, filled by forward hooks on the analysis copy.

    ``kind``: ``"output"``, ``"callable"``, ``"module"``, ``"hidden"`` or ``"heads"``; ``seq``:
    the order of the batch and time axes in the model's layout; ``axes``: the default names of
    the raw state's axes (empty: from the output's shape, or ``axes=``); ``captured``: what the
    last forward left — ``"state"`` from a hook, ``"feature"`` the main output's feature axis.
    """

    kind: str
    seq: tuple[str, str]
    axes: tuple[str, ...] = ()
    captured: dict[str, Any] = field(default_factory=dict)

    def keep(self, x: Any) -> None:
        self.captured["state"] = _first_tensor(x)


def _hook_state(clone: nn.Module, state: str | Callable[[Any], torch.Tensor], layer: int | None, module: str | None, capture: str) -> _StateHook:
    """Register on the analysis copy the hooks that capture the chosen state."""
    seq = (BATCH, TIME) if _batch_first(clone) else (TIME, BATCH)
    if module is not None:
        try:
            target = clone.get_submodule(module)
        except AttributeError as e:
            raise ValueError(f"no submodule {module!r} in {type(clone).__name__}") from e
        hook = _StateHook("module", seq, (*seq, HIDDEN))
        if capture == "output":
            target.register_forward_hook(lambda m, a, out: hook.keep(out))
        else:
            target.register_forward_pre_hook(lambda m, a: hook.keep(a))
        return hook
    if callable(state):
        return _StateHook("callable", seq)
    if state == "output":
        return _StateHook("output", seq)
    if state not in ("hidden", "heads"):
        raise ValueError(f"state must be 'output', 'hidden', 'heads' or a callable, got {state!r}")
    if layer is None:
        raise ValueError(f"state={state!r} needs layer= (a block index)")
    blocks = _blocks(clone)
    if not -len(blocks) <= layer < len(blocks):
        raise IndexError(f"layer={layer} but the model has {len(blocks)} blocks")
    if state == "hidden":
        hook = _StateHook("hidden", seq, (*seq, HIDDEN))
        blocks[layer].register_forward_hook(lambda m, a, out: hook.keep(out))
        return hook
    return _hook_heads(blocks[layer], seq)


def _hook_heads(block: nn.Module, seq: tuple[str, str]) -> _StateHook:
    """Capture a block's per-head attention outputs: recomputed from an nn.MultiheadAttention
    call, or split off the input of a Hugging Face-style output projection."""
    mha = next((m for m in block.modules() if isinstance(m, nn.MultiheadAttention)), None)
    if mha is not None:
        hook = _StateHook("heads", seq, (BATCH, TIME, HEAD, HIDDEN))
        mha.register_forward_pre_hook(lambda m, a, kw: hook.captured.__setitem__("state", _mha_heads(m, a, kw)), with_kwargs=True)
        return hook
    proj, heads = _attention_projection(block)
    hook = _StateHook("heads", seq, (*seq, HEAD, HIDDEN))

    def split(m: nn.Module, a: tuple[Any, ...]) -> None:
        x = _first_tensor(a)
        hook.captured["state"] = x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)

    proj.register_forward_pre_hook(split)
    return hook


def _raw_state_function(
    clone: nn.Module, inputs: Any, hook: _StateHook, state: str | Callable[[Any], torch.Tensor], module: str | None
) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """``values -> state`` before selection: the analysis copy run with ``values`` for its parameters."""
    args, kwargs = split_inputs(inputs)

    def raw_state(values: dict[str, torch.Tensor]) -> torch.Tensor:
        hook.captured.clear()
        with math_attention():
            out = functional_call(clone, values, args, kwargs, strict=False)
        if hook.kind == "output":
            z, hook.captured["feature"] = _main_output(out)
            return z
        if hook.kind == "callable":
            assert callable(state)
            return state(out)
        if "state" not in hook.captured:
            raise RuntimeError(f"the hooked module did not run (state={state!r}, module={module!r})")
        return hook.captured["state"]  # type: ignore[no-any-return]

    return raw_state


def _state_axes(raw: torch.Tensor, hook: _StateHook, axes: Sequence[str] | None) -> tuple[str, ...]:
    """The raw state's axis names: ``axes=``, else from the state kind and the model's layout
    (empty when they cannot be told from the shape)."""
    if axes is not None:
        names = tuple(canonical_axis(a) for a in axes)
    elif hook.kind == "output":
        feature = hook.captured.get("feature", HIDDEN)
        names = (*hook.seq, feature) if raw.dim() == 3 else (BATCH, feature) if raw.dim() == 2 else ()
    else:
        names = hook.axes if len(hook.axes) == raw.dim() else ()
    if names and len(names) != raw.dim():
        raise ValueError(f"axes={names} do not match the state's {raw.dim()} dimensions {tuple(raw.shape)}")
    return names


def _selected_state(
    raw_state: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    raw: torch.Tensor,
    names: tuple[str, ...],
    select: Mapping[str, Index] | Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[Callable[[dict[str, torch.Tensor], Any], torch.Tensor], tuple[str, ...]]:
    """The state function after ``select=``, and the axis names it leaves (empty if unnamed)."""
    if select is not None and not callable(select) and not names:
        raise ValueError(f"name the state's axes with axes= (state shape {tuple(raw.shape)}) to use select=")
    final_axes = select_axes(raw, names, select)[1] if names and not callable(select) else ()

    def fn(values: dict[str, torch.Tensor], _inputs: Any) -> torch.Tensor:
        z = raw_state(values)
        if callable(select):
            return select(z)
        return select_axes(z, names, select)[0] if select else z

    return fn, final_axes


def _build_ntk(
    model: nn.Module,
    fn: Callable[[dict[str, torch.Tensor], Any], torch.Tensor],
    chosen: dict[str, torch.Tensor],
    inputs: Any,
    kind: str,
    final_axes: tuple[str, ...],
    memory_budget: int | None,
    chunk_size: int | None,
) -> TransformerNTK:
    """The :class:`TransformerNTK` of ``fn`` over ``chosen``, with its axis names and memory plan."""
    # Additive attention masks hold -inf by design; the generic finiteness check would refuse
    # them, so it sees the inputs with infinities zeroed (fn closes over the real ones), and NaN
    # is refused here.
    if any(t.is_floating_point() and bool(torch.isnan(t).any()) for t in tensors(inputs)):
        raise ValueError("inputs contain NaN")
    ntk = TransformerNTK.from_function(fn, chosen, _finite_view(inputs), chunk_size=chunk_size or 1)
    assert isinstance(ntk, TransformerNTK)
    ntk.inputs = inputs
    ntk.model = model
    ntk.axes = final_axes if final_axes and len(final_axes) == len(ntk.state_shape) else tuple(f"axis{i}" for i in range(len(ntk.state_shape)))
    ntk.state_kind = kind
    ntk.plan = plan_memory(ntk, memory_budget=memory_budget, chunk_size=chunk_size)
    ntk.chunk_size = int(ntk.plan["chunk_size"])
    return ntk


def _finite_view(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return torch.nan_to_num(obj, posinf=0.0, neginf=0.0) if obj.is_floating_point() else obj
    if isinstance(obj, Mapping):
        return {k: _finite_view(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_finite_view(v) for v in obj)
    return obj


# -- memory ------------------------------------------------------------------------------------------


def plan_memory(ntk: NTK, memory_budget: int | None = None, chunk_size: int | None = None) -> dict[str, Any]:
    """Choose the AD side and the probes per chunk that fit a memory budget.

    Side: the smaller probe space (VJP when ``D ≤ P``), whose one-sided estimator also has the
    lower Rademacher variance when the kernel's diagonal is spread out.  Memory of a chunk of c
    probes ≈ A + c·(A + s·d_in + (2s + 16)·d_out): the forward's saved activations A (the bytes of
    their storages, :func:`~ntkscope.operators.modules.saved_activations`; shared by the chunk's passes), per probe a set of intermediate gradients or tangents (≈ A), the probe
    (``d_in`` numbers of s bytes) and its image (``d_out`` = P for a VJP, D for a JVP) held as
    per-parameter parts and concatenated, plus the float64 copy and square the estimators reduce
    in.  The chunk is the largest c that fits (at least 1, at most 256).
    """
    D, P = ntk.dim, ntk.num_params
    side = "vjp" if D <= P else "jvp"
    d_in, d_out = (D, P) if side == "vjp" else (P, D)
    item = ntk.dtype.itemsize
    act = saved_activations(ntk._f, ntk.primals).nbytes
    per_probe = act + item * d_in + (2 * item + 16) * d_out
    free = available_bytes(ntk.device)
    if free is None:  # unknown: assume 4 GiB free
        free = 4 * 2**30
    budget = int(memory_budget) if memory_budget is not None else min(4 * 2**30, free // 4)
    env = os.environ.get("NTKSCOPE_MEMORY_BUDGET")
    if memory_budget is None and env:
        budget = int(float(env))
    if chunk_size is not None:
        chunk, why = int(chunk_size), "chunk_size given"
    else:
        chunk = int(max(1, min(256, (budget - act) // max(per_probe, 1))))
        why = f"{chunk} probe(s) of ≈{per_probe / 2**20:.1f} MiB each fit the {budget / 2**20:.0f} MiB budget"
        if act + per_probe > budget:  # one probe at a time is the least memory there is, but it is not within budget
            why = (
                f"not even 1 probe fits the {budget / 2**20:.1f} MiB budget (≈{per_probe / 2**20:.1f} MiB per probe after "
                f"{act / 2**20:.1f} MiB of activations): running 1 at a time, peak ≈{(act + per_probe) / 2**20:.1f} MiB"
            )
            warnings.warn(f"transformer_ntk: {why}", UserWarning, stacklevel=user_stacklevel())
    return {
        "side": side,
        "chunk_size": chunk,
        "memory_budget": budget,
        "activation_bytes": act,
        "bytes_per_probe": per_probe,
        "estimated_peak_bytes": act + chunk * per_probe,
        "reason": f"{side.upper()} side: D={D} {'≤' if side == 'vjp' else '>'} P={P}; {why}",
    }
