"""Evaluators: how a block of probes is pushed through ``f(θ)`` in one AD mode.

An :class:`Evaluator` holds the function of an NTK twice — as the user wrote it, and with the
per-module batched-probe rules of :mod:`ntkscope.operators.rules` substituted — and evaluates blocks of
probe rows chunk by chunk along the first *path* that works:

* ``vmap-forward+rules`` / ``vmap-reverse+rules``: ``vmap`` over ``jvp``/``vjp`` with the rules
  (checked once per mode against a generic path on one probe before they are trusted);
* ``vmap-*``: ``vmap`` over ``jvp``/``vjp`` of the function as written;
* ``loop-*``: a Python loop over probes (where ``vmap`` is unsupported);
* ``*-no-mkldnn``: with oneDNN off (its LSTM has no forward-mode rule on CPU);
* ``*-double-vjp``: J·u as the VJP of the linear map w ↦ Jᵀw (where forward mode is missing, or
  disagrees with reverse mode).

``J`` is the Jacobian that backpropagation sees.  Forward-mode AD ignores ``torch.no_grad()``
regions inside a forward (a frozen feature extractor written that way), so its J·u can belong to
a larger Jacobian; the first forward-mode result is therefore checked once against reverse mode
(``(Jᵀ(Ju))·u = ‖Ju‖²``), and where they disagree J·u is taken as the VJP of a VJP.

Every path runs with attention as plain matrix products (:func:`ntkscope.operators.rules.math_attention`),
so fused attention kernels without forward-mode rules never block the JVP.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.func import jvp, vjp, vmap

from ..core.linalg import sqnorms
from ..core.memory import scope_cache
from .rules import math_attention

if TYPE_CHECKING:
    from .ghost import GhostNorms

__all__ = ["Evaluator", "Path", "JVP_PATHS", "VJP_PATHS", "quiet", "unflatten_rows", "over_probes", "jvp_rows", "pullback_rows"]


@dataclass(frozen=True)
class Path:
    """One way of evaluating a chunk of AD passes."""

    name: str
    batched: bool  # vmap over probes, or a Python loop
    mkldnn_off: bool  # run with oneDNN disabled (LSTM forward-mode on CPU needs it)
    double_vjp: bool = False  # JVP as the VJP of a VJP (where forward-mode AD is missing)
    rules: bool = False  # the function with the per-module rules substituted

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        mk = torch.backends.mkldnn.flags(enabled=False) if self.mkldnn_off else contextlib.nullcontext()
        with quiet(), mk, math_attention():
            yield


JVP_PATHS = (
    Path("vmap-forward+rules", True, False, rules=True),
    Path("vmap-forward", True, False),
    Path("vmap-forward-no-mkldnn", True, True),
    Path("loop-forward", False, False),
    Path("loop-forward-no-mkldnn", False, True),
    Path("vmap-double-vjp", True, False, True),
    Path("loop-double-vjp", False, False, True),
    Path("loop-double-vjp-no-mkldnn", False, True, True),
)
VJP_PATHS = (
    Path("vmap-reverse+rules", True, False, rules=True),
    Path("vmap-reverse", True, False),
    Path("vmap-reverse-no-mkldnn", True, True),
    Path("loop-reverse", False, False),
    Path("loop-reverse-no-mkldnn", False, True),
)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RNN module weights are not part of single contiguous.*")
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*functional_call.*")
        # entering torch.backends.mkldnn.flags(...) on CPU builds warns about Intel-GPU TF32
        warnings.filterwarnings("ignore", category=UserWarning, message=".*TF32 acceleration on top of oneDNN.*")
        yield


def find_path(paths: Sequence[Path], name: str | None) -> Path | None:
    if name is None:
        return None
    for p in paths:
        if p.name == name:
            return p
    raise ValueError(f"unknown path {name!r}; choose one of {[p.name for p in paths]}")


def is_randomness_error(e: Exception) -> bool:
    return "randomness" in str(e) and "vmap" in str(e)


def random_model_error() -> ValueError:
    return ValueError(
        "the model draws random numbers (e.g. Dropout in training mode), so its NTK is not defined: call model.eval() first"
    )


def agrees(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a fast path's result matches the generic path's, for passes in ``dtype``: relative
    1e-10 in float64, 1e-4 otherwise."""
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    scale = torch.linalg.vector_norm(ref)
    return bool(torch.linalg.vector_norm(got - ref) <= tol * scale) if scale > 0 else bool((got == 0).all())


