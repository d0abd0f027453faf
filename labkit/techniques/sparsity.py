"""Sparsity: choose weights to drop, keep the masks through training, then run the fastest
real kernel for what is left.

Papers: magnitude pruning (Han et al., 2015, "Learning both Weights and Connections for
Efficient Neural Networks"); gradual pruning with a cubic schedule (Zhu & Gupta, 2017, "To
prune, or not to prune"); L1-regularised training then thresholding (the seed paper,
"Research on Inference and Training Acceleration of Large Language Model" (Chen, CISAI
2024): L = L_task + lambda * sum |W_ij|); N:M sparsity (Mishra et al., 2021, "Accelerating
Sparse Deep Neural Networks"); the structures (unstructured, N:M, blocks, neurons, heads) of
"A survey of sparse structures in the multi-layer perceptron of large language models"
(Deshmukh, Lyu, Tokura, Honda, 2024).

Idea. A weight ``W`` (out, in) with a fraction ``p`` of non-zeros costs O(p * out * in)
multiply-adds instead of O(out * in) -- *if* a kernel can skip the zeros. Three independent
choices:

* how weights are chosen (``method``, one strategy object each in :mod:`.pruning`):
  ``magnitude`` one shot, ``gradual`` on the cubic schedule, ``l1`` penalty then threshold;
* the structure (``structure``): ``unstructured``, ``nm``, ``block``, ``row``/``column``,
  ``neuron`` (FFN hidden units) and ``head`` (whole attention heads), masks from
  :mod:`.masks` kept as ``torch.nn.utils.parametrize`` parametrizations (``W -> W * M``),
  so an optimizer step can never revive a pruned weight;
* the execution path, picked by :func:`accelerate` (the one autotuner of
  :mod:`labkit.accelerate`) among the kernels of :mod:`labkit.kernels`.

Cubic schedule (Zhu & Gupta)::

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3,   t0 <= t <= t0 + n * dt

Complexity (y = x W^T, T tokens): dense 2*T*out*in FLOPs; sparse paths 2*T*nnz plus index
overhead; bytes per layout in :func:`labkit.kernels.storage_bytes`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .. import accelerate as A
from .. import kernels as K
from .. import validate as V
from ..kernels import masks as MK
from ..model import MLP, Attention
from . import importance as IM
from .registry import is_restoring, linears, register, scope_fields, swap_modules

STRUCTURES = ("unstructured", "nm", "block", "row", "column", "neuron", "head")
METHODS = ("magnitude", "gradual", "l1")
SCORES = ("weight", "activation")  # what "magnitude" ranks: |W|, or its effect on data
SCOPES = ("layer", "global")
SPARSE_PARTS = ("attn", "ffn")  # where pruning applies (registry vocabulary, coarse parts)
LINEAR_PATHS = K.LINEAR_PATHS
PATHS = K.LINEAR_PATHS
NM_CPU_NOTE = K.NM_CPU_NOTE

# Cross-field rules, one line each: (field, broken when, what is allowed).
_RULES = (
    ("initial_sparsity", lambda c: c.initial_sparsity > c.sparsity,
     lambda c: f"a sparsity <= sparsity={c.sparsity}"),
    ("parts", lambda c: c.structure == "head" and "attn" not in c.parts,
     lambda c: "parts with 'attn' for structure='head'"),
    ("parts", lambda c: c.structure == "neuron" and "ffn" not in c.parts,
     lambda c: "parts with 'ffn' for structure='neuron'"),
    ("scope", lambda c: c.scope == "global" and c.structure != "unstructured",
     lambda c: "'layer' (global ranking is for structure='unstructured')"),
    ("score", lambda c: c.score == "activation" and c.method != "magnitude",
     lambda c: f"'weight' for method={c.method!r} (activation scores are gathered once, on "
               "calibration rows, for one-shot pruning)"),
    ("compensate", lambda c: c.compensate and c.structure not in ("neuron", "head"),
     lambda c: f"False for structure={c.structure!r} (bias compensation folds removed FFN "
               "neurons or heads into a bias)"),
    ("compensate", lambda c: c.compensate and c.method != "magnitude",
     lambda c: f"False for method={c.method!r} (compensation is for one-shot pruning)"
               ),
    ("method", lambda c: c.method == "gradual" and c.structure == "nm",
     lambda c: "'magnitude' or 'l1' for structure='nm' (N:M has the fixed sparsity 1 - n/m, "
               "which a schedule cannot step through)"),
)


@dataclass(frozen=True)
class SparsityConfig:
    """Prune the linears of ``parts`` (``"attn"``, ``"ffn"``) in the blocks ``layers``
    (``()``: every block) to ``sparsity`` with ``structure``.

    ``n``/``m`` are used by ``nm`` (sparsity is then 1 - n/m), ``block`` by ``block``,
    ``l1_lambda`` by ``l1``; ``initial_sparsity``, ``start_step``, ``prune_steps`` (n) and
    ``prune_every`` (dt) are the cubic schedule of ``gradual``.

    ``score``: what one-shot magnitude pruning ranks: ``"weight"`` (``|W|``; a neuron or
    head by the L1 of its weights) or ``"activation"`` (its effect on calibration rows:
    Wanda's ``|W| ||X||`` for a weight, the predicted output error for a neuron or head, see
    :mod:`.importance`). ``compensate``: fold each removed neuron's (head's) mean output
    into the next bias. Both need ``apply_(model, config, calibration=batches)``."""

    sparsity: float = 0.5
    structure: str = "unstructured"
    method: str = "magnitude"
    scope: str = "layer"
    parts: tuple[str, ...] = ("ffn",)
    layers: tuple[int, ...] = ()
    n: int = 2
    m: int = 4
    block: int = 32
    l1_lambda: float = 1e-4
    initial_sparsity: float = 0.0
    start_step: int = 0
    prune_steps: int = 10
    prune_every: int = 10
    score: str = "weight"
    compensate: bool = False

    def __post_init__(self):
        MK.check_sparsity(self.sparsity)
        V.choice("structure", self.structure, STRUCTURES)
        V.choice("method", self.method, METHODS)
        V.choice("scope", self.scope, SCOPES)
        scope_fields(self, SPARSE_PARTS)
        MK.check_nm(self.n, self.m)
        MK.check_block(self.block)
        V.number("l1_lambda", self.l1_lambda, 0.0)
        MK.check_sparsity(self.initial_sparsity, "initial_sparsity")
        V.integer("start_step", self.start_step, 0)
        V.integer("prune_steps", self.prune_steps, 1)
        V.integer("prune_every", self.prune_every, 1)
        V.choice("score", self.score, SCORES)
        if not isinstance(self.compensate, bool):
            raise V.LabkitConfigError("compensate", self.compensate, "True or False")
        for field, broken, allowed in _RULES:
            if broken(self):
                raise V.LabkitConfigError(field, getattr(self, field), allowed(self))

    @property
    def target_sparsity(self) -> float:
        """The sparsity the run ends at: 1 - n/m for N:M, ``sparsity`` otherwise."""
        return 1.0 - self.n / self.m if self.structure == "nm" else self.sparsity

    @property
    def needs_data(self) -> bool:
        """Whether applying it needs calibration rows (activation scores, compensation)."""
        return self.score == "activation" or self.compensate

    @property
    def label(self) -> str:
        """E.g. ``"nm 1:4 (75%)"`` or ``"block 90%"``: the real sparsity, never the ignored
        field."""
        if self.structure == "nm":
            return f"nm {self.n}:{self.m} ({self.target_sparsity:.0%})"
        return f"{self.structure} {self.target_sparsity:.0%}"


# --------------------------------------------------------------------------- masking
class MaskedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is ``W * M`` through parametrize (the simulate stage).

    ``structure``/``n``/``m``/``block`` say what the mask may look like, so
    :func:`accelerate` knows which real kernels apply."""

    kernel_path = "masked-dense"

    @classmethod
    def from_linear(cls, lin: nn.Linear, structure: str, n: int = 2, m: int = 4,
                    block: int = 32) -> MaskedLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight = lin.weight  # the same Parameter: an optimizer that holds it still works
        new.bias = lin.bias
        new.structure, new.n, new.m, new.block = structure, n, m, block
        MK.attach_mask(new, "weight", torch.ones_like(lin.weight, dtype=torch.bool))
        return new

    @property
    def mask(self) -> torch.Tensor:
        return MK.mask_of(self, "weight")


