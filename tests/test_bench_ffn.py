import math

from peak_fields import assert_peak_fields

from labkit.benchmarks import ffn


def test_quick_run_structure_and_sanity():
    out = ffn.run(quick=True)
    assert out["name"] == "ffn" and set(out) == {"name", "rows", "targets", "env"}
    assert out["env"]["torch"] and out["env"]["threads"] >= 1
    rows = out["rows"]
    assert {r["scope"] for r in rows} == {"ffn", "matmul"}
    for r in rows:
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert math.isfinite(r["speedup"]) and r["speedup"] > 0
        assert r["efficiency"] == r["speedup"] / r["flop_ratio"]
        assert_peak_fields(r, r["flops"], with_speedup=r["method"] != "dense")
        if r["method"] == "dense":
            assert r["rank"] is None and r["flop_ratio"] == 1.0
        else:
            d, f, k = r["d_model"], r["d_ff"], r["rank"]
            # counted FLOPs: 2 d f per matrix dense vs 2 r (d + f) factorized
            assert r["flop_ratio"] == (d * f) / (k * (d + f))
            assert r["kernel_path"].startswith("low-rank")
    ffn_rows = [r for r in rows if r["scope"] == "ffn"]
    dense = next(r for r in ffn_rows if r["rank"] is None)
    low = next(r for r in ffn_rows if r["rank"] is not None)
    assert low["params"] < dense["params"] and low["flops"] < dense["flops"]
    assert dense["flops"] == 2 * 2 * dense["tokens"] * dense["d_model"] * dense["d_ff"]
    (t,) = out["targets"]
    assert set(t) == {"target", "measured", "required", "unit", "met", "note"}
    assert t["unit"] == "x" and t["met"] == (t["measured"] >= t["required"])
    assert t["required"] == 0.8 * low["flop_ratio"] and t["measured"] == low["speedup"]


def test_make_pair_full_rank_is_the_dense_mlp():
    import torch

    dense, low = ffn.make_pair(16, 48, rank=16, gated=True)
    x = torch.randn(5, 16)
    torch.testing.assert_close(low(x), dense(x), atol=1e-5, rtol=1e-4)
