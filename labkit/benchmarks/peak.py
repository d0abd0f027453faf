"""The machine's own limits: large square GEMMs in fp32, bf16 and int8 and one memory copy,
at the timed thread count (:func:`labkit.roofline.peaks`).

Every kernel row of ``bench quant``, ``sparsity``, ``ffn`` and ``attention`` is put against
these peaks (:func:`labkit.roofline.roofline`): its achieved GFLOP/s, its fraction of the
peak of its kind, and a speedup above the measured peak ratio flagged "reference below
peak". This benchmark shows the peaks themselves: each kernel at several sizes (a GEMM too
small to reach the peak shows where it saturates), each kind's best, the attainable ratios
int8/fp32, bf16/fp32, int8/bf16, and the copy bandwidth the roofline's memory roof uses.

For reference, per instruction: AVX-512 VNNI's ``vpdpbusd`` does 64 int8 multiply-adds
against 16 fp32 FMAs (int8 at most ~4x fp32 per core), AVX512-BF16 ``vdpbf16ps`` 32 bf16
(~2x); AMX tiles do far more. What a core sustains is what this measures.

Threads: 1 by default (``LABKIT_PEAK_BENCH_THREADS`` to change), the count the quantization
benchmark times at. The sizes a bench compares against are ``REFERENCE_N`` (full) and
``QUICK_N`` (quick).
"""
from __future__ import annotations

import os

from .. import measure, roofline

NAME = "peak"
REFERENCE_N = 1024  # the GEMM size other benchmarks' peaks use (full runs)
QUICK_N = 256
SIZES = (512, 1024, 2048)
MIN_RUN_TIME = 0.3
QUICK_MIN_RUN_TIME = 0.01


def bench_peaks(quick: bool) -> dict:
    """The peaks every benchmark compares its rows with, at the current thread count."""
    return roofline.peaks(n=QUICK_N if quick else REFERENCE_N,
                         min_run_time=QUICK_MIN_RUN_TIME if quick else MIN_RUN_TIME,
                         copy_mbytes=8 if quick else 64)


def with_peak(row: dict, flops: float, kind: str, peak: dict | None, speedup=None,
              reference_flops: float | None = None, reference_kind: str = "fp32") -> dict:
    """The one helper every benchmark's kernel rows go through: ``row`` plus
    :func:`labkit.roofline.roofline`'s fields (achieved ``gflops``, ``peak_kind``,
    ``peak_gflops``, ``fraction_of_peak``, and with a ``speedup`` its ``speedup_bound``
    and ``peak_verdict``), from the row's ``median_ms``. ``peak=None``: this machine's
    :func:`bench_peaks` at the current thread count (full size)."""
    peak = bench_peaks(False) if peak is None else peak
    row.update(roofline.roofline(flops, row["median_ms"] * 1e-3, kind, peak, speedup=speedup,
                                reference_flops=reference_flops,
                                reference_kind=reference_kind))
    return row


def run(quick: bool = False) -> dict:
    threads = int(os.environ.get("LABKIT_PEAK_BENCH_THREADS", "1"))
    sizes = (128, QUICK_N) if quick else SIZES
    rows, by_n = [], {}
    with measure.num_threads(threads):
        for n in sizes:
            p = (bench_peaks(quick) if n == (QUICK_N if quick else REFERENCE_N) else
                 roofline.peaks(n=n, min_run_time=QUICK_MIN_RUN_TIME if quick else MIN_RUN_TIME,
                               copy_mbytes=8 if quick else 64))
            by_n[n] = p
            rows += [{"table": "kernel", **{k: v for k, v in r.items() if k != "flops"}}
                     for r in p["rows"] if r["kind"] != "memory"]
        ref = by_n[QUICK_N if quick else REFERENCE_N]
        for n, p in by_n.items():
            rows.append({"table": "peak", "n": n, "threads": threads,
                         **{f"{k}_gflops": v for k, v in p["gflops"].items()},
                         **{f"ratio_{k.replace('/', '_over_')}": v
                            for k, v in p["ratio"].items()},
                         "bandwidth_gbs": p["bandwidth_gbs"],
                         "reference": n == ref["n"]})
    env = measure.environment()
    from ..techniques.int8 import cpu_int8_isa

    env.update({"timing_threads": threads, "int8_isa": cpu_int8_isa(),
                "loadavg_1m": os.getloadavg()[0], "reference_n": ref["n"]})
    note = ("quick mode: small GEMMs, below the peak; " if quick else "") + \
        "diagnostics, not targets: the machine's limits that other rows are measured against"
    return {"name": NAME, "rows": rows, "targets": [], "env": env, "note": note}


__all__ = ["NAME", "QUICK_N", "REFERENCE_N", "bench_peaks", "run", "with_peak"]
