"""The simulator without a launch: the schedule it plays, the alpha-beta fit, the memory
and scaling it predicts, and the tables the lab builds from a launch's result."""
import pytest

from labkit.dist import lab
from labkit.dist import simulator as SIM
from labkit.validate import LabkitConfigError


def _cal(**kw):
    base = {"fwd_a": 0.0, "fwd_rate": 1e10, "bwd_a": 0.0, "bwd_rate": 1e10,
            "ends_fwd_a": 0.0, "ends_fwd_b": 0.0, "ends_bwd_a": 0.0, "ends_bwd_b": 0.0,
            "d_cal": 64, "ends_flops_cal": 0.0, "act_bytes_per_token_dim": 4.0,
            "ar_alpha": 1e-5, "ar_beta": 1e-9, "p2p_alpha": 1e-5, "p2p_beta": 1e-9}
    return SIM.Calibration(**{**base, **kw})


@pytest.mark.parametrize("S,M", [(2, 1), (2, 4), (2, 8), (4, 4), (4, 16)])
def test_equal_stages_give_the_gpipe_bubble(S, M):
    run = SIM.play([(1.0, 2.0)] * S, M, "gpipe", send=0.0)
    assert run["bubble"] == pytest.approx((S - 1) / (M + S - 1))
    assert run["step_s"] == pytest.approx((M + S - 1) * 3.0)
    one = SIM.play([(1.0, 2.0)] * S, M, "1f1b", send=0.0)
    assert one["step_s"] == pytest.approx(run["step_s"])  # 1F1B: same bubble, less memory
    assert len(run["events"]) == 2 * S * M


def test_sends_and_uneven_stages_lengthen_the_step():
    even = SIM.play([(1.0, 1.0)] * 2, 4, "gpipe", send=0.0)["step_s"]
    assert SIM.play([(1.0, 1.0)] * 2, 4, "gpipe", send=0.5)["step_s"] > even
    assert SIM.play([(1.0, 1.0), (2.0, 2.0)], 4, "gpipe", send=0.0)["step_s"] > even


def test_alpha_beta_fit_recovers_a_line():
    xs = [1e3, 1e4, 1e5, 1e6]
    a, b = SIM.fit_line(xs, [2e-5 + 3e-9 * x for x in xs])
    assert a == pytest.approx(2e-5) and b == pytest.approx(3e-9)
    a, b = SIM.fit_line(xs, [1e-3, 1e-3, 1e-3, 1e-3])  # flat: a constant, not a fall
    assert a == pytest.approx(1e-3) and b >= 0


def test_simulate_memory_and_communication_terms():
    spec, cal = SIM.SIZES["7B"], _cal()
    one = SIM.simulate(spec, cal, batch=8)
    assert one["simulated"] and one["grad_all_reduce_s"] == 0
    assert one["state_bytes_per_device"] == pytest.approx(16 * spec.params())
    dp = SIM.simulate(spec, cal, dp=8, batch=64)
    assert dp["grad_all_reduce_s"] == pytest.approx(cal.all_reduce(4 * spec.params(), 8))
    pp = SIM.simulate(spec, cal, pp=4, microbatches=8, batch=8, schedule="1f1b")
    gp = SIM.simulate(spec, cal, pp=4, microbatches=8, batch=8, schedule="gpipe")
    assert pp["state_bytes_per_device"] < one["state_bytes_per_device"] / 3
    assert pp["activation_bytes_per_device"] < gp["activation_bytes_per_device"]
    tp = SIM.simulate(spec, cal, tp=8, batch=8)
    assert tp["tp_comm_s"] > 0 and tp["state_bytes_per_device"] < one["state_bytes_per_device"]
    with pytest.raises(LabkitConfigError, match="pp"):
        SIM.simulate(spec, cal, pp=64)
    with pytest.raises(LabkitConfigError, match="tp"):
        SIM.simulate(spec, cal, tp=3)
    with pytest.raises(LabkitConfigError, match="batch"):
        SIM.simulate(spec, cal, dp=3, batch=8)


