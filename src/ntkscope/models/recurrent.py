"""The hidden-state NTK of recurrent networks: the kernel over a whole trajectory h_1..h_T.

For a recurrent map ``h_t = F(θ, h_{t-1}, x_t)`` the *hidden NTK* (Hazelden 2025, "the hidden
NTK") is ``K = J Jᵀ`` with ``J = ∂ vec(h_1..h_T) / ∂θ`` — D = batch × time × hidden rows (times
directions and layers when asked).  One call builds it, as an :class:`~ntkscope.NTK`, for

* ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (any ``num_layers``, bidirectional, ``batch_first``
  either way, LSTM ``proj_size``): the top layer (default), one chosen layer, or every layer.
  Non-top layers are obtained by running the stack layer by layer with single-layer copies that
  read the *same* parameter tensors (``weight_ih_l{k}`` of the model becomes ``weight_ih_l0`` of
  the copy), so the Jacobian is over the model's own parameters;
* ``nn.RNNCell`` / ``nn.GRUCell`` / ``nn.LSTMCell`` run in a Python loop over time;
* a user step function ``step(params, h, x_t) -> h`` (:func:`step_ntk`), optionally with an
  input layer before it and a readout after it;
* any model holding a recurrent submodule (``hidden_ntk(model, x, submodule="rnn")``): the
  submodule's output sequence is captured while the whole model runs (input layers count).

An explicit zero initial state is always passed (PyTorch's self-made ``h0`` breaks per-sample
``vmap``); with ``submodule=`` it is injected by a temporary forward pre-hook.  The LSTM's
missing forward-mode rule under oneDNN (float32 on CPU) is handled by the NTK operator, which
falls back to a path with oneDNN disabled (see ``NTK.paths``).

The returned :class:`RecurrentNTK` keeps the state's shape and axis names (``state_shape``,
``axes``; e.g. ``("time", "batch", "hidden")`` for a sequence-first GRU) so that
:mod:`ntkscope.metrics.structure` can take partial traces over them.  The model is never modified: its
parameters are read, not copied into it, and no hook outlives a forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..operators import rules as _rules
from ..operators.modules import analysis_module, check_no_dropout, select_params, split_inputs
from ..operators.ntk import NTK
from .axes import BATCH, DIRECTION, HIDDEN, LAYER, TIME

__all__ = ["RecurrentNTK", "hidden_ntk", "step_ntk"]

ParamsArg = Mapping[str, torch.Tensor] | Iterable[str | torch.Tensor] | None


class RecurrentNTK(NTK):
    """An :class:`~ntkscope.NTK` whose state is a hidden trajectory with named axes.

    Attributes:
        axes: one name per state axis (``state_shape`` gives the sizes), from ``"layer"``,
            ``"time"``, ``"batch"``, ``"direction"``, ``"hidden"`` (:mod:`ntkscope.models.axes`).
        kind: what was analysed (``"GRU"``, ``"LSTMCell"``, ``"step"``, ...).
    """

    axes: tuple[str, ...]
    kind: str

    @property
    def axis_sizes(self) -> dict[str, int]:
        """``{axis name: size}`` in state order."""
        return dict(zip(self.axes, self.state_shape))

    def describe(self) -> str:
        sizes = ", ".join(f"{a}={n}" for a, n in self.axis_sizes.items())
        return f"RecurrentNTK[{self.kind}]({sizes}; " + super().describe()[4:]


def _finish(K: NTK, axes: Sequence[str], kind: str) -> RecurrentNTK:
    assert isinstance(K, RecurrentNTK)
    if len(axes) != len(K.state_shape):  # a bug here, not the user's: say so plainly
        raise AssertionError(f"axes {axes} do not match state shape {K.state_shape}")
    K.axes = tuple(axes)
    K.kind = kind
    return K


def _seq_axes(batch_first: bool) -> list[str]:
    return [BATCH, TIME] if batch_first else [TIME, BATCH]


# -- nn.RNN / nn.GRU / nn.LSTM ------------------------------------------------------------------


def _zero_state(model: nn.RNNBase, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's own zero initial state, made explicit (and built from x: dtype, device); 2-D
    (no batch axis) for an unbatched sequence ``x (T, features)``, as the module expects."""
    nd = 2 if model.bidirectional else 1
    batch = () if x.dim() == 2 else (x.shape[0] if model.batch_first else x.shape[1],)
    out_size = model.proj_size if getattr(model, "proj_size", 0) else model.hidden_size
    h0 = x.new_zeros(model.num_layers * nd, *batch, out_size)
    if isinstance(model, nn.LSTM):
        return (h0, x.new_zeros(model.num_layers * nd, *batch, model.hidden_size))
    return h0


