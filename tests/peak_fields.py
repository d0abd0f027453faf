"""The roofline fields every benchmark kernel row carries (labkit.benchmarks.peak.with_peak),
checked the same way for every benchmark."""
import math

FIELDS = ("gflops", "peak_kind", "peak_gflops", "fraction_of_peak")


def assert_peak_fields(row: dict, flops: float | None = None, with_speedup: bool = False):
    for k in FIELDS:
        assert k in row, f"{k} missing from {sorted(row)}"
    assert row["peak_kind"] in ("fp32", "bf16", "int8")
    if flops is not None:  # achieved rate = counted FLOPs / median time
        assert math.isclose(row["gflops"], flops / (row["median_ms"] * 1e-3) / 1e9,
                            rel_tol=1e-9)
    if row["peak_gflops"]:
        assert math.isclose(row["fraction_of_peak"], row["gflops"] / row["peak_gflops"])
    if with_speedup:
        assert "speedup_bound" in row and "peak_verdict" in row
        if row["speedup_bound"] is not None:
            sp = row["speedup"] if "speedup" in row else row["speedup_vs_fp32"]
            above = sp > 1.1 * row["speedup_bound"]
            assert row["peak_verdict"].startswith("reference below peak") == above
