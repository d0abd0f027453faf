"""Measure what a technique really changes: latency, memory, FLOPs, parameters, quality.

* latency: ``torch.utils.benchmark`` (warm-up, then blocked auto-ranging), median and IQR,
  with the thread count, dtype, shapes, torch version and CPU model recorded.
* memory: parameter and buffer bytes by dtype (shared tensors once), and the peak bytes of
  tensors allocated during one call, tracked by a dispatch mode (CPU has no allocator stats).
* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` (counts matmuls, convolutions and SDPA;
  element-wise ops are not counted, which is the usual convention).
* the kernel path that ran: every module with a ``kernel_path`` attribute reports it.

``compare(baseline, candidate)`` puts two measurements side by side with ratios.
"""
from __future__ import annotations

import contextlib
import math
import platform
import weakref
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from torch.utils import benchmark
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from . import validate as V


@contextlib.contextmanager
def num_threads(n: int | None):
    """Run a block with ``n`` intra-op threads (``None``: leave as is), then restore."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(V.integer("threads", n, 1))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """What a number depends on; recorded next to every timing."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_model(),
            "python": platform.python_version(), "machine": platform.machine()}


@dataclass
class Timing:
    label: str
    median_s: float
    iqr_s: float
    runs: int
    threads: int
    shapes: str = ""
    dtype: str = ""

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3

    def row(self) -> dict:
        return {**asdict(self), "median_ms": self.median_ms}


def time_fn(fn, label: str = "", min_run_time: float = 0.5, shapes: str = "",
            dtype: str = "", threads: int | None = None) -> Timing:
    """Median and IQR of ``fn()``: one warm-up call, then ``blocked_autorange``."""
    V.number("min_run_time", min_run_time, 0.0, lo_open=True)
    threads = threads or torch.get_num_threads()
    fn()  # warm-up: lazy init, allocator, weight packing
    t = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, label=label)
    m = t.blocked_autorange(min_run_time=min_run_time)
    return Timing(label, m.median, m.iqr, len(m.times), threads, shapes, dtype)


@dataclass
class Paired:
    """Timings of several callables measured side by side (see :func:`paired`).

    ``seconds[name]`` is the median over rounds, ``spread[name]`` its (min, max) over
    rounds; ``ratio[name]`` the median over rounds of the per-round ratio
    ``reference / name`` (a speedup: > 1 means faster than the reference), and
    ``ratio_spread[name]`` its (min, max)."""

    reference: str
    seconds: dict
    spread: dict
    ratio: dict
    ratio_spread: dict
    rounds: int
    threads: int

    def row(self, k) -> dict:
        """The timing fields of one callable: median and spread in ms, the speedup against
        the reference with its spread, rounds and threads (every benchmark's row has them)."""
        return {"median_ms": self.seconds[k] * 1e3, "min_ms": self.spread[k][0] * 1e3,
                "max_ms": self.spread[k][1] * 1e3, "speedup": self.ratio[k],
                "speedup_min": self.ratio_spread[k][0], "speedup_max": self.ratio_spread[k][1],
                "rounds": self.rounds, "threads": self.threads}

    def rows(self) -> list[dict]:
        return [{"variant": k, **self.row(k)} for k in self.seconds]


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def paired(fns: dict, reference: str | None = None, rounds: int = 3,
           min_run_time: float = 0.2, timer=None) -> Paired:
    """Time every callable in ``fns`` side by side: ``rounds`` rounds, each timing every
    callable once, the order rotated by one each round so drift and other processes hit
    all alike. ``timer(name, fn, min_run_time) -> seconds`` is injectable (tests pass a
    fake); the default is the median of :func:`time_fn`. ``reference`` defaults to the
    first key."""
    if not fns:
        raise ValueError("paired() needs at least one callable")
    names = list(fns)
    reference = names[0] if reference is None else reference
    V.choice("reference", reference, names)
    V.integer("rounds", rounds, 1)
    if timer is None:
        def timer(name, fn, mrt):
            return time_fn(fn, name, mrt).median_s
    per = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            per[k].append(float(timer(k, fns[k], min_run_time)))
    ratios = {k: [per[reference][i] / per[k][i] for i in range(rounds)] for k in names}
    return Paired(reference, {k: _median(v) for k, v in per.items()},
                  {k: (min(v), max(v)) for k, v in per.items()},
                  {k: _median(v) for k, v in ratios.items()},
                  {k: (min(v), max(v)) for k, v in ratios.items()},
                  rounds, torch.get_num_threads())


def speedup_verdict(speedup: float, spread: tuple[float, float] | None = None,
                    flop_ratio: float | None = None, slack: float = 1.1) -> str:
    """``"measured"``, or why a speedup is noise rather than a result: its spread over
    rounds straddles 1 (it could be slower or faster), or it exceeds the counted FLOP
    ratio by more than ``slack`` (fewer FLOPs cannot explain it)."""
    if spread is not None and spread[0] < 1.0 < spread[1]:
        return "noise: spread over rounds straddles 1x"
    if flop_ratio is not None and speedup > flop_ratio * slack:
        return f"noise: above the FLOP ratio {flop_ratio:.2f}x"
    return "measured"


