import pytest
import torch

from labkit import measure as Me
from labkit import model as M
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