def _layer_template(model: nn.RNNBase, layer: int, dtype: torch.dtype, device: torch.device) -> nn.RNNBase:
    """A single-layer copy of ``model``'s layer ``layer``, with uninitialised storage.

    Built on the meta device so that no random initialisation runs (the global RNG is left
    alone); its parameters are never used, :func:`torch.func.functional_call` swaps in the model's.
    """
    nd = 2 if model.bidirectional else 1
    out_size = model.proj_size if getattr(model, "proj_size", 0) else model.hidden_size
    in_size = model.input_size if layer == 0 else out_size * nd
    kw: dict[str, Any] = dict(
        num_layers=1, bias=model.bias, batch_first=model.batch_first, bidirectional=model.bidirectional, device="meta"
    )
    if isinstance(model, nn.LSTM):
        tmpl: nn.RNNBase = nn.LSTM(in_size, model.hidden_size, proj_size=model.proj_size, **kw)
    elif isinstance(model, nn.GRU):
        tmpl = nn.GRU(in_size, model.hidden_size, **kw)
    else:
        tmpl = nn.RNN(in_size, model.hidden_size, nonlinearity=model.nonlinearity, **kw)
    return tmpl.to_empty(device=device).to(dtype).eval()


def _layer_names(model: nn.RNNBase, layer: int) -> dict[str, str]:
    """``{template parameter name: model parameter name}`` for one layer."""
    out = {}
    for name, _ in model.named_parameters():
        base, _, rest = name.partition("_l")
        idx = rest.split("_", 1)
        if int(idx[0]) == layer:
            suffix = "_" + idx[1] if len(idx) > 1 else ""
            out[f"{base}_l0{suffix}"] = name
    return out


