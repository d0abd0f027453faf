"""The simulator without a launch: the schedule it plays, the fits (and the calibrations
they refuse), calibration -> prediction on a made-up machine with known costs, memory
broken down, the DDP verdict, the strict gradient comparison, pipeline stages equal to
the model for both block styles, and the tables the lab builds from a result."""
import math

import dist_fakes as FK
import pytest
import torch

from labkit.dist import lab
from labkit.dist import simulator as SIM
from labkit.dist.common import compare_grads
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
    assert SIM.play([(1.0, 1.0)] * 2, 4, "gpipe", send=0.5)["step_s"] == pytest.approx(even + 1)
    assert SIM.play([(1.0, 1.0), (2.0, 2.0)], 4, "gpipe", send=0.0)["step_s"] > even


def test_fit_line_recovers_a_line_and_refuses_what_has_no_rate():
    xs = [1e3, 1e4, 1e5, 1e6]
    a, b = SIM.fit_line(xs, [2e-5 + 3e-9 * x for x in xs])
    assert a == pytest.approx(2e-5) and b == pytest.approx(3e-9)
    a, b = SIM.fit_line(xs, [3e-9 * x - 1e-6 for x in xs])  # a < 0: through the origin
    assert a == 0.0 and b == pytest.approx(3e-9, rel=1e-2)
    with pytest.raises(SIM.CalibrationError, match="block forward: time does not grow"):
        SIM.fit_line(xs, [1e-3] * 4, what="block forward")  # flat: no FLOP rate
    with pytest.raises(SIM.CalibrationError, match="does not grow"):
        SIM.fit_line(xs, [4e-3, 3e-3, 2e-3, 1e-3])  # falling
    with pytest.raises(SIM.CalibrationError, match="two or more sizes"):
        SIM.fit_line([1e3, 1e3], [1e-3, 2e-3])


def test_a_flat_calibration_gives_flagged_nan_never_a_number():
    raw = [FK.calibrate_raw(r, flat=True) for r in range(2)]
    with pytest.warns(UserWarning, match="calibration incomplete"):
        cal = SIM.fit(raw, 2)
    assert any("block forward" in p for p in cal.problems)
    assert math.isnan(cal.fwd_rate) and math.isnan(cal.bwd_rate)
    big = SIM.simulate(SIM.SIZES["7B"], cal, dp=8, tp=4, pp=4, microbatches=8, batch=64)
    assert math.isnan(big["step_s"]) and big["valid"] is False  # not 8,832 s
    assert "INVALID" in SIM.describe(big) and "block forward" in SIM.describe(big)


@pytest.fixture(scope="module")
def machine():
    """The made-up machine's calibration, fitted the way a launch's is."""
    raw = [FK.calibrate_raw(r) for r in range(2)]
    cal = SIM.fit(raw, 2)
    assert cal.problems == []
    return cal, SIM.spec_from(raw[0])


def test_fit_recovers_the_machine(machine):
    cal, spec = machine
    assert spec.seq == FK.N  # the batches' real length, not the seq asked for
    assert cal.fwd_a == pytest.approx(FK.A_F) and cal.bwd_a == pytest.approx(FK.A_B)
    assert spec.block_flops_per_token() / cal.fwd_rate == pytest.approx(FK.B_F)
    assert cal.ar_alpha == pytest.approx(FK.ALPHA) and cal.ar_beta == pytest.approx(FK.BETA)
    assert cal.p2p_alpha == pytest.approx(FK.P_A) and cal.p2p_beta == pytest.approx(FK.P_B)
    assert cal.tp_fwd_overhead == pytest.approx(FK.TP_F)
    assert cal.tp_bwd_overhead == pytest.approx(FK.TP_B)
    assert cal.pipe_op_overhead == pytest.approx(FK.PIPE_OP)
    assert cal.pipe_step_overhead == pytest.approx(FK.PIPE_STEP)
    assert cal.concurrency == pytest.approx(FK.CONC)


@pytest.mark.parametrize("M", range(1, 9))
def test_prediction_equals_the_machine_in_closed_form(machine, M):
    """Every configuration the lab measures, predicted from the calibration alone, equals
    the machine's cost written out (so a term dropped or counted twice shows)."""
    cal, spec = machine

    def sim(**kw):  # the made-up machine's ranks share its cores, as the real runs do
        return SIM.simulate(spec, cal, **kw, shared=True)["step_s"]

    assert sim(batch=8 * M) == pytest.approx(FK.one_rank_step(8 * M), rel=1e-9)
    assert sim(dp=2, batch=8 * M) == pytest.approx(FK.ddp_step(8 * M), rel=1e-9)
    assert sim(tp=2, batch=8 * M) == pytest.approx(FK.tp_step(8 * M), rel=1e-9)
    assert sim(pp=2, microbatches=M, batch=4 * M, schedule="gpipe") == \
        pytest.approx(FK.gpipe_step(M, 4), rel=1e-9)