def masked_linears(model: nn.Module) -> dict[str, MaskedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MaskedLinear)}


def attach(model: nn.Module, config: SparsityConfig) -> list[str]:
    """Swap the targeted linears for :class:`MaskedLinear` with all-ones masks (a shared
    module is visited once: its linears are already masked the second time)."""
    chosen = {id(m) for m in linears(model, config.layers, config.parts).values()}
    for name, m in linears(model, config.layers, config.parts).items():
        if type(m) is not nn.Linear and not isinstance(m, MaskedLinear):
            raise TypeError(f"sparsity prunes nn.Linear weights; {name} is a "
                            f"{type(m).__name__} (apply sparsity before, or to other parts "
                            "than, the technique that swapped it in)")
    return swap_modules(
        model, lambda name, m: id(m) in chosen and not isinstance(m, MaskedLinear),
        lambda name, m: MaskedLinear.from_linear(m, config.structure, config.n, config.m,
                                                 config.block))


# Rows (scored by their sum over inputs) and columns of a neuron / head group.
_GROUP_ROLES = {"neuron": (MLP, ("up", "gate"), ("down",)),
                "head": (Attention, ("q", "k", "v"), ("o",))}


def owner_groups(model: nn.Module, structure: str) -> list[tuple[str, nn.Module, dict]]:
    """For neuron/head structures: ``(name, MLP or Attention, {role: masked linear})``,
    each module once even when shared."""
    if structure not in _GROUP_ROLES:
        return []
    cls, rows, cols = _GROUP_ROLES[structure]
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, cls):
            lins = {k: getattr(mod, k) for k in (*rows, *cols)
                    if isinstance(getattr(mod, k, None), MaskedLinear)}
            if lins:
                out.append((name, mod, lins))
    return out


