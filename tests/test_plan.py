"""The planner: its selection rules (budget, shrinking slack, the best single technique kept,
the Pareto front, stacks predicted from singles), the search end to end with a deterministic
timer, rows written as they are measured, and bad input refused."""
import json

import pytest
import torch
import toy

import labkit
from labkit import measure
from labkit import plan as PL
from labkit.validate import LabkitConfigError


def flop_timer(name, fn, min_run_time):
    """A deterministic 'clock': a call takes one second per GFLOP it counts."""
    return measure.flops(fn) * 1e-9 + 1e-6


@pytest.fixture(scope="module")
def setup():
    teacher = toy.teacher()
    return teacher, toy.workload(teacher.cfg)


def _row(name, drop, speed, bytes_ratio=0.5, fam=None):
    return {"candidate": name, "dev_drop_points": drop, "speedup": speed,
            "bytes_ratio": bytes_ratio, "dev_accuracy": 0.9 - drop / 100,
            "families": fam or name}


def _planner(**cfg):
    p = PL.Planner.__new__(PL.Planner)
    p.c = PL.PlanConfig(**cfg)
    p.log = PL._Log(None)
    return p


def _trial(name, drop, speed, fams):
    t = PL.Trial(PL.Candidate(tuple((f, f"{name}:{f}", None) for f in fams)), None)
    t.row = _row(name, drop, speed)
    return t


def test_selection_keeps_the_fastest_within_the_rungs_slack_and_each_familys_best():
    p = _planner(budget=1.0, slack=10.0, rungs=2, families=("blocks", "neurons", "int8"))
    trials = [_trial("a", 0.5, 3.0, ("blocks", "int8")), _trial("b", 8.0, 4.0, ("neurons",)),
              _trial("c", 20.0, 9.0, ("blocks",)), _trial("d", 0.0, 1.2, ("int8",)),
              _trial("e", 2.0, 1.5, ("blocks",))]
    kept = p.select(trials, 0, keep=1)  # rung 0 of 2: slack 10 points
    # b is the fastest within 1 + 10 points; c is over; e and d are their family's best
    assert [t.row["candidate"] for t in kept] == ["b", "e", "d"]
    assert not trials[2].alive and "points lost" in trials[2].row["status"]
    assert not trials[0].alive and "not among" in trials[0].row["status"]
    kept = p.select(kept, 2, keep=3)  # the last rung: no slack left
    assert [t.row["candidate"] for t in kept] == ["d"]


def test_objective_bytes_ranks_by_bytes_saved():
    p = _planner(objective="bytes", families=("blocks",))
    fast, small = _trial("fast", 0, 3.0, ("blocks",)), _trial("small", 0, 1.1, ("blocks",))
    fast.row["bytes_ratio"], small.row["bytes_ratio"] = 0.8, 0.3
    assert p.select([fast, small], 0, keep=1)[0] is small


def test_pareto_front_keeps_only_undominated_rows():
    rows = [_row("a", 0.0, 1.0), _row("b", 1.0, 2.0), _row("c", 2.0, 1.5),
            _row("d", 3.0, 3.0), _row("e", 1.0, 2.0)]
    front = PL.pareto(rows, "speedup")
    assert [r["candidate"] for r in front] == ["a", "b", "e", "d"]  # c: b beats it on both
    small = PL.pareto([{**r, "bytes_ratio": s} for r, s in zip(rows, (1.0, 0.5, 0.4, 0.6, 0.5))],
                      "bytes_ratio", "min")
    assert {r["candidate"] for r in small} == {"a", "b", "c", "e"}  # d: b smaller and better


def test_stacks_are_predicted_from_singles_and_never_mix_exclusive_families():
    p = _planner(budget=1.0, slack=5.0, stacks=10)
    singles = [_trial("blk", 2.0, 2.0, ("blocks",)), _trial("neu", 3.0, 1.5, ("neurons",)),
               _trial("rank", 1.0, 1.4, ("rank",)), _trial("int8", 0.0, 1.3, ("int8",))]
    stacks = p._stacks(singles)
    names = {s.families for s in stacks}
    assert ("neurons", "rank") not in names and ("blocks", "rank", "neurons") not in names
    assert ("blocks", "int8") in names
    # drops add: blocks + neurons + int8 predicted at 5 points, within 1 + 5
    assert ("blocks", "neurons", "int8") in names
    # the best predicted stack first: 2.0 * 1.5 * 1.3
    assert stacks[0].families == ("blocks", "neurons", "int8")
    p = _planner(budget=1.0, slack=3.0, stacks=10)
    assert ("blocks", "neurons", "int8") not in {s.families for s in p._stacks(singles)}


def test_levels_fit_the_model():
    cfg = toy.config()
    blocks = PL.levels(cfg, "blocks")
    assert [c.configs[0].keep for c in blocks] == [(0, 1)]  # at most half of 3 blocks go
    heads = PL.levels(cfg, "heads")
    assert [c.configs[0].sparsity for c in heads] == [0.25, 0.5]
    assert all(c.configs[0].score == "activation" for c in PL.levels(cfg, "neurons"))


