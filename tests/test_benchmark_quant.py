"""labkit bench quant in quick mode: structure and sanity (never speed: machines are shared)."""
import math

from labkit.benchmarks import quant


def test_quick_structure_and_sanity():
    r = quant.run(quick=True)
    assert r["name"] == "quant" and r["env"]["torch"]
    assert r["env"]["timing_threads"] == 1
    for t in r["targets"]:
        assert set(t) == {"target", "measured", "required", "unit", "met", "note"}
        assert t["unit"] == "x" and math.isfinite(t["measured"]) and t["measured"] > 0
        assert t["met"] == (t["measured"] >= t["required"] - (0.05 if "batch 1" in t["target"]
                                                              else 0)
                            if "bytes" not in t["target"] else t["measured"] <= t["required"])
    sections = {row["section"] for row in r["rows"]}
    assert sections == {"linear", "batch1", "model", "bytes"}
    variants = {row["variant"] for row in r["rows"] if row["section"] == "linear"}
    assert {"fp32", "bf16", "int8_dynamic", "int8_weight_only", "torch_dynamic"} <= variants
    for row in r["rows"]:
        if "median_ms" in row:
            assert row["median_ms"] > 0 and row["kernel_path"]
    # sizes are counted, not timed: these hold on any machine
    byts = {t["target"]: t for t in r["targets"] if "bytes" in t["target"]}
    assert all(t["met"] for t in byts.values())
    claim = next(row for row in r["rows"] if row["variant"].startswith("paper claim"))
    assert abs(claim["ratio"] - 0.5) < 0.02
    # the accelerated batch-1 model ran the path accelerate chose
    b1 = [row for row in r["rows"] if row["section"] == "batch1"]
    assert len({row["chosen"] for row in b1}) == 1