def compute_masks(model: nn.Module, config: SparsityConfig,
                  sparsity: float | None = None, stats: dict | None = None
                  ) -> dict[str, torch.Tensor]:
    """Magnitude masks (scores ``|W * M|``, so pruned weights stay pruned) for every masked
    linear at ``sparsity`` (default the config's). With ``stats`` (from
    :func:`activation_stats`) the scores are activation-aware (``config.score``)."""
    s = config.sparsity if sparsity is None else MK.check_sparsity(sparsity)
    lins = masked_linears(model)
    if config.structure in _GROUP_ROLES:
        by_id = {id(m): n for n, m in lins.items()}
        _, rows, _ = _GROUP_ROLES[config.structure]
        out = {}
        for owner, mod, group in owner_groups(model, config.structure):
            unit = 1 if config.structure == "neuron" else mod.head_dim
            if stats is not None:
                score = _unit_scores(config, mod, stats[owner])  # (hidden,)
            else:
                score = sum((lin.weight.detach().abs().sum(1 if k in rows else 0)
                             for k, lin in group.items()))  # (hidden,)
            keep = MK._group_mask(score, s, unit)  # (hidden,)
            for k, lin in group.items():
                full = (keep[:, None] if k in rows else keep[None, :]).expand_as(lin.weight)
                out[by_id[id(lin)]] = full.clone()
        return out
    scores = {n: (IM.wanda_scores(stats[n], lin.weight) if stats is not None
                  else lin.weight.detach().abs()) for n, lin in lins.items()}
    if config.scope == "global":
        return MK.global_unstructured_masks(scores, s)
    return {n: MK.make_mask(lin.weight, config.structure, s, n=config.n, m=config.m,
                            block=config.block, scores=scores[n]) for n, lin in lins.items()}


def _unit_scores(config: SparsityConfig, mod: nn.Module, m) -> torch.Tensor:
    """Per hidden line of ``mod`` (d_ff neurons, or H * Dh head rows): the predicted error of
    removing its unit, spread evenly over a head's rows (their group sum is the head's)."""
    if config.structure == "neuron":
        return IM.neuron_scores(m, _original(mod.down), config.compensate)
    return (IM.head_scores(m, config.compensate) / mod.head_dim).repeat_interleave(
        mod.head_dim)


def _original(lin: nn.Module) -> torch.Tensor:
    """A masked linear's weight before its mask (what a unit adds while it is kept)."""
    return lin.parametrizations.weight.original if hasattr(lin, "parametrizations") \
        else lin.weight


def activation_stats(model: nn.Module, config: SparsityConfig, calibration) -> dict:
    """Activation moments on ``calibration`` for the units ``config`` prunes: per MLP
    (neurons) or attention (heads) owner, or per masked linear (Wanda)."""
    if config.structure in _GROUP_ROLES:
        owners = {n: mod for n, mod, _ in owner_groups(model, config.structure)}
        key = "neurons" if config.structure == "neuron" else "heads"
        return IM.collect(model, calibration, **{key: owners})
    return IM.collect(model, calibration, linears=masked_linears(model))