def _rnn_ntk(
    model: nn.RNNBase,
    x: torch.Tensor,
    h0: Any,
    layer: int | str | None,
    params: ParamsArg,
    chunk_size: int | None,
) -> RecurrentNTK:
    if type(model) not in (nn.RNN, nn.GRU, nn.LSTM):
        raise TypeError(f"unsupported recurrent module {type(model).__name__}: expected nn.RNN, nn.GRU or nn.LSTM")
    if x.dim() != 3:
        raise ValueError(
            f"{type(model).__name__} input must be 3-D ({'batch, time' if model.batch_first else 'time, batch'}, features), "
            f"got shape {tuple(x.shape)}"
        )
    kind = type(model).__name__
    L = model.num_layers
    nd = 2 if model.bidirectional else 1
    if h0 is None:
        h0 = _zero_state(model, x)
    seq = _seq_axes(model.batch_first)
    dir_axes = [DIRECTION] if nd == 2 else []
    top_layer = layer is None or (isinstance(layer, int) and not isinstance(layer, bool) and layer in (L - 1, -1))
    if top_layer and nd == 1:
        # the top layer's output sequence: the module itself (the recurrent rules apply)
        K = RecurrentNTK(model, (x, h0), output=0, params=params, chunk_size=chunk_size)
        return _finish(K, [*seq, HIDDEN], kind)
    if layer is None:
        layer = L - 1
    all_layers = layer == "all"
    if not all_layers:
        if not isinstance(layer, int) or isinstance(layer, bool) or not -L <= layer < L:
            raise ValueError(f"layer must be None (top), 'all' or an int in [{-L}, {L}), got {layer!r}")
        layer = layer % L
    top = L - 1 if all_layers else int(layer)
    check_no_dropout(model)
    if model.training and model.dropout > 0 and L > 1:
        raise ValueError(f"{kind}: inter-layer dropout is active; call model.eval() first")
    names, primals, fixed = select_params(model, params)
    if params is None:  # layers above the chosen one do not move its state: leave them out of P
        keep = {n for k in range(top + 1) for n in _layer_names(model, k).values()}
        idx = [i for i, n in enumerate(names) if n in keep]
        fixed.update({names[i]: primals[i] for i in range(len(names)) if i not in idx})
        names, primals = [names[i] for i in idx], [primals[i] for i in idx]
    dtype, device = primals[0].dtype, primals[0].device
    templates = [_layer_template(model, k, dtype, device) for k in range(top + 1)]
    maps = [_layer_names(model, k) for k in range(top + 1)]
    is_lstm = isinstance(model, nn.LSTM)

    def stack_fn(layers: Sequence[nn.Module]) -> Callable[[dict[str, torch.Tensor], tuple[torch.Tensor, Any]], torch.Tensor]:
        def fn(p: dict[str, torch.Tensor], inputs: tuple[torch.Tensor, Any]) -> torch.Tensor:
            values = {**fixed, **p}
            inp, state = inputs
            outs = []
            for k in range(top + 1):
                sl = slice(k * nd, (k + 1) * nd)
                s0 = (state[0][sl], state[1][sl]) if is_lstm else state[sl]
                out, _ = functional_call(layers[k], {t: values[n] for t, n in maps[k].items()}, (inp, s0))
                outs.append(out)
                inp = out
            chosen = outs if all_layers else outs[-1:]
            shaped = [o.reshape(*o.shape[:2], nd, -1) if nd == 2 else o for o in chosen]
            return torch.stack(shaped) if all_layers else shaped[0]

        return fn

    ruled_layers = [_rules.substitute(t)[0] for t in templates]
    ruled = None if any(t is None for t in ruled_layers) else (stack_fn(ruled_layers), [f"layer {k}: {kind}" for k in range(top + 1)])  # type: ignore[arg-type]
    Kf = RecurrentNTK.from_function(stack_fn(templates), dict(zip(names, primals)), (x, h0), chunk_size=chunk_size, ruled=ruled)
    axes = ([LAYER] if all_layers else []) + [*seq, *dir_axes, HIDDEN]
    return _finish(Kf, axes, kind if all_layers or top == L - 1 else f"{kind} layer {top}")


# -- nn.*Cell in a loop, and user step functions -------------------------------------------------


def _loop(
    step: Callable[[Any, torch.Tensor], Any],
    x: torch.Tensor,
    h0: Any,
    batch_first: bool,
    hidden: Callable[[Any], torch.Tensor],
) -> torch.Tensor:
    """Run ``h_t = step(h_{t-1}, x_t)`` over the time axis; stack ``hidden(h_t)`` along it."""
    tdim = 1 if batch_first else 0
    h = h0
    hs = []
    for t in range(x.shape[tdim]):
        h = step(h, x.select(tdim, t))
        hs.append(hidden(h))
    return torch.stack(hs, tdim)


def _first(h: Any) -> torch.Tensor:
    return h[0] if isinstance(h, (tuple, list)) else h


