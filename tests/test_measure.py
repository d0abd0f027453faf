import pytest
import torch

from labkit import measure as Me
from labkit import model as M
from labkit import roofline as RF
from labkit.validate import LabkitConfigError


def test_flops_of_a_linear_match_2mnk():
    lin = torch.nn.Linear(32, 64, bias=False)
    x = torch.randn(8, 32)
    assert Me.flops(lambda: lin(x)) == 2 * 8 * 32 * 64


def test_model_bytes_by_dtype_and_shared_once():
    m = M.build("tiny", kind="decoder")
    n = M.count_params(m) + sum(b.numel() for b in m.buffers())  # rotary tables are buffers
    b = Me.model_bytes(m)
    assert b["total"] == b["float32"] == 4 * n
    m.half()
    assert Me.model_bytes(m)["float16"] == 2 * n


def test_peak_memory_sees_a_large_temporary():
    x = torch.randn(256, 256)

    def f():
        big = x.repeat(8, 1)  # 8 x 256 KiB, freed before return
        return big.sum()

    peak = Me.peak_memory(f)
    assert 2 * 2**20 <= peak < 4 * 2**20


def test_measure_and_compare_table():
    a, b = M.build("tiny", num_labels=2), M.build("tiny", num_labels=2, n_layers=1)
    x = torch.randint(0, 100, (2, 16))
    ma = Me.measure(a, x, label="dense", min_run_time=0.05)
    mb = Me.measure(b, x, label="half", min_run_time=0.05)
    t = Me.compare(ma, mb).set_index("metric")
    assert t.loc["params", "half/dense"] == pytest.approx(mb.params / ma.params)
    assert t.loc["flops", "half/dense"] < 0.7
    assert t.loc["speedup", "half/dense"] > 0
    assert ma.env["threads"] == torch.get_num_threads() and ma.paths == {}


def test_timing_rejects_bad_min_run_time():
    with pytest.raises(LabkitConfigError, match="min_run_time"):
        Me.time_fn(lambda: None, min_run_time=0)


# --------------------------------------------------------------------------- packed bytes

