"""What the parallel strategies share: the same model and the same global batches on every
rank, shards of a batch, exact gradient comparison (every parameter on both sides), bytes
held per rank (counted tensor by tensor, and allocated as the CPU allocator saw it), and a
lock-step timer (every rank runs the same number of repetitions, so collectives never
deadlock) that also records how much CPU a rank got while it was timed."""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import math
import os
import resource
import time

import torch
import torch.distributed as dist

from .. import validate as V
from ..labs.workloads import TASKS, workload
from ..model import NORM_POSITIONS, PRESETS


def check_common(config: dict, world_size: int, batch_divisor: int = 1) -> None:
    """Fields every experiment shares; the global batch must split over ``batch_divisor``."""
    V.choice("task", config.get("task", "nli"), TASKS)
    V.choice("size", config.get("size", "tiny"), PRESETS)
    batch = V.integer("batch", config.get("batch", 16), 1)
    V.integer("seq", config.get("seq", 32), 8)
    V.integer("steps", config.get("steps", 10), 0)
    V.choice("norm_position", config.get("norm_position", "pre"), NORM_POSITIONS)
    V.integer("type_vocab_size", config.get("type_vocab_size", 0), 0, 16)
    if batch % batch_divisor:
        raise V.LabkitConfigError("batch", batch, f"a multiple of {batch_divisor} (the data "
                                  f"parallel degree times the micro-batches)")


def setup(config: dict):
    """The workload and a model built from the same seed on every rank. ``layers``,
    ``norm_position`` ("post": BERT/MiniLM blocks) and ``type_vocab_size`` (segment
    embeddings) override the preset."""
    wl = workload(config.get("task", "nli"), config.get("size", "tiny"),
                  batch_size=config.get("batch", 16), seq_len=config.get("seq", 32),
                  n_train=config.get("n_train", 2000), n_eval=64, seed=config.get("seed", 0))
    return wl, build_model(wl, config)


def build_model(wl, config: dict):
    from ..model import build

    over = {k: config[k] for k in ("norm_position", "type_vocab_size") if k in config}
    if config.get("layers"):
        over["n_layers"] = config["layers"]
    return build(dataclasses.replace(wl.cfg, **over), seed=config.get("seed", 0))


def tokens_per_row(wl, seed: int = 0) -> int:
    """The sequence length the batches really have (the data pads to its longest row, which
    can be shorter than the ``seq`` asked for): what every timing here ran on."""
    return int(next(wl.make_batches(seed))["input_ids"].shape[1])


def shard(batch: dict, index: int, parts: int) -> dict:
    """Rows ``[index*B/parts, (index+1)*B/parts)`` of every tensor in ``batch``."""
    n = len(batch["input_ids"]) // parts
    return {k: v[index * n:(index + 1) * n] for k, v in batch.items()}


def compare_grads(got: dict, ref: dict, names=None) -> dict:
    """Gradients by parameter name, ``got`` (a strategy) vs ``ref`` (one process), over
    ``names`` (default: every name either side has). A parameter whose gradient is missing
    (absent or None) on either side is a failure, not a skip: a split that stops training
    one parameter must not pass. Returns the largest absolute difference (``inf`` when
    anything is missing), how many gradients were compared and what was missing."""
    names = sorted(set(got) | set(ref)) if names is None else list(names)
    worst, compared, missing = 0.0, 0, []
    for k in names:
        a, b = got.get(k), ref.get(k)
        if a is None or b is None:
            missing.append(f"{k} ({'strategy' if a is None else 'one process'})")
            continue
        worst = max(worst, float((a.detach() - b.detach()).abs().max()))
        compared += 1
    return {"grad_max_abs_diff": math.inf if missing else worst, "grads_compared": compared,
            "grads_missing": missing}


def grads(module: torch.nn.Module) -> dict:
    """Every parameter's gradient by name, None where it has none (so a missing one shows)."""
    return {n: None if p.grad is None else p.grad.detach().clone()
            for n, p in module.named_parameters()}


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


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]


def live_bytes() -> tuple[int, str]:
    """Bytes this process has allocated and not freed, every thread and arena: glibc's
    ``mallinfo2`` (in-use heap + mmapped chunks; torch's CPU tensors are malloc'd). Where
    that is unavailable, the resident set after a collection (coarser: pages, libraries)."""
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        m = libc.mallinfo2()
        return int(m.uordblks + m.hblkhd), "mallinfo2"
    except (OSError, AttributeError):  # pragma: no cover - not glibc >= 2.33
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"), "rss"


def allocated_bytes(fn, warmup: bool = True) -> tuple[object, int, str]:
    """``(fn(), bytes, method)``: what ``fn`` allocated and still holds when it returns,
    in every thread (C++'s allocations included, e.g. DDP's gradient buckets or a
    pipeline's receive buffers), by :func:`live_bytes`. ``fn`` runs once first and its
    result is dropped, so imports and one-time caches are not counted; it should return
    what it holds and free its temporaries."""
    if warmup:
        out = fn()
        del out
    before, method = live_bytes()
    out = fn()
    return out, live_bytes()[0] - before, method


def cores_available() -> int:
    """CPUs this process may run on (its affinity mask; a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def lockstep_timer(reps: int = 3, group=None, cpu: dict | None = None):
    """A :func:`labkit.measure.paired` timer for collective code: a barrier, a warm-up
    call, then exactly ``reps`` calls each timed on its own (every rank agrees on the
    count, so nothing deadlocks; collectives inside a call keep the ranks in step), then a
    barrier; the fastest call's seconds. On a shared machine the fastest of several is the
    least-disturbed estimate, and the simulator is calibrated the same way.

    ``cpu``: a dict that collects, per name, this process's CPU seconds per wall second
    during the fastest call (1.0 for a one-thread rank on a core of its own; less when it
    waited for a core, i.e. the rank shared its core with another process)."""
    def timer(name, fn, _min_run_time):
        dist.barrier(group=group)
        fn()
        best, share = float("inf"), float("nan")
        for _ in range(reps):
            start, c = time.perf_counter(), time.process_time()
            fn()
            wall = time.perf_counter() - start
            if wall < best:
                best, share = wall, (time.process_time() - c) / max(wall, 1e-12)
        dist.barrier(group=group)
        if cpu is not None:
            cpu.setdefault(name, []).append(share)
        return best
    return timer
