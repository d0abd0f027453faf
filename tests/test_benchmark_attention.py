from peak_fields import assert_peak_fields

from labkit.benchmarks import attention as A


def test_quick_run_has_the_contract_structure():
    out = A.run(quick=True)
    assert out["name"] == "attention" and "torch" in out["env"]
    timed = [r for r in out["rows"] if r.get("kind") != "crossover"]
    methods = {(r["scope"], r["method"]) for r in timed}
    assert {("op", "sdpa"), ("op", "kernel-elu"), ("op", "linformer"), ("op", "linformer-core"),
            ("module", "sdpa"), ("module", "kernel-elu"), ("module", "linformer")} <= methods
    for r in timed:
        assert r["median_ms"] > 0 and r["speedup"] > 0 and r["n"] in (128, 256)
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["includes"]
        assert r["heads"] == 8 and r["head_dim"] == 64 and r["dtype"] == "float32"
        if r["method"] == "sdpa":
            assert r["speedup"] == 1.0
        assert r["flops"] > 0  # counted, so each row stands against the fp32 peak
        assert_peak_fields(r, r["flops"], with_speedup=r["method"] != "sdpa")
    assert {r["method"] for r in out["rows"] if r.get("kind") == "crossover"} == \
        {"kernel-elu", "linformer"}
    assert len(out["targets"]) == 3
    for t in out["targets"]:
        assert set(t) >= {"target", "measured", "required", "unit", "met", "note"}
        assert t["unit"] == "x" and isinstance(t["met"], bool) and t["measured"] > 0
        assert t["met"] == (t["measured"] >= t["required"])


def test_crossover_logic():
    rows = [{"scope": "op", "method": "x", "n": n, "speedup": s}
            for n, s in [(128, 0.5), (256, 1.2), (512, 0.9), (1024, 2.0), (2048, 5.0)]]
    c = A.crossover(rows, "x")
    assert c["crossover_n"] == 1024 and not c["below_range"]
    rows = [{"scope": "op", "method": "x", "n": n, "speedup": 2.0} for n in (128, 256)]
    assert A.crossover(rows, "x")["below_range"]
    rows = [{"scope": "op", "method": "x", "n": n, "speedup": 0.5} for n in (128, 256)]
    assert A.crossover(rows, "x")["crossover_n"] is None


def test_sweep_memory_is_linear_for_kernel_and_quadratic_scores_are_avoided():
    rows = A.sweep((128, 512), scopes=("op",), min_run_time=0.01, rounds=1, k=64)
    peak = {(r["method"], r["n"]): r["peak_bytes"] for r in rows}
    # kernel attention's extra memory grows ~linearly with n (4x n -> about 4x bytes)
    assert peak["kernel-elu", 512] < 6 * peak["kernel-elu", 128]
    assert peak["linformer", 512] < 6 * peak["linformer", 128]