class ForwardModeMismatch(RuntimeError):
    """Forward-mode J·u disagrees with reverse mode's Jᵀ (e.g. ``torch.no_grad()`` in the forward)."""


#: relative tolerance of the forward/reverse consistency check, by dtype (others: 3e-2)
_ADJOINT_RTOL = {torch.float64: 1e-8, torch.float32: 1e-3}


class Evaluator:
    """Evaluates ``J·U`` and ``Jᵀ·V`` on blocks of probe *rows*, ``chunk_size`` at a time.

    ``f(*primals)`` is the flattened state (``dim`` numbers); ``ruled_f`` the same function with
    rules (or None).
    A path is chosen per mode on first use and kept; one that fails falls back to the next.
    """

    def __init__(
        self,
        f: Callable[..., torch.Tensor],
        primals: Sequence[torch.Tensor],
        ruled_f: Callable[..., torch.Tensor] | None,
        dim: int,
        chunk_size: int,
        jvp_path: str | None = None,
        vjp_path: str | None = None,
        ruled_chunk_size: int | None = None,
        ghost: Callable[..., GhostNorms | None] | None = None,
    ) -> None:
        self.f = f
        self.dim = dim  # D, the size of the flattened state
        self.ruled_f = ruled_f
        self.primals = tuple(primals)
        self.shapes = [p.shape for p in self.primals]
        self.chunk_size = chunk_size
        self.ruled_chunk_size = ruled_chunk_size or chunk_size
        self.paths: dict[str, Path | None] = {"jvp": find_path(JVP_PATHS, jvp_path), "vjp": find_path(VJP_PATHS, vjp_path)}
        for mode, p in self.paths.items():
            if p is not None and p.rules and ruled_f is None:
                raise ValueError(f"{mode}_path={p.name!r}: no submodule of this model has a rule (see ntkscope.operators.rules)")
        self.forced = {"jvp": jvp_path is not None, "vjp": vjp_path is not None}
        self.broken: dict[str, Exception] = {}
        self.rules_ok: dict[str, bool] = {}  # per mode: checked against a generic path
        self.forward_ok: bool | None = None  # forward mode checked against reverse mode
        self._ghost_factory = ghost  # built on first use (one recording forward)
        self.ghost: GhostNorms | None = None
        self.ghost_ok: bool | None = None  # None: not tried; True once a ghost result was used
        self.ghost_checked: dict[str, bool] = {}  # per result kind: agreed with a generic path
        self.ghost_chunk_size: int | None = None  # set: the user's chunk size; else the ghost's own
        self.ghost_path = "vmap-reverse+rules+ghost" if ruled_f is not None else "vmap-reverse+ghost"
        self.blocks: GhostNorms | None = None  # every linear layer ghosted, for the per-example blocks
        self.blocks_ok: bool | None = None  # whether they were found (None: not looked for)
        self._blocks_key: Any = None  # what they were found for: the state's blocks and the values' fingerprints
        self._blocks_never = False  # the model's layers rule them out, whatever the values

    # -- paths ---------------------------------------------------------------------------------

    def candidates(self, mode: str) -> list[Path]:
        every = JVP_PATHS if mode == "jvp" else VJP_PATHS
        rules = self.ruled_f is not None and self.rules_ok.get(mode) is not False
        forward = mode != "jvp" or self.forward_ok is not False
        return [p for p in every if (rules or not p.rules) and (forward or p.double_vjp)]

    def _fn(self, path: Path) -> Callable[..., torch.Tensor]:
        if not path.rules:
            return self.f
        assert self.ruled_f is not None  # rules paths are candidates only when there are rules
        return self.ruled_f

    def _eval(self, mode: str, path: Path, chunk: torch.Tensor, cache: dict[Any, Any]) -> list[torch.Tensor]:
        """The chunk's results as ``(m, ·)`` blocks: one per parameter (VJP) or the state (JVP)."""
        f = self._fn(path)
        key = (path.mkldnn_off, path.rules, path.double_vjp)
        if mode == "vjp":
            if key not in cache:  # one forward per call, reused by every chunk
                cache[key] = vjp(f, *self.primals)[1]
            return pullback_rows(cache[key], chunk, path.batched)
        tangents = unflatten_rows(chunk, self.shapes)
        if not path.double_vjp:
            return [jvp_rows(f, self.primals, tangents, path.batched)]
        # J u as the VJP of the linear map w ↦ Jᵀw; built once per call (one forward, one
        # backward), then applied to every probe of every chunk
        if key not in cache:
            w0 = torch.zeros(self.dim, dtype=chunk.dtype, device=chunk.device)
            cache[key] = vjp(lambda w: vjp(f, *self.primals)[1](w), w0)[1]
        vjp2 = cache[key]
        return [over_probes(lambda *t: vjp2(t)[0], tangents, path.batched)]

    def _verify(self, mode: str, row: torch.Tensor, got: torch.Tensor) -> bool:
        """Whether the rules agree with the first generic path that works, on one probe."""
        for p in self.candidates(mode):
            if p.rules:
                continue
            try:
                with p.context():
                    ref = _cat(self._eval(mode, p, row, {}))
            except Exception:  # noqa: S112 — try the next generic path
                continue
            return agrees(got, ref, row.dtype)
        return True  # no generic path works (e.g. no forward-mode rule): the rules are the only way

    def _check_forward(self, u: torch.Tensor, ju: torch.Tensor) -> bool:
        """Whether forward mode's ``Ju`` (one probe ``u``) is reverse mode's: ``(Jᵀ(Ju))·u`` must
        equal ``‖Ju‖²``.  One uncounted VJP pass, once per kernel; True where no reverse path works."""
        for p in VJP_PATHS:
            if p.rules:
                continue
            try:
                with p.context():
                    g = _cat(self._eval("vjp", p, ju, {}))
            except Exception:  # noqa: S112 — try the next reverse path
                continue
            a = float(ju.to(torch.float64).square().sum())
            b = float((g.to(torch.float64) * u.to(torch.float64)).sum())
            return abs(a - b) <= _ADJOINT_RTOL.get(u.dtype, 3e-2) * max(a, abs(b))
        return True

    # -- evaluation ----------------------------------------------------------------------------

    def _cache(self) -> dict[Any, Any]:
        """Per-call state: the forward behind the VJP is shared by every chunk of this call, and by
        every chunk of the enclosing map_probes call (the parameters cannot change in between)."""
        shared = scope_cache()
        return {} if shared is None else shared.setdefault(("evaluator", self), {})  # type: ignore[return-value]

    def run(self, mode: str, rows: torch.Tensor, reduce: Callable[[list[torch.Tensor]], torch.Tensor] | None = None) -> torch.Tensor:
        """``rows`` (m probes) through ``mode``: ``(m, D)`` or ``(m, P)`` rows, or ``reduce`` of
        each chunk's blocks (a list of ``(m, ·)`` column groups), concatenated: the whole result
        block is never held, nor even one chunk's concatenation.  A mode that failed is tried
        again (the failure may have been the forward's, and passed); ``broken`` keeps the last
        failure for :meth:`NTK.modes` until a call succeeds."""
        path = self.paths[mode]
        order = [path] if path is not None else self.candidates(mode)
        outs = []
        cache = self._cache()
        errors: list[str] = []
        start = 0
        while start < rows.shape[0]:
            p = order[0]
            chunk = rows[start : start + (self.ruled_chunk_size if p.rules else self.chunk_size)]
            try:
                with p.context():
                    out = self._eval(mode, p, chunk, cache)
                if p.rules and not self.forced[mode] and mode not in self.rules_ok:
                    self.rules_ok[mode] = self._verify(mode, chunk[:1], _cat([o[:1] for o in out]))
                    if not self.rules_ok[mode]:
                        raise RuntimeError("the rules disagree with the generic path on a test probe")
                if mode == "jvp" and not p.double_vjp and self.forward_ok is None:
                    self.forward_ok = self._check_forward(chunk[:1], _cat([o[:1] for o in out]))
                    if not self.forward_ok:
                        raise ForwardModeMismatch(
                            "forward-mode J·u disagrees with reverse mode (torch.no_grad() inside the forward? forward-mode AD "
                            "ignores it, backpropagation does not)"
                        )
            except Exception as e:  # try the next path
                if is_randomness_error(e):
                    raise random_model_error() from e
                if isinstance(e, ForwardModeMismatch):  # no forward-mode path will do: only the double VJP
                    order = [p, *(q for q in order if q.double_vjp)]
                elif p.rules:
                    self.rules_ok[mode] = False
                errors.append(f"{p.name}: {type(e).__name__}: {e}")
                if self.forced[mode] or len(order) == 1:
                    self.broken[mode] = RuntimeError("; ".join(errors))
                    raise RuntimeError(no_path_message(mode, errors)) from e
                order.pop(0)
                continue
            outs.append(_cat(out) if reduce is None else reduce(out))
            start += chunk.shape[0]
            self.paths[mode] = p
            self.broken.pop(mode, None)
            order = [p]
        return torch.cat(outs, 0) if len(outs) > 1 else outs[0]

    def sqnorms(self, mode: str, rows: torch.Tensor) -> torch.Tensor:
        """``‖Jᵀv‖²`` / ``‖Ju‖²`` of each row (float64), reduced chunk by chunk.  On the VJP side,
        linear layers whose weight gradients are larger than their inputs' Gram contribute
        ghost norms (:mod:`ntkscope.operators.ghost`), checked once against a generic path."""
        out = self._ghost("sqnorms", rows) if mode == "vjp" else None
        return self.run(mode, rows, reduce=sqnorms) if out is None else out

    def gram_rows(self, mode: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows with the inner products of the one-sided products (``(m, ·)``): on the VJP side
        with ghosted layers, their shorter isometric image (:meth:`GhostNorms.gram_rows`)."""
        out = self._ghost("gram_rows", rows) if mode == "vjp" else None
        return self.run(mode, rows) if out is None else out

    def ghost_norms(self) -> GhostNorms | None:
        """The ghost-norm evaluator (built on first use: one forward without gradients), or None
        where no layer is ghosted, a VJP path is forced or the ghost failed."""
        if self._ghost_factory is None or self.forced["vjp"] or "vjp" in self.broken or self.ghost_ok is False:
            return None
        if self.ghost is None:
            try:
                with quiet(), math_attention():
                    self.ghost = self._ghost_factory(self.primals)
            except Exception:  # noqa: BLE001 — the generic path does without
                self.ghost = None
            if self.ghost is None:
                self.ghost_ok = False
        return self.ghost

    def find_blocks(self, blocks: torch.Tensor, G: int, key: Any, inputs: Sequence[torch.Tensor] = ()) -> bool:
        """Whether ``Σ_b ‖J_bᵀv_b‖²`` over the state's blocks (``blocks``: each entry's block,
        ``key`` naming them; ``inputs``, read live too) can be had from ghost norms
        (:meth:`GhostNorms.find_blocks`): every analysed parameter in a ghosted layer, every row's
        cotangent from one block, and one probe on two blocks agreeing with two generic passes
        (uncounted, like every check).  Looked for again when ``key`` or the parameters' values
        change (training in place moves an NTK's point, and a ReLU can open a path between
        examples); values, not write counters, since ``p.data`` writes bump none."""
        if self._blocks_never:  # no analysed parameter set can change that: no fingerprints to take
            return False
        shared = scope_cache()  # the chunks of one call: the values cannot change in between
        if shared is not None and shared.get(("blocks", self)) == key:
            return bool(self.blocks_ok)
        if not self.blocks_ok and self._blocks_key is not None and self._blocks_key[0] == key:
            return False  # refused for these blocks before: a refusal is never wrong, so no fingerprint to take
        if self._blocks_key != (key, self._fingerprint(inputs)):
            self.blocks_ok = self._find_blocks(blocks, G)
            self._blocks_key = (key, self._fingerprint(inputs))  # after the build: the ghost's fixed values count too
        if shared is not None:
            shared[("blocks", self)] = key
        return bool(self.blocks_ok)

    @property
    def blocks_ruled_out(self) -> bool:
        """Whether the model's layers rule per-example blocks out, whatever the values."""
        return self._blocks_never

    def _fingerprint(self, inputs: Sequence[torch.Tensor]) -> tuple[int, ...]:
        """The parameters', the blocks' fixed values and ``inputs``, bit for bit (:func:`fingerprint`)."""
        fixed = self.blocks.base.values() if self.blocks is not None else ()
        return fingerprint((*self.primals, *fixed, *inputs))

    def _find_blocks(self, blocks: torch.Tensor, G: int) -> bool:
        self.ghost_checked.pop("block_sqnorms", None)
        self.blocks = None
        if self._ghost_factory is None or self.forced["vjp"]:
            self._blocks_never = True
            return False
        if "vjp" in self.broken:
            return False
        try:
            with quiet(), math_attention():
                g = self.blocks = self._ghost_factory(self.primals, every=True)
                if g is None or g.free:  # a parameter outside the supported layers
                    self._blocks_never = True
                    return False
                p = g.pullback()
                if not g.find_blocks(p, blocks, G, step=self.ghost_chunk_size or g.chunk_size or 8):
                    return False
                gen = torch.Generator().manual_seed(0x626C6B)
                v = torch.randn(self.dim, generator=gen, dtype=torch.float64).to(device=blocks.device, dtype=self.primals[0].dtype)
                two = torch.stack([v * (blocks == 0), v * (blocks == G - 1)])
                got = g.block_sqnorms(p, two.sum(0, keepdim=True))
            ref = self.run("vjp", two, reduce=sqnorms).sum().reshape(1)
        except Exception as e:
            if is_randomness_error(e):
                raise random_model_error() from e
            return False
        self.ghost_checked["block_sqnorms"] = agrees(got, ref, two.dtype)
        return self.ghost_checked["block_sqnorms"]

    def block_sqnorms(self, rows: torch.Tensor) -> torch.Tensor | None:
        """``Σ_b ‖J_bᵀv_b‖²`` of each row (float64), or None where :meth:`find_blocks` has not
        succeeded or the ghost failed since."""
        return self._ghost("block_sqnorms", rows) if self.blocks_ok else None

    def _ghost(self, what: str, rows: torch.Tensor) -> torch.Tensor | None:
        """``what`` ("sqnorms", "gram_rows" or "block_sqnorms") of ``rows`` with ghost norms, or None where they
        do not apply (no ghosted layer, a forced path, or a failed check: the caller's generic
        path then runs)."""
        g = self.blocks if what == "block_sqnorms" else self.ghost_norms()
        if self.ghost_checked.get(what) is False or g is None:
            return None
        cache = self._cache()
        key = "blocks" if g is self.blocks else "ghost"
        size = self.ghost_chunk_size or g.chunk_size or (self.ruled_chunk_size if self.ruled_f is not None else self.chunk_size)
        outs = []
        try:
            with quiet(), math_attention():
                if key not in cache:
                    cache[key] = g.pullback()
                for start in range(0, rows.shape[0], size):
                    outs.append(getattr(g, what)(cache[key], rows[start : start + size]))
                    if what not in self.ghost_checked:
                        self.ghost_checked[what] = self._check_ghost(what, rows[start : start + 2], outs[0][:2])
                        if not self.ghost_checked[what]:
                            return None
        except Exception as e:
            if is_randomness_error(e):
                raise random_model_error() from e
            self.ghost_checked[what] = False
            return None
        if g is self.ghost:
            self.ghost_ok = True
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _check_ghost(self, what: str, rows: torch.Tensor, got: torch.Tensor) -> bool:
        """The ghost result of (up to) two probes against the generic path's: squared norms, or
        the probe Gram of the isometric rows."""
        if what == "sqnorms":
            ref = self.run("vjp", rows, reduce=sqnorms)
        else:
            V = self.run("vjp", rows).to(torch.float64)
            ref, got = V @ V.T, got.to(torch.float64) @ got.to(torch.float64).T
        return agrees(got, ref, rows.dtype)


