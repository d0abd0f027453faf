"""The technique registry: a validated config dataclass, a registered module swap, one
vocabulary for *where* a technique applies and one model-check hook.

Usage, in the spirit of torchao's ``quantize_(model, Config())``::

    @register(LowRankAttentionConfig)
    def _apply(model, config): ...          # swaps modules in place

    apply_(model, LowRankAttentionConfig(k=64))
    expected(model.cfg, LowRankAttentionConfig(k=64))  # analytic params/FLOPs/bytes

Where a technique applies is said with two plain-literal config fields, the same in every
technique:

* ``layers: tuple[int, ...] = ()``: block indices; ``()`` means every block.
* ``parts: tuple[str, ...]``: from :data:`PARTS`, coarse (``"attn"``, ``"ffn"``, ``"head"``
  for the linears outside the blocks) or fine (``"attn.q"``, ``"ffn.up"``, ...).

:func:`scope_fields` validates them in a config's ``__post_init__``; :func:`modules` and
:func:`linears` turn ``(model, layers, parts)`` into the modules they name.

The model check: :func:`check` validates ``layers`` against the model and then calls the
config's own ``check(model_cfg)`` (a rank above the dimension, a decoder for an
encoder-only technique). Both :func:`apply_` and :func:`expected` call it, so a bad value
fails with the same :class:`~labkit.validate.LabkitConfigError` everywhere.

Every swap goes through :func:`swap_modules`, the single shared walker, so techniques
compose: each one only replaces the modules its ``select`` picks, and a module used in
several places (cross-layer sharing) is replaced once, by one new module, everywhere.

Restoring (:func:`restoring`): :func:`labkit.load` re-applies a saved model's techniques
inside ``with restoring():``, then loads every tensor from the file. There a technique only
builds its structure (modules, parameters and buffers of the right shapes); whatever it would
choose from the weights or from calibration data (magnitude masks, activation-aware scores,
an SVD, bits from a Hessian) is skipped, because the saved values replace it. A technique
whose ``apply_`` computes from weights or data checks :func:`is_restoring`.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import inspect
from collections.abc import Callable

from torch import nn

from .. import validate as V
from ..scope import (  # noqa: F401  (the scope vocabulary, re-exported)
    ATTN_LINEARS,
    FFN_LINEARS,
    PARTS,
    block_indices,
    expand_parts,
    layers_field,
    parts_field,
    scope_fields,
)


@dataclasses.dataclass
class Technique:
    """What labkit knows of one technique config class: how to apply it to a model and how
    to count it (``account(table, model_cfg, config)`` edits a
    :class:`labkit.accounting.Table` the way applying edits the model; it may return a dict
    of analytic extras reported under ``detail``)."""

    apply: Callable | None = None
    account: Callable | None = None


_TECHNIQUES: dict[type, Technique] = {}  # the one registry
_RESTORING = contextvars.ContextVar("labkit_restoring", default=False)

# ---------------------------------------------------------------------------- where


def _blocks(model: nn.Module):
    """``(prefix, blocks, attn name map, ffn name map)`` for labkit's Transformer or a
    Hugging Face BERT (e.g. the pretrained MiniLM): the one place their names differ."""
    if hasattr(model, "blocks"):
        return "blocks", model.blocks, {"attn": "attn", **{f"attn.{x}": f"attn.{x}"
                                                           for x in ATTN_LINEARS}}, \
            {"ffn": "ffn", **{f"ffn.{x}": f"ffn.{x}" for x in FFN_LINEARS}}
    enc = getattr(model, "encoder", None)
    if enc is not None and hasattr(enc, "layer"):
        prefix = "encoder.layer" if not hasattr(model, "bert") else "bert.encoder.layer"
        return prefix, enc.layer, {"attn": "attention", "attn.q": "attention.self.query",
                                   "attn.k": "attention.self.key",
                                   "attn.v": "attention.self.value",
                                   "attn.o": "attention.output.dense"}, \
            {"ffn.up": "intermediate.dense", "ffn.down": "output.dense"}
    raise TypeError(f"{type(model).__name__} has neither labkit's .blocks nor a BERT "
                    "encoder.layer list: no parts to select")


def _get(module: nn.Module, dotted: str):
    for attr in dotted.split("."):
        module = getattr(module, attr, None)
        if module is None:
            return None
    return module


def modules(model: nn.Module, layers: tuple[int, ...] = (),
            parts: tuple[str, ...] = ("attn", "ffn")) -> dict[str, nn.Module]:
    """``{qualified name: module}`` for every part in every selected block, as named
    (``"attn"`` gives the attention module, ``"attn.q"`` its query linear). A module shared
    by several blocks appears under each name. ``"head"``: the linears outside the blocks."""
    prefix, blocks, amap, fmap = _blocks(model)
    out = {}
    for i in block_indices(len(blocks), layers):
        for p in parts:
            if p == "head":
                continue
            local = (amap if p.startswith("attn") else fmap).get(p)
            m = _get(blocks[i], local) if local else None
            if m is not None:
                out[f"{prefix}.{i}.{local}"] = m
    if "head" in parts:
        inside = {id(m) for m in blocks.modules()}
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and id(m) not in inside and not name.startswith(prefix):
                out[name] = m
    return out


def linears(model: nn.Module, layers: tuple[int, ...] = (),
            parts: tuple[str, ...] = ("attn", "ffn")) -> dict[str, nn.Module]:
    """Like :func:`modules` with coarse parts expanded to their linears: the weight
    matrices that sparsity, quantisation or factorisation act on."""
    return modules(model, layers, tuple(expand_parts(parts)))


def linear_selector(model: nn.Module, layers: tuple = (), parts: tuple = ("attn", "ffn"),
                    exact: bool = True):
    """The one rule for which linears a quantization technique takes, as a
    :func:`swap_modules` ``select(name, module)``: the linears of ``parts`` in the blocks
    ``layers`` (this vocabulary also reads a Hugging Face BERT such as all-MiniLM-L6-v2).
    ``exact`` (default): only plain ``nn.Linear``, so a layer another technique swapped in
    (masked, low-rank, already quantized) is left as it is; ``exact=False`` also takes
    ``nn.Linear`` subclasses."""
    chosen = {id(m) for m in linears(model, layers, parts).values()}

    def select(name, m):
        if id(m) not in chosen or not isinstance(m, nn.Linear):
            return False
        return not exact or type(m) is nn.Linear
    return select


# ---------------------------------------------------------------------------- registry

def register(config_cls: type, apply: Callable | None = None,
             account: Callable | None = None):
    """Register ``config_cls``'s technique: ``apply(model, config) -> model`` and
    ``account(table, model_cfg, config)`` (see :class:`Technique`). Called with neither it
    is a decorator for ``apply`` (``@register(Config)``); :func:`register_account` is the
    one for ``account``. One table holds both, read by :func:`apply_` and :func:`expected`."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"{config_cls.__name__} must be a dataclass")
    entry = _TECHNIQUES.setdefault(config_cls, Technique())
    if apply is not None:
        entry.apply = apply
    if account is not None:
        entry.account = account
    if apply is not None or account is not None:
        return None

    def deco(fn):
        entry.apply = fn
        return fn

    return deco


