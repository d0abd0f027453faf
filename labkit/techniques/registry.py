"""The technique registry: a validated config dataclass plus a registered module swap.

Usage, in the spirit of torchao's ``quantize_(model, Config())``::

    @register(LowRankAttentionConfig)
    def _apply(model, config): ...          # swaps modules in place

    apply_(model, LowRankAttentionConfig(k=64))
    expected(model.cfg, LowRankAttentionConfig(k=64))  # analytic parameter/FLOP change

Every swap goes through :func:`swap_modules`, the single shared walker, so techniques
compose: each one only replaces the modules its ``select`` picks.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

_APPLY: dict[type, Callable] = {}
_EXPECTED: dict[type, Callable] = {}


def register(config_cls: type, expected_fn: Callable | None = None):
    """Decorator: register ``fn(model, config) -> model`` as the way to apply ``config_cls``."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"{config_cls.__name__} must be a dataclass")

    def deco(fn):
        _APPLY[config_cls] = fn
        if expected_fn is not None:
            _EXPECTED[config_cls] = expected_fn
        return fn

    return deco


def register_expected(config_cls: type):
    def deco(fn):
        _EXPECTED[config_cls] = fn
        return fn

    return deco


def registered() -> list[str]:
    return sorted(c.__name__ for c in _APPLY)


def apply_(model: nn.Module, config) -> nn.Module:
    """Apply a technique config to ``model`` in place and return it."""
    fn = _APPLY.get(type(config))
    if fn is None:
        raise TypeError(f"no technique is registered for {type(config).__name__}; "
                        f"registered: {registered()}")
    out = fn(model, config)
    applied = list(getattr(model, "applied_techniques", []))
    applied.append({"technique": type(config).__name__, **dataclasses.asdict(config)})
    model.applied_techniques = applied
    return out if out is not None else model


def expected(model_cfg, config) -> dict:
    """Analytic change a config makes to a model of ``model_cfg`` (params, FLOPs, bytes)."""
    fn = _EXPECTED.get(type(config))
    if fn is None:
        raise TypeError(f"no expected() is registered for {type(config).__name__}")
    return fn(model_cfg, config)


def swap_modules(model: nn.Module, select: Callable[[str, nn.Module], bool],
                 make: Callable[[str, nn.Module], nn.Module]) -> list[str]:
    """Replace every submodule ``m`` named ``name`` with ``make(name, m)`` where
    ``select(name, m)``. Children of a replaced module are not visited. Returns the names."""
    swapped = []

    def walk(parent: nn.Module, prefix: str):
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}.{child_name}" if prefix else child_name
            if select(name, child):
                setattr(parent, child_name, make(name, child))
                swapped.append(name)
            else:
                walk(child, name)

    walk(model, "")
    return swapped