def _cell_ntk(
    cell: nn.RNNCellBase, x: torch.Tensor, h0: Any, batch_first: bool, params: ParamsArg, chunk_size: int | None
) -> RecurrentNTK:
    if x.dim() != 3:
        raise ValueError(f"{type(cell).__name__} sequence input must be 3-D, got shape {tuple(x.shape)}")
    batch = x.shape[0] if batch_first else x.shape[1]
    is_lstm = isinstance(cell, nn.LSTMCell)
    if h0 is None:
        z = x.new_zeros(batch, cell.hidden_size)
        h0 = (z, z.clone()) if is_lstm else z
    names, primals, fixed = select_params(cell, params)

    def loop_fn(c: nn.Module) -> Callable[[dict[str, torch.Tensor], tuple[torch.Tensor, Any]], torch.Tensor]:
        def fn(p: dict[str, torch.Tensor], inputs: tuple[torch.Tensor, Any]) -> torch.Tensor:
            values = {**fixed, **p}
            xs, s0 = inputs
            return _loop(lambda h, xt: functional_call(c, values, (xt, h)), xs, s0, batch_first, _first)

        return fn

    ruled_cell, ruled_names = _rules.substitute(cell)
    ruled = None if ruled_cell is None else (loop_fn(ruled_cell), ruled_names)
    K = RecurrentNTK.from_function(loop_fn(cell), dict(zip(names, primals)), (x, h0), chunk_size=chunk_size, ruled=ruled)
    return _finish(K, [*_seq_axes(batch_first), HIDDEN], type(cell).__name__)


# -- any model around a recurrent submodule ------------------------------------------------------


def _submodule_ntk(
    model: nn.Module, inputs: Any, submodule: str, h0: Any, params: ParamsArg, chunk_size: int | None
) -> RecurrentNTK:
    try:
        sub = model.get_submodule(submodule)
    except AttributeError as e:
        raise ValueError(f"{type(model).__name__} has no submodule {submodule!r}") from e
    if type(sub) not in (nn.RNN, nn.GRU, nn.LSTM):
        raise TypeError(f"submodule {submodule!r} is a {type(sub).__name__}, not nn.RNN/nn.GRU/nn.LSTM")
    assert isinstance(sub, nn.RNNBase)
    nd = 2 if sub.bidirectional else 1
    captured: list[torch.Tensor] = []

    def pre_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # inject an explicit zero initial state when the model lets the module make its own
        if len(args) == 1 and kwargs.get("hx") is None:
            kwargs = {**kwargs, "hx": h0 if h0 is not None else _zero_state(sub, args[0])}
        elif h0 is not None:
            raise ValueError(
                f"h0= was given, but the model passes its own initial state to submodule {submodule!r}: "
                "drop h0= (the model's state is the one used)"
            )
        return args, kwargs

    def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        captured.append(out[0])

    def run(p: dict[str, torch.Tensor], x: Any, net: nn.Module) -> torch.Tensor:
        captured.clear()
        part = net.get_submodule(submodule)
        handles = [part.register_forward_pre_hook(pre_hook, with_kwargs=True), part.register_forward_hook(hook)]
        try:
            args, kwargs = split_inputs(x)  # as NTK reads them: a dict is keyword arguments
            functional_call(net, p, args, kwargs, strict=False)
        finally:
            for h in handles:
                h.remove()
        if len(captured) != 1:
            raise ValueError(f"submodule {submodule!r} ran {len(captured)} times in one forward pass; expected once")
        out = captured[0]
        if out.dim() == 2:  # an unbatched sequence (T, ·): a batch of one
            out = out.unsqueeze(0 if sub.batch_first else 1)
        return out.reshape(*out.shape[:2], nd, -1) if nd == 2 else out

    check_no_dropout(model)
    names, primals, fixed = select_params(model, params)
    values = {**fixed, **dict(zip(names, primals))}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    # where needed a copy sharing the tensors (train-mode norm layers on batch statistics, a
    # module under two names); the capture hooks go on it, and come off after every forward
    model = analysis_module(model)

    def fn(p: dict[str, torch.Tensor], x: Any) -> torch.Tensor:
        return run({**values, **buffers, **p}, x, model)

    if params is None:  # only the parameters that move the state: a readout after it does not
        names, primals = _moving_params(fn, names, primals, inputs)
    ruled_model, ruled_names = _rules.substitute(model)
    ruled = None
    if ruled_model is not None:
        net = ruled_model

        def fn_ruled(p: dict[str, torch.Tensor], x: Any) -> torch.Tensor:
            return run({**values, **buffers, **p}, x, net)

        ruled = (fn_ruled, ruled_names)
    K = RecurrentNTK.from_function(fn, dict(zip(names, primals)), inputs, chunk_size=chunk_size, ruled=ruled)
    axes = [*_seq_axes(sub.batch_first), *([DIRECTION] if nd == 2 else []), HIDDEN]
    return _finish(K, axes, f"{type(model).__name__}.{submodule}")