def register_account(config_cls: type):
    """Decorator: ``fn(table, model_cfg, config)`` is how ``config_cls`` is counted
    (:func:`register` with ``account=fn``)."""
    def deco(fn):
        register(config_cls, account=fn)
        return fn

    return deco


def _apply_fn(config_cls: type) -> Callable | None:
    entry = _TECHNIQUES.get(config_cls)
    return entry.apply if entry is not None else None


def registered() -> list[str]:
    return sorted(c.__name__ for c, t in _TECHNIQUES.items() if t.apply is not None)


def config_class(name: str) -> type | None:
    """The registered config class called ``name`` (None when no technique has it)."""
    return next((c for c, t in _TECHNIQUES.items()
                 if c.__name__ == name and t.apply is not None), None)


@contextlib.contextmanager
def restoring():
    """Inside, :func:`apply_` builds each technique's structure only: values chosen from
    weights or calibration data are skipped, because a saved file supplies them."""
    token = _RESTORING.set(True)
    try:
        yield
    finally:
        _RESTORING.reset(token)


def is_restoring() -> bool:
    """True inside :func:`restoring` (what a technique's ``apply_`` checks)."""
    return _RESTORING.get()


def check(config, model_cfg) -> None:
    """The one model check: ``layers`` within the model, then ``config.check(model_cfg)``.
    Raises :class:`~labkit.validate.LabkitConfigError` naming the field, value and range."""
    if model_cfg is None:
        return
    if hasattr(config, "layers") and isinstance(config.layers, tuple):
        block_indices(model_cfg.n_layers, config.layers)
    own = getattr(config, "check", None)
    if callable(own):
        own(model_cfg)


def takes_calibration(config) -> bool:
    """Whether the technique of ``config`` chooses from data (its apply function takes
    ``calibration``), e.g. activation-aware pruning scores."""
    fn = _apply_fn(type(config))
    return fn is not None and "calibration" in inspect.signature(fn).parameters