def test_errors_simulate_each_run_at_its_own_sequence_length(machine):
    cal, spec = machine
    long = SIM.Spec(**{**SIM.dataclasses.asdict(spec), "seq": 64})  # seq asked: 64
    runs = [{"label": "1 rank", "batch": 16, "tokens_per_row": FK.N,
             "measured_s": FK.one_rank_step(16)}]
    (row,) = SIM.errors(cal, long, runs)
    assert row["tokens_per_row"] == FK.N and abs(row["relative_error"]) < 1e-9
    # without the run's own length the same run is simulated at 64 tokens a row
    (wrong,) = SIM.errors(cal, long, [{k: v for k, v in runs[0].items()
                                        if k != "tokens_per_row"}])
    assert wrong["relative_error"] > 0.5


def test_lab_errors_on_a_result_are_zero_on_the_machine():
    err = lab.simulator_errors(FK.result())
    assert list(err.label) == ["1 rank, whole batch", "DDP x2", "TP x2"] + \
        [f"GPipe S=2 M={m}" for m in (1, 2, 4, 8)]
    assert err.relative_error.abs().max() < 1e-9 and err.simulated.all()
    assert (err.tokens_per_row == FK.N).all()
    assert len(lab.error_figure(err).data) == 1


def test_memory_is_broken_down_so_it_can_be_checked_by_hand():
    cal = _cal(act_bytes_per_token_dim=5.0)
    spec = SIM.SIZES["1.3B"]
    r = SIM.simulate(spec, cal, pp=2, microbatches=26, batch=8 * 26)
    held = 12 * spec.block_params() + spec.vocab * spec.d_model + spec.extra_params
    assert r["params_per_device"] == held
    assert (r["weight_bytes"], r["grad_bytes"], r["optimizer_bytes"]) == \
        (4 * held, 4 * held, 8 * held)
    tokens = 8 * spec.seq  # one micro-batch of 8 rows
    per_mb = 12 * tokens * 5.0 * (10 * spec.d_model + 2 * spec.d_ff)
    assert r["activation_bytes_per_microbatch"] == pytest.approx(per_mb)
    assert r["microbatches_in_flight"] == 26  # GPipe keeps every micro-batch
    assert r["pipeline_buffer_bytes"] == pytest.approx(26 * tokens * spec.d_model * 4)
    assert r["memory_bytes_per_device"] == pytest.approx(
        16 * held + 26 * per_mb + r["pipeline_buffer_bytes"])
    text = SIM.describe(r)
    for part in (f"{4 * held / 1e9:.2f} GB (4 B/param)", f"{8 * held / 1e9:.2f} GB (8 B/param)",
                 f"{per_mb / 1e9:.2f} GB per micro-batch x 26 in flight", "busiest device",
                 "the whole step"):
        assert part in text, part
    one = SIM.simulate(spec, cal, pp=2, microbatches=26, batch=8 * 26, schedule="1f1b")
    assert one["microbatches_in_flight"] == 2  # 1F1B: at most S
    assert one["memory_bytes_per_device"] < r["memory_bytes_per_device"] / 5


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


def test_memory_errors_compare_with_what_the_ranks_allocated():
    res = FK.result(alloc_factor=1.25)  # e.g. DDP keeping a bucket copy of every gradient
    (row,) = lab.simulator_memory_errors(res).to_dict(orient="records")
    assert row["measured_bytes"] == int(16 * FK.P * 1.25)
    assert row["relative_error"] == pytest.approx(1 / 1.25 - 1, abs=1e-6)


# ---- Eq. 10 and the bubble table -----------------------------------------------------

@pytest.mark.parametrize("S", [2, 3, 4, 8])
def test_eq10_is_gpipe_at_m_equal_s(S):
    t = 1.0  # a stage's time on the whole batch
    assert lab.eq10_step(t, S) == pytest.approx(t * (S + S - 1) / S)  # GPipe at M = S
    bubble = 1 - t / lab.eq10_step(t, S)
    assert bubble == pytest.approx((S - 1) / (2 * S - 1)) and bubble > 0
    run = SIM.play([(t / S / 3, 2 * t / S / 3)] * S, S, "gpipe", 0.0)  # M = S
    assert run["step_s"] == pytest.approx(lab.eq10_step(t, S))