def test_search_end_to_end_with_a_deterministic_timer(setup, tmp_path):
    teacher, work = setup
    rows = []
    log = tmp_path / "rows.jsonl"
    cfg = PL.PlanConfig(budget=2.0, search_minutes=30, recover_steps=20, recover_lr=3e-3,
                        families=("blocks", "neurons", "int8"), keep=2, rungs=1, stacks=2,
                        rounds=1, calibration_rows=64)
    r = PL.plan(teacher, work, cfg, timer=flop_timer, log=log, on_row=rows.append)
    assert rows == r.rows and len(rows) >= 5
    logged = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["candidate"] for x in logged if "event" not in x] == [x["candidate"] for x in rows]
    final = {f["model"]: f for f in r.final}
    assert final["dense"]["speedup"] == pytest.approx(1.0)
    if r.candidate is not None:
        chosen = [x for x in rows if x["candidate"] == r.candidate.name][-1]
        assert chosen["dev_drop_points"] <= cfg.budget and chosen["rung"] == cfg.rungs
        # with FLOP-proportional time, the choice is at least as fast as every row within budget
        ok = [x for x in rows if x["rung"] == cfg.rungs and x["dev_drop_points"] <= cfg.budget]
        assert chosen["speedup"] == max(x["speedup"] for x in ok)
        assert r.metrics["chosen_speedup"] == pytest.approx(final["chosen"]["speedup"])
        assert final["chosen"]["speedup"] > 1.0  # fewer FLOPs: faster under this timer
    for name in ("chosen_speedup", "best_single_speedup", "chosen_bytes_ratio",
                 "chosen_accuracy_drop", "dense_accuracy", "search_seconds", "candidates"):
        assert name in r.metrics
    assert r.metrics["candidates"] == len({x["candidate"] for x in rows})
    assert all(f["eval_n"] == 512 for f in r.final)
    # the choice is saved and loads as the same model on the same kernels
    labkit.save(r.simulated, tmp_path / "chosen", acceleration=r.acceleration)
    again = labkit.load(tmp_path / "chosen")
    with torch.no_grad():
        assert torch.equal(again(*work.sample), r.model(*work.sample))


def test_an_interrupted_search_keeps_the_rows_measured(setup, tmp_path):
    teacher, work = setup
    calls = {"n": 0}

    def timer(name, fn, mrt):
        calls["n"] += 1
        if calls["n"] > 150:
            raise KeyboardInterrupt
        return flop_timer(name, fn, mrt)

    log, seen = tmp_path / "rows.jsonl", []
    with pytest.raises(KeyboardInterrupt):
        PL.plan(teacher, work, PL.PlanConfig(families=("blocks", "neurons"), rounds=1,
                                             calibration_rows=32), timer=timer, log=log,
                on_row=seen.append)
    logged = [json.loads(x)["candidate"] for x in log.read_text().splitlines()]
    assert len(seen) >= 2 and logged == [r["candidate"] for r in seen]
    with pytest.raises(LabkitConfigError, match="log"):  # an earlier search is never clobbered
        PL.plan(teacher, work, PL.PlanConfig(), log=log)


def test_the_time_budget_bounds_the_recovered_candidates(setup):
    teacher, work = setup
    p = PL.Planner(teacher, work, PL.PlanConfig(search_minutes=1.0, calibration_rows=32),
                   timer=flop_timer)
    trials = [_trial(n, 0.0, 2.0, ("blocks",)) for n in "abc"]
    for t in trials:
        t.row["flops_ratio_claimed"] = 1.0
    p.step_seconds = 1.0
    p.start = p.clock() - 30  # 30 of the 60 seconds used: room for one 20-step recovery
    assert [t.row["candidate"] for t in p.affordable(trials, 20)] == ["a"]
    assert "time" in trials[1].row["status"]
    # not recovered further, but measured: still a candidate for the choice
    assert all(t.alive for t in trials)
    best = PL._best(trials[1:], lambda t: t.row["speedup"], 1.0)
    assert best is trials[1]


def test_bad_input_is_refused_with_the_parameter_named(setup):
    teacher, work = setup
    for field, value in (("budget", -1.0), ("budget", 80.0), ("objective", "energy"),
                         ("search_minutes", 0.0), ("families", ("blocks", "magic")),
                         ("families", ()), ("keep", 0), ("eta", 1)):
        with pytest.raises(LabkitConfigError, match=field):
            PL.PlanConfig(**{field: value})
    assert PL.PlanConfig(families="blocks, int8").families == ("blocks", "int8")
    no_dev = toy.workload(teacher.cfg)
    no_dev.dev_set = None
    with pytest.raises(LabkitConfigError, match="dev_set"):
        PL.plan(teacher, no_dev)
    other = PL.materialize(teacher, PL.levels(teacher.cfg, "blocks")[0], None)
    other.cfg = toy.config(num_labels=2)
    with pytest.raises(LabkitConfigError, match="teacher"):
        PL.plan(teacher, work, PL.PlanConfig(families=("neurons",), rounds=1,
                                             calibration_rows=32, rungs=1),
                teacher=other, timer=flop_timer)
    with pytest.raises(LabkitConfigError, match="config"):
        PL.plan(teacher, work, {"budget": 1.0})


