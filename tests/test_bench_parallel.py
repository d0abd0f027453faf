"""``labkit bench parallel``'s targets on injected results (a made-up machine, no launch):
each can be met, can fail, and says "not measurable here" (met None) with why where this
machine cannot tell; and the CLI prints that third state."""
import dist_fakes as FK
import pytest

from labkit.benchmarks import parallel as BP


def _targets(**kw):
    return BP.evaluate(FK.result(**kw), "injected")["targets"]


def _one(targets, prefix):
    return [t for t in targets if t["target"].startswith(prefix)]


def test_on_the_machine_itself_the_measured_targets_are_met():
    ts = _targets()
    assert all(set(t) >= {"target", "measured", "required", "unit", "met", "note"} for t in ts)
    assert all(t["met"] for t in ts if "gradients" in t["target"])
    assert all(t["met"] is True for t in _one(ts, "GPipe bubble, sleeping"))
    assert len(_one(ts, "simulator step time")) == 7
    assert all(t["met"] is True for t in _one(ts, "simulator step time"))  # the machine
    assert all(t["met"] is True for t in _one(ts, "simulator memory"))
    # this machine's fixed costs: 2 ranks on half the rows each do not reach 0.75x
    (ddp,) = _one(ts, "2-rank DDP")
    assert ddp["met"] is False and ddp["measured"] == pytest.approx(
        FK.ddp_step(8) / FK.one_rank_step(8))


def test_a_ddp_step_the_simulator_does_not_explain_meets_ddp_and_fails_the_simulator():
    ts = _targets(ddp_ratio=0.6)
    (ddp,) = _one(ts, "2-rank DDP")
    assert ddp["met"] is True and ddp["measured"] == pytest.approx(0.6)
    (sim,) = _one(ts, "simulator step time: DDP x2")
    assert sim["met"] is False


def test_a_slower_ddp_fails_where_each_rank_had_a_core():
    (ddp,) = _one(_targets(ddp_ratio=1.59), "2-rank DDP")
    assert ddp["met"] is False and "not met" in ddp["note"]


def test_without_a_core_per_rank_ddp_and_the_compute_bubble_are_not_measurable():
    ts = _targets(ddp_ratio=1.59, contention=1.8)
    (ddp,) = _one(ts, "2-rank DDP")
    assert ddp["met"] is None and ddp["note"].startswith("not measurable here")
    assert "1.80x as long on every rank at once" in ddp["note"]
    assert all(t["met"] is None for t in _one(ts, "GPipe bubble, model stages"))
    # the sleeping stages do not need a core: still a target
    assert all(t["met"] is True for t in _one(ts, "GPipe bubble, sleeping"))


def test_m1_on_computing_stages_is_never_a_target():
    (m1,) = [t for t in _targets() if t["target"].startswith("GPipe bubble, model stages, "
                                                             "S=2 M=1 ")]
    assert m1["met"] is None and "take turns" in m1["note"]


def test_a_wrong_bubble_on_sleeping_stages_fails():
    ts = _one(_targets(sleep_error=0.3), "GPipe bubble, sleeping")
    assert len(ts) == 4 and not any(t["met"] for t in ts)
    assert all(t["required"] == "within 10%" for t in ts)


def test_a_calibration_that_cannot_be_fitted_fails_the_simulator_targets():
    with pytest.warns(UserWarning, match="calibration incomplete"):
        ts = _one(_targets(flat=True), "simulator step time")
    assert ts and all(t["met"] is False and "could not be fitted" in t["note"] for t in ts)


def test_memory_off_by_a_bucket_copy_fails():
    (mem,) = _one(_targets(alloc_factor=1.3), "simulator memory")
    assert mem["met"] is False and "allocated by mallinfo2" in mem["note"]


def test_cli_prints_not_measurable(monkeypatch, capsys):
    from labkit import cli

    monkeypatch.setattr(BP, "run", lambda quick=False: {
        "name": "parallel", **BP.evaluate(FK.result(contention=1.8), "injected"), "env": {}})
    assert cli.main(["bench", "parallel"]) == 0
    out = capsys.readouterr().out
    assert "not measurable" in out and "NOT met" not in out.split("targets")[1].split(
        "2-rank DDP")[1].splitlines()[0]


def test_quick_run_has_every_kind_of_target():
    """One real launch (quick sizes): the targets are there and each says met, not met or
    not measurable; the numbers themselves are for an idle machine."""
    out = BP.run(quick=True)
    assert out["name"] == "parallel" and out["env"]["ranks"] == 2
    kinds = {t["target"].split(":")[0].split(",")[0] for t in out["targets"]}
    assert {"ddp gradients == one process", "GPipe bubble", "simulator step time",
            "simulator memory per device", "2-rank DDP step / 1-rank step"} <= kinds
    for t in out["targets"]:
        assert t["met"] in (True, False, None) and t["note"]
        if t["met"] is None:
            assert "not measurable here" in t["note"]
    assert all(t["met"] for t in out["targets"] if "gradients" in t["target"])
    assert {r["table"] for r in out["rows"]} >= {"bubble", "bubble_sleeping", "simulator",
                                                  "simulator_memory", "ddp", "memory"}