def test_bubble_table_and_figure():
    b = lab.bubble(FK.result()["ranks"])
    assert list(b.M) == [1, 2, 4, 8]
    assert (b.eq10_bubble == 1 / 3).all()  # S = 2: (S-1)/(2S-1), whatever M
    assert b.eq10_step_s.tolist() == pytest.approx((b.no_bubble_step_s * 1.5).tolist())
    fig = lab.bubble_figure(b, lab.bubble(FK.result()["ranks"], "sleep_sweep"))
    (eq10,) = [t for t in fig.data if t.name.startswith("Eq. 10")]
    assert list(eq10.x) == [2] and list(eq10.y) == pytest.approx([1 / 3])


@pytest.mark.parametrize("M", [1, 2, 4, 8])
def test_overlap_of_two_ranks_from_their_traces(M):
    run = SIM.play([(1.0, 1.0)] * 2, M, "gpipe", send=0.0)
    per = [{"t0": 100.0, "wall_s": run["step_s"],
            "events": [e for e in run["events"] if e[1] == s]} for s in range(2)]
    assert lab.overlap(per) == pytest.approx((M - 1) / (M + 1))
    assert lab._ideal_overlap(2, M) == pytest.approx((M - 1) / (M + 1))
    turns = [{"t0": 0.0, "wall_s": 4.0, "events": [("F", 0, 0, 0.0, 1.0), ("B", 0, 0, 3.0, 4.0)]},
             {"t0": 0.0, "wall_s": 4.0, "events": [("F", 1, 0, 1.0, 2.0), ("B", 1, 0, 2.0, 3.0)]}]
    assert lab.overlap(turns) == 0.0


# ---- DDP: a target only where each rank had a core ------------------------------------

def _ddp(**kw):
    return lab.ddp_scaling(FK.result(**kw)["ranks"])


def test_ddp_target_can_be_met_and_can_fail_with_a_core_each():
    met = lab.ddp_verdict(_ddp(ddp_ratio=0.6))
    assert met["met"] is True and met["measured"] == pytest.approx(0.6)
    slow = lab.ddp_verdict(_ddp(ddp_ratio=1.59))  # the audit's 1.59x slower
    assert slow["met"] is False and "not met" in slow["note"]
    assert lab.ddp_verdict(_ddp(ddp_ratio=0.75))["met"] is True  # the bound itself
    assert lab.ddp_verdict(_ddp(ddp_ratio=0.76))["met"] is False


@pytest.mark.parametrize("kw,why", [
    ({"contention": 1.6}, "1.60x as long on every rank at once"),
    ({"cpu_share": 0.5}, "0.50 CPU s per wall s"),
    ({"cores": 1}, "1 cores for 2 rank threads")])
def test_ddp_target_is_not_measurable_without_a_core_per_rank(kw, why):
    v = lab.ddp_verdict(_ddp(ddp_ratio=0.6, **kw))
    assert v["met"] is None and v["note"].startswith("not measurable here") and why in v["note"]


# ---- gradients: every parameter, on both sides -----------------------------------------

def test_a_missing_gradient_on_either_side_fails_the_check():
    g = {"a": torch.ones(2), "b": torch.ones(3)}
    assert compare_grads(g, dict(g)) == {"grad_max_abs_diff": 0.0, "grads_compared": 2,
                                         "grads_missing": []}
    for got, ref, side in (({"a": g["a"], "b": None}, g, "strategy"),
                           ({"a": g["a"]}, g, "strategy"),
                           (g, {"a": g["a"], "b": None}, "one process")):
        out = compare_grads(got, ref)
        assert out["grad_max_abs_diff"] == math.inf and out["grads_compared"] == 1
        assert out["grads_missing"] == [f"b ({side})"]


def _stages(model):
    from labkit.dist.pipeline import Stage, split_blocks

    parts = split_blocks(model.cfg.n_layers, 2)
    return [Stage(model, parts[0], True, False), Stage(model, parts[1], False, True)]


def _inputs(cfg, rows=3, n=12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, cfg.vocab_size, (rows, n), generator=g)
    ids[:, 5] = cfg.sep_token_id  # segment A, [SEP], segment B
    mask = torch.zeros(rows, n, dtype=torch.bool)
    mask[1, 9:] = True
    return ids, mask


