"""Batched-probe evaluation rules per module type, wherever the module sits in a model.

The NTK evaluates a block of probes with ``torch.func`` over the user's model.  For the module
types below it first substitutes, in an analysis copy that shares every parameter and buffer
tensor with the model, a forward built from :class:`~ntkscope.operators.rules.core.BatchedOp` primitives
whose tangent and adjoint take the whole probe block as large matrix products.  Everything
between those modules — readouts, residuals, reshapes, indexing, tuple outputs — is the user's
own code, batched by ``torch.func``.  Modules without a rule run as written.

========================================  ===================================================
module                                    rule
========================================  ===================================================
``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``     one :class:`~ntkscope.operators.rules.recurrent.RecurrenceOp`
                                          per layer and direction (any ``num_layers``,
                                          bidirectional, either batch layout, with or without
                                          ``h0``, unbatched input; not LSTM ``proj_size``)
``nn.RNNCell`` / ``nn.GRUCell`` /         one step of the same recurrence
``nn.LSTMCell``
``nn.MultiheadAttention``                 its own forward with the q/k/v input projections as
                                          2-D products (:mod:`~ntkscope.operators.rules.attention`:
                                          a 3-D projection with batched weight tangents is
                                          evaluated by copying the weight L times)
Hugging Face ``NewGELUActivation``        ``F.gelu(approximate="tanh")``: the same function (GPT-2's
(``gelu_new``)                            ``gelu_new``) as one kernel instead of seven element-wise
                                          ones (registered once ``transformers`` is imported)
``nn.MultiheadAttention``, Transformer    math attention (:func:`math_attention`, every path): the
layers, ``scaled_dot_product_attention``  fused kernels, which have no forward-mode rule, are
                                          replaced by plain matrix products during analysis
========================================  ===================================================

``nn.Linear``, element-wise activations, ``nn.Conv1d``/``nn.Conv2d``, ``nn.Embedding`` and
``nn.LayerNorm`` need no rule: ``torch.func`` already batches each of them as single large
kernels (a linear layer's probe block becomes one GEMM, a convolution with per-probe weights one
grouped convolution).  :class:`~ntkscope.operators.rules.dense.LinearOp` is a hand-written rule for
``nn.Linear`` that measured no faster than that on MLPs (and slower on the JVP side), so it is
not registered by default: ``register_rule(nn.Linear, linear_forward)`` turns it on.

Adding a rule: write a :class:`~ntkscope.operators.rules.core.BatchedOp` (``primal``, ``tangent``,
``adjoint`` on probe-major blocks) and a forward that calls it, then
``register_rule(MyModule, forward)``; ``forward(module, original, *args, **kwargs)`` gets the
module (its parameters are the analysed ones) and its original bound forward, to fall back to
for inputs the rule does not handle.  The NTK checks each mode against the generic path once
before trusting the rules, and falls back when they disagree or raise.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .attention import mha_forward
from .core import BatchedOp, RuleUnsupported, measure_probe_numel
from .dense import LINEAR
from .recurrent import cell_forward, rnn_forward, supports_rnn

__all__ = [
    "BatchedOp",
    "RuleUnsupported",
    "register_rule",
    "unregister_rule",
    "substitute",
    "math_attention",
    "rule_names",
    "measure_probe_numel",
    "linear_forward",
    "gelu_tanh_forward",
    "analysis_copy",
    "shared_copy",
]

Forward = Callable[..., Any]

#: module type -> (rule forward, predicate saying whether an instance is supported)
_RULES: dict[type, tuple[Forward, Callable[[nn.Module], bool]]] = {}


def register_rule(cls: type, forward: Forward, applies: Callable[[nn.Module], bool] | None = None) -> None:
    """Evaluate every ``cls`` instance (or subclass instance that keeps ``cls.forward``) with
    ``forward(module, original_forward, *args, **kwargs)`` during NTK analysis."""
    _RULES[cls] = (forward, applies or (lambda m: True))


def linear_forward(module: nn.Linear, original: Forward, input: Any) -> Any:
    """``nn.Linear`` through :class:`~ntkscope.operators.rules.dense.LinearOp` (opt-in, see above)."""
    if not isinstance(input, torch.Tensor) or input.dim() == 0:
        return original(input)
    return LINEAR(input, module.weight, module.bias)


for _rnn in (nn.RNN, nn.GRU, nn.LSTM):
    register_rule(_rnn, rnn_forward, supports_rnn)
for _cell in (nn.RNNCell, nn.GRUCell, nn.LSTMCell):
    register_rule(_cell, cell_forward)
register_rule(nn.MultiheadAttention, mha_forward)


def gelu_tanh_forward(module: nn.Module, original: Forward, input: Any) -> Any:
    """Hugging Face's ``NewGELUActivation`` (``gelu_new``: GPT-2, GPT-J, …) writes
    ``0.5x(1 + tanh(√(2/π)(x + 0.044715x³)))`` as seven element-wise ops, each its own kernel over
    the probe block in both AD modes; ``F.gelu(approximate="tanh")`` is the same function in one
    kernel, with fused derivatives."""
    if not isinstance(input, torch.Tensor):
        return original(input)
    return F.gelu(input, approximate="tanh")


#: rules for classes of optional libraries: (module name, class name, forward), registered the
#: first time a model is analysed after that library was imported (importing it costs seconds)
_OPTIONAL: list[tuple[str, str, Forward]] = [("transformers.activations", "NewGELUActivation", gelu_tanh_forward)]
_OPTIONAL_SEEN: set[tuple[str, str]] = set()


def _register_optional() -> None:
    for mod, name, forward in _OPTIONAL:
        cls = getattr(sys.modules.get(mod), name, None)
        if isinstance(cls, type) and (mod, name) not in _OPTIONAL_SEEN:
            _OPTIONAL_SEEN.add((mod, name))  # once: unregister_rule stays in force
            register_rule(cls, forward)


def unregister_rule(cls: type) -> None:
    """Stop evaluating ``cls`` with a rule (its modules run as written)."""
    _RULES.pop(cls, None)
    for key in [k for k in _SUBCLASSES if k[0] is cls]:
        _SUBCLASSES.pop(key)


def _rule_for(module: nn.Module) -> tuple[type, Forward] | None:
    # a subclass with its own forward computes something else: it is left alone
    return _find(_RULES, module)


_SUBCLASSES: dict[tuple[type, Forward], type] = {}


def _ruled_class(cls: type, forward: Forward) -> type:
    key = (cls, forward)
    if key not in _SUBCLASSES:

        def ruled(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return forward(self, super(sub, self).forward, *args, **kwargs)  # type: ignore[arg-type]

        sub = type(cls.__name__, (cls,), {"forward": ruled, "__module__": cls.__module__, "_ntkscope_rule": True})
        _SUBCLASSES[key] = sub
    return _SUBCLASSES[key]


def rule_names(model: nn.Module) -> list[str]:
    """``"name: Type"`` of every submodule of ``model`` that has a rule."""
    _register_optional()
    return [f"{n or '(model)'}: {type(m).__name__}" for n, m in model.named_modules() if _rule_for(m) is not None]


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that shares every parameter and buffer tensor with it: only the module
    objects are new, so an analysis can rebind their attributes or classes (no memory, and the
    user's model is untouched).  Raises what ``copy.deepcopy`` raises."""
    memo: dict[int, Any] = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def _swap(model: nn.Module, table: dict[type, tuple[Forward, Callable[[nn.Module], bool]]]) -> nn.Module:
    """A :func:`shared_copy` whose submodules found in ``table`` evaluate with its forwards."""
    clone = shared_copy(model)
    for m in clone.modules():
        found = _find(table, m)
        if found is not None:
            m.__class__ = _ruled_class(type(m), found[1])
    return clone


