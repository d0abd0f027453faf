"""Sparsity: choose weights to drop, keep the masks through training, then run the fastest
real kernel for what is left.

Papers: magnitude pruning (Han et al., 2015); gradual pruning with a cubic schedule
(Zhu & Gupta, 2017, "To prune, or not to prune"); L1-regularised training then thresholding
(the first paper of labkit: L = L_task + lambda * sum |W_ij|); N:M sparsity (Mishra et al.,
2021); and the survey of sparse structures in transformer MLPs (unstructured, N:M, blocks,
neurons, heads) that labkit's sparsity lab follows.

Idea. A weight ``W`` (out, in) with a fraction ``p`` of non-zeros costs O(p * out * in)
multiply-adds instead of O(out * in) -- *if* a kernel can skip the zeros. Pruning has three
independent choices, each a config field:

* how weights are chosen (``method``): ``magnitude`` (one shot, per layer or ``scope=
  "global"``), ``gradual`` (the cubic schedule below, masks tightened every ``prune_every``
  steps), ``l1`` (train with ``lambda * sum |W|``, then threshold by magnitude);
* the structure (``structure``): ``unstructured``, ``nm`` (N of every M along the input),
  ``block`` (b x b tiles), ``row``/``column`` (per layer), ``neuron`` (FFN hidden units: rows
  of up/gate and the matching columns of down) and ``head`` (whole attention heads);
* the execution path, picked later by :func:`accelerate`: masked dense, CSR, BSR,
  block-gathered dense, compacted dense (pruned neurons/heads removed), or N:M (simulated on
  CPU: torch's semi-structured kernels are CUDA only, so no N:M speed is measured there).

Cubic schedule (Zhu & Gupta)::

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3,   t0 <= t <= t0 + n * dt

Masks are ``torch.nn.utils.parametrize`` parametrizations (``W -> W * M``, see
:mod:`labkit.techniques.masks`), so an optimizer step can never revive a pruned weight.

Complexity (y = x W^T, T tokens): dense 2*T*out*in FLOPs; CSR/BSR/compacted 2*T*nnz plus
index overhead; memory: dense 4*out*in bytes; CSR 4*nnz + 8*nnz + 8*(out+1); BSR
4*nnz + 8*nnzb + 8*(out/b+1); N:M 4*nnz + ceil(log2 M)/8 * nnz (metadata); compacted dense
4*kept (+ 8 per kept row/column index when a single layer keeps its outer shape).
"""
from __future__ import annotations

import copy
import math
import statistics
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import validate as V
from ..measure import capture_inputs, time_fn
from ..model import MLP, Attention
from ..train import Callback, fit
from . import masks as MK
from .registry import register, register_expected, swap_modules

STRUCTURES = ("unstructured", "nm", "block", "row", "column", "neuron", "head")
METHODS = ("magnitude", "gradual", "l1")
SCOPES = ("layer", "global")
TARGETS = ("ffn", "attn", "all")
PATHS = ("dense", "masked-dense", "csr", "bsr", "block-gathered-dense", "compacted-dense",
         "nm-simulated", "nm-semi-structured-cuda")
NM_CPU_NOTE = "N:M simulated on CPU (dense matmul on the masked weight): speed not measured"