@pytest.mark.parametrize("style", [{}, {"norm_position": "post", "type_vocab_size": 2}])
def test_pipeline_stages_equal_the_model_for_both_block_styles(style):
    """Pre-norm and BERT-style (post-norm, segment embeddings: MiniLM's shape) blocks:
    the stages run in a row give the model's logits, padding mask and segments included,
    with the segment ids derived from [SEP] or given."""
    from labkit.model import build, preset

    m = build(preset("small", vocab_size=100, **style))
    ids, mask = _inputs(m.cfg)
    st = _stages(m)
    types = (torch.arange(12) > 7).long().expand(3, 12) if style else None
    for s in st:
        s.mask, s.types = mask, types
    with torch.no_grad():
        assert (st[1](st[0](ids)) - m(ids, mask, types)).abs().max() == 0.0
    if style:  # the segments matter: other segment ids give other logits
        with torch.no_grad():
            assert (m(ids, mask, types) - m(ids, mask)).abs().max() > 1e-4


def test_a_split_that_drops_a_gradient_fails_the_gradient_check():
    """A stage split that stops training the pooler must not pass as exact."""
    import copy

    from labkit.dist.common import grads
    from labkit.model import build, preset

    m = build(preset("tiny", vocab_size=100))
    ids, mask = _inputs(m.cfg)
    labels = torch.tensor([0, 1, 2])
    ref = copy.deepcopy(m)
    ref.loss({"input_ids": ids, "padding_mask": mask, "labels": labels}).backward()
    st = _stages(m)
    st[1].pooler.weight.requires_grad_(False)  # the broken split
    for s in st:
        s.mask = mask
    torch.nn.functional.cross_entropy(st[1](st[0](ids)), labels).backward()
    got = {**grads(st[0]), **grads(st[1])}
    out = compare_grads(got, grads(ref), names=sorted(got))
    assert out["grads_missing"] == ["pooler.weight (strategy)"]
    assert out["grad_max_abs_diff"] == math.inf  # fails any tolerance
    assert out["grads_compared"] == len(got) - 1


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_spec_counts_every_parameter_of_a_labkit_model(kind):
    from labkit.model import build, count_params, preset

    cfg = preset("tiny", kind=kind)
    spec = SIM.spec_of(cfg, 32)
    assert spec.params() == count_params(build(cfg))
    one = SIM.simulate(spec, _cal(), batch=8)
    assert one["state_bytes_per_device"] == 16 * spec.params()  # fp32 w + g + AdamW 2x


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_the_flop_count_is_the_blocks_matmuls_plus_attention(kind):
    """The FLOPs the simulator divides by a rate: 2 per weight (torch's flop counter on a
    labkit block's linears) plus attention's 4 N D per token."""
    from torch.utils.flop_counter import FlopCounterMode

    from labkit.model import Block, Rotary, preset

    cfg = preset("small", kind=kind, vocab_size=100)
    rows, n = 4, 26
    block = Block(cfg)
    rope = Rotary(cfg.head_dim, 64, 1e4) if kind == "decoder" else None
    with FlopCounterMode(display=False) as fc:
        block(torch.randn(rows, n, cfg.d_model), rope=rope)
    ops = fc.get_flop_counts()["Global"]
    linear = sum(v for k, v in ops.items() if k.__name__.split(".")[0] in ("mm", "addmm"))
    spec = SIM.Spec(cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff, 100, n,
                    gated=kind == "decoder")
    assert linear / (rows * n) == 2 * spec.block_params()
    assert spec.block_flops_per_token() == 2 * spec.block_params() + 4 * n * cfg.d_model


def test_concurrency_slows_only_devices_that_share_the_machine(machine):
    """The factor applies to compute of several ranks on this machine (shared=True), not
    to one rank, and not to a simulated cluster with a device each (the default)."""
    cal, spec = machine
    one = SIM.simulate(spec, cal, batch=8)
    assert one["step_s"] == pytest.approx(FK.one_rank_step(8), rel=1e-9)
    assert SIM.simulate(spec, cal, batch=8, shared=True)["step_s"] == one["step_s"]
    own = SIM.simulate(spec, cal, dp=2, batch=16)
    assert own["step_s"] == pytest.approx(FK.one_rank_step(8) + FK.all_reduce(4 * FK.P))
    shared = SIM.simulate(spec, cal, dp=2, batch=16, shared=True)
    assert shared["step_s"] == pytest.approx(FK.ddp_step(16), rel=1e-9)
    assert shared["compute_slowdown"] == pytest.approx(FK.CONC) and own["compute_slowdown"] == 1
