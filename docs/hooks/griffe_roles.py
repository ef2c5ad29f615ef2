"""Griffe extension: render the Sphinx roles of ntkscope's docstrings as cross-references.

The docstrings use reStructuredText roles (``:class:`~ntkscope.NTK```, ``:func:`trace```) so that
they read well in ``help()``.  mkdocstrings renders Markdown, where a role would show as literal
text; this rewrites each role into an *optional* autoref: a link when the target is documented on
the site, plain code otherwise (so an undocumented target never fails the strict build).
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|obj|exc):`(~?)([^`<>]+?)`")
# ``double backticks`` (reST literals) -> `single` (Markdown code); leave fenced blocks alone
_LITERAL = re.compile(r"``([^`]+?)``")


def _lookup(path: str) -> str | None:
    """The canonical dotted path of an importable ``path`` (where it is defined), else None."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        if inspect.ismodule(obj):
            return obj.__name__
        mod, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        if isinstance(mod, str) and isinstance(qual, str) and mod.startswith("ntkscope"):
            return f"{mod}.{qual}"
        return path  # data or an attribute: documented where it is
    return None


def _qualify(target: str, obj: griffe.Object) -> str:
    module = obj.module.path if isinstance(obj, griffe.Object) else "ntkscope"
    candidates = [target] if target.startswith("ntkscope") else [f"{module}.{target}", f"ntkscope.{target}"]
    for c in candidates:
        found = _lookup(c)
        if found is not None:
            return found
    return candidates[0]


# an Args entry naming several parameters ("a / b: text" or "a, b: text") -> one entry each
_MULTI = re.compile(r"^(?P<ind> +)(?P<names>\w+(?:\s*(?:/|,)\s*\w+)+): (?P<text>.*)$", re.M)


def _split_params(text: str) -> str:
    def one(m: re.Match[str]) -> str:
        names = re.split(r"\s*(?:/|,)\s*", m.group("names"))
        # continuation lines below belong to the last entry, so it carries the text
        last = f"{m.group('ind')}{names[-1]}: {m.group('text')}"
        return "\n".join([f"{m.group('ind')}{n}: see `{names[-1]}`." for n in names[:-1]] + [last])

    return _MULTI.sub(one, text)


def rewrite(text: str, obj: griffe.Object) -> str:
    def role(m: re.Match[str]) -> str:
        short, target = m.group(1) == "~", m.group(2).strip().rstrip("()")
        label = target.rsplit(".", 1)[-1] if short else target
        ident = _qualify(target, obj)
        return f'<autoref identifier="{ident}" optional><code>{label}</code></autoref>'

    out = []
    for i, chunk in enumerate(re.split(r"(^```.*?^```)", text, flags=re.S | re.M)):
        if i % 2:
            out.append(chunk)
        else:
            out.append(_ROLE.sub(role, _LITERAL.sub(r"`\1`", chunk)))
    return "".join(out)


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles and reST literals in every docstring as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(_split_params(obj.docstring.value), obj)