def latency(model, *inputs, label: str = "", min_run_time: float = 0.5) -> Timing:
    """Inference latency of ``model(*inputs)`` under ``torch.inference_mode``."""
    shapes = ",".join(str(tuple(x.shape)) for x in inputs if torch.is_tensor(x))
    dtype = next((str(p.dtype) for p in model.parameters()), "")

    def call():
        with torch.inference_mode():
            model(*inputs)

    return time_fn(call, label or type(model).__name__, min_run_time, shapes, dtype)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, including tensor subclasses that pack data and scales
    (their ``__tensor_flatten__`` inner tensors are summed)."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _quantized_pieces(q: torch.Tensor) -> list[tuple[str, int]]:
    """``[(dtype, bytes)]`` a quantized tensor stores: its codes, and its scale and zero
    point (per tensor: one float64 and one int64; per channel: a vector of each)."""
    codes = (str(q.dtype).replace("torch.", ""), q.numel() * q.element_size())
    if q.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric,
                       torch.per_channel_affine_float_qparams):
        s, z = q.q_per_channel_scales(), q.q_per_channel_zero_points()
        return [codes, (str(s.dtype).replace("torch.", ""), s.numel() * s.element_size()),
                (str(z.dtype).replace("torch.", ""), z.numel() * z.element_size())]
    return [codes, ("float64", 8), ("int64", 8)]


def _packed_linear(m) -> list:
    """The tensors a torch.ao packed linear keeps outside parameters and buffers (torch's
    ``quantize_dynamic`` / static quantized ``Linear``): unpacked, they are its quantized
    weight and its fp32 bias. fbgemm's packed copy also keeps one int32 column offset per
    output, not counted (the layout is the kernel's)."""
    from torch.ao.nn.quantized.modules.linear import LinearPackedParams

    if not isinstance(m, LinearPackedParams):
        return []
    w, b = m._weight_bias()
    return [w] + ([b] if b is not None else [])


def stored_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every tensor ``model`` stores, each object once: parameters and buffers, the packed
    weights of torch.ao quantized linears, and, for a module with a ``stored_tensors()``
    method (a compiled graph whose weights are graph constants), what that method returns
    instead of its own parameters and buffers."""
    seen, out, skip = set(), [], ()
    for name, m in model.named_modules():
        if skip and name.startswith(skip):
            continue
        declared = getattr(m, "stored_tensors", None)
        if callable(declared):
            found = list(declared())
            skip = (*skip, name + ".") if name else ("",)  # "" prefixes every name
        else:
            found = [*m.parameters(recurse=False), *m.buffers(recurse=False),
                     *_packed_linear(m)]
        for t in found:
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


def model_bytes(model: torch.nn.Module) -> dict:
    """Bytes ``model`` stores by dtype (:func:`stored_tensors`: parameters, buffers, packed
    quantized weights, each once), plus ``total``."""
    by = defaultdict(int)
    for t in stored_tensors(model):
        if t.is_quantized:
            for dt, nb in _quantized_pieces(t):
                by[dt] += nb
        else:
            by[str(t.dtype).replace("torch.", "")] += tensor_bytes(t)
    out = dict(by)
    out["total"] = sum(by.values())
    return out


class _LiveBytes(TorchDispatchMode):
    """Tracks bytes of storages created under it; a storage is freed when the last tensor
    seen on it is collected."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.current = self.peak = 0

    def _drop(self, key):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.current -= self.size.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            try:
                key = t.untyped_storage().data_ptr()
            except (RuntimeError, NotImplementedError):
                continue
            if not key:
                continue
            if key not in self.refs:
                self.refs[key] = 0
                self.size[key] = t.untyped_storage().nbytes()
                self.current += self.size[key]
                self.peak = max(self.peak, self.current)
            self.refs[key] += 1
            weakref.finalize(t, self._drop, key)
        return out


def peak_memory(fn) -> int:
    """Peak bytes of tensors allocated while ``fn()`` runs (inputs and weights excluded)."""
    tracker = _LiveBytes()
    with tracker:
        result = fn()
    del result
    return tracker.peak


def peak_activation_bytes(model, *inputs) -> int:
    """Peak activation memory of one inference forward pass."""
    def call():
        with torch.inference_mode():
            return model(*inputs)

    return peak_memory(call)


def _register_cpu_sdpa_flops():
    """torch's flop counter has formulas for the CUDA SDPA kernels only; register the CPU
    flash kernel with labkit's one formula (:func:`labkit.accounting.sdpa_flops`, what the
    analytic tables claim: ``4 B H N_q N_k D_head``, causal not discounted, as upstream)."""
    from torch.utils import flop_counter as fc

    from .accounting import sdpa_flops

    fwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in fc.flop_registry:
        @fc.register_flop_formula(fwd)
        def _fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
            b, h, n_q, d = query
            return b * sdpa_flops(n_q, key[-2], h * d)
    if bwd is not None and bwd not in fc.flop_registry:
        @fc.register_flop_formula(bwd)
        def _bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_backward_flop_count(grad_out, query, key, value)


