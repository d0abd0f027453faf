"""The model-level INT8 autotuner with an injected timer: given these whole-model timings,
this candidate is chosen; inside the margin fp32 stays; an unavailable path is a row and a
warning, never a silent fallback. Cheap builders stand in for the compiles except in the
last test, which builds every real candidate once."""
import warnings

import pytest
import torch
from torch import nn

from labkit import model as M
from labkit.techniques import int8_model as IM
from labkit.techniques import static_int8 as SI
from labkit.validate import LabkitConfigError


class Tagged(nn.Module):
    """The model under another name (what a builder returns), logits shifted by ``err``."""

    def __init__(self, model, name, err=0.0):
        super().__init__()
        self.m, self.kernel_path, self.err = model, f"fake {name}", err

    def forward(self, *a):
        return self.m(*a) + self.err


def fakes(**err):
    return {n: (lambda m, a, c, n=n: Tagged(m, n, err.get(n, 0.0)))
            for n in IM.MODEL_CANDIDATES if n != "fp32"}


def timer_of(seconds: dict):
    calls = []

    def timer(name, fn, mrt):
        calls.append(name)
        return seconds.get(name.split("/")[-1], 1.0)  # per-site names: all alike
    timer.calls = calls
    return timer


REAL_UNAVAILABLE = SI.unavailable


@pytest.fixture(autouse=True)
def static_available(monkeypatch):
    """The fake builders stand in for the compiles, so these tests do not depend on this
    CPU having VNNI; the test of an unavailable path injects its own reason."""
    monkeypatch.setattr(SI, "unavailable", lambda backend="x86_inductor": None)


@pytest.fixture(scope="module")
def setup():
    m = M.build("tiny").eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, m.cfg.vocab_size, (4, 16), generator=g)
    mask = torch.zeros(4, 16, dtype=torch.bool)
    cal = [{"input_ids": torch.randint(6, m.cfg.vocab_size, (8, 16), generator=g),
            "padding_mask": torch.zeros(8, 16, dtype=torch.bool), "labels": None}]
    return m, (ids, mask), cal


def run(setup, seconds, **kw):
    m, inputs, cal = setup
    kw.setdefault("builders", fakes())
    return IM.accelerate_model(m, inputs, cal, rounds=3, timer=timer_of(seconds), **kw)


def test_picks_the_fastest_candidate(setup):
    t = {"fp32": 1.0, "fp32_compiled": 0.6, "int8_per_site": 0.7, "static_int8": 0.3}
    ch = run(setup, t)
    assert ch.chosen == "static_int8" and ch.model.kernel_path == "fake static_int8"
    assert ch.speedup == pytest.approx(1 / 0.3)
    rows = {r["candidate"]: r for r in ch.rows}
    assert rows["choice"]["chosen"] == "static_int8"
    assert [r["candidate"] for r in ch.rows if r.get("chosen") is True] == ["static_int8"]
    # like with like: static INT8 against the fp32 graph compiled the same way
    assert rows["static_int8"]["speedup_vs_fp32_compiled"] == pytest.approx(0.6 / 0.3)
    assert rows["fp32_compiled"]["speedup"] == pytest.approx(1 / 0.6)


@pytest.mark.parametrize("winner", ["fp32_compiled", "int8_per_site"])
def test_other_winners(setup, winner):
    t = {"fp32": 1.0, "fp32_compiled": 0.8, "int8_per_site": 0.8, "static_int8": 0.9}
    t[winner] = 0.5
    assert run(setup, t).chosen == winner


def test_inside_the_margin_fp32_stays(setup):
    t = {"fp32": 1.0, "fp32_compiled": 0.97, "int8_per_site": 0.99, "static_int8": 0.96}
    ch = run(setup, t, margin=0.05)
    assert ch.chosen == "fp32" and ch.model is setup[0]
    assert "inside the 5% margin" in ch.rows[-1]["warnings"]


