"""Sparsity masks: which weights to keep, for every structure labkit knows.

Papers: magnitude pruning (Han et al., 2015; Zhu & Gupta, 2017); N:M fine-grained structured
sparsity (Mishra et al., 2021, "Accelerating Sparse Deep Neural Networks"); the survey
labkit's sparsity lab follows, "A survey of sparse structures in the multi-layer perceptron
of large language models" (Deshmukh, Lyu, Tokura, Honda, 2024).

Idea. A mask ``M`` is a boolean tensor the shape of a weight ``W`` (``True`` = keep). The
pruned weight is ``W * M``. The structure decides which masks are allowed; a score tensor
(``|W|`` by default, or anything of W's shape: gradients x weights, L1-trained magnitudes)
decides which allowed mask is chosen: the one keeping the largest total score.

Structures (weights are ``nn.Linear`` layout, ``(out, in)``)::

    unstructured  any entries;          zeros = round(s * out * in)  (always < all:
                  every structure keeps at least one unit, see ``n_pruned``)
    nm            in every group of M consecutive entries along ``in`` keep exactly N
                  (s = 1 - N/M; 2:4 is the pattern sparse tensor cores run)
    block         whole b x b tiles;    zero tiles = round(s * (out/b) * (in/b))
    row           whole output rows (FFN hidden neurons of ``up``/``gate``, heads of q/k/v
                  with ``group=head_dim``); zero groups = round(s * out/group)
    column        whole input columns (FFN hidden neurons of ``down``, heads of ``o``)

Complexity: O(numel log numel) for the sorts (``torch.topk``), once per mask build.

API (all functions validate and raise :class:`labkit.validate.LabkitConfigError` naming the
parameter, its value and what is allowed)::

    make_mask(weight, structure, sparsity=..., n=2, m=4, block=32, group=1, scores=None)
    unstructured_mask(scores, sparsity)        nm_mask(scores, n, m)
    block_mask(scores, sparsity, block)        row_mask(scores, sparsity, group=1)
    column_mask(scores, sparsity, group=1)
    global_unstructured_masks({name: scores}, sparsity)   # one threshold over all tensors
    check_mask(mask, structure, ...) -> dict   # raises ValueError if the structure is broken
    sparsity_of(mask_or_tensor) -> float       # fraction of zeros
    attach_mask(module, "weight", mask)        # torch.nn.utils.parametrize: W -> W * M
    mask_of(module, "weight") / set_mask(...)  / remove_mask(module, "weight")
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import validate as V

STRUCTURES = ("unstructured", "nm", "block", "row", "column")


# ---------------------------------------------------------------------------------------
# validation
def check_sparsity(sparsity, name: str = "sparsity") -> float:
    """A sparsity in [0, 1): 1.0 would delete the layer."""
    return V.number(name, sparsity, 0.0, 1.0, hi_open=True)


def check_nm(n, m, dim: int | None = None) -> tuple[int, int]:
    """N:M with 1 <= N <= M and M dividing ``dim`` (the input dimension) when given."""
    V.integer("m", m, 1)
    V.integer("n", n, 1)
    if n > m:
        raise V.LabkitConfigError("n", n, f"an integer in [1, m={m}] (N must not exceed M)")
    if dim is not None and dim % m:
        raise V.LabkitConfigError("m", m, f"a divisor of the input dimension {dim}")
    return n, m


def check_block(block, shape: tuple[int, ...] | None = None) -> int:
    """A block size >= 1 that tiles both dimensions of a 2-D ``shape`` when given."""
    V.integer("block", block, 1)
    if shape is not None:
        rows, cols = shape[0], shape[-1]
        if rows % block or cols % block:
            raise V.LabkitConfigError(
                "block", block, f"a common divisor of the weight shape {rows} x {cols} "
                "(blocks must tile the matrix)")
    return block


def check_structure(structure) -> str:
    return V.choice("structure", structure, STRUCTURES)


def _check_2d(scores: torch.Tensor) -> None:
    if scores.dim() != 2:
        raise V.LabkitConfigError("weight", tuple(scores.shape), "a 2-D (out, in) tensor")


# ---------------------------------------------------------------------------------------
# masks (scores -> bool mask of the same shape, True = keep)
def n_pruned(sparsity: float, count: int) -> int:
    """How many of ``count`` units a sparsity prunes: round(s * count), but always leaving
    at least one unit (a sparsity < 1 never deletes a whole tensor)."""
    return max(0, min(round(sparsity * count), count - 1))


def _keep_top(flat_scores: torch.Tensor, n_zero: int) -> torch.Tensor:
    """Bool mask over a 1-D score vector keeping all but the ``n_zero`` lowest."""
    keep = torch.ones_like(flat_scores, dtype=torch.bool)
    if n_zero > 0:
        idx = torch.topk(flat_scores, n_zero, largest=False, sorted=False).indices
        keep[idx] = False
    return keep


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the largest-scoring entries; exactly round(s * numel) zeros."""
    s = check_sparsity(sparsity)
    scores = scores.detach().float()
    n_zero = n_pruned(s, scores.numel())
    return _keep_top(scores.flatten(), n_zero).view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N largest of every M consecutive entries along the last (input) dim."""
    scores = scores.detach().float()
    _check_2d(scores)
    check_nm(n, m, scores.shape[-1])
    groups = scores.reshape(-1, m)  # (out * in/M, M)
    idx = torch.topk(groups, n, dim=-1).indices  # (out * in/M, N)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return keep.view_as(scores)


def block_scores(scores: torch.Tensor, block: int) -> torch.Tensor:
    """Sum of scores in each b x b tile: (out/b, in/b)."""
    r, c = scores.shape
    return scores.reshape(r // block, block, c // block, block).sum(dim=(1, 3))


def block_mask(scores: torch.Tensor, sparsity: float, block: int) -> torch.Tensor:
    """Keep whole b x b tiles with the largest summed score; round(s * tiles) tiles zeroed."""
    s = check_sparsity(sparsity)
    scores = scores.detach().float()
    _check_2d(scores)
    check_block(block, tuple(scores.shape))
    tiles = block_scores(scores, block)  # (R, C)
    keep = _keep_top(tiles.flatten(), n_pruned(s, tiles.numel())).view_as(tiles)
    return keep.repeat_interleave(block, 0).repeat_interleave(block, 1)


def _group_mask(line_scores: torch.Tensor, sparsity: float, group: int) -> torch.Tensor:
    """Keep-vector over lines (rows or columns), pruning whole groups of ``group`` lines."""
    s = check_sparsity(sparsity)
    V.integer("group", group, 1)
    count = line_scores.numel()
    if count % group:
        raise V.LabkitConfigError("group", group, f"a divisor of the dimension {count}")
    g = line_scores.reshape(-1, group).sum(-1)  # (count/group,)
    keep = _keep_top(g, n_pruned(s, g.numel()))
    return keep.repeat_interleave(group)


def row_mask(scores: torch.Tensor, sparsity: float, group: int = 1) -> torch.Tensor:
    """Zero whole output rows (in groups of ``group`` rows, e.g. a head's head_dim rows)."""
    scores = scores.detach().float()
    _check_2d(scores)
    keep = _group_mask(scores.sum(1), sparsity, group)  # (out,)
    return keep[:, None].expand_as(scores).clone()


def column_mask(scores: torch.Tensor, sparsity: float, group: int = 1) -> torch.Tensor:
    """Zero whole input columns (in groups of ``group`` columns)."""
    scores = scores.detach().float()
    _check_2d(scores)
    keep = _group_mask(scores.sum(0), sparsity, group)  # (in,)
    return keep[None, :].expand_as(scores).clone()


def make_mask(weight: torch.Tensor, structure: str, sparsity: float = 0.5, n: int = 2,
              m: int = 4, block: int = 32, group: int = 1,
              scores: torch.Tensor | None = None) -> torch.Tensor:
    """The mask of ``structure`` keeping the largest ``scores`` (default ``|weight|``).

    ``sparsity`` is ignored for ``nm`` (it is 1 - n/m there)."""
    check_structure(structure)
    scores = weight.detach().abs() if scores is None else scores.detach()
    if scores.shape != weight.shape:
        raise V.LabkitConfigError("scores", tuple(scores.shape),
                                  f"a tensor of the weight's shape {tuple(weight.shape)}")
    if structure == "unstructured":
        return unstructured_mask(scores, sparsity)
    if structure == "nm":
        return nm_mask(scores, n, m)
    if structure == "block":
        return block_mask(scores, sparsity, block)
    if structure == "row":
        return row_mask(scores, sparsity, group)
    return column_mask(scores, sparsity, group)


def global_unstructured_masks(scores: dict[str, torch.Tensor],
                              sparsity: float) -> dict[str, torch.Tensor]:
    """Global magnitude pruning: one threshold across all tensors, exactly
    round(s * total) zeros overall (layers end up with different sparsities)."""
    s = check_sparsity(sparsity)
    if not scores:
        return {}
    names = list(scores)
    flat = torch.cat([scores[k].detach().float().flatten() for k in names])
    keep = _keep_top(flat, n_pruned(s, flat.numel()))
    out, i = {}, 0
    for k in names:
        numel = scores[k].numel()
        out[k] = keep[i: i + numel].view_as(scores[k])
        i += numel
    return out


# ---------------------------------------------------------------------------------------
# checks
def sparsity_of(t: torch.Tensor) -> float:
    """Fraction of zero entries (for a bool mask: of False entries)."""
    if t.numel() == 0:
        return 0.0
    nz = int(t.count_nonzero())
    return 1.0 - nz / t.numel()


def check_mask(mask: torch.Tensor, structure: str, sparsity: float | None = None,
               n: int = 2, m: int = 4, block: int = 32, group: int = 1) -> dict:
    """Verify a mask has its structure (and the requested sparsity, when given).

    Returns ``{"structure", "sparsity", "ok": True}``; raises ``ValueError`` describing the
    first violation otherwise."""
    check_structure(structure)
    keep = mask.bool()
    got = sparsity_of(keep)
    if structure == "nm":
        _check_2d(keep)
        check_nm(n, m, keep.shape[-1])
        per = keep.reshape(-1, m).sum(-1)
        if not bool((per == n).all()):
            bad = int((per != n).sum())
            raise ValueError(f"{bad} groups of {m} do not have exactly {n} non-zeros")
        sparsity = 1.0 - n / m
    elif structure == "block":
        _check_2d(keep)
        check_block(block, tuple(keep.shape))
        tiles = block_scores(keep.float(), block)
        if not bool(((tiles == 0) | (tiles == block * block)).all()):
            raise ValueError(f"some {block}x{block} blocks are partly pruned")
    elif structure in ("row", "column"):
        _check_2d(keep)
        lines = keep if structure == "row" else keep.t()  # (lines, entries per line)
        if not bool((lines.all(1) | ~lines.any(1)).all()):
            raise ValueError(f"some {structure}s are partly pruned")
        if group > 1 and not bool((lines[:, 0].reshape(-1, group).float().std(-1) == 0).all()):
            raise ValueError(f"some groups of {group} {structure}s are partly pruned")
    if sparsity is not None and structure != "nm":
        unit = {"unstructured": 1, "block": block * block,
                "row": keep.shape[-1] * group if keep.dim() == 2 else 1,
                "column": keep.shape[0] * group if keep.dim() == 2 else 1}[structure]
        units = keep.numel() // unit
        want = n_pruned(check_sparsity(sparsity), units) / units
        if not math.isclose(got, want, abs_tol=1e-9):
            raise ValueError(f"mask sparsity {got:.6f} != requested {want:.6f}")
    elif sparsity is not None and not math.isclose(got, sparsity, abs_tol=1e-9):
        raise ValueError(f"mask sparsity {got:.6f} != requested {sparsity:.6f}")
    return {"structure": structure, "sparsity": got, "ok": True}


# ---------------------------------------------------------------------------------------
# masks that stay applied through training (torch.nn.utils.parametrize)
class WeightMask(nn.Module):
    """Parametrization ``W -> W * M``; gradients of pruned entries are zero too, and the
    optimizer's update to the underlying ``original`` is re-masked on every read."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.bool().clone())

    def forward(self, w):
        return w * self.mask.to(w.dtype)


def attach_mask(module: nn.Module, name: str, mask: torch.Tensor) -> nn.Module:
    """Mask ``module.<name>`` through parametrize (replacing an existing labkit mask)."""
    w = getattr(module, name)
    if tuple(mask.shape) != tuple(w.shape):
        raise V.LabkitConfigError("mask", tuple(mask.shape),
                                  f"the shape of {name} {tuple(w.shape)}")
    existing = mask_of(module, name)
    if existing is not None:
        set_mask(module, name, mask)
        return module
    parametrize.register_parametrization(module, name, WeightMask(mask.to(w.device)))
    return module


def _mask_param(module: nn.Module, name: str) -> WeightMask | None:
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if isinstance(p, WeightMask):
            return p
    return None


def mask_of(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """The bool mask on ``module.<name>``, or None when it is not masked."""
    p = _mask_param(module, name)
    return None if p is None else p.mask


def set_mask(module: nn.Module, name: str, mask: torch.Tensor) -> None:
    p = _mask_param(module, name)
    if p is None:
        attach_mask(module, name, mask)
    else:
        p.mask.copy_(mask.bool())


def remove_mask(module: nn.Module, name: str = "weight", bake: bool = True) -> None:
    """Remove the parametrization; ``bake`` keeps the masked values (zeros stay zeros)."""
    if parametrize.is_parametrized(module, name):
        parametrize.remove_parametrizations(module, name, leave_parametrized=bake)


__all__ = [
    "STRUCTURES",
    "WeightMask",
    "attach_mask",
    "block_mask",
    "block_scores",
    "check_block",
    "check_mask",
    "check_nm",
    "check_sparsity",
    "check_structure",
    "column_mask",
    "global_unstructured_masks",
    "make_mask",
    "mask_of",
    "n_pruned",
    "nm_mask",
    "remove_mask",
    "row_mask",
    "set_mask",
    "sparsity_of",
    "unstructured_mask",
]