def substitute(model: nn.Module) -> tuple[nn.Module | None, list[str]]:
    """An analysis copy of ``model`` whose supported submodules evaluate with rules, sharing
    every parameter and buffer tensor with ``model`` (which is not changed), and the list of
    ruled submodules; ``(None, [])`` when no submodule has a rule or the model cannot be copied."""
    names = rule_names(model)
    if not names:
        return None, []
    try:
        return _swap(model, _RULES), names
    except Exception:  # something in the model cannot be copied: no rules, the generic path
        return None, []


def _embedding_forward(module: nn.Embedding, original: Forward, input: Any) -> Any:
    # PyTorch never trains the padding row (embedding's backward skips it), so its tangent is
    # dropped too: J·u and Jᵀ·v then describe the same Jacobian
    p = module.padding_idx
    assert p is not None
    w = module.weight
    w = torch.cat([w[:p], w[p : p + 1].detach(), w[p + 1 :]])
    return torch.nn.functional.embedding(input, w, p, module.max_norm, module.norm_type, module.scale_grad_by_freq, module.sparse)


#: rules that change what is computed, not how fast: applied on every path (see analysis_copy)
_SEMANTIC: dict[type, tuple[Forward, Callable[[nn.Module], bool]]] = {
    nn.Embedding: (_embedding_forward, lambda m: getattr(m, "padding_idx", None) is not None and getattr(m, "max_norm", None) is None),
}


def analysis_copy(model: nn.Module) -> nn.Module:
    """``model``, or a copy sharing its tensors in which modules whose reverse mode PyTorch
    defines differently from their derivative are made consistent: ``nn.Embedding`` with a
    ``padding_idx`` (whose row PyTorch's backward never updates) drops that row's tangent too.
    Every evaluation path uses it, so JVP- and VJP-based estimates agree."""
    if not any(_find(_SEMANTIC, m) for m in model.modules()):
        return model
    return _swap(model, _SEMANTIC)


def _find(table: dict[type, tuple[Forward, Callable[[nn.Module], bool]]], module: nn.Module) -> tuple[type, Forward] | None:
    for cls in type(module).__mro__:
        if cls in table:
            forward, applies = table[cls]
            if type(module).forward is not cls.forward or not applies(module):  # type: ignore[attr-defined]
                return None
            return cls, forward
        if getattr(cls, "_ntkscope_rule", False):  # already substituted
            return None
    return None


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Attention as plain matrix products for the duration of an analysis.

    Eval-mode ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` take fused kernels
    (``_native_multi_head_attention``, ``_transformer_encoder_layer_fwd``) and
    ``scaled_dot_product_attention`` takes flash/efficient kernels; none has a forward-mode rule
    or a double backward.  This switches the MHA fast path off and selects the MATH SDPA backend
    (the same function), and restores the user's settings afterwards.
    """
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