def _moving_params(
    fn: Callable[[dict[str, torch.Tensor], Any], torch.Tensor], names: list[str], primals: list[torch.Tensor], inputs: Any
) -> tuple[list[str], list[torch.Tensor]]:
    """The parameters the state depends on: those one backward of a forward reaches (others,
    such as a readout after the recurrent submodule, are outside its graph)."""
    leaves = [p.detach().requires_grad_() for p in primals]
    with torch.enable_grad(), torch.random.fork_rng(devices=[]):
        z = fn(dict(zip(names, leaves)), inputs)
        grads = torch.autograd.grad(z, leaves, torch.ones_like(z), allow_unused=True)
    keep = [i for i, g in enumerate(grads) if g is not None]
    if not keep:
        raise ValueError("no trainable parameter moves the state of the submodule")
    return [names[i] for i in keep], [primals[i] for i in keep]


# -- public entry points ------------------------------------------------------------------------


def hidden_ntk(
    model: nn.Module,
    inputs: Any,
    *,
    h0: Any = None,
    layer: int | str | None = None,
    submodule: str | None = None,
    batch_first: bool = False,
    params: ParamsArg = None,
    chunk_size: int | None = None,
) -> RecurrentNTK:
    """The NTK over the whole hidden trajectory of a recurrent model.

    Args:
        model: ``nn.RNN``/``nn.GRU``/``nn.LSTM``; ``nn.RNNCell``/``nn.GRUCell``/``nn.LSTMCell``
            (run over the time axis of ``inputs``); or any module with a recurrent
            ``submodule``.
        inputs: the input sequence (3-D for modules and cells; whatever ``model`` takes with
            ``submodule=``).
        h0: the initial state (``(h0, c0)`` for LSTMs), in the module's own layout; default
            zeros, passed explicitly.
        layer: for ``nn.RNN``/``GRU``/``LSTM``: ``None`` — the top layer's output sequence
            (PyTorch's ``output``); an int — that layer's output sequence; ``"all"`` — every
            layer, stacked along a leading ``"layer"`` axis.
        submodule: name of the recurrent submodule of ``model`` whose output sequence is the
            state (the whole model runs, so layers before it count).
        batch_first: layout of ``inputs`` for cells (modules use their own ``batch_first``).
        params: which parameters (names, tensors or a name → tensor dict, as for ``NTK``).
            Default: all trainable ones that move the state.
        chunk_size: probes per vectorised batch.

    Returns:
        A :class:`RecurrentNTK`; ``K.state_shape`` and ``K.axes`` name the state axes, e.g.
        ``(50, 15, 64)`` and ``("time", "batch", "hidden")`` for the paper's GRU; a
        bidirectional layer adds ``"direction"`` before ``"hidden"``.

    Cost: one JVP (or VJP) pushes a probe through the whole unrolled sequence, about the price
    of one forward (backward) pass over all T steps, batched over a chunk of probes.  With
    ``D = T·B·H`` usually far above P, the JVP side (probes in R^P) is the one-sided method of
    choice, as in the paper's GRU experiments (Hazelden 2025, Figs. 2–3); the exact kernel
    needs ``min(D, P)`` passes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}; use step_ntk for step functions")
    if submodule is not None:
        return _submodule_ntk(model, inputs, submodule, h0, params, chunk_size)
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a tensor sequence, got {type(inputs).__name__}")
    if isinstance(model, nn.RNNBase):
        return _rnn_ntk(model, inputs, h0, layer, params, chunk_size)
    if layer is not None:
        raise ValueError("layer= applies to nn.RNN/nn.GRU/nn.LSTM only")
    if isinstance(model, nn.RNNCellBase):
        return _cell_ntk(model, inputs, h0, batch_first, params, chunk_size)
    raise TypeError(
        f"{type(model).__name__} is not a recurrent module: pass submodule='name' of its nn.RNN/GRU/LSTM, "
        "or use step_ntk for a step function"
    )


def step_ntk(
    step: Callable[[dict[str, torch.Tensor], Any, torch.Tensor], Any],
    params: Mapping[str, torch.Tensor],
    inputs: torch.Tensor,
    h0: Any,
    *,
    encoder: nn.Module | None = None,
    readout: nn.Module | None = None,
    state: str = "hidden",
    hidden: Callable[[Any], torch.Tensor] | None = None,
    batch_first: bool = False,
    chunk_size: int | None = None,
) -> RecurrentNTK:
    """The hidden NTK of a user recurrence ``h_t = step(params, h_{t-1}, u_t)``.

    ``u_t = encoder(x_t)`` when an input layer is given (else ``x_t``).  The state is the
    trajectory ``hidden(h_t)`` (default: ``h_t``, or its first element for a tuple carry such as
    an LSTM's ``(h, c)``), or with ``state="output"`` the readout ``readout(hidden(h_t))``.
    Parameters: ``params`` (passed to ``step`` as a dict), plus the encoder's and readout's
    trainable parameters as ``"encoder.*"`` / ``"readout.*"`` (those that move the state).

    Args:
        h0: the initial carry (a tensor ``(batch, hidden)`` or a tuple), or an int hidden size
            for a zero ``(batch, hidden)`` state.
        batch_first: ``inputs`` is ``(batch, time, features)`` instead of ``(time, batch, ...)``.
    """
    if state not in ("hidden", "output"):
        raise ValueError(f"state must be 'hidden' or 'output', got {state!r}")
    if state == "output" and readout is None:
        raise ValueError("state='output' needs a readout module")
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 3:
        raise ValueError(f"inputs must be a 3-D tensor sequence, got {getattr(inputs, 'shape', type(inputs).__name__)}")
    if isinstance(h0, int) and not isinstance(h0, bool):
        h0 = inputs.new_zeros(inputs.shape[0] if batch_first else inputs.shape[1], h0)
    pick = hidden or _first
    mods = {"encoder": encoder, "readout": readout if state == "output" else None}
    allp = {f"step.{n}": p.detach() for n, p in params.items()}
    for prefix, mod in mods.items():
        if mod is not None:
            check_no_dropout(mod)
            allp.update({f"{prefix}.{n}": p.detach() for n, p in mod.named_parameters() if p.requires_grad})
    frozen = {
        prefix: {n: p.detach() for n, p in mod.named_parameters() if not p.requires_grad}
        for prefix, mod in mods.items()
        if mod is not None
    }

    def sub(p: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        k = len(prefix) + 1
        return {**frozen.get(prefix, {}), **{n[k:]: v for n, v in p.items() if n.startswith(prefix + ".")}}

    def fn(p: dict[str, torch.Tensor], xs: torch.Tensor) -> torch.Tensor:
        sp = sub(p, "step")
        u = functional_call(encoder, sub(p, "encoder"), (xs,)) if encoder is not None else xs
        traj = _loop(lambda h, ut: step(sp, h, ut), u, h0, batch_first, pick)
        if state == "output":
            assert readout is not None
            traj = functional_call(readout, sub(p, "readout"), (traj,))
        return traj

    K = RecurrentNTK.from_function(fn, allp, inputs, chunk_size=chunk_size)
    return _finish(K, [*_seq_axes(batch_first), HIDDEN], "step")