_register_cpu_sdpa_flops()


def _register_int_mm_flops():
    """torch's flop counter has no formula for ``aten._int_mm`` (the s8s8 matmul torchao's
    INT8 path runs), so INT8 models counted zero FLOPs in their linears: count 2 M K N."""
    from torch.utils import flop_counter as fc

    op = getattr(torch.ops.aten, "_int_mm", None)
    if op is not None and op not in fc.flop_registry:
        @fc.register_flop_formula(op)
        def _int_mm(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
            m, k = a_shape
            return 2 * m * k * b_shape[1]


_register_int_mm_flops()


def _register_dynamic_linear_flops():
    """Nor for torch's dynamic INT8 linear (``quantized::linear_dynamic``, what
    ``accelerate`` keeps where it is fastest): count 2 t in out from the input and output
    shapes (the packed weight has none), so an INT8 model's work is not read as removed."""
    from torch.utils import flop_counter as fc

    op = getattr(getattr(torch.ops, "quantized", None), "linear_dynamic", None)
    if op is not None and op not in fc.flop_registry:
        @fc.register_flop_formula(op)
        def _linear_dynamic(x_shape, *args, out_shape=None, **kwargs) -> int:
            return 2 * math.prod(x_shape) * out_shape[-1]


_register_dynamic_linear_flops()


def capture_inputs(model: torch.nn.Module, inputs: tuple, modules: dict) -> dict:
    """``{name: (args, kwargs)}``: what each of ``modules`` (``{name: module}``) receives
    first during one inference forward of ``model(*inputs)``, for timing layers on real input."""
    seen, hooks = {}, []
    for name, mod in modules.items():
        def hook(m, args, kwargs, name=name):
            seen.setdefault(name, (args, kwargs))
        hooks.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():  # not inference_mode: callers reuse the captured tensors
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def flops(fn) -> int:
    """FLOPs counted by ``FlopCounterMode`` while ``fn()`` runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def forward_flops(model, *inputs) -> int:
    def call():
        with torch.no_grad():
            model(*inputs)

    return flops(call)


def kernel_paths(model: torch.nn.Module) -> dict[str, str]:
    """``{module name: path}`` for every module that says which kernel it runs."""
    return {name: m.kernel_path for name, m in model.named_modules()
            if isinstance(getattr(m, "kernel_path", None), str)}


@dataclass
class Measurement:
    """Everything measured about one model on one input, for :func:`compare`."""

    label: str
    params: int
    bytes: int
    flops: int
    latency_ms: float
    latency_iqr_ms: float
    peak_activation_bytes: int
    quality: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)
    env: dict = field(default_factory=environment)

    def row(self) -> dict:
        return {"label": self.label, "params": self.params, "bytes": self.bytes,
                "flops": self.flops, "latency_ms": self.latency_ms,
                "latency_iqr_ms": self.latency_iqr_ms,
                "peak_activation_bytes": self.peak_activation_bytes, **self.quality}


def measure(model, *inputs, label: str = "", quality: dict | None = None,
            min_run_time: float = 0.5) -> Measurement:
    from .model import count_params

    t = latency(model, *inputs, label=label, min_run_time=min_run_time)
    return Measurement(label=label or type(model).__name__, params=count_params(model),
                       bytes=model_bytes(model)["total"], flops=forward_flops(model, *inputs),
                       latency_ms=t.median_ms, latency_iqr_ms=t.iqr_s * 1e3,
                       peak_activation_bytes=peak_activation_bytes(model, *inputs),
                       quality=dict(quality or {}), paths=kernel_paths(model))


LOWER_IS_BETTER = ("params", "bytes", "flops", "latency_ms", "peak_activation_bytes", "loss")


def compare(baseline: Measurement, *candidates: Measurement):
    """A tidy table: one row per metric, a column per model, and ``<label>/baseline`` ratios.

    For latency the ``speedup`` row is baseline / candidate (higher is better)."""
    import pandas as pd

    rows = []
    base = baseline.row()
    for metric, b in base.items():
        if metric == "label":
            continue
        row = {"metric": metric, baseline.label: b}
        for c in candidates:
            v = c.row().get(metric)
            row[c.label] = v
            row[f"{c.label}/{baseline.label}"] = (v / b) if (v is not None and b) else None
        rows.append(row)
    for c in candidates:
        rows.append({"metric": "speedup", baseline.label: 1.0, c.label: None,
                     f"{c.label}/{baseline.label}": baseline.latency_ms / c.latency_ms})
    return pd.DataFrame(rows).groupby("metric", sort=False).first().reset_index()