@dataclass(frozen=True)
class SparsityConfig:
    """Prune the ``targets`` linears of a model to ``sparsity`` with ``structure``.

    ``n``/``m`` are used by ``nm`` (sparsity is then 1 - n/m), ``block`` by ``block``.
    ``initial_sparsity``, ``start_step``, ``prune_steps`` (n) and ``prune_every`` (dt)
    define the cubic schedule of ``gradual``; ``l1_lambda`` the penalty of ``l1``."""

    sparsity: float = 0.5
    structure: str = "unstructured"
    method: str = "magnitude"
    scope: str = "layer"
    targets: str = "ffn"
    n: int = 2
    m: int = 4
    block: int = 32
    l1_lambda: float = 1e-4
    initial_sparsity: float = 0.0
    start_step: int = 0
    prune_steps: int = 10
    prune_every: int = 10

    def __post_init__(self):
        MK.check_sparsity(self.sparsity)
        V.choice("structure", self.structure, STRUCTURES)
        V.choice("method", self.method, METHODS)
        V.choice("scope", self.scope, SCOPES)
        V.choice("targets", self.targets, TARGETS)
        MK.check_nm(self.n, self.m)
        MK.check_block(self.block)
        V.number("l1_lambda", self.l1_lambda, 0.0)
        MK.check_sparsity(self.initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.sparsity:
            raise V.LabkitConfigError("initial_sparsity", self.initial_sparsity,
                                      f"a sparsity <= sparsity={self.sparsity}")
        V.integer("start_step", self.start_step, 0)
        V.integer("prune_steps", self.prune_steps, 1)
        V.integer("prune_every", self.prune_every, 1)
        if self.structure == "head" and self.targets == "ffn":
            raise V.LabkitConfigError("targets", self.targets,
                                      "'attn' or 'all' for structure='head'")
        if self.structure == "neuron" and self.targets == "attn":
            raise V.LabkitConfigError("targets", self.targets,
                                      "'ffn' or 'all' for structure='neuron'")
        if self.scope == "global" and self.structure != "unstructured":
            raise V.LabkitConfigError("scope", self.scope,
                                      "'layer' (global ranking is for structure='unstructured')")
        if self.method == "gradual" and self.structure == "nm":
            raise V.LabkitConfigError(
                "method", self.method, "'magnitude' or 'l1' for structure='nm' (N:M has the "
                "fixed sparsity 1 - n/m, which a schedule cannot step through)")

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.n / self.m if self.structure == "nm" else self.sparsity


def cubic_schedule(t: int, s_i: float, s_f: float, t0: int, n: int, dt: int) -> float:
    """Zhu & Gupta's sparsity at step ``t``: s_i before t0, s_f after t0 + n*dt."""
    MK.check_sparsity(s_i, "initial_sparsity")
    MK.check_sparsity(s_f, "sparsity")
    V.integer("prune_steps", n, 1)
    V.integer("prune_every", dt, 1)
    if t <= t0:
        return float(s_i)
    frac = min(1.0, (t - t0) / (n * dt))
    return float(s_f + (s_i - s_f) * (1.0 - frac) ** 3)


# --------------------------------------------------------------------------- masking
class MaskedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is ``W * M`` through parametrize (the simulate stage).

    ``structure``/``n``/``m``/``block`` say what the mask is allowed to look like, so
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

    @property
    def raw_weight(self) -> torch.Tensor:
        return self.parametrizations.weight.original

    def dense_weight(self) -> torch.Tensor:
        """The masked weight as a plain tensor."""
        return self.weight.detach().clone()


def _selected(name: str, module: nn.Module, targets: str) -> bool:
    if not isinstance(module, nn.Linear) or isinstance(module, MaskedLinear):
        return False
    parts = name.split(".")
    if len(parts) < 2:
        return False
    owner = parts[-2]
    if targets in ("ffn", "all") and owner == "ffn":
        return True
    return targets in ("attn", "all") and owner == "attn"


def masked_linears(model: nn.Module) -> dict[str, MaskedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MaskedLinear)}


def attach(model: nn.Module, config: SparsityConfig) -> list[str]:
    """Swap the targeted linears for :class:`MaskedLinear` with all-ones masks."""
    structure = config.structure
    return swap_modules(
        model, lambda name, m: _selected(name, m, config.targets),
        lambda name, m: MaskedLinear.from_linear(m, structure, config.n, config.m,
                                                 config.block))


def _owner_groups(model: nn.Module, structure: str) -> list[tuple[nn.Module, dict]]:
    """For neuron/head structures: each MLP/Attention with its masked linears by role."""
    out = []
    for mod in model.modules():
        if structure == "neuron" and isinstance(mod, MLP):
            lins = {k: getattr(mod, k) for k in ("up", "gate", "down")
                    if isinstance(getattr(mod, k, None), MaskedLinear)}
        elif structure == "head" and isinstance(mod, Attention):
            lins = {k: getattr(mod, k) for k in ("q", "k", "v", "o")
                    if isinstance(getattr(mod, k, None), MaskedLinear)}
        else:
            continue
        if lins:
            out.append((mod, lins))
    return out


def compute_masks(model: nn.Module, config: SparsityConfig,
                  sparsity: float | None = None) -> dict[str, torch.Tensor]:
    """Magnitude masks (scores ``|W * M|``, so pruned weights stay pruned) for every
    masked linear at ``sparsity`` (default the config's)."""
    s = config.sparsity if sparsity is None else MK.check_sparsity(sparsity)
    lins = masked_linears(model)
    if config.structure in ("neuron", "head"):
        by_id = {id(m): n for n, m in lins.items()}
        out = {}
        for mod, group in _owner_groups(model, config.structure):
            if config.structure == "neuron":
                rows, _cols = ("up", "gate"), ("down",)
                unit = 1
            else:
                rows, _cols = ("q", "k", "v"), ("o",)
                unit = mod.head_dim
            score = None
            for k, lin in group.items():
                w = lin.weight.detach().abs()
                part = w.sum(1) if k in rows else w.sum(0)  # (hidden,)
                score = part if score is None else score + part
            keep = MK._group_mask(score, s, unit)  # (hidden,)
            for k, lin in group.items():
                full = (keep[:, None] if k in rows else keep[None, :]).expand_as(lin.weight)
                out[by_id[id(lin)]] = full.clone()
        return out
    if config.scope == "global":
        return MK.global_unstructured_masks(
            {n: lin.weight.detach().abs() for n, lin in lins.items()}, s)
    return {n: MK.make_mask(lin.weight, config.structure, s, n=config.n, m=config.m,
                            block=config.block) for n, lin in lins.items()}


def set_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    lins = masked_linears(model)
    for name, mask in masks.items():
        MK.set_mask(lins[name], "weight", mask)