def test_scaling_reaches_1024_devices_and_7b():
    rows = lab.scaling(_cal())
    assert {r["model"] for r in rows} == {"125M", "1.3B", "7B"}
    assert max(r["devices"] for r in rows) == 1024
    assert all(r["simulated"] and r["step_s"] > 0 for r in rows)
    assert max(r["model_params"] for r in rows) > 6e9


def _fake_result():
    cal = {"seq": 32, "cfg": {"kind": "encoder", "vocab_size": 100, "d_model": 64,
                               "n_layers": 2, "n_heads": 4, "d_ff": 256, "max_len": 32,
                               "num_labels": 3},
           "block": [(32, 1e-3, 2e-3), (64, 2e-3, 4e-3), (128, 4e-3, 8e-3)],
           "ends": [(32, 1e-4, 1e-4), (64, 1e-4, 1e-4), (128, 1e-4, 1e-4)],
           "act_bytes_per_token": 4000.0, "all_reduce": [(1e3, 1e-4), (1e6, 1e-3)],
           "p2p": [(1e3, 5e-5), (1e6, 5e-4)]}
    sweep = lambda r: {"bubble": [
        {"M": m, "S": 2, "rank": r, "mb_rows": 4, "dp": 1, "wall_s": 0.01 * (m + 1),
         "busy_s": 0.01 * m, "bubble": 1 / (m + 1), "samples_per_s": 1.0, "events": []}
        for m in (1, 2, 4)]}
    ranks = [{"calibrate": cal, "sweep": sweep(r)} for r in range(2)]
    return {"world_size": 2, "ranks": ranks}


def test_lab_tables_from_a_result():
    res = _fake_result()
    b = lab.bubble(res["ranks"])
    assert list(b.M) == [1, 2, 4]
    assert b.relative_error_vs_gpipe.abs().max() < 1e-12  # the fake ran a perfect GPipe
    err = lab.simulator_errors(res)
    assert list(err.label) == ["GPipe S=2 M=1", "GPipe S=2 M=2", "GPipe S=2 M=4"]
    assert err.simulated.all() and err.relative_error.notna().all()
    fig = lab.gantt({0: [("F", 0, 0, 0.0, 1.0), ("B", 0, 0, 2.0, 3.0)],
                     1: [("F", 1, 0, 1.0, 2.0)]})
    assert len(fig.data) == 4


@pytest.mark.parametrize("M", [1, 2, 4, 8])
def test_overlap_of_two_ranks_from_their_traces(M):
    # the simulator's own GPipe run of two equal stages, split into per-rank traces
    run = SIM.play([(1.0, 1.0)] * 2, M, "gpipe", send=0.0)
    per = [{"t0": 100.0, "wall_s": run["step_s"],
            "events": [e for e in run["events"] if e[1] == s]} for s in range(2)]
    assert lab.overlap(per) == pytest.approx((M - 1) / (M + 1))
    assert lab._ideal_overlap(2, M) == pytest.approx((M - 1) / (M + 1))
    # ranks that take turns (never compute at once): no overlap, bubble 1 - 1/S
    turns = [{"t0": 0.0, "wall_s": 4.0, "events": [("F", 0, 0, 0.0, 1.0), ("B", 0, 0, 3.0, 4.0)]},
             {"t0": 0.0, "wall_s": 4.0, "events": [("F", 1, 0, 1.0, 2.0), ("B", 1, 0, 2.0, 3.0)]}]
    assert lab.overlap(turns) == 0.0


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_spec_counts_every_parameter_of_a_labkit_model(kind):
    from labkit.model import build, count_params, preset

    cfg = preset("tiny", kind=kind)
    spec = SIM.spec_of(cfg, 32)
    assert spec.params() == count_params(build(cfg))
    one = SIM.simulate(spec, _cal(), batch=8)
    assert one["state_bytes_per_device"] == 16 * spec.params()  # fp32 w + g + AdamW 2x
