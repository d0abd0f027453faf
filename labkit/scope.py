"""Where a technique applies: the vocabulary every technique config and the analytic
counts share (block ``layers``, model ``parts``), with the checks that read a notebook's
string parameters. A leaf module: it imports nothing of labkit but :mod:`labkit.validate`,
so the counts (:mod:`labkit.accounting`) and the techniques use one vocabulary."""
from __future__ import annotations

from . import validate as V

ATTN_LINEARS = ("q", "k", "v", "o")
FFN_LINEARS = ("up", "gate", "down")
PARTS = ("attn", *(f"attn.{x}" for x in ATTN_LINEARS),
         "ffn", *(f"ffn.{x}" for x in FFN_LINEARS), "head")


def layers_field(value, name: str = "layers") -> tuple[int, ...]:
    """A tuple of distinct block indices >= 0, sorted; ``()`` means every block. A string
    ``"0,2"`` (a notebook parameter) is read as ``(0, 2)``, ``""`` as ``()``."""
    if isinstance(value, str):
        try:
            value = tuple(int(x) for x in value.replace(" ", "").split(",") if x)
        except ValueError:
            raise V.LabkitConfigError(name, value, "comma-separated block indices, e.g. "
                                      "'0,2' ('' = every block)") from None
    if isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, tuple):
        raise V.LabkitConfigError(name, value, "a tuple of block indices (() = every block)")
    out = tuple(V.integer(name, i, 0) for i in value)
    if len(set(out)) != len(out):
        raise V.LabkitConfigError(name, value, "distinct block indices")
    return tuple(sorted(out))


def parts_field(value, allowed: tuple[str, ...] = PARTS, name: str = "parts") -> tuple[str, ...]:
    """A non-empty tuple of distinct names from ``allowed`` (a subset of :data:`PARTS`).
    A string ``"attn,ffn"`` (a notebook parameter) is read as ``("attn", "ffn")``."""
    if isinstance(value, str):
        value = tuple(x for x in value.replace(" ", "").split(",") if x)
    if isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, tuple) or not value or len(set(value)) != len(value):
        raise V.LabkitConfigError(name, value, "a non-empty tuple of distinct names from "
                                  + ", ".join(repr(a) for a in allowed))
    for p in value:
        if p not in allowed:
            raise V.LabkitConfigError(name, value, "names from " +
                                      ", ".join(repr(a) for a in allowed))
    return value


def scope_fields(config, allowed_parts: tuple[str, ...] | None = None) -> None:
    """Validate and normalise a frozen config's ``layers`` (and ``parts``, when it has one)
    in ``__post_init__``."""
    if hasattr(config, "layers"):
        object.__setattr__(config, "layers", layers_field(config.layers))
    if hasattr(config, "parts"):
        object.__setattr__(config, "parts",
                           parts_field(config.parts, allowed_parts or PARTS))


def block_indices(n_layers: int, layers: tuple[int, ...] = ()) -> list[int]:
    """The block indices ``layers`` names in a model of ``n_layers`` blocks (checked)."""
    for i in layers:
        if i >= n_layers:
            raise V.LabkitConfigError("layers", layers,
                                      f"block indices in [0, {n_layers - 1}] (() = every block)")
    return list(layers) if layers else list(range(n_layers))


def expand_parts(parts: tuple[str, ...]) -> list[str]:
    """Fine part names (``"attn.q"``, ...) a tuple of parts covers, in :data:`PARTS` order;
    ``"head"`` stays as it is."""
    out = []
    for p in parts:
        if p == "attn":
            out += [f"attn.{x}" for x in ATTN_LINEARS]
        elif p == "ffn":
            out += [f"ffn.{x}" for x in FFN_LINEARS]
        else:
            out.append(p)
    return [p for p in PARTS if p in set(out)]


__all__ = ["ATTN_LINEARS", "FFN_LINEARS", "PARTS", "block_indices", "expand_parts",
           "layers_field", "parts_field", "scope_fields"]
