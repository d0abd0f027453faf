"""labkit bench quant in quick mode: structure and sanity (never speed: machines are shared)."""
import math

from peak_fields import assert_peak_fields

from labkit.benchmarks import quant
from labkit.techniques import static_int8 as SI


def test_quick_structure_and_sanity():
    r = quant.run(quick=True)
    assert r["name"] == "quant" and r["env"]["torch"]
    assert r["env"]["timing_threads"] == 1
    for t in r["targets"]:
        assert set(t) == {"target", "measured", "required", "unit", "met", "note"}
        assert t["unit"] == "x" and math.isfinite(t["measured"]) and t["measured"] > 0
        at_most = "bytes" in t["target"]
        band = 0.05 if "batch 1" in t["target"] else 0
        assert t["met"] == (t["measured"] <= t["required"] if at_most
                            else t["measured"] >= t["required"] - band)
    sections = {row["section"] for row in r["rows"]}
    assert sections == {"linear", "batch1", "model", "static", "bytes"}
    static = [row for row in r["rows"] if row["section"] == "static"]
    assert len(static) == 1 and "quick mode" in static[0]["warnings"]  # said, not skipped
    variants = {row["variant"] for row in r["rows"] if row["section"] == "linear"}
    assert {"fp32", "fp32_onednn", "bf16", "int8_dynamic", "int8_weight_only",
            "torch_dynamic"} <= variants
    for row in r["rows"]:
        if "median_ms" in row:
            assert row["median_ms"] > 0 and row["kernel_path"]
            # every timed row against the machine's peak of its kind
            assert_peak_fields(row, with_speedup=row["variant"] != row["reference"])
    lin = {row["variant"]: row for row in r["rows"] if row["section"] == "linear"}
    d_in, d_out = 256, 1024
    assert math.isclose(lin["fp32"]["gflops"],
                        2 * 64 * d_in * d_out / (lin["fp32"]["median_ms"] * 1e-3) / 1e9)
    assert {k: lin[k]["peak_kind"] for k in ("fp32", "fp32_onednn", "bf16", "int8_dynamic",
                                             "int8_weight_only", "torch_dynamic")} == {
        "fp32": "fp32", "fp32_onednn": "fp32", "bf16": "bf16", "int8_dynamic": "int8",
        "int8_weight_only": "fp32", "torch_dynamic": "int8"}
    # the kernels a frozen graph runs, timed eagerly beside the rest, against their peaks
    assert lin["fp32_onednn_packed"]["peak_kind"] == "fp32"
    if SI.unavailable() is None:
        assert lin["static_int8"]["peak_kind"] == "int8"
    else:  # e.g. a CPU without VNNI: a row that says why, never timed
        assert lin["static_int8"]["kernel_path"] == "unavailable"
        assert "VNNI" in lin["static_int8"]["warnings"] and "median_ms" not in lin["static_int8"]
    # the INT8 speedup target is against the fastest fp32 path of the same rounds
    eager = [row for row in lin.values() if row["mode"] == "eager"]
    best = {k: max((row for row in eager if row["peak_kind"] == k and k == quant.kind_of(
        row["variant"])), key=lambda row: row["gflops"]) for k in ("int8", "fp32")}
    target = next(t for t in r["targets"] if t["target"] == (
        "INT8 linear 256->1024 at batch 64, eager: speedup vs fp32 eager"))
    assert math.isclose(target["measured"], best["int8"]["speedup_vs_fp32"]
                        / best["fp32"]["speedup_vs_fp32"])
    assert best["fp32"]["variant"] in target["note"]
    peaks = [t for t in r["targets"] if "fraction of the measured" in t["target"]]
    assert {"int8", "fp32"} == {t["target"].split(" peak")[0].split()[-1] for t in peaks}
    # sizes are counted, not timed: these hold on any machine
    byts = {t["target"]: t for t in r["targets"] if "bytes" in t["target"]}
    assert byts["INT8 weight bytes / fp32, block linears (scales + zero points counted)"]["met"]
    # INT8 + 50% structured sparsity: reported for the whole model and the block linears,
    # each named; the 0.15 bound holds for the one FFN matrix it was measured on
    ratio = {row["variant"]: row["ratio"] for row in r["rows"] if row["section"] == "bytes"}
    one = ratio["int8 + 50% rows / fp32, one FFN up matrix (counted)"]
    block = byts["INT8 + 50% structured sparsity bytes / fp32, block linears"]["measured"]
    whole = byts["INT8 + 50% structured sparsity bytes / fp32, whole model"]["measured"]
    assert one <= 0.15 < block < whole
    assert whole < ratio["int8 / fp32, whole model (counted)"]
    everything = byts["INT8 everywhere (embeddings too) + 50% structured sparsity bytes / fp32,"
                      " whole model"]["measured"]
    assert everything < 0.5 < whole  # the tiny encoder's embeddings are most of its bytes
    claim = next(row for row in r["rows"] if row["variant"].startswith("paper claim"))
    assert abs(claim["ratio"] - 0.5) < 0.02
    # the accelerated batch-1 model ran the path accelerate chose
    b1 = [row for row in r["rows"] if row["section"] == "batch1"]
    assert len({row["chosen"] for row in b1}) == 1
    # like with like: every speedup names its reference, eager vs eager here (quick)
    assert all(row["mode"] == "eager" and row["reference"] == "fp32"
               for row in r["rows"] if "speedup_vs_fp32" in row)


def test_kind_of():
    assert quant.kind_of("int8_dynamic_compiled") == "int8"
    assert quant.kind_of("static_int8_compiled") == "int8"
    assert quant.kind_of("int8_weight_only") == "fp32"  # dequantizes, fp32 GEMM
    assert quant.kind_of("bf16") == "bf16" and quant.kind_of("fp32_compiled") == "fp32"
