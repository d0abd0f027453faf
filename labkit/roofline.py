"""The machine's own limits, measured, and where a kernel stands against them (roofline).

A speedup says nothing about how good either side is: INT8 at 5x fp32 on a CPU whose VNNI
does 4x the multiply-adds of its fp32 FMAs per instruction means the fp32 reference ran
below the machine's fp32 peak, not that INT8 is fast. So labkit measures the peaks it
compares against, on the user's machine, at the timed thread count:

* compute: large square GEMMs ``(n, n) @ (n, n)`` in fp32 (``torch.mm``, i.e. the BLAS
  sgemm ``nn.Linear`` runs, and oneDNN's ``mkldnn._linear_pointwise``: MKL's sgemm can run
  far below oneDNN's on a non-Intel CPU, and then every fp32 reference does too; with its
  weight prepacked once, as Inductor's freezing does, and reordered per call), bf16
  (``torch.mm``) and int8 (``torch._int_mm`` s8s8 -> s32, the op torchao's dynamic INT8
  runs; oneDNN ``qlinear_pointwise`` u8s8, the op static PT2E INT8 lowers to; fbgemm
  ``quantized::linear_dynamic``, torch's dynamic INT8). A kind's peak is its fastest kernel.
* memory: the bandwidth of one large ``copy_`` (bytes read + written per second).

Roofline (Williams, Waterman, Patterson, *Roofline: an insightful visual performance model
for multicore architectures*): a kernel of ``F`` FLOPs moving ``Q`` bytes can reach at most
``min(P, (F / Q) B)`` FLOP/s for the peak ``P`` of its kind and bandwidth ``B``. Below that
ceiling by a wide margin it is *dispatch-bound* (per-call overhead, quantize/rescale passes);
near it, *memory-bound* where ``(F / Q) B < P``, else *compute-bound*.

A speedup of a candidate (``F_c`` FLOPs of kind ``c``) over a reference (``F_r`` FLOPs of
kind ``r``) is bounded when both run at their peaks:

    speedup <= (F_r / F_c) (P_c / P_r)

and a measured speedup above that bound means the reference ran below its peak
("reference below peak"), whatever the candidate did. Complexity: a few GEMM timings of
``2 n^3`` FLOPs each, once per process per (threads, n, min_run_time).
"""
from __future__ import annotations

import torch

from . import validate as V
from .measure import environment, num_threads, time_fn

# it uses measure's timer and thread pinning; measure does not import it (no circle)

KINDS = ("fp32", "bf16", "int8")
_CACHE: dict = {}


def _gemm_kernels(n: int) -> dict:
    """``{name: (kind, make)}``: ``make()`` returns the callable timed (inputs built once)."""
    g = torch.Generator().manual_seed(0)

    def fp32():
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        return lambda: torch.mm(a, b)

    def fp32_onednn():  # what Inductor's freezing picks with a symbolic batch
        a, w = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        return lambda: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")

    def fp32_onednn_packed():  # the same, its weight packed once as freezing packs it
        a, w = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, n)
        return lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")

    def bf16():
        a, b = (torch.randn(n, n, generator=g).bfloat16() for _ in "ab")
        return lambda: torch.mm(a, b)

    def int_mm():
        a, b = (torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=g) for _ in "ab")
        return lambda: torch._int_mm(a, b)

    def qlinear():  # activations arrive as uint8 from the previous op's fused quantize
        w = torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=g)
        x = torch.randint(0, 256, (n, n), dtype=torch.uint8, generator=g)
        packed = torch.ops.onednn.qlinear_prepack(w, [n, n])
        ws, wz = torch.full((n,), 1e-2), torch.zeros(n, dtype=torch.long)
        return lambda: torch.ops.onednn.qlinear_pointwise(
            x, 0.1, 128, packed, ws, wz, None, 1.0, 0, torch.float32, "none", [], "")

    def fbgemm_dynamic():
        import warnings

        from torch import nn

        with warnings.catch_warnings():  # quantize_dynamic's deprecation: noted in int8.py
            warnings.simplefilter("ignore")
            lin = torch.ao.quantization.quantize_dynamic(
                nn.Sequential(nn.Linear(n, n, bias=False)), {nn.Linear}, dtype=torch.qint8)[0]
        x = torch.randn(n, n, generator=g)
        return lambda: lin(x)

    return {"fp32 torch.mm (BLAS sgemm)": ("fp32", fp32),
            "fp32 mkldnn._linear_pointwise (oneDNN)": ("fp32", fp32_onednn),
            "fp32 mkldnn._linear_pointwise (oneDNN, weight prepacked)":
                ("fp32", fp32_onednn_packed),
            "bf16 torch.mm": ("bf16", bf16),
            "int8 torch._int_mm (s8s8->s32)": ("int8", int_mm),
            "int8 onednn.qlinear_pointwise (u8s8, static)": ("int8", qlinear),
            "int8 quantized::linear_dynamic (fbgemm, act. quantized per call)":
                ("int8", fbgemm_dynamic)}


