"""What each strategy's rank really allocates for its model state: experiment ``memory``.

For each strategy (``ddp``, ``tensor``, ``pipeline``) every rank builds a fresh model,
wraps it, makes its AdamW optimizer and takes one training step, all inside
:func:`labkit.dist.common.allocated_bytes` (the bytes malloc has handed out and not taken
back, every thread: glibc's ``mallinfo2``). What is still allocated afterwards is what the rank
holds between steps: weights, gradients, optimizer state, and whatever the strategy keeps
besides (DDP's all-reduce buckets unless the gradients are views into them, a
pipeline's receive buffers). The workload's data are built before, outside the count.
:func:`labkit.dist.lab.simulator_memory_errors` sets the simulator's bytes next to these.
"""
from __future__ import annotations

import math

import torch

from .common import allocated_bytes, build_model, check_common, state_bytes
from .common import setup as _setup

STRATEGIES = ("ddp", "tensor", "pipeline")


def validate(config: dict, world_size: int) -> None:
    from .. import validate as V

    names = config.get("strategies", STRATEGIES)
    for s in names:
        V.choice("strategies", s, STRATEGIES)
    m = V.integer("microbatches", config.get("microbatches", 2), 1)
    # DDP shards the batch over the ranks; the pipeline cuts it into m micro-batches
    check_common(config, world_size, batch_divisor=math.lcm(
        world_size if "ddp" in names else 1, m if "pipeline" in names else 1))


def _ddp(ctx, wl, cfg, batch):
    from .common import shard
    from .ddp import forward, task_loss, wrap

    model = build_model(wl, cfg)
    ddp = wrap(model)
    opt = torch.optim.AdamW(model.parameters())
    part = shard(batch, ctx.rank, ctx.world_size)
    task_loss(model, forward(ddp, part), part).backward()
    opt.step()
    return (ddp, opt), state_bytes(model, opt)


def _tensor(ctx, wl, cfg, batch, mesh):
    from .tensor import parallelize

    model = build_model(wl, cfg)
    parallelize(model, mesh)
    opt = torch.optim.AdamW(model.parameters())
    model.loss(batch).backward()
    opt.step()
    return (model, opt), state_bytes(model, opt)


def _pipeline(ctx, wl, cfg, batch):
    from torch import nn

    from .pipeline import Pipe

    model = build_model(wl, cfg)
    pipe = Pipe(ctx, model, ctx.world_size, cfg.get("microbatches", 2), "gpipe")
    del model  # the rank keeps only its stage's modules
    opt = torch.optim.AdamW(pipe.parameters())
    pipe.step(batch)
    opt.step()
    return (pipe, opt), state_bytes(nn.ModuleList(pipe.modules), opt)


def run(ctx) -> dict:
    cfg = ctx.config
    wl, _ = _setup(cfg)
    batch = next(wl.make_batches(cfg.get("seed", 0)))
    mesh = None
    out = {"rank": ctx.rank, "batch": len(batch["input_ids"]),
           "microbatches": cfg.get("microbatches", 2),
           "tokens_per_row": int(batch["input_ids"].shape[1])}
    for name in cfg.get("strategies", STRATEGIES):
        if name == "tensor" and mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (ctx.world_size,))
        fn = {"ddp": lambda: _ddp(ctx, wl, cfg, batch),
              "tensor": lambda m=mesh: _tensor(ctx, wl, cfg, batch, m),
              "pipeline": lambda: _pipeline(ctx, wl, cfg, batch)}[name]
        (held, counted), allocated, method = allocated_bytes(fn)
        del held
        out[name] = {"allocated_bytes": allocated, "allocated_by": method, **counted}
    return out