def compensate(model: nn.Module, config: SparsityConfig, stats: dict) -> int:
    """Fold every pruned neuron's (head's) mean output into the next bias; returns how many
    units were folded. Call once, right after the one-shot prune."""
    done = 0
    for owner, mod, _group in owner_groups(model, config.structure):
        if config.structure == "neuron":
            removed = ~mod.down.mask.any(0)  # (d_ff,) columns the mask removed
            IM.compensate_neurons(mod.down, _original(mod.down), stats[owner], removed)
        else:
            hd = mod.head_dim
            removed = ~mod.o.mask.any(0).view(-1, hd).any(1)  # (H,)
            IM.compensate_heads(mod.o, stats[owner], removed)
        done += int(removed.sum())
    return done


def set_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    lins = masked_linears(model)
    for name, mask in masks.items():
        MK.set_mask(lins[name], "weight", mask)


def prune(model: nn.Module, config: SparsityConfig, sparsity: float | None = None,
          stats: dict | None = None) -> dict:
    """Recompute and set magnitude masks; returns ``{name: mask}``."""
    masks = compute_masks(model, config, sparsity, stats)
    set_masks(model, masks)
    return masks


def actual_sparsity(model: nn.Module) -> float:
    """Fraction of zeros over all masked (or accelerated sparse) weights in ``model``."""
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, MaskedLinear):
            w = m.weight.detach()
            zeros += int((w == 0).sum())
            total += w.numel()
        elif hasattr(m, "sparse_counts"):
            z, t = m.sparse_counts()
            zeros, total = zeros + z, total + t
    return zeros / total if total else 0.0


def start_(model: nn.Module, config: SparsityConfig) -> None:
    """Prune to where ``config.method`` starts: ``magnitude`` the target, ``gradual`` its
    initial sparsity, ``l1`` nothing (it trains with the penalty first)."""
    if config.method == "magnitude":
        prune(model, config)
    elif config.method == "gradual" and config.initial_sparsity > 0:
        prune(model, config, config.initial_sparsity)


@register(SparsityConfig)
def sparsify_(model: nn.Module, config: SparsityConfig, calibration=None) -> nn.Module:
    """Attach masks to the targeted linears and prune them to where the method starts
    (``magnitude``: the target; ``gradual``: ``initial_sparsity``; ``l1``: nothing yet).
    Activation scores and compensation are computed on ``calibration`` (the model as it is
    before this pruning, every unit present). Restoring a saved model
    (:func:`~.registry.restoring`): masks only, the file has them (and the compensated
    biases)."""
    if is_restoring():
        attach(model, config)
        return model
    if config.needs_data:
        calibration = IM.check_batches(calibration, getattr(model, "cfg", None))
    elif calibration is not None:
        raise V.LabkitConfigError("calibration", "batches", "None for score='weight' without "
                                  "compensation (nothing is chosen from data)")
    attach(model, config)
    if not config.needs_data:
        start_(model, config)
        return model
    stats = activation_stats(model, config, calibration)
    prune(model, config, stats=stats if config.score == "activation" else None)
    if config.compensate:
        compensate(model, config, stats)
    return model


def compact_neurons_(model: nn.Module, sparsity: float = 0.5) -> nn.Module:
    """Structured sparsity made real: prune ``sparsity`` of the FFN hidden neurons by
    magnitude and remove them (:class:`labkit.kernels.CompactedMLP`)."""
    sparsify_(model, SparsityConfig(sparsity=sparsity, structure="neuron"))
    return convert(model, "compacted-dense")


# --------------------------------------------------------------------------- accelerate
def _bake(module: nn.Module) -> nn.Module:
    """A copy of a module with its masked linears as plain dense linears."""
    new = copy.deepcopy(module)
    swap_modules(new, lambda n, m: isinstance(m, MaskedLinear), lambda n, m: K.DenseLinear.of(m))
    return new.requires_grad_(False)


_COMPACT = {"neuron": K.CompactedMLP, "head": K.CompactedAttention}