def _copy_kernel(mbytes: int):
    src = torch.randn(mbytes * 2**20 // 4)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src), 2 * src.numel() * 4


def _timed(timer, name, fn, mrt) -> float:
    if timer is not None:
        return float(timer(name, fn, mrt))
    return time_fn(fn, name, mrt).median_s


def peaks(threads: int | None = None, n: int = 1024, min_run_time: float = 0.2,
          copy_mbytes: int = 64, timer=None) -> dict:
    """The machine's measured peaks at ``threads`` intra-op threads (default: the current
    count): ``{"gflops": {kind: GFLOP/s (GOP/s for int8)}, "bandwidth_gbs", "ratio":
    {"int8/fp32", "bf16/fp32", "int8/bf16"}, "rows": [one per kernel], "n", "threads",
    "env"}``. A kernel this CPU or build cannot run is a row with its ``error`` and no
    number (its kind has no peak when none of its kernels ran), never a guess.

    Cached for the process per ``(threads, n, min_run_time, copy_mbytes)``; ``timer(name,
    fn, min_run_time) -> seconds`` (tests) bypasses the cache."""
    V.integer("n", n, 16, 16384)
    V.number("min_run_time", min_run_time, 0.0, lo_open=True)
    V.integer("copy_mbytes", copy_mbytes, 1, 4096)
    threads = V.integer("threads", threads, 1) if threads is not None \
        else torch.get_num_threads()
    key = (threads, n, min_run_time, copy_mbytes)
    if timer is None and key in _CACHE:
        return _CACHE[key]
    with num_threads(threads):
        rows = []
        for name, (kind, make) in _gemm_kernels(n).items():
            row = {"kernel": name, "kind": kind, "n": n, "threads": threads,
                   "flops": 2 * n ** 3}
            try:
                fn = make()
                fn()  # a kernel the CPU lacks fails here, not in the timer
                row["seconds"] = _timed(timer, name, fn, min_run_time)
                row["gflops"] = row["flops"] / row["seconds"] / 1e9
            except (RuntimeError, NotImplementedError, AttributeError) as e:
                row.update(seconds=None, gflops=None,
                           error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            rows.append(row)
        fn, nbytes = _copy_kernel(copy_mbytes)
        sec = _timed(timer, "memory copy_", fn, min_run_time)
        rows.append({"kernel": f"memory copy_ ({copy_mbytes} MiB)", "kind": "memory",
                     "threads": threads, "bytes": nbytes, "seconds": sec,
                     "bandwidth_gbs": nbytes / sec / 1e9})
    best = {k: max((r["gflops"] for r in rows if r["kind"] == k and r.get("gflops")),
                   default=None) for k in KINDS}
    for r in rows:
        if r.get("gflops") and best.get(r["kind"]):
            r["fraction_of_kind_peak"] = r["gflops"] / best[r["kind"]]

    def ratio(a, b):
        return best[a] / best[b] if best[a] and best[b] else None

    out = {"gflops": best, "bandwidth_gbs": rows[-1]["bandwidth_gbs"],
           "ratio": {"int8/fp32": ratio("int8", "fp32"), "bf16/fp32": ratio("bf16", "fp32"),
                     "int8/bf16": ratio("int8", "bf16")},
           "rows": rows, "n": n, "threads": threads, "env": environment()}
    if timer is None:
        _CACHE[key] = out
    return out


def roofline(flops: float, seconds: float, kind: str, peak: dict, speedup: float | None = None,
             reference_flops: float | None = None, reference_kind: str = "fp32",
             slack: float = 1.1) -> dict:
    """The fields every benchmark kernel row carries (one schema): ``gflops`` achieved,
    ``peak_kind``, ``peak_gflops`` and ``fraction_of_peak`` against ``peak`` (from
    :func:`peaks`), and with a ``speedup`` over a reference of ``reference_flops`` FLOPs
    (default: the same) of ``reference_kind``: ``speedup_bound`` = (F_r / F) (P_kind / P_ref)
    and ``peak_verdict``: ``"reference below peak"`` when the speedup exceeds the bound by
    more than ``slack`` (then the ratio says the reference is slow, not that this is fast),
    else ``"within peak ratio"``; ``"no peak"`` when a peak is missing or no FLOPs were
    counted (nothing to bound)."""
    V.choice("kind", kind, KINDS)
    V.choice("reference_kind", reference_kind, KINDS)
    V.number("seconds", seconds, 0.0, lo_open=True)
    g = flops / seconds / 1e9
    p = peak["gflops"].get(kind)
    out = {"gflops": g, "peak_kind": kind, "peak_gflops": p,
           "fraction_of_peak": g / p if p else None}
    if speedup is None:
        return out
    pr = peak["gflops"].get(reference_kind)
    if not (p and pr and flops):
        return {**out, "speedup_bound": None, "peak_verdict": "no peak"}
    bound = (reference_flops if reference_flops is not None else flops) / flops * p / pr
    out["speedup_bound"] = bound
    out["peak_verdict"] = (f"reference below peak: {speedup:.2f}x > the {kind}/"
                           f"{reference_kind} peak bound {bound:.2f}x"
                           if speedup > bound * slack else "within peak ratio")
    return out


def regime(flops: float, bytes_moved: float, seconds: float, kind: str, peak: dict,
           dispatch_below: float = 0.3) -> dict:
    """Where a kernel stands on the roofline: ``intensity`` (FLOP/byte), ``attainable``
    GFLOP/s = min(peak, intensity x bandwidth), ``fraction_of_attainable``, and ``regime``:
    ``dispatch-bound`` below ``dispatch_below`` of the attainable (overhead, not the
    hardware, decides), else ``memory-bound`` where the bandwidth roof is the lower one,
    else ``compute-bound``."""
    V.choice("kind", kind, KINDS)
    V.number("bytes_moved", bytes_moved, 0.0, lo_open=True)
    V.number("dispatch_below", dispatch_below, 0.0, 1.0)
    p, bw = peak["gflops"].get(kind), peak["bandwidth_gbs"]
    ai = flops / bytes_moved
    g = flops / seconds / 1e9
    if not p:
        return {"intensity": ai, "attainable_gflops": None, "fraction_of_attainable": None,
                "regime": f"no {kind} peak measured"}
    mem_roof = ai * bw
    attainable = min(p, mem_roof)
    frac = g / attainable
    if frac < dispatch_below:
        name = "dispatch-bound"
    elif mem_roof < p:
        name = "memory-bound"
    else:
        name = "compute-bound"
    return {"intensity": ai, "attainable_gflops": attainable, "fraction_of_attainable": frac,
            "regime": name}


__all__ = ["KINDS", "peaks", "regime", "roofline"]