def test_model_bytes_counts_torch_dynamic_packed_weights():
    """A torch.ao dynamic INT8 linear keeps its weight packed, neither parameter nor buffer:
    the old count (parameters + buffers) gave 0 bytes for it."""
    import warnings

    from torch import nn

    from labkit.techniques.int8 import AcceleratedLinear

    lin = nn.Linear(256, 1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        td = AcceleratedLinear(lin, "torch_dynamic")
    b = Me.model_bytes(td)
    # int8 codes, a float64 scale and int64 zero point (per tensor), the fp32 bias
    assert b["qint8"] == 256 * 1024
    assert b["float32"] == 4 * 1024
    assert b["total"] == 256 * 1024 + 8 + 8 + 4 * 1024
    assert Me.model_bytes(AcceleratedLinear(lin, "fp32"))["total"] == 4 * (256 * 1024 + 1024)


def test_stored_tensors_method_replaces_a_subtree():
    """A module that declares what it stores (a compiled graph holding constants) is counted
    by its declaration, not by its leftover parameters; other modules as before, once."""
    from torch import nn

    class Declares(nn.Module):
        def __init__(self):
            super().__init__()
            self.dead = nn.Linear(8, 8)  # still registered, not used: not counted
            self.keep = torch.zeros(10, dtype=torch.int8)

        def stored_tensors(self):
            return [self.keep]

    holder = nn.Module()
    holder.a = Declares()
    holder.b = nn.Linear(4, 4)
    holder.c = holder.b  # shared: once
    assert Me.model_bytes(holder)["total"] == 10 + 4 * (16 + 4)
    assert Me.model_bytes(holder.a)["total"] == 10


# --------------------------------------------------------------------------- roofline

def _peak(fp32=100.0, bf16=200.0, int8=400.0, bw=10.0):
    return {"gflops": {"fp32": fp32, "bf16": bf16, "int8": int8}, "bandwidth_gbs": bw}


def test_peaks_with_a_fake_timer_reports_rates_and_ratios():
    n = 64

    def timer(name, fn, mrt):  # fp32 kernels 2 GFLOP/s..., int8 8x the best fp32
        rate = {"fp32 torch": 1.0, "fp32 mkldnn": 2.0, "bf16": 4.0, "int8 torch._int_mm": 16.0,
                "int8 onednn": 12.0, "int8 quantized": 8.0}
        if name.startswith("memory"):
            return 2 * (1 * 2**20) / 5e9  # 1 MiB copied: 5 GB/s
        r = next(v for k, v in rate.items() if name.startswith(k))
        return 2 * n ** 3 / (r * 1e9)

    p = RF.peaks(1, n=n, min_run_time=0.01, copy_mbytes=1, timer=timer)
    assert p["gflops"]["fp32"] == pytest.approx(2.0)  # the faster fp32 kernel is the peak
    assert p["gflops"]["int8"] == pytest.approx(16.0)
    assert p["ratio"]["int8/fp32"] == pytest.approx(8.0)
    assert p["ratio"]["bf16/fp32"] == pytest.approx(2.0)
    assert p["bandwidth_gbs"] == pytest.approx(5.0)
    slow = next(r for r in p["rows"] if r["kernel"].startswith("fp32 torch"))
    assert slow["fraction_of_kind_peak"] == pytest.approx(0.5)


def test_peaks_cached_per_thread_count_and_real_kernels_run():
    a = RF.peaks(1, n=64, min_run_time=0.001, copy_mbytes=1)
    assert RF.peaks(1, n=64, min_run_time=0.001, copy_mbytes=1) is a  # cached
    assert a["threads"] == 1 and a["gflops"]["fp32"] > 0
    for r in a["rows"]:
        assert r.get("gflops") or r.get("bandwidth_gbs") or r["error"]


def test_roofline_flags_a_speedup_above_the_peak_ratio():
    p = _peak()
    # int8 at 5x fp32 on a machine whose int8 peak is 4x: the fp32 reference was slow
    r = RF.roofline(2e9, 0.01, "int8", p, speedup=5.0)
    assert r["gflops"] == pytest.approx(200.0) and r["fraction_of_peak"] == pytest.approx(0.5)
    assert r["speedup_bound"] == pytest.approx(4.0)
    assert r["peak_verdict"].startswith("reference below peak")
    assert RF.roofline(2e9, 0.01, "int8", p, speedup=3.9)["peak_verdict"] == "within peak ratio"
    # fewer FLOPs (sparsity, same kind): the bound is the FLOP ratio
    r = RF.roofline(1e9, 0.01, "fp32", p, speedup=2.5, reference_flops=2e9)
    assert r["speedup_bound"] == pytest.approx(2.0)
    assert r["peak_verdict"].startswith("reference below peak")
    assert RF.roofline(1e9, 0.01, "fp32", {"gflops": {"fp32": None}},
                       speedup=1.0)["peak_verdict"] == "no peak"
    with pytest.raises(LabkitConfigError, match="kind"):
        RF.roofline(1e9, 0.01, "int4", p)


@pytest.mark.parametrize("flops,nbytes,seconds,want", [
    (2e6, 1e6, 2e6 / 15e9, "memory-bound"),     # 2 FLOP/B x 10 GB/s = 20 < 100: near it
    (2e6, 1e6, 2e6 / 1e9, "dispatch-bound"),    # 1 GFLOP/s of an attainable 20
    (2e9, 1e6, 2e9 / 90e9, "compute-bound"),    # 2000 FLOP/B: the compute roof, 90 of 100
])
def test_regime_each_verdict(flops, nbytes, seconds, want):
    r = RF.regime(flops, nbytes, seconds, "fp32", _peak())
    assert r["regime"] == want
    assert r["attainable_gflops"] == pytest.approx(min(100.0, flops / nbytes * 10.0))


def test_flops_count_torchs_dynamic_int8_linear():
    """INT8 changes how a linear computes, not how much: torch's dynamic INT8 linear
    counts the 2 t in out of the fp32 one (else an INT8 model reads as work removed)."""
    import warnings

    from torch import nn

    lin = nn.Sequential(nn.Linear(64, 32)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(lin, {nn.Linear}, dtype=torch.qint8)
    x = torch.randn(4, 10, 64)
    with torch.inference_mode():
        assert Me.flops(lambda: q(x)) == Me.flops(lambda: lin(x)) == 2 * 40 * 64 * 32
