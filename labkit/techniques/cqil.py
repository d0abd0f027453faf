"""CQIL: concurrent computation of quasi-independent layers.

Paper: Zou, Wang, Xu, Li, Yang, Jiang, "Inference Latency Optimization with Concurrent
Computation of Quasi-Independent Layers" (ACL 2024); reference code Photooon/CQIL (read,
not copied).

Idea: in a trained transformer the inputs of adjacent blocks are nearly the same vector
(cosine similarity close to 1 in the middle and upper layers), so those blocks barely
depend on each other. Deal a group of blocks ``[start, end)`` out ``P`` at a time: the
``P`` blocks of a step all read the same input and their residual updates are summed. On
``P`` devices (or processes) a step costs one block plus one all-reduce instead of ``P``
blocks. A little recovery training (self-distillation from the unchanged model through LoRA
adapters) closes most of the quality gap.

Equations. A step over blocks ``f_1 .. f_P`` (each ``f_i(x) = x + ...`` with its residuals)::

    x' = x + sum_i (f_i(x) - x)

Bypass of distance ``D``: the MLP of the ``m``-th block of a step also sees the attention
outputs ``a_j`` of the ``D`` blocks before it in the same step, added to the MLP input only::

    h_m = x + a_m,   a_m = attn(norm1(x)),   f_m(x) = h_m + mlp(norm2(h_m + sum_{j=m-D}^{m-1} a_j))

(the reference code adds the bypass in place to the tensor that is also the residual, so it
lands in the block output too and is counted again in the sum; here it feeds the MLP only).
The reference is pre-norm (Llama). A post-norm block (BERT, MiniLM) normalises after each
residual add, ``h_m = norm1(x + a_m)``, ``a_m = attn(x)``, ``f_m(x) = norm2(h_m + mlp(m))``;
its bypass joins the attention outputs where they are summed, before the norm, and again
feeds the MLP only: ``m = norm1(x + a_m + sum_j a_j)``.

Recovery: ``L_KD = T^2 KL(softmax(z_teacher / T) || softmax(z / T))`` per token, the teacher
the unchanged sequential model, the student trained through rank-``r`` LoRA adapters
``W x + (alpha / r) B A x`` on the attention and MLP linears (``B = 0`` at the start, so the
student starts as CQIL exactly), or a full fine-tune.

Complexity: the block FLOPs are unchanged; the critical path over ``L`` blocks falls from
``L`` to ``L - (end - start) + ceil((end - start) / P)`` blocks (ideal latency cut
``(end - start)(1 - 1/P) / L`` when ``P`` divides the group), plus one all-reduce of a
``(B, N, D)`` tensor per step across processes (:mod:`labkit.techniques.cqil_dist`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import validate as V
from ..accounting import rows
from ..model import BlockContext, BlockExecutor
from ..train import StepStrategy
from .registry import register, register_account, swap_modules


def check_group(start: int, end: int, p: int, n_layers: int | None = None, d: int = 0):
    """Validate a CQIL group ``[start, end)`` dealt ``p`` ways with bypass distance ``d``."""
    V.integer("start", start, 0)
    V.integer("end", end, 1)
    if start >= end:
        raise V.LabkitConfigError("start", start, f"less than end={end}")
    if n_layers is not None and end > n_layers:
        raise V.LabkitConfigError("end", end, f"at most the number of blocks ({n_layers})")
    V.integer("P", p, 2)
    if p > end - start:
        raise V.LabkitConfigError("P", p, f"an integer in [2, end - start = {end - start}]")
    V.integer("D", d, 0)


@dataclass(frozen=True)
class CQILConfig:
    """Blocks ``[start, end)`` run ``P`` at a time on a shared input; bypass distance ``D``."""

    start: int = 0
    end: int = 2
    P: int = 2
    D: int = 0

    def __post_init__(self):
        check_group(self.start, self.end, self.P, None, self.D)

    def check(self, model_cfg) -> None:
        check_group(self.start, self.end, self.P, model_cfg.n_layers, self.D)


def steps_of(start: int, end: int, p: int) -> list[list[int]]:
    """The group's steps: block ``start + s P + i`` is the ``i``-th of step ``s`` (the
    reference code deals block ``j`` to rank ``(j - start) mod P``)."""
    return [list(range(s, min(s + p, end))) for s in range(start, end, p)]


def ideal_cut(n_layers: int, start: int, end: int, p: int) -> float:
    """Fraction of the block critical path removed: ``(end - start)(1 - 1/P) / L`` when P
    divides the group (here exactly, with a shorter last step otherwise)."""
    return ((end - start) - math.ceil((end - start) / p)) / n_layers


def block_parts(block, x: torch.Tensor, ctx: BlockContext, bypass=None):
    """One block split at its MLP input: returns ``(f(x), a)`` with ``a`` the attention
    output; ``bypass`` reaches the MLP's input only (not the residual). Pre-norm and
    post-norm blocks (``block.post_norm``, BERT) alike; without a bypass ``f(x)`` is
    ``block(x)``."""
    mask, rope = ctx.key_padding_mask, ctx.rope
    if getattr(block, "post_norm", False):  # norm(x + f(x)) after each sub-layer
        a = block.drop(block.attn(x, key_padding_mask=mask, rope=rope))  # (B, N, D)
        h = block.norm1(x + a)
        m_in = h if bypass is None else block.norm1(x + a + bypass)
        return block.norm2(h + block.drop(block.ffn(m_in))), a
    a = block.drop(block.attn(block.norm1(x), key_padding_mask=mask, rope=rope))  # (B, N, D)
    h = x + a
    m_in = h if bypass is None else h + bypass
    return h + block.drop(block.ffn(block.norm2(m_in))), a


def run_step(blocks, idx: list[int], x: torch.Tensor, ctx: BlockContext, d: int) -> torch.Tensor:
    """One CQIL step in one process: ``x + sum_i (f_i(x) - x)`` with bypass distance ``d``."""
    if d == 0:
        delta = sum(ctx.call(blocks[j], x) - x for j in idx)
        return x + delta
    attn_outs, delta = [], 0
    for j in idx:
        bypass = sum(attn_outs[-d:]) if attn_outs else None
        y, a = block_parts(blocks[j], x, ctx, bypass)
        attn_outs.append(a)
        delta = delta + (y - x)
    return x + delta


class CQILExecutor(BlockExecutor):
    """Blocks before ``start`` and from ``end`` run in order; the group runs in steps of
    ``P`` blocks on a shared input (simulated in one process: same numbers, no speedup)."""

    def __init__(self, start: int, end: int, p: int, d: int = 0):
        super().__init__()
        self.start, self.end, self.p, self.d = start, end, p, d

    def forward(self, blocks: nn.ModuleList, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        for i in range(self.start):
            x = ctx.call(blocks[i], x)  # (B, N, D)
        for idx in steps_of(self.start, self.end, self.p):
            x = run_step(blocks, idx, x, ctx, self.d)
        for i in range(self.end, len(blocks)):
            x = ctx.call(blocks[i], x)
        return x

    def extra_repr(self) -> str:
        return f"group=[{self.start}, {self.end}), P={self.p}, D={self.d}"


_PARTS = ("attn", "norm1", "norm2", "ffn", "drop", "post_norm")


@register(CQILConfig)
def _apply(model, config: CQILConfig):
    check_group(config.start, config.end, config.P, len(model.blocks), config.D)
    if config.D > 0:  # the bypass splits each block at its MLP: it must know the block
        odd = [i for i in range(config.start, config.end)
               if not all(hasattr(model.blocks[i], k) for k in _PARTS)]
        if odd:
            raise V.LabkitConfigError(
                "D", config.D, f"0 for blocks {odd}: a bypass needs blocks with labkit's "
                f"{', '.join(_PARTS)} (type {type(model.blocks[odd[0]]).__name__})")
    model.set_executor(CQILExecutor(config.start, config.end, config.P, config.D))
    return model


@register_account(CQILConfig)
def _account(table, cfg, config: CQILConfig) -> dict:
    """Parameters and FLOPs unchanged (the step sum is element-wise); what changes is the
    critical path and the communication."""
    return {"ideal_latency_cut": ideal_cut(cfg.n_layers, config.start, config.end, config.P),
            "allreduce_per_forward": len(steps_of(config.start, config.end, config.P))}


# ---- (a) how independent are adjacent blocks? -------------------------------------------

@torch.no_grad()
def input_similarity(model, ids: torch.Tensor, padding_mask: torch.Tensor | None = None):
    """``(L, L)`` mean cosine similarity between the inputs of blocks ``i`` and ``j`` over
    the real (non-padding) tokens; entry ``[i, i+1]`` is the adjacent-block similarity CQIL
    relies on. Measured on the sequential model (the executor is swapped out meanwhile),
    captured by forward pre-hooks on the blocks."""
    inputs = []
    before = model.set_executor(BlockExecutor())
    hooks = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
             for b in model.blocks]
    try:
        was = model.training
        model.eval()
        model(ids, padding_mask)
        model.train(was)
    finally:
        for h in hooks:
            h.remove()
        model.set_executor(before)
    h = torch.stack([F.normalize(x, dim=-1) for x in inputs])  # (L, B, N, D)
    keep = torch.ones(h.shape[1:3], dtype=torch.bool) if padding_mask is None else ~padding_mask
    flat = h[:, keep]  # (L, T, D)
    return torch.einsum("itd,jtd->ij", flat, flat) / flat.shape[1]  # (L, L)


# ---- (d) recovery: LoRA adapters and self-distillation ------------------------------------

@dataclass(frozen=True)
class LoRAConfig:
    """Rank-``rank`` adapters on every attention (q, k, v, o) and MLP (up, gate, down)
    linear of the blocks; ``alpha`` scales them by ``alpha / rank`` (the reference uses
    alpha = rank)."""

    rank: int = 8
    alpha: float | None = None

    def __post_init__(self):
        V.integer("rank", self.rank, 1)
        if self.alpha is not None:
            V.number("alpha", self.alpha, 0.0, lo_open=True)


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) B A x`` with the base frozen; same signature as nn.Linear."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        V.integer("rank", rank, 1)
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.scale = (alpha if alpha is not None else rank) / rank
        self.A = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))  # starts as the base
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x):  # (..., in) -> (..., out)
        return self.base(x) + F.linear(F.linear(x, self.A), self.B) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear with the adapter folded in (no inference cost)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None)
        out.weight.copy_(self.base.weight + self.scale * self.B @ self.A)
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out.to(self.base.weight.device)


_LORA_TARGETS = {"attn": ("q", "k", "v", "o"), "ffn": ("up", "gate", "down")}


def _is_target(name: str, m: nn.Module) -> bool:
    parts = name.split(".")
    return (isinstance(m, nn.Linear) and len(parts) >= 4 and parts[0] == "blocks"
            and parts[-1] in _LORA_TARGETS.get(parts[-2], ()))


@register(LoRAConfig)
def _apply_lora(model, config: LoRAConfig):
    for p in model.parameters():
        p.requires_grad_(False)
    swap_modules(model, _is_target, lambda n, m: LoRALinear(m, config.rank, config.alpha))
    return model


@register_account(LoRAConfig)
def _account_lora(table, cfg, config: LoRAConfig) -> None:
    """A rank-r adapter beside every block linear that is an ``nn.Linear``:
    ``r (in + out)`` parameters and ``2 t r (in + out)`` FLOPs each."""
    for r in rows(table).values():
        if r.kind in ("linear", "sparse", "fakequant"):
            r.adapter_rank = config.rank


def merge_lora_(model) -> int:
    """Fold every adapter into its linear; returns how many were merged."""
    return len(swap_modules(model, lambda n, m: isinstance(m, LoRALinear),
                            lambda n, m: m.merged()))


class DistillStrategy(StepStrategy):
    """Self-distillation: ``T^2 KL(teacher || student)`` on the logits at temperature ``T``,
    averaged over predictions (tokens for the decoder, rows for the encoder)."""

    def __init__(self, teacher: nn.Module, temperature: float = 1.0):
        self.teacher = teacher.eval()
        self.t = V.number("temperature", temperature, 0.0, lo_open=True)

    def loss(self, model, batch, state):
        ids, mask = batch["input_ids"], batch.get("padding_mask")
        with torch.no_grad():
            zt = self.teacher(ids, mask)
        zs = model(ids, mask)
        c = zs.shape[-1]
        loss = F.kl_div(F.log_softmax(zs.reshape(-1, c) / self.t, -1),
                        F.log_softmax(zt.reshape(-1, c) / self.t, -1),
                        log_target=True, reduction="batchmean") * self.t ** 2
        return loss
