"""Parameter blocks: which parameters (columns of J) form each block of :func:`~ntkscope.metrics.blocks.parameter_blocks`."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

__all__ = ["ROOT", "REST", "resolve_groups", "column_slices"]

#: Block name of the top module's own parameters.
ROOT = "(root)"
#: Block name of the parameters no block of a ``groups`` dict claims.
REST = "(rest)"


def _owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ROOT


def resolve_groups(
    param_names: Sequence[str], groups: None | str | Mapping[str, str | Sequence[str]] = None
) -> dict[str, list[str]]:
    """Block name -> parameter names, in the kernel's parameter order.

    ``None``: one block per module that owns parameters directly, named by its qualified name
    (``"(root)"`` for the top module's own parameters).  ``"tensor"``: one block per parameter
    tensor.  A dict: block name -> parameter names or glob patterns (``fnmatch``, e.g.
    ``"layers.*.attn.*"``); a pattern that matches nothing, or a parameter claimed by two
    blocks, is an error; parameters no block claims go to a last block ``"(rest)"``.
    """
    names = list(param_names)
    if groups is None:
        out: dict[str, list[str]] = {}
        for n in names:
            out.setdefault(_owner(n), []).append(n)
        return out
    if isinstance(groups, str):
        if groups in ("tensor", "tensors"):
            return {n: [n] for n in names}
        if groups in ("module", "modules"):
            return resolve_groups(names, None)
        raise ValueError(f"groups={groups!r}: use None (one block per module), 'tensor', or a dict name -> patterns")
    if not isinstance(groups, Mapping):
        raise TypeError(f"groups must be None, 'tensor' or a dict name -> parameter names/patterns, not {type(groups).__name__}")
    if not groups:
        raise ValueError("groups is an empty dict: name at least one block")
    claimed: dict[str, str] = {}
    out = {}
    for gname, pats in groups.items():
        if not isinstance(gname, str):
            raise TypeError(f"block names must be strings, got {gname!r}")
        plist = [pats] if isinstance(pats, str) else list(pats)
        if not plist:
            raise ValueError(f"block {gname!r} lists no parameters")
        members: list[str] = []
        for pat in plist:
            if not isinstance(pat, str):
                raise TypeError(f"block {gname!r}: entries must be parameter names or glob patterns, got {type(pat).__name__}")
            hit = [n for n in names if n == pat or fnmatch.fnmatchcase(n, pat)]
            if not hit:
                raise ValueError(f"block {gname!r}: {pat!r} matches no parameter of the kernel (it has {names[:6]}...)")
            for n in hit:
                if n in claimed and claimed[n] != gname:
                    raise ValueError(f"parameter {n!r} is in two blocks: {claimed[n]!r} and {gname!r}")
                if n not in members:
                    claimed[n] = gname
                    members.append(n)
        out[gname] = [n for n in names if n in members]
    rest = [n for n in names if n not in claimed]
    if rest:
        if REST in out:
            raise ValueError(f"block name {REST!r} is reserved for the parameters no block claims")
        out[REST] = rest
    return out


def column_slices(numels: Sequence[int], idx: Sequence[int]) -> list[tuple[int, int]]:
    """The columns of J of the parameters ``idx`` (given each parameter's size, in order) as
    ``[start, end)`` ranges, adjacent ranges merged."""
    offs = [0]
    for n in numels:
        offs.append(offs[-1] + n)
    slices: list[tuple[int, int]] = []
    for i in sorted(idx):
        s, e = offs[i], offs[i + 1]
        if slices and slices[-1][1] == s:
            slices[-1] = (slices[-1][0], e)
        else:
            slices.append((s, e))
    return slices