def _group_structure(mod: nn.Module) -> str | None:
    """``neuron``/``head`` when ``mod`` is an MLP/attention whose masked linears all carry
    that structure (then it is compacted as a whole)."""
    for st, (cls, _, _) in _GROUP_ROLES.items():
        if isinstance(mod, cls):
            lins = [m for m in mod.children() if isinstance(m, MaskedLinear)]
            if lins and all(lin.structure == st for lin in lins):
                return st
    return None


def _linear_candidates(lin: MaskedLinear, paths) -> tuple[dict, str]:
    if lin.structure == "nm":  # one path on CPU: nothing to choose (see kernels/nm.py)
        return {"nm-simulated": K.NMLinear.of_nm(lin, lin.n, lin.m)}, "nm-simulated"
    w = lin.weight.detach()
    tiles = (lin.structure == "block" and w.shape[0] % lin.block == 0
             and w.shape[1] % lin.block == 0)
    ok = {"dense": True, "csr": True, "bsr": tiles, "block-gathered-dense": tiles,
          "compacted-dense": not bool(w.any(1).all()) or not bool(w.any(0).all())}
    return ({p: K.linear_path(lin, p, lin.block) for p, good in ok.items()
             if good and (p in paths or p == "dense")}, "dense")


def sites(paths=PATHS):
    """The :func:`labkit.accelerate.accelerate` sites of a pruned model: whole MLPs /
    attentions for neuron / head masks (dense vs compacted), single masked linears else."""
    def site(name, mod):
        st = _group_structure(mod)
        if st is not None:
            cands = {"dense": _bake(mod)}
            cands["dense"].kernel_path = "dense"
            if "compacted-dense" in paths:
                cands["compacted-dense"] = _COMPACT[st].of(_bake(mod))
            return A.Site(name, mod, cands, "dense")
        if isinstance(mod, MaskedLinear):
            cands, current = _linear_candidates(mod, paths)
            return A.Site(name, mod, cands, current)
        return None
    return lambda model: site


def accelerate(model: nn.Module, *inputs, paths=PATHS, rounds: int = 3,
               min_run_time: float = 0.02, atol: float = 1e-4, margin: float = 0.05,
               verify: bool = True, verify_rounds: int = 5, timer=None) -> list[dict]:
    """Replace every masked layer with its fastest measured path by the rule of
    :mod:`labkit.accelerate` (``dense`` is the current path a sparse one must beat by
    ``margin``; candidates that disagree with the masked layer beyond ``atol`` are
    dropped). Returns the rows."""
    return A.accelerate(model, inputs, sites(paths), margin=margin, rounds=rounds,
                        min_run_time=min_run_time, timer=timer, atol=atol, verify=verify,
                        verify_rounds=verify_rounds)


def convert(model: nn.Module, path: str) -> nn.Module:
    """Put EVERY masked layer of ``model`` on one path (for sweeps that compare paths;
    :func:`accelerate` is the per-layer choice). ``compacted-dense`` compacts whole
    MLPs/attentions for ``neuron``/``head`` masks and single linears otherwise. A shared
    module is converted once and stays shared."""
    V.choice("path", path, LINEAR_PATHS)
    model.eval()
    if path == "compacted-dense":
        names = A.aliases(model)
        for _, mod in list(model.named_modules()):
            st = _group_structure(mod)
            if st is not None:
                A.replace(model, mod, _COMPACT[st].of(_bake(mod)), names[id(mod)])
    swap_modules(model, lambda name, m: isinstance(m, MaskedLinear),
                 _memo(lambda name, m: K.linear_path(m, path, m.block, m.n, m.m)))
    return model


def _memo(make):
    """``make`` once per module object: a shared linear gets one replacement."""
    done = {}

    def once(name, m):
        if id(m) not in done:
            done[id(m)] = make(name, m)
        return done[id(m)]
    return once


chosen_paths = A.chosen_paths

storage_bytes = K.storage_bytes

__all__ = [
    "LINEAR_PATHS",
    "METHODS",
    "NM_CPU_NOTE",
    "PATHS",
    "SCOPES",
    "SCORES",
    "SPARSE_PARTS",
    "STRUCTURES",
    "MaskedLinear",
    "SparsityConfig",
    "accelerate",
    "activation_stats",
    "actual_sparsity",
    "compensate",
    "attach",
    "chosen_paths",
    "compact_neurons_",
    "compute_masks",
    "convert",
    "owner_groups",
    "prune",
    "set_masks",
    "sites",
    "sparsify_",
    "storage_bytes",
]