def test_candidate_names_and_stacking_order():
    a = PL.levels(toy.config(), "neurons")[0]
    b = PL.levels(toy.config(), "blocks")[0]
    s = a.stacked(b)
    assert s.families == ("blocks", "neurons")  # blocks are applied first
    assert not PL.compatible(a, PL.levels(toy.config(), "rank")[0])


def test_exit_threshold_runs_the_fewest_blocks_above_the_floor():
    # 4 rows, one exit after block 0 of 2: exit confidences 0.95, 0.95, 0.75, 0.6
    exit_logits = torch.log(torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.75, 0.25], [0.6, 0.4]]))
    final = torch.log(torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.1, 0.9], [0.1, 0.9]]))
    labels = torch.tensor([0, 1, 1, 1])
    logits = torch.stack([exit_logits, final])  # the exit is right on row 0 only
    # any exit costs accuracy: floor 1.0 -> never exit; floor 0.75 -> exit rows 0-1 only
    assert PL.exit_threshold(logits, labels, (0,), 2, 1.0) == 1.0
    q = PL.exit_threshold(logits, labels, (0,), 2, 0.75)
    assert 0.75 < q <= 0.95
    # floor 0: the lowest threshold, every row exits
    assert PL.exit_threshold(logits, labels, (0,), 2, 0.0) == PL.EXIT_THRESHOLDS[0]


def test_a_bert_style_model_is_timed_and_exported_with_the_segment_ids_it_is_scored_with():
    """Rows that carry token_type_ids are scored with them; a whole-model static INT8
    candidate exported without them would refuse every dev batch. So the timed (and
    exported) inputs carry the segment ids the model derives, and calibration batches
    are cut to the same inputs."""
    from labkit import model as M
    from labkit.accuracy import correct
    from labkit.labs.workloads import Workload
    from labkit.techniques import static_int8 as SI

    m = M.build(toy.config(type_vocab_size=2), seed=0).eval()
    wide = toy.rows(64, 5)  # trimmed batches are column slices of wider tensors (views)
    wide = {k: torch.cat([v, v], 1) if v.dim() == 2 else v for k, v in wide.items()}
    dev = {k: v[:, :toy.N] if v.dim() == 2 else v for k, v in wide.items()}
    dev["token_type_ids"] = m.token_types(dev["input_ids"])
    wl = toy.workload(m.cfg)
    ids0, mask0 = (torch.cat([t, t], 1)[:, :toy.N] for t in wl.sample)
    wl = Workload("nli", m.cfg, toy.batches, wl.eval_set, (ids0, mask0), wl.dev_set)
    plain = PL.timed_inputs(m, wl)
    assert len(plain) == 2  # toy dev rows carry no segment ids
    wl = Workload("nli", m.cfg, toy.batches, wl.eval_set, wl.sample, [dev])
    ids, mask, tt = PL.timed_inputs(m, wl)
    assert torch.equal(ids, wl.sample[0]) and torch.equal(tt, m.token_types(ids))
    assert len(PL._static_args(m, toy.rows(8, 1), 3)) == 3
    if SI.unavailable() is not None:
        pytest.skip(SI.unavailable())
    cand = PL.Candidate((("static_int8", "static INT8", None),))
    fast, _ = PL.accelerated(m, cand, (ids, mask, tt), {},
                             calibration=[toy.rows(16, s) for s in range(2)])
    assert correct(fast, [dev]).shape == (64,)  # the dev batch, token types and all


def test_a_family_this_cpu_cannot_run_is_marked_unavailable_not_searched(setup, tmp_path,
                                                                          monkeypatch):
    """Static INT8 on a CPU without VNNI/AMX: a warning naming why, an event in the log,
    the family in the metrics, no candidate of it; the search runs the rest (it used to
    crash on the first static candidate after the whole screen)."""
    from labkit.techniques import static_int8 as SI

    monkeypatch.setattr(SI, "unavailable", lambda backend="x86_inductor": "no VNNI (test)")
    teacher, work = setup
    log = tmp_path / "rows.jsonl"
    cfg = PL.PlanConfig(families=("blocks", "static_int8"), rounds=1, calibration_rows=32,
                        recover_steps=2, rungs=1)
    with pytest.warns(UserWarning, match="'static_int8' is unavailable.*no VNNI"):
        r = PL.plan(teacher, work, cfg, timer=flop_timer, log=log)
    assert r.metrics["unavailable_families"] == {"static_int8": "no VNNI (test)"}
    assert r.rows and all("static_int8" not in x["families"] for x in r.rows)
    events = [json.loads(x) for x in log.read_text().splitlines()]
    assert {"event": "family unavailable", "family": "static_int8",
            "why": "no VNNI (test)"} in events
