"""Notebook 07 (parallel training) with its fast parameters: one launch, every strategy
exact over every parameter, the bubble table with Eq. 10 as GPipe at M = S, the bubble
estimator on sleeping stages at the formula, the simulator's errors per configuration at
the sequence length that ran, its bytes next to what the ranks allocated, the live board
fed."""
import pytest

NAME = "07_parallel_training"


@pytest.fixture(scope="module")
def res(run_notebook):
    return run_notebook(NAME)


def _section(res, name):
    return [r for r in res["rows"] if r["section"] == name]


def test_every_strategy_matches_one_process(res):
    m = res["metrics"]
    assert m["all_exact"] is True
    assert m["ddp_grad_max_abs_diff"] <= 1e-6 and m["pipeline_grad_max_abs_diff"] <= 1e-6
    assert m["tensor_grad_max_abs_diff"] <= 1e-5
    assert m["backend"] == "gloo" and m["world_size"] == 2 and m["threads"] == 1


def test_bubble_rows_carry_gpipe_and_eq10_as_gpipe_at_m_equal_s(res):
    rows = _section(res, "bubble")
    assert [r["M"] for r in rows] == [1, 2]  # fast params: max_m=2
    for r in rows:
        S, M = r["S"], r["M"]
        assert r["gpipe_bubble"] == pytest.approx((S - 1) / (M + S - 1))
        assert r["eq10_bubble"] == pytest.approx((S - 1) / (2 * S - 1))  # not 0
        t = r["no_bubble_step_s"]  # a stage's work on the whole batch
        assert r["eq10_step_s"] == pytest.approx(t + (S - 1) / S * t)
        assert r["gpipe_step_s"] == pytest.approx(t * (M + S - 1) / M)
        assert r["gpipe_overlap"] == pytest.approx((M - 1) / (M + 1))
    # at M = S Eq. 10 is GPipe's step
    (at_s,) = [r for r in rows if r["M"] == r["S"]]
    assert at_s["eq10_step_s"] == pytest.approx(at_s["gpipe_step_s"])
    assert res["metrics"]["bubble_gpipe_m1"] == 0.5
    assert res["metrics"]["bubble_eq10"] == pytest.approx(1 / 3)


def test_bubble_on_sleeping_stages_is_the_schedule_s(res):
    rows = _section(res, "bubble_sleeping")
    assert [r["M"] for r in rows] == [1, 2]
    for r in rows:
        assert abs(r["relative_error_vs_gpipe"]) <= 0.10, r
    assert res["metrics"]["bubble_sleep_max_abs_relative_error"] <= 0.10


def test_memory_measured_vs_claimed(res):
    rows = _section(res, "memory")
    assert {r["strategy"] for r in rows} == {"ddp", "tensor", "pipeline"}
    ddp = [r for r in rows if r["strategy"] == "ddp"]
    assert all(r["measured_over_claimed"] == pytest.approx(1.0) for r in ddp)
    tp = [r for r in rows if r["strategy"] == "tensor"]
    assert all(r["measured_over_claimed"] > 1.0 for r in tp)  # embeddings stay whole
    assert all(r["grads_missing"] == "" for r in _section(res, "exactness"))


def _calibrated(res):
    """The simulator's fits failed only when the run says so (under load, times that do
    not grow with size): then its predictions are None and the test says why it stops."""
    problems = res["metrics"]["simulator_calibration_problems"]
    if res["metrics"]["simulated_7b_step_s"] is None:  # NaN: only with a fit named failed
        assert problems, "the 7B step is NaN but no calibration problem is named"
        pytest.skip("the simulator could not be calibrated on this loaded machine: "
                    + "; ".join(problems))


def test_simulator_is_labelled_and_checked(res):
    _calibrated(res)
    err = _section(res, "simulator_error")
    labels = [r["label"] for r in err]
    assert labels[:3] == ["1 rank, whole batch", "DDP x2", "TP x2"]
    assert labels[3:] == ["GPipe S=2 M=1", "GPipe S=2 M=2"] and all(r["simulated"] for r in err)
    # each run simulated at the length its batches had (the data pads to its longest
    # row: shorter than seq=32)
    assert len({r["tokens_per_row"] for r in err}) == 1 and err[0]["tokens_per_row"] < 32
    assert res["metrics"]["simulator_relative_errors"].keys() == set(labels)
    scaled = _section(res, "scaling_simulated")
    assert max(r["devices"] for r in scaled) == 1024 and all(r["simulated"] for r in scaled)
    assert res["metrics"]["simulated_7b_step_s"] > 0
    mem = {r["label"]: r for r in _section(res, "simulator_memory_error")}
    assert set(mem) == {"ddp x2", "tensor x2", "pipeline x2"}
    for r in mem.values():  # allocated (malloc's live bytes) >= the tensors counted
        assert r["measured_by"] in ("mallinfo2", "rss")
        assert r["measured_bytes"] >= r["counted_state_bytes"]
    # weights + gradients + AdamW (+ a pipeline's receive buffers) explain DDP's and the
    # pipeline's allocations; tensor parallel's DTensor objects (~0.25 MB) are not counted
    assert abs(mem["ddp x2"]["relative_error"]) <= 0.15
    assert abs(mem["pipeline x2"]["relative_error"]) <= 0.15
    assert -0.35 < mem["tensor x2"]["relative_error"] < 0


def test_live_board_was_fed(res):
    # 3 fast steps x 2 ranks x 3 strategies streamed as they ran
    assert res["metrics"]["live_steps_streamed"] >= 18


def test_headline_claimed_vs_measured_first(res):
    from labkit.dist.lab import HEADLINE

    assert res["headline"] == list(HEADLINE) and 3 <= len(HEADLINE) <= 5
    assert res["headline"][:2] == ["bubble_gpipe_max_m", "bubble_measured_max_m"]
    _calibrated(res)
    assert all(res["metrics"][name] is not None for name in res["headline"])


@pytest.mark.parametrize("params,message", [
    ({"stages": 3}, "stages=3 is not allowed"), ({"threads": 2}, "threads=2 is not allowed"),
    ({"max_m": 0}, "max_m=0 is not allowed: expected an integer in [1, 16]"),
    ({"schedule": "zigzag"}, "schedule='zigzag' is not allowed: expected one of")])
def test_bad_parameter_fails_before_any_launch(run_notebook, params, message):
    from labkit.report import NotebookFailed

    with pytest.raises(NotebookFailed) as e:
        run_notebook(NAME, **params)
    assert message in str(e.value)