def apply_(model: nn.Module, config, calibration=None) -> nn.Module:
    """Apply a technique config to ``model`` in place and return it.

    ``calibration``: batches of training rows (dicts of ``input_ids``, ``padding_mask``,
    ...) for a technique that chooses from data; whether it needs them is the config's
    business (it says so with a named error), and a technique that takes none refuses them."""
    fn = _apply_fn(type(config))
    if fn is None:
        raise TypeError(f"no technique is registered for {type(config).__name__}; "
                        f"registered: {registered()}")
    check(config, getattr(model, "cfg", None))
    if not hasattr(model, "base_cfg") and hasattr(model, "cfg"):
        model.base_cfg = model.cfg  # the config before any technique (LayerPrune changes cfg)
    was_training = model.training  # modules a technique adds start in train mode
    if takes_calibration(config):
        out = fn(model, config, calibration=calibration)
    elif calibration is not None:
        raise V.LabkitConfigError("calibration", "batches",
                                  f"None: {type(config).__name__} chooses nothing from data")
    else:
        out = fn(model, config)
    applied = list(getattr(model, "applied_techniques", []))
    applied.append({"technique": type(config).__name__, **dataclasses.asdict(config)})
    model.applied_techniques = applied
    out = out if out is not None else model
    return out.train(was_training)


def expected(model_cfg, *configs, seq_len: int | None = None) -> dict:
    """Analytic totals of a model of ``model_cfg`` before and after applying ``configs``
    in order (:mod:`labkit.accounting`'s one schema for every technique and stack):
    ``params_before``, ``params_after``, ``params_ratio`` (before / after), the same for
    ``flops`` (one inference forward pass, batch 1, ``seq_len`` tokens) and ``bytes``,
    ``parts``: the same per part, and ``detail``: what the techniques add beyond the
    totals. ``seq_len`` defaults to ``max_len``, or the shortest projection length of a
    technique that fixes one (Linformer's ``seq_len``)."""
    from .. import accounting

    accounted = sorted(c.__name__ for c, t in _TECHNIQUES.items() if t.account is not None)
    for c in configs:
        entry = _TECHNIQUES.get(type(c))
        if entry is None or entry.account is None:
            raise TypeError(f"no expected() accounting is registered for {type(c).__name__}; "
                            f"accounted: {accounted}")
        check(c, model_cfg)
    if seq_len is None:
        lengths = [c.length(model_cfg) for c in configs if hasattr(c, "length")]
        seq_len = min([model_cfg.max_len, *lengths])
    before = accounting.table(model_cfg, seq_len)
    after = copy.deepcopy(before)
    detail = {}
    for c in configs:
        detail.update(_TECHNIQUES[type(c)].account(after, model_cfg, c) or {})
    out = accounting.summary(before, after, [type(c).__name__ for c in configs])
    out["detail"] = detail
    return out


def swap_attention(model: nn.Module, layers: tuple[int, ...],
                   make: Callable[[int, nn.Module], nn.Module]) -> nn.Module:
    """Replace the plain softmax attention (:class:`labkit.model.Attention`) of the blocks
    ``layers`` with ``make(block index, old)``, the one rule both attention techniques use:
    an attention another technique already replaced is refused, and so is a block without
    one. A shared attention is made once (for its first block) and stays shared."""
    from ..model import Attention

    idx = block_indices(model.cfg.n_layers, layers)
    wanted = {f"blocks.{i}.attn": i for i in idx}

    def new(name, old):
        if type(old) is not Attention:
            raise V.LabkitConfigError(
                "layers", layers, f"blocks whose attention is plain softmax attention "
                                  f"({name} is already {type(old).__name__})")
        return make(wanted[name], old)

    swapped = swap_modules(model, lambda name, m: name in wanted and isinstance(m, Attention),
                           new)
    if len(swapped) != len(idx):
        raise V.LabkitConfigError("layers", layers,
                                  f"blocks with an attention module (found {swapped})")
    return model


def swap_modules(model: nn.Module, select: Callable[[str, nn.Module], bool],
                 make: Callable[[str, nn.Module], nn.Module]) -> list[str]:
    """Replace every submodule ``m`` named ``name`` with ``make(name, m)`` where
    ``select(name, m)``. Children of a replaced module are not visited. A module reached
    under several names (shared across blocks) is made once and that one replacement is
    set everywhere, so sharing survives the swap. Returns the names replaced."""
    swapped, made, new_ids = [], {}, set()

    def walk(parent: nn.Module, prefix: str):
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}.{child_name}" if prefix else child_name
            if id(child) in new_ids:
                continue
            if id(child) in made:
                setattr(parent, child_name, made[id(child)])
                swapped.append(name)
            elif select(name, child):
                new = make(name, child)
                made[id(child)] = new
                new_ids.add(id(new))
                setattr(parent, child_name, new)
                swapped.append(name)
            else:
                walk(child, name)

    walk(model, "")
    return swapped
