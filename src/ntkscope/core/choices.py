"""Choices given as strings or enum members (methods, probe distributions)."""

from __future__ import annotations

import enum
from typing import TypeVar

E = TypeVar("E", bound=enum.Enum)


def parse_choice(cls: type[E], value: str | E, what: str) -> E:
    """The member of the string enum ``cls`` named by ``value``, or a ``ValueError`` naming
    ``what`` was asked for and listing the choices."""
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(repr(c.value) for c in cls)
        raise ValueError(f"unknown {what} {value!r}; choose one of {choices}") from None
