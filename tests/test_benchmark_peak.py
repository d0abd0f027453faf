"""labkit bench peak in quick mode: structure (never speed: the machine is shared)."""
import json

from labkit.benchmarks import peak
from labkit.cli import main


def test_quick_rows_and_ratios():
    r = peak.run(quick=True)
    assert r["name"] == "peak" and r["targets"] == [] and r["env"]["timing_threads"] == 1
    kernels = [x for x in r["rows"] if x["table"] == "kernel"]
    assert {x["kind"] for x in kernels} == {"fp32", "bf16", "int8"}
    for x in kernels:
        assert x.get("gflops") or x["error"]  # a kernel that cannot run says why
    peaks = [x for x in r["rows"] if x["table"] == "peak"]
    assert [x["reference"] for x in peaks].count(True) == 1
    for p in peaks:
        best = max(x["gflops"] for x in kernels if x["kind"] == "int8" and x["n"] == p["n"]
                   and x.get("gflops"))
        assert p["int8_gflops"] == best
        assert p["ratio_int8_over_fp32"] == p["int8_gflops"] / p["fp32_gflops"]
        assert p["bandwidth_gbs"] > 0


def test_cli_json(capsys):
    assert main(["bench", "peak", "--quick", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["name"] == "peak" and out["rows"]