def prune(model: nn.Module, config: SparsityConfig, sparsity: float | None = None) -> dict:
    """Recompute and set magnitude masks; returns ``{name: mask}``."""
    masks = compute_masks(model, config, sparsity)
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


def l1_penalty(lam: float):
    """``extra_loss`` for :func:`labkit.train.fit`: ``lam * sum |W|`` over masked weights."""
    lam = V.number("l1_lambda", lam, 0.0)

    def loss(model):
        terms = [m.weight.abs().sum() for m in masked_linears(model).values()]
        return lam * torch.stack(terms).sum() if terms else torch.zeros(())

    return loss


@register(SparsityConfig)
def sparsify_(model: nn.Module, config: SparsityConfig) -> nn.Module:
    """Attach masks to the targeted linears and prune them one shot to the sparsity the
    method starts at (``magnitude``: the target; ``gradual``: ``initial_sparsity``;
    ``l1``: none yet -- train with :func:`l1_penalty`, then :func:`prune`)."""
    attach(model, config)
    if config.method == "magnitude":
        prune(model, config)
    elif config.method == "gradual" and config.initial_sparsity > 0:
        prune(model, config, config.initial_sparsity)
    return model


class GradualPruning(Callback):
    """Tighten the masks on the cubic schedule at t0, t0 + dt, ..., t0 + n*dt."""

    all_ranks = True  # changes the model: every rank prunes alike

    def __init__(self, model, config: SparsityConfig, offset: int = 0):
        self.model, self.config, self.offset = model, config, offset
        self.history: list[tuple[int, float]] = []

    def on_step(self, state):
        c = self.config
        t = state.step - self.offset
        if t < c.start_step or t > c.start_step + c.prune_steps * c.prune_every:
            return
        if (t - c.start_step) % c.prune_every:
            return
        s = cubic_schedule(t, c.initial_sparsity, c.sparsity, c.start_step, c.prune_steps,
                           c.prune_every)
        prune(self.model, c, s)
        self.history.append((state.step, s))


class _PruneAt(Callback):
    all_ranks = True

    def __init__(self, model, config, step):
        self.model, self.config, self.step, self.done = model, config, step, False

    def on_step(self, state):
        if not self.done and state.step >= self.step:
            prune(self.model, self.config)
            self.done = True


def train_sparse(model, config: SparsityConfig, batches, steps: int, eval_fn=None,
                 eval_every: int = 50, callbacks=(), lr: float = 1e-3, prune_at: float = 0.5,
                 progress: bool = False, seed: int = 0):
    """Train ``model`` ending at ``config.sparsity`` by ``config.method``, in ONE run of
    :func:`labkit.train.fit` (one history, one optimizer):

    * ``magnitude``: dense until ``prune_at * steps``, prune one shot, fine-tune the rest
      (``prune_at=0`` prunes at initialisation: sparse training from scratch);
    * ``gradual``: the cubic schedule of the config (its ``start_step`` etc.);
    * ``l1``: ``lambda * sum |W|`` until ``prune_at * steps``, threshold, fine-tune.

    Evaluations carry the actual ``sparsity``. Returns the :class:`TrainResult`."""
    V.number("prune_at", prune_at, 0.0, 1.0)
    if not masked_linears(model):
        attach(model, config)
    cut = round(prune_at * steps)
    cbs = []
    if eval_fn is not None:
        inner = eval_fn

        def eval_fn():
            return {**inner(), "sparsity": actual_sparsity(model)}
    extra = None
    if config.method == "magnitude":
        if cut == 0:
            prune(model, config)
        else:
            cbs.append(_PruneAt(model, config, cut))
    elif config.method == "gradual":
        if config.initial_sparsity > 0:
            prune(model, config, config.initial_sparsity)
        cbs.append(GradualPruning(model, config))
        if config.start_step + config.prune_steps * config.prune_every > steps:
            warnings.warn(f"the cubic schedule ends at step {config.start_step + config.prune_steps * config.prune_every} "
                          f"> steps={steps}: final sparsity will be below {config.sparsity}")
    else:
        penalty = l1_penalty(config.l1_lambda)
        counter = {"step": 0}

        class _Count(Callback):
            def on_step(self, state):
                counter["step"] = state.step

        def extra(m):
            return penalty(m) if counter["step"] < cut else torch.zeros(())

        cbs += [_Count(), _PruneAt(model, config, max(cut, 1))]
    return fit(model, batches, steps, lr=lr, eval_fn=eval_fn, eval_every=eval_every,
               callbacks=[*cbs, *callbacks], extra_loss=extra, progress=progress, seed=seed)


