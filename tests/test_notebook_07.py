"""Notebook 07 (parallel training) with its fast parameters: one launch, every strategy
exact, the bubble table and the simulator's errors present, the live board fed."""
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


def test_bubble_rows_carry_the_gpipe_formula(res):
    rows = _section(res, "bubble")
    assert [r["M"] for r in rows] == [1, 2]  # fast params: max_m=2
    for r in rows:
        assert r["gpipe_bubble"] == pytest.approx((r["S"] - 1) / (r["M"] + r["S"] - 1))
        assert 0.0 <= r["measured_bubble"] < 1.0 and r["eq10_bubble"] == 0.0
        assert 0.0 <= r["measured_overlap"] <= 1.0
        assert 0.0 < r["cpu_share_in_compute"] <= 1.05  # CPU seconds per wall second
        assert r["gpipe_overlap"] == pytest.approx((r["M"] - 1) / (r["M"] + 1))
    assert res["metrics"]["bubble_gpipe_m1"] == 0.5


def test_memory_measured_vs_claimed(res):
    rows = _section(res, "memory")
    assert {r["strategy"] for r in rows} == {"ddp", "tensor", "pipeline"}
    ddp = [r for r in rows if r["strategy"] == "ddp"]
    assert all(r["measured_over_claimed"] == pytest.approx(1.0) for r in ddp)
    tp = [r for r in rows if r["strategy"] == "tensor"]
    assert all(r["measured_over_claimed"] > 1.0 for r in tp)  # embeddings stay whole


def test_simulator_is_labelled_and_checked(res):
    err = _section(res, "simulator_error")
    assert len(err) >= 4 and all(r["simulated"] for r in err)
    scaled = _section(res, "scaling_simulated")
    assert max(r["devices"] for r in scaled) == 1024 and all(r["simulated"] for r in scaled)
    assert res["metrics"]["simulated_7b_step_s"] > 0
    mem = _section(res, "simulator_memory_error")
    assert {r["label"] for r in mem} == {"ddp x2", "tensor x2", "pipeline x2"}
    assert res["metrics"]["simulator_memory_max_abs_relative_error"] <= 0.2  # a count


def test_live_board_was_fed(res):
    # 3 fast steps x 2 ranks x 3 strategies streamed as they ran
    assert res["metrics"]["live_steps_streamed"] >= 18


def test_headline_claimed_vs_measured_first(res):
    from labkit.dist.lab import HEADLINE

    assert res["headline"] == list(HEADLINE) and 3 <= len(HEADLINE) <= 5
    assert res["headline"][:2] == ["bubble_gpipe_max_m", "bubble_measured_max_m"]
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