def fingerprint(ts: Sequence[torch.Tensor], piece: int = 1 << 22) -> tuple[int, ...]:
    """Two sums of each tensor's bits, one weighted by position: any write changes them but for
    a collision.  One pass over the numbers, ``piece`` at a time (no copy of a large model)."""
    out = []
    for t in ts:
        flat = t.detach().reshape(-1)
        if flat.is_floating_point() or flat.is_complex():
            flat = flat.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
        plain = weighted = 0
        for s in range(0, flat.numel(), piece):
            bits = flat[s : s + piece].to(torch.int64)
            plain += int(bits.sum())
            weighted += int((bits * torch.arange(s + 1, s + 1 + bits.numel(), device=bits.device)).sum())
        out += [plain, weighted]
    return tuple(out)


def no_path_message(mode: str, errors: list[str]) -> str:
    """One line saying what failed (and, for the JVP, what to use instead), then each path's
    error once: the paths mostly fail on the same missing rule."""
    first = errors[0].split(": ", 1)[-1].splitlines()[0][:300]
    head = f"no {mode.upper()} evaluation path works for this model ({first})"
    if mode == "jvp":
        head += "; forward-mode AD is unavailable here: method='vjp' (the one-sided trace and norms) needs only reverse mode"
    seen: dict[str, list[str]] = {}
    for err in errors:
        name, _, msg = err.partition(": ")
        seen.setdefault(msg.strip()[:500], []).append(name)
    return head + "".join(f"\n  {', '.join(names)}: {msg}" for msg, names in seen.items())