# --------------------------------------------------------------------------- memory
def storage_bytes(weight: torch.Tensor, path: str, block: int = 32, n: int = 2,
                  m: int = 4, index_bytes: int = 8) -> dict:
    """Bytes to store a (masked) fp32 weight on ``path``: values plus index metadata.

    ``index_bytes`` is 8 for torch's default int64 CSR/BSR indices (4 if converted to
    int32). Returns ``{"values", "index", "total"}``."""
    V.choice("path", path, ("dense", "csr", "bsr", "nm", "compacted"))
    w = weight.detach()
    el = w.element_size()
    nnz = int(w.count_nonzero())
    rows, cols = w.shape
    if path == "dense":
        values, index = w.numel() * el, 0
    elif path == "csr":
        values, index = nnz * el, nnz * index_bytes + (rows + 1) * index_bytes
    elif path == "bsr":
        MK.check_block(block, tuple(w.shape))
        nzb = int((MK.block_scores((w != 0).float(), block) > 0).sum())
        values = nzb * block * block * el
        index = nzb * index_bytes + (rows // block + 1) * index_bytes
    elif path == "nm":
        MK.check_nm(n, m, cols)
        kept = rows * cols // m * n
        values, index = kept * el, math.ceil(kept * math.ceil(math.log2(m)) / 8)
    else:  # compacted: the kept rows x kept columns dense block, plus their indices
        r = int(w.any(1).sum())
        c = int(w.any(0).sum())
        values = r * c * el
        index = index_bytes * ((r if r < rows else 0) + (c if c < cols else 0))
    return {"values": values, "index": index, "total": values + index}


@register_expected(SparsityConfig)
def expected(model_cfg, config: SparsityConfig) -> dict:
    """Analytic change of pruning ``config`` on a model of ``model_cfg``: non-zero weight
    count, FLOPs per token of the pruned matmuls (2 per weight), and weight bytes in the
    structure's natural storage (CSR for unstructured, BSR for block, values + N:M metadata,
    compacted dense for rows/columns/neurons/heads), all against dense fp32."""
    d, f = model_cfg.d_model, model_cfg.d_ff
    gated = model_cfg.kind == "decoder"
    ffn = [(f, d)] * (2 if gated else 1) + [(d, f)]
    attn = [(d, d)] * 4
    shapes = (ffn if config.targets in ("ffn", "all") else []) + \
             (attn if config.targets in ("attn", "all") else [])
    shapes = shapes * model_cfg.n_layers
    dense_w = sum(r * c for r, c in shapes)
    s, st = config.sparsity, config.structure
    kept_w = 0
    sparse_bytes = 0
    if st == "unstructured" and config.scope == "global":
        kept_w = dense_w - MK.n_pruned(s, dense_w)
        sparse_bytes = None  # per-layer nnz is data dependent
    for r, c in shapes:
        if st == "unstructured" and config.scope == "layer":
            k = r * c - MK.n_pruned(s, r * c)
            kept_w += k
            sparse_bytes += 4 * k + 8 * k + 8 * (r + 1)
        elif st == "nm":
            k = r * c // config.m * config.n
            kept_w += k
            sparse_bytes += 4 * k + math.ceil(k * math.ceil(math.log2(config.m)) / 8)
        elif st == "block":
            b = config.block
            nb = (r // b) * (c // b)
            kb = nb - MK.n_pruned(s, nb)
            kept_w += kb * b * b
            sparse_bytes += 4 * kb * b * b + 8 * kb + 8 * (r // b + 1)
        elif st == "row":
            kr = r - MK.n_pruned(s, r)
            kept_w += kr * c
            sparse_bytes += 4 * kr * c + (8 * kr if kr < r else 0)
        elif st == "column":
            kc = c - MK.n_pruned(s, c)
            kept_w += r * kc
            sparse_bytes += 4 * r * kc + (8 * kc if kc < c else 0)
    if st == "neuron":
        kf = f - MK.n_pruned(s, f)
        per = (2 if gated else 1) * kf * d + d * kf
        kept_w += per * model_cfg.n_layers
        sparse_bytes += 4 * per * model_cfg.n_layers
        if config.targets == "all":
            kept_w += 4 * d * d * model_cfg.n_layers
            sparse_bytes += 4 * 4 * d * d * model_cfg.n_layers
    if st == "head":
        h = model_cfg.n_heads
        kh = h - MK.n_pruned(s, h)
        per = 4 * d * kh * model_cfg.head_dim
        kept_w += per * model_cfg.n_layers
        sparse_bytes += 4 * per * model_cfg.n_layers
        if config.targets == "all":
            fw = sum(r * c for r, c in ffn) * model_cfg.n_layers
            kept_w += fw
            sparse_bytes += 4 * fw
    out = {"weights_dense": dense_w, "weights_nonzero": kept_w,
           "params": kept_w - dense_w, "flops_per_token": 2 * (kept_w - dense_w),
           "bytes_dense": 4 * dense_w, "sparsity": 1 - kept_w / dense_w}
    if sparse_bytes is not None:
        out["bytes_sparse"] = sparse_bytes
        out["bytes"] = sparse_bytes - 4 * dense_w
    return out


# --------------------------------------------------------------------------- fast paths
class _SparseLinearBase(nn.Module):
    def __init__(self, lin: MaskedLinear | nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        w = lin.weight.detach()
        self._nnz = int(w.count_nonzero())
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone(),
                                                               requires_grad=False)

    def sparse_counts(self) -> tuple[int, int]:
        total = self.in_features * self.out_features
        return total - self._nnz, total

    def _out(self, y_t, x):  # y_t: (out, T) -> (..., out)
        y = y_t.t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class DenseLinear(nn.Linear):
    """The masked weight baked into a plain dense linear (zeros multiplied)."""

    kernel_path = "dense"

    @classmethod
    def of(cls, lin: nn.Linear, path: str = "dense") -> DenseLinear:
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None)
        with torch.no_grad():
            new.weight.copy_(lin.weight.detach())
            if lin.bias is not None:
                new.bias.copy_(lin.bias.detach())
        new.kernel_path = path
        return new

    def sparse_counts(self) -> tuple[int, int]:
        return int((self.weight == 0).sum()), self.weight.numel()


class CSRLinear(_SparseLinearBase):
    """y = (W_csr @ x^T)^T with torch's sparse CSR matmul (MKL on CPU builds that have it)."""

    kernel_path = "csr"

    def __init__(self, lin):
        super().__init__(lin)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is in beta state.*")
            csr = lin.weight.detach().to_sparse_csr()
        self.register_buffer("crow", csr.crow_indices())
        self.register_buffer("col", csr.col_indices())
        self.register_buffer("values", csr.values())

    def forward(self, x):  # (..., in) -> (..., out)
        w = torch.sparse_csr_tensor(self.crow, self.col, self.values,
                                    (self.out_features, self.in_features),
                                    check_invariants=False)
        x2 = x.reshape(-1, self.in_features)  # (T, in)
        return self._out(w @ x2.t(), x)  # (out, T)


class BSRLinear(_SparseLinearBase):
    """y = (W_bsr @ x^T)^T with torch's block-sparse row matmul (b x b blocks)."""

    kernel_path = "bsr"

    def __init__(self, lin, block: int):
        super().__init__(lin)
        MK.check_block(block, tuple(lin.weight.shape))
        self.block = block
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is in beta state.*")
            bsr = lin.weight.detach().to_sparse_bsr((block, block))
        self.register_buffer("crow", bsr.crow_indices())
        self.register_buffer("col", bsr.col_indices())
        self.register_buffer("values", bsr.values())  # (nnzb, b, b)

    def forward(self, x):
        w = torch.sparse_bsr_tensor(self.crow, self.col, self.values,
                                    (self.out_features, self.in_features),
                                    check_invariants=False)
        x2 = x.reshape(-1, self.in_features)  # (T, in)
        return self._out(w @ x2.t().contiguous(), x)


class BlockGatheredLinear(_SparseLinearBase):
    """labkit's own block-sparse path on plain dense kernels. Block rows are bucketed by
    their number k of non-zero b x b blocks; in each bucket the k blocks of a row are packed
    side by side, ``W_r`` (b, k*b), the matching input rows of ``x^T`` are gathered, and one
    batched matmul does the whole bucket: ``y_r = W_r @ x^T[cols_r]`` (b, T). Exactly
    2*T*nnzb*b*b FLOPs (no padding), a gather of nnzb*b*T inputs, one bmm per distinct k."""

    kernel_path = "block-gathered-dense"

    def __init__(self, lin, block: int):
        super().__init__(lin)
        w = lin.weight.detach()
        MK.check_block(block, tuple(w.shape))
        b = self.block = block
        R, C = w.shape[0] // b, w.shape[1] // b
        self.R = R
        keep = MK.block_scores((w != 0).float(), b) > 0  # (R, C)
        cnt = keep.sum(1)
        tiles = w.view(R, b, C, b).permute(0, 2, 1, 3)  # (R, C, b_out, b_in)
        self.ks = []
        for k in sorted(set(cnt.tolist()) - {0}):
            rows = (cnt == k).nonzero().squeeze(1)  # (r_k,)
            cols = keep[rows].nonzero()[:, 1].view(len(rows), k)  # (r_k, k) ascending
            packed = tiles[rows[:, None], cols]  # (r_k, k, b_out, b_in)
            packed = packed.permute(0, 2, 1, 3).reshape(len(rows), b, k * b)  # (r_k, b, k*b)
            self.register_buffer(f"rows_{k}", rows)
            self.register_buffer(f"cols_{k}", (cols[:, :, None] * b + torch.arange(b))
                                 .reshape(-1))
            self.register_buffer(f"packed_{k}", packed.contiguous())
            self.ks.append(k)

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)  # (T, in)
        xt = x2.t().contiguous()  # (in, T)
        t = xt.shape[1]
        y = xt.new_zeros(self.R, self.block, t)  # (R, b, T)
        for k in self.ks:
            rows = getattr(self, f"rows_{k}")
            g = xt.index_select(0, getattr(self, f"cols_{k}")).view(len(rows), k * self.block, t)
            y.index_copy_(0, rows, torch.bmm(getattr(self, f"packed_{k}"), g))  # (r_k, b, T)
        return self._out(y.view(self.out_features, t), x)


class CompactedLinear(_SparseLinearBase):
    """Pruned rows/columns physically removed: y[..., rows] = x[..., cols] @ W_kept^T.
    The layer keeps its outer shape (a gather of inputs, a scatter of outputs)."""

    kernel_path = "compacted-dense"

    def __init__(self, lin):
        super().__init__(lin)
        w = lin.weight.detach()
        rows = w.any(1).nonzero().squeeze(1)
        cols = w.any(0).nonzero().squeeze(1)
        self.all_rows = len(rows) == w.shape[0]
        self.all_cols = len(cols) == w.shape[1]
        self.register_buffer("rows", rows)
        self.register_buffer("cols", cols)
        self.weight = nn.Parameter(w[rows][:, cols].contiguous(), requires_grad=False)

    def forward(self, x):
        xs = x if self.all_cols else x.index_select(-1, self.cols)  # (..., kept_in)
        if self.all_rows:
            return F.linear(xs, self.weight, self.bias)
        y = x.new_zeros(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.index_add_(-1, self.rows, F.linear(xs, self.weight))


class NMLinear(DenseLinear):
    """N:M weights. CPU: simulated (dense matmul on the masked weight) and says so;
    CUDA: torch's semi-structured sparse kernel (fp16)."""

    @classmethod
    def of_nm(cls, lin, n: int, m: int) -> NMLinear:
        new = cls.of(lin, f"nm-simulated ({n}:{m}, speed not measured on CPU)")
        new.n, new.m = n, m
        if torch.cuda.is_available() and (n, m) == (2, 4):  # pragma: no cover - needs a GPU
            from torch.sparse import to_sparse_semi_structured

            new = new.half().cuda()
            new.weight = nn.Parameter(to_sparse_semi_structured(new.weight.detach()),
                                      requires_grad=False)
            new.kernel_path = "nm-semi-structured-cuda"
        return new


class CompactedMLP(MLP):
    """An MLP with pruned hidden neurons removed (d_ff -> kept)."""

    kernel_path = "compacted-dense"

    @classmethod
    def of(cls, mlp: MLP) -> CompactedMLP:
        up = mlp.up.weight.detach()
        keep = up.any(1)
        if mlp.gated:
            keep = keep | mlp.gate.weight.detach().any(1)
        idx = keep.nonzero().squeeze(1)
        new = cls(mlp.up.in_features, len(idx), gated=mlp.gated)
        with torch.no_grad():
            new.up.weight.copy_(up[idx])
            if mlp.up.bias is not None:
                new.up.bias.copy_(mlp.up.bias.detach()[idx])
            if mlp.gated:
                new.gate.weight.copy_(mlp.gate.weight.detach()[idx])
            new.down.weight.copy_(mlp.down.weight.detach()[:, idx])
            if mlp.down.bias is not None:
                new.down.bias.copy_(mlp.down.bias.detach())
        new.pruned_from = mlp.up.out_features
        return new.requires_grad_(False)

    def sparse_counts(self) -> tuple[int, int]:
        d = self.up.in_features
        mats = 3 if self.gated else 2
        total = mats * d * self.pruned_from
        return total - mats * d * self.up.out_features, total


class CompactedAttention(Attention):
    """Attention with pruned heads removed: Q/K/V project to kept_heads * head_dim."""

    kernel_path = "compacted-dense"

    @classmethod
    def of(cls, attn: Attention) -> CompactedAttention:
        hd = attn.head_dim
        q = attn.q.weight.detach()
        alive = q.view(attn.n_heads, hd, -1).flatten(1).any(1)
        heads = alive.nonzero().squeeze(1)
        idx = (heads[:, None] * hd + torch.arange(hd)).reshape(-1)
        new = cls(attn.d_model, attn.n_heads, causal=attn.causal, dropout=attn.dropout)
        new.n_heads, new.head_dim = len(heads), hd
        new.pruned_from = attn.n_heads
        for name in ("q", "k", "v"):
            old = getattr(attn, name)
            lin = nn.Linear(attn.d_model, len(idx), bias=old.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(old.weight.detach()[idx])
                if old.bias is not None:
                    lin.bias.copy_(old.bias.detach()[idx])
            setattr(new, name, lin)
        o = nn.Linear(len(idx), attn.d_model, bias=attn.o.bias is not None)
        with torch.no_grad():
            o.weight.copy_(attn.o.weight.detach()[:, idx])
            if attn.o.bias is not None:
                o.bias.copy_(attn.o.bias.detach())
        new.o = o
        return new.requires_grad_(False)

    def sparse_counts(self) -> tuple[int, int]:
        total = 4 * self.d_model * self.d_model
        return total - 4 * self.d_model * self.n_heads * self.head_dim, total


# --------------------------------------------------------------------------- accelerate
def paired_times(fns: dict, rounds: int = 5, min_run_time: float = 0.02) -> dict:
    """Median (and IQR) seconds of each ``fn`` measured in interleaved rounds of
    :func:`labkit.measure.time_fn`, so load from other processes hits all candidates alike.
    Returns ``{label: {"median_s", "iqr_s", "q1_s", "q3_s", "runs", "times_s"}}``."""
    V.integer("rounds", rounds, 1)
    keys = list(fns)
    per = {k: [] for k in keys}
    for i in range(rounds):
        shift = i % len(keys)  # rotate the order between rounds
        for k in keys[shift:] + keys[:shift]:
            per[k].append(time_fn(fns[k], str(k), min_run_time=min_run_time).median_s)
    out = {}
    for k, ts in per.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        out[k] = {"median_s": statistics.median(ts), "iqr_s": q[2] - q[0], "runs": len(ts),
                  "q1_s": q[0], "q3_s": q[2], "times_s": ts}
    return out


def paired_speedup(times: dict, base: str, key: str) -> float:
    """Median over rounds of the per-round ratio ``base / key`` from :func:`paired_times`."""
    return statistics.median(b / k for b, k in zip(times[base]["times_s"],
                                                    times[key]["times_s"]))


def _linear_candidates(lin: MaskedLinear, paths) -> dict[str, nn.Module]:
    out = {"dense": DenseLinear.of(lin)}
    st = lin.structure
    if st == "nm":
        nm = NMLinear.of_nm(lin, lin.n, lin.m)
        return {nm.kernel_path: nm}  # one path: nothing to choose on CPU
    w = lin.weight.detach()
    if "csr" in paths:
        out["csr"] = CSRLinear(lin)
    tiles = st == "block" and w.shape[0] % lin.block == 0 and w.shape[1] % lin.block == 0
    if "bsr" in paths and tiles:
        out["bsr"] = BSRLinear(lin, lin.block)
    if "block-gathered-dense" in paths and tiles:
        out["block-gathered-dense"] = BlockGatheredLinear(lin, lin.block)
    if "compacted-dense" in paths and (not bool(w.any(1).all()) or not bool(w.any(0).all())):
        out["compacted-dense"] = CompactedLinear(lin)
    return out


def _bake(module: nn.Module) -> nn.Module:
    """A copy of an MLP/Attention with its masked linears as plain dense linears."""
    new = copy.deepcopy(module)
    swap_modules(new, lambda n, m: isinstance(m, MaskedLinear),
                 lambda n, m: DenseLinear.of(m))
    return new.requires_grad_(False)


def _set_module(model, name, new):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def accelerate(model: nn.Module, *inputs, paths=PATHS, rounds: int = 5,
               min_run_time: float = 0.02, atol: float = 1e-4, margin: float = 0.05,
               verify: bool = True, verify_rounds: int = 5) -> list[dict]:
    """Replace every masked layer with its fastest measured path, dense included.

    For each masked linear (or, for ``neuron``/``head`` structures, each MLP/attention) the
    candidate paths are built, checked against the masked output (``atol``), and timed on
    the layer's real input from ``model(*inputs)`` in interleaved rounds; the fastest is
    kept and its ``kernel_path`` recorded; a sparse path must beat dense by ``margin``
    (5%: below that the timing noise decides, and dense is the safe choice). With ``verify`` the whole model is then timed
    against the all-dense version and, if slower than 0.95x, every layer is reverted to dense
    with a warning (the ``<model>`` row keeps the measured ratio of the mixed choice and says
    ``reverted``). Returns tidy rows (also stored as ``model.acceleration``)."""
    model.eval()
    groups = {}
    for struct in ("neuron", "head"):
        for mod, lins in _owner_groups(model, struct):
            if all(lin.structure == struct for lin in lins.values()):
                groups[next(n for n, m in model.named_modules() if m is mod)] = (struct, mod)
    lin_names = {n: m for n, m in masked_linears(model).items()
                 if not any(n.startswith(g + ".") for g in groups)}
    targets = {**{g: mod for g, (_, mod) in groups.items()}, **lin_names}
    captured = capture_inputs(model, inputs, targets)
    rows, dense_versions = [], {}
    for name, mod in targets.items():
        args, kwargs = captured[name]
        if name in groups:
            cands = {"dense": _bake(mod)}
            compact = (CompactedMLP.of(_bake(mod)) if groups[name][0] == "neuron"
                       else CompactedAttention.of(_bake(mod)))
            cands["compacted-dense"] = compact
            cands["dense"].kernel_path = "dense"
        else:
            cands = _linear_candidates(mod, paths)
        with torch.no_grad():
            ref = mod(*args, **kwargs)
            for label, c in list(cands.items()):
                got = c(*args, **kwargs)
                if not torch.allclose(got, ref, atol=atol, rtol=1e-3):
                    warnings.warn(f"{name}: path {label} disagrees with the masked layer "
                                  f"(max err {float((got - ref).abs().max()):.2e}); dropped")
                    del cands[label]

        def runner(c, args=args, kwargs=kwargs):
            def run():
                with torch.inference_mode():
                    c(*args, **kwargs)
            return run

        if len(cands) > 1:
            times = paired_times({k: runner(c) for k, c in cands.items()}, rounds, min_run_time)
        else:
            times = {k: {"median_s": float("nan"), "iqr_s": float("nan"), "runs": 0}
                     for k in cands}
        dense_t = times.get("dense", {}).get("median_s", float("nan"))
        best = next(iter(cands))
        if len(cands) > 1:
            best = min(cands, key=lambda k: times[k]["median_s"])
            if "dense" in cands and times[best]["median_s"] > dense_t / (1 + margin):
                best = "dense"
        for k, t in times.items():
            rows.append({"layer": name, "path": cands[k].kernel_path
                         if isinstance(getattr(cands[k], "kernel_path", None), str) else k,
                         "candidate": k, "median_ms": t["median_s"] * 1e3,
                         "iqr_ms": t["iqr_s"] * 1e3, "speedup_vs_dense": dense_t / t["median_s"],
                         "chosen": k == best})
        if "dense" in cands:
            dense_versions[name] = cands["dense"]
        _set_module(model, name, cands[best])
    if verify and dense_versions:
        dense_model = copy.deepcopy(model)
        for name, d in dense_versions.items():
            _set_module(dense_model, name, copy.deepcopy(d))

        def whole(mm):
            def run():
                with torch.inference_mode():
                    mm(*inputs)
            return run

        t = paired_times({"dense": whole(dense_model), "accelerated": whole(model)},
                         verify_rounds, min_run_time)
        ratio = paired_speedup(t, "dense", "accelerated")
        reverted = ratio < 0.95
        if reverted:
            warnings.warn(f"accelerated model ran at {ratio:.2f}x the dense model; reverting "
                          "every layer to the dense path")
            for name, d in dense_versions.items():
                d.kernel_path = "dense (model-level revert)"
                _set_module(model, name, d)
            for r in rows:
                r["chosen"] = r["candidate"] == "dense"
                if r["chosen"]:
                    r["path"] = "dense (model-level revert)"
        rows.append({"layer": "<model>", "path": "reverted to dense" if reverted else "mixed",
                     "candidate": "accelerated", "median_ms": t["accelerated"]["median_s"] * 1e3,
                     "iqr_ms": t["accelerated"]["iqr_s"] * 1e3, "speedup_vs_dense": ratio,
                     "chosen": True, "reverted": reverted})
    model.acceleration = rows
    return rows


LINEAR_PATHS = ("dense", "csr", "bsr", "block-gathered-dense", "compacted-dense",
                "nm-simulated")


def linear_path(lin: nn.Linear, path: str, block: int = 32, n: int = 2,
                m: int = 4) -> nn.Module:
    """The (masked) linear ``lin`` on one named execution path, no measuring."""
    V.choice("path", path, LINEAR_PATHS)
    if path == "dense":
        return DenseLinear.of(lin)
    if path == "csr":
        return CSRLinear(lin)
    if path == "bsr":
        return BSRLinear(lin, block)
    if path == "block-gathered-dense":
        return BlockGatheredLinear(lin, block)
    if path == "compacted-dense":
        return CompactedLinear(lin)
    return NMLinear.of_nm(lin, n, m)


def convert(model: nn.Module, path: str) -> nn.Module:
    """Put EVERY masked layer of ``model`` on one path (for sweeps that compare paths;
    :func:`accelerate` is the per-layer choice). ``compacted-dense`` compacts whole
    MLPs/attentions for ``neuron``/``head`` masks and single linears otherwise."""
    V.choice("path", path, LINEAR_PATHS)
    model.eval()
    if path == "compacted-dense":
        for struct, cls in (("neuron", CompactedMLP), ("head", CompactedAttention)):
            for mod, lins in _owner_groups(model, struct):
                if all(lin.structure == struct for lin in lins.values()):
                    name = next(n for n, x in model.named_modules() if x is mod)
                    _set_module(model, name, cls.of(_bake(mod)))
    swap_modules(model, lambda name, m: isinstance(m, MaskedLinear),
                 lambda name, m: linear_path(m, path, m.block, m.n, m.m))
    return model


def chosen_paths(rows: list[dict]) -> dict[str, str]:
    """``{layer: path}`` of the paths :func:`accelerate` kept."""
    return {r["layer"]: r["path"] for r in rows if r["chosen"] and r["layer"] != "<model>"}


__all__ = [
    "LINEAR_PATHS",
    "METHODS",
    "NM_CPU_NOTE",
    "PATHS",
    "SCOPES",
    "STRUCTURES",
    "TARGETS",
    "BSRLinear",
    "BlockGatheredLinear",
    "CSRLinear",
    "CompactedAttention",
    "CompactedLinear",
    "CompactedMLP",
    "DenseLinear",
    "GradualPruning",
    "MaskedLinear",
    "NMLinear",
    "SparsityConfig",
    "accelerate",
    "actual_sparsity",
    "attach",
    "chosen_paths",
    "compute_masks",
    "convert",
    "cubic_schedule",
    "expected",
    "l1_penalty",
    "linear_path",
    "paired_speedup",
    "paired_times",
    "prune",
    "set_masks",
    "sparsify_",
    "storage_bytes",
    "train_sparse",
]
