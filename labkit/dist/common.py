"""What the parallel strategies share: the same model and the same global batches on every
rank, shards of a batch, exact gradient comparison, bytes held per rank, and a lock-step
timer (every rank runs the same number of repetitions, so collectives never deadlock)."""
from __future__ import annotations

import resource
import time

import torch
import torch.distributed as dist

from .. import validate as V
from ..labs.workloads import TASKS, workload
from ..model import PRESETS


def check_common(config: dict, world_size: int, batch_divisor: int = 1) -> None:
    """Fields every experiment shares; the global batch must split over ``batch_divisor``."""
    V.choice("task", config.get("task", "nli"), TASKS)
    V.choice("size", config.get("size", "tiny"), PRESETS)
    batch = V.integer("batch", config.get("batch", 16), 1)
    V.integer("seq", config.get("seq", 32), 8)
    V.integer("steps", config.get("steps", 10), 0)
    if batch % batch_divisor:
        raise V.LabkitConfigError("batch", batch, f"a multiple of {batch_divisor} (the data "
                                  f"parallel degree times the micro-batches)")


def setup(config: dict):
    """The workload and a model built from the same seed on every rank."""
    from ..model import build

    wl = workload(config.get("task", "nli"), config.get("size", "tiny"),
                  batch_size=config.get("batch", 16), seq_len=config.get("seq", 32),
                  n_train=config.get("n_train", 2000), n_eval=64, seed=config.get("seed", 0))
    cfg = wl.cfg
    if config.get("layers"):
        import dataclasses
        cfg = dataclasses.replace(cfg, n_layers=config["layers"])
    return wl, build(cfg, seed=config.get("seed", 0))


def shard(batch: dict, index: int, parts: int) -> dict:
    """Rows ``[index*B/parts, (index+1)*B/parts)`` of every tensor in ``batch``."""
    n = len(batch["input_ids"]) // parts
    return {k: v[index * n:(index + 1) * n] for k, v in batch.items()}


def max_abs_diff(got: dict, ref: dict) -> float:
    """Largest absolute difference over tensors present in both (e.g. gradients by name)."""
    worst = 0.0
    for k, t in got.items():
        if k in ref and t is not None and ref[k] is not None:
            worst = max(worst, float((t.detach() - ref[k].detach()).abs().max()))
    return worst


def grads(module: torch.nn.Module) -> dict:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()
            if p.grad is not None}


def all_max(value: float, group=None) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def state_bytes(module: torch.nn.Module, optimizer=None) -> dict:
    """Bytes this rank actually holds: parameters (a tensor-parallel shard counts its local
    part), gradients, optimizer state; and the process's peak resident set."""
    params = {id(p): p for p in module.parameters()}.values()
    p_bytes = sum(_local(p).numel() * p.element_size() for p in params)
    g_bytes = sum(_local(p.grad).numel() * p.grad.element_size() for p in params
                  if p.grad is not None)
    o_bytes = 0
    if optimizer is not None:
        for st in optimizer.state.values():
            o_bytes += sum(_local(v).numel() * v.element_size() for v in st.values()
                           if torch.is_tensor(v) and v.dim() > 0)
    return {"param_bytes": p_bytes, "grad_bytes": g_bytes, "optimizer_bytes": o_bytes,
            "state_bytes": p_bytes + g_bytes + o_bytes,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def lockstep_timer(reps: int = 3, group=None):
    """A :func:`labkit.measure.paired` timer for collective code: a barrier, a warm-up
    call, then exactly ``reps`` calls each timed on its own (every rank agrees on the
    count, so nothing deadlocks; collectives inside a call keep the ranks in step), then a
    barrier; the fastest call's seconds. On a shared machine the fastest of several is the
    least-disturbed estimate, and the simulator is calibrated the same way."""
    def timer(name, fn, _min_run_time):
        dist.barrier(group=group)
        fn()
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        dist.barrier(group=group)
        return best
    return timer