# -- one chunk of probes through torch.func: shared by the Evaluator and ntkscope.differentiable --


def unflatten_rows(rows: torch.Tensor, shapes: Sequence[torch.Size]) -> tuple[torch.Tensor, ...]:
    """``(m, P)`` probe rows -> per-parameter tangents ``(m, *shape)`` (parameters in order)."""
    parts = torch.split(rows, [math.prod(s) for s in shapes], dim=1)
    return tuple(p.reshape(rows.shape[0], *s) for p, s in zip(parts, shapes))


def over_probes(push: Callable[..., torch.Tensor], tangents: Sequence[torch.Tensor], batched: bool = True) -> torch.Tensor:
    """``push`` of each probe (the i-th rows of ``tangents``), stacked: ``vmap`` over the probes,
    or a Python loop where ``vmap`` is unsupported."""
    if batched:
        return vmap(push)(*tangents)  # type: ignore[no-any-return]
    return torch.stack([push(*(t[i] for t in tangents)) for i in range(tangents[0].shape[0])])


def jvp_rows(f: Callable[..., torch.Tensor], primals: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor], batched: bool = True) -> torch.Tensor:
    """``J u_i`` (rows ``(m, D)``) of the flat function ``f`` at ``primals`` for per-parameter
    tangent blocks ``(m, *shape)``, with :func:`torch.func.jvp`.  Differentiable in the primals."""
    primals = tuple(primals)
    return over_probes(lambda *t: jvp(f, primals, t)[1], tangents, batched)


def pullback_rows(pullback: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], rows: torch.Tensor, batched: bool = True) -> list[torch.Tensor]:
    """``Jᵀw_i`` for probe rows ``w_i`` (``(m, D)``) through the pullback of :func:`torch.func.vjp`:
    one ``(m, numel)`` block per parameter.  Differentiable in the primals of the pullback."""
    if batched:
        parts = vmap(pullback)(rows)
    else:
        cols = [pullback(r) for r in rows]
        parts = tuple(torch.stack([c[i] for c in cols]) for i in range(len(cols[0])))
    return [p.reshape(rows.shape[0], -1) for p in parts]


def _cat(blocks: list[torch.Tensor]) -> torch.Tensor:
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, 1)