def test_rows_carry_logit_difference_and_calibration(setup):
    ch = run(setup, {"fp32": 1.0, "fp32_compiled": 1.0, "int8_per_site": 1.0,
                     "static_int8": 1.0}, builders=fakes(static_int8=0.25))
    rows = {r["candidate"]: r for r in ch.rows}
    assert rows["static_int8"]["max_abs_logit_diff"] == pytest.approx(0.25)
    assert rows["fp32"]["max_abs_logit_diff"] == 0.0


def test_unavailable_static_is_a_row_and_a_warning(setup, monkeypatch):
    monkeypatch.setattr(SI, "unavailable", REAL_UNAVAILABLE)  # the real check, on this CPU:
    monkeypatch.setattr(SI, "cpu_int8_isa", lambda: "no VNNI/AMX")
    t = {"fp32": 1.0, "fp32_compiled": 0.6, "int8_per_site": 0.7, "static_int8": 0.1}
    with pytest.warns(UserWarning, match="static_int8 unavailable.*VNNI"):
        ch = run(setup, t)
    rows = {r["candidate"]: r for r in ch.rows}
    assert rows["static_int8"]["available"] is False and "VNNI" in rows["static_int8"]["warnings"]
    assert "median_ms" not in rows["static_int8"]  # never timed
    assert ch.chosen == "fp32_compiled"


def test_a_failing_build_is_a_row_not_a_crash(setup):
    def broken(m, a, c):
        raise RuntimeError("Inductor failed to compile")
    b = {**fakes(), "fp32_compiled": broken}
    with pytest.warns(UserWarning, match="fp32_compiled unavailable"):
        ch = run(setup, {"fp32": 1.0, "int8_per_site": 0.7, "static_int8": 0.8}, builders=b)
    assert ch.chosen == "int8_per_site"
    assert "speedup_vs_fp32_compiled" not in {k for r in ch.rows for k in r}


def test_bad_input(setup):
    m, inputs, cal = setup
    with pytest.raises(LabkitConfigError, match="calibration"):
        IM.accelerate_model(m, inputs, None)
    with pytest.raises(LabkitConfigError, match="candidates"):
        IM.accelerate_model(m, inputs, cal, candidates=("fp32", "int4"))
    with pytest.raises(LabkitConfigError, match=r"calibration\[0\] ids"):
        IM.accelerate_model(m, inputs, [torch.full((2, 16), m.cfg.vocab_size)])
    with pytest.raises(LabkitConfigError, match="backend"):
        IM.accelerate_model(m, inputs, cal, backend="cuda")
    # without static INT8 no calibration is needed
    ch = IM.accelerate_model(m, inputs, None, candidates=("fp32", "fp32_compiled"),
                             builders=fakes(), timer=timer_of({"fp32": 1.0,
                                                                "fp32_compiled": 0.5}))
    assert ch.chosen == "fp32_compiled"


@pytest.mark.skipif(SI.unavailable() is not None, reason="static INT8 unavailable here")
def test_real_candidates_with_a_fake_timer(setup):
    """Every default builder really builds (export, calibration, two compiles, per-site
    accelerate); the fake timer decides, the chosen module runs with the model's signature."""
    m, inputs, cal = setup
    t = {"fp32": 1.0, "fp32_compiled": 0.8, "int8_per_site": 0.9, "static_int8": 0.4,
         "current": 1.0, "accelerated": 0.9}  # the last two: per-site accelerate's own check
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ch = IM.accelerate_model(m, inputs, cal, timer=timer_of(t), rounds=2)
    assert ch.chosen == "static_int8" and isinstance(ch.model, SI.CompiledModel)
    rows = {r["candidate"]: r for r in ch.rows}
    assert rows["static_int8"]["calibration_rows"] == 8
    assert "qlinear_pointwise" in rows["static_int8"]["kernel_path"]
    assert rows["int8_per_site"]["kernel_path"].startswith("per site")
    with torch.no_grad():
        ref = m(*inputs)
        assert float((ch.model(*inputs) - ref).abs().max()) <= 0.06 * float(ref.abs().max())
    assert all(r["available"] for r in ch.rows if r["candidate"] != "choice")
