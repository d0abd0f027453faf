"""Input checks shared by configs, the command line and notebook parameters.

Every check raises :class:`LabkitConfigError` (a ``ValueError``) whose message names the
parameter, the value it got and what is allowed, so a papermill run fails in its first
cells with a message a person can act on.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


class LabkitConfigError(ValueError):
    """A parameter, config field or CLI flag has a value that is not allowed."""

    def __init__(self, name: str, value: Any, allowed: str):
        self.name, self.value, self.allowed = name, value, allowed
        super().__init__(f"{name}={value!r} is not allowed: expected {allowed}")


def choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    allowed = list(allowed)
    if value not in allowed:
        raise LabkitConfigError(name, value, "one of " + ", ".join(repr(a) for a in allowed))
    return value


def integer(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """An int (bools refused) in [lo, hi]; either bound may be open."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise LabkitConfigError(name, value, f"an integer{_range(lo, hi, '[', ']')}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise LabkitConfigError(name, value, f"an integer{_range(lo, hi, '[', ']')}")
    return value


def number(name: str, value: Any, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False) -> float:
    """A real number in the interval; ``lo_open``/``hi_open`` exclude the bound."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
        and not math.isnan(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        what = _range(lo, hi, "(" if lo_open else "[", ")" if hi_open else "]")
        raise LabkitConfigError(name, value, f"a number{what}")
    return float(value)


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise LabkitConfigError(name, value, "True or False")
    return value


def _range(lo, hi, left: str, right: str) -> str:
    if lo is None and hi is None:
        return ""
    if hi is None:
        return f" >= {lo}" if left == "[" else f" > {lo}"
    if lo is None:
        return f" <= {hi}" if right == "]" else f" < {hi}"
    return f" in {left}{lo}, {hi}{right}"


def layer_indices(name: str, value: Any) -> tuple[int, ...] | None:
    """``None`` (every block) or a non-empty tuple/list of block indices >= 0, as a tuple."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or not value:
        raise LabkitConfigError(name, value, "None or a non-empty tuple of block indices")
    return tuple(integer(name, i, 0) for i in value)


def params(names_and_values: dict[str, Any], spec: dict[str, tuple]) -> dict[str, Any]:
    """Validate notebook parameters against ``spec``: ``{name: (kind, *args)}``.

    kinds: ``("int", lo, hi)``, ``("float", lo, hi)``, ``("choice", options)``, ``("bool",)``,
    ``("str",)``. Unknown names in ``names_and_values`` are ignored (papermill injects more).
    """
    out = {}
    for name, (kind, *args) in spec.items():
        value = names_and_values[name]
        if kind == "int":
            out[name] = integer(name, value, *args)
        elif kind == "float":
            out[name] = number(name, value, *args)
        elif kind == "choice":
            out[name] = choice(name, value, args[0])
        elif kind == "bool":
            out[name] = boolean(name, value)
        elif kind == "str":
            if not isinstance(value, str):
                raise LabkitConfigError(name, value, "a string")
            out[name] = value
        else:  # pragma: no cover - programming error in a notebook
            raise TypeError(f"unknown parameter kind {kind!r} for {name}")
    return out

