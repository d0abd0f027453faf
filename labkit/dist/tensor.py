"""Tensor (intra-layer model) parallel, the seed paper's Eq. 8-9, with
``torch.distributed.tensor.parallel`` on a 1-D :func:`init_device_mesh` of T ranks.

Megatron's split of a block: Q, K, V and the MLP's up (and gate) projections are cut by
output columns, so each rank computes H/T whole heads and d_ff/T hidden units locally;
the attention output and MLP down projections are cut by input rows, so each rank's
partial sums are added by one all-reduce:

    Y = [X A_1, ..., X A_T]          (column-wise: no communication)          (Eq. 8)
    Z = sum_t Y_t B_t                (row-wise: one all-reduce of (B, N, D))   (Eq. 9)

Two all-reduces of the activations per block forward (and two in backward). Saves: the
block weights, their gradients and optimizer state are 1/T per rank (embeddings, norms and
the head stay replicated here); activations inside attention and the MLP are 1/T too.
Costs: 4 all-reduces of B*N*D values per block per step, on the critical path.

Heads and d_ff must divide by T. Experiment ``tensor`` checks outputs and gradients
against the unsplit model and reports memory per rank measured vs claimed.
"""
from __future__ import annotations

import copy
import time

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from .. import validate as V
from ..model import PRESETS
from .common import (
    all_max,
    check_common,
    compare_grads,
    grads,
    lockstep_timer,
    setup,
    state_bytes,
)


def validate(config: dict, world_size: int) -> None:
    check_common(config, world_size)
    t = V.integer("degree", config.get("degree", world_size), 1, world_size)
    if world_size % t:
        raise V.LabkitConfigError("degree", t, f"a divisor of the {world_size} ranks")
    size = PRESETS[config.get("size", "tiny")]
    if size["n_heads"] % t:
        raise V.LabkitConfigError("degree", t, f"a divisor of n_heads={size['n_heads']}")
    if size["d_ff"] % t:
        raise V.LabkitConfigError("degree", t, f"a divisor of d_ff={size['d_ff']}")


def plan(block) -> dict:
    """Column-wise q/k/v/up(/gate), row-wise o/down."""
    p = {"attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(),
         "attn.v": ColwiseParallel(), "attn.o": RowwiseParallel(),
         "ffn.up": ColwiseParallel(), "ffn.down": RowwiseParallel()}
    if block.ffn.gate is not None:
        p["ffn.gate"] = ColwiseParallel()
    return p


def parallelize_block(block, mesh) -> None:
    """Shard one block over the 1-D ``mesh`` in place."""
    parallelize_module(block, mesh, plan(block))
    block.attn.n_heads //= mesh.size()  # each rank runs its H/T heads on its local columns


def parallelize(model, mesh) -> None:
    """Shard every block of ``model`` over the 1-D ``mesh`` in place."""
    for block in model.blocks:
        parallelize_block(block, mesh)


def sharded_bytes(model) -> int:
    """Bytes the plan splits: every planned weight, and the column-wise biases (a row-wise
    layer's bias is added after the all-reduce, so it stays whole on every rank)."""
    total = 0
    for block in model.blocks:
        for name, style in plan(block).items():
            lin = block.get_submodule(name)
            ps = [lin.weight] + ([lin.bias] if lin.bias is not None
                                 and isinstance(style, ColwiseParallel) else [])
            total += sum(p.numel() * p.element_size() for p in ps)
    return total


def full_grads(model) -> dict:
    """Every gradient as a whole tensor (sharded ones all-gathered; a collective), None
    where a parameter has none. Every rank walks the same parameters in the same order,
    so the all-gathers match."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name] = None if g is None else g.full_tensor() if hasattr(g, "full_tensor") else g
    return out


def run(ctx) -> dict:
    cfg = ctx.config
    t = cfg.get("degree", ctx.world_size)
    wl, model = setup(cfg)
    ref = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (t,))
    parallelize(model, mesh)
    stream = wl.make_batches(cfg.get("seed", 0))
    batch = next(stream)  # tensor parallel: every rank sees the whole batch
    out = {"rank": ctx.rank, "degree": t}
    if cfg.get("check", True):
        args = (batch["input_ids"], batch.get("padding_mask"), batch.get("token_type_ids"))
        y, y_ref = model(*args), ref(*args)
        out["output_max_abs_diff"] = all_max(float((y - y_ref).abs().max()))
        model.loss(batch).backward()
        ref.loss(batch).backward()
        out.update(compare_grads(full_grads(model), grads(ref)))
        out["grad_max_abs_diff"] = all_max(out["grad_max_abs_diff"])
        model.zero_grad(set_to_none=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.get("lr", 1e-3))
    losses = []
    for step in range(1, cfg.get("steps", 0) + 1):
        b = next(stream)
        start = time.perf_counter()
        loss = model.loss(b)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - start
        mem = state_bytes(model, opt)  # weights, gradients and optimizer state all live
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        ctx.emit(step=step, loss=float(loss), step_s=dt, samples_per_s=len(b["input_ids"]) / dt)
    out["losses"] = losses
    if cfg.get("rounds", 0):  # fwd + bwd step time, every rank in lock-step
        b = next(stream)

        def step():
            model.loss(b).backward()
        cpu: dict = {}
        timer = lockstep_timer(cfg.get("reps", 3), cpu=cpu)
        times = sorted(timer("tp", step, 0) for _ in range(cfg["rounds"]))
        out["step_s"] = times[len(times) // 2]
        out["cpu_share"] = min(cpu["tp"])
        out["tokens_per_row"] = int(b["input_ids"].shape[1])
        model.zero_grad(set_to_none=True)
    if not losses:
        mem = state_bytes(model)
    full = state_bytes(ref)["param_bytes"]
    split = sharded_bytes(ref)
    out["memory"] = mem
    out["claimed_param_bytes"] = full / t  # the paper's claim: 1/T of the weights each
    out["claimed_param_bytes_blocks_only"] = full - split + split / t  # what the plan shards
    return out
