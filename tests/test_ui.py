"""labkit.ui.LiveBoard: cheap logging, static boards filled when read, live updates
kept under their wall-time budget, headless runs get static boards."""
from __future__ import annotations

import time
from unittest import mock

import pytest

from labkit import ui
from labkit.train import TrainState
from labkit.validate import LabkitConfigError


def test_static_board_fills_the_figure_when_read():
    board = ui.LiveBoard(["loss", "accuracy"], live=False)
    cb = board.callback()
    state = TrainState()
    for step in range(1, 6):
        state.step, state.loss = step, 1.0 / step
        cb.on_step(state)
    state.metrics = {"accuracy": 0.75, "loss": 0.2}
    cb.on_eval(state)
    assert board._fig.data[0].x in (None, ())  # nothing pushed during the run
    fig = board.fig
    by_name = {(t.name, t.xaxis): (list(t.x), list(t.y)) for t in fig.data}
    assert by_name[("train", "x")] == ([1, 2, 3, 4, 5], [1.0, 0.5, 1 / 3, 0.25, 0.2])
    assert by_name[("train eval", "x")] == ([5], [0.2])
    assert by_name[("train eval", "x2")] == ([5], [0.75])


def test_unknown_panel_is_rejected():
    with pytest.raises(LabkitConfigError, match="panel='speed'"):
        ui.LiveBoard(["loss"], live=False).log("speed", "a", 0, 1.0)


def test_live_updates_stretch_to_stay_within_budget():
    import contextlib

    with mock.patch.object(ui, "has_frontend", lambda: True):
        board = ui.LiveBoard(["loss"], live=True, min_interval=0.0, budget=0.02)
    assert board.live
    calls = []

    @contextlib.contextmanager
    def slow_update():  # a widget update that costs 10 ms
        calls.append(time.perf_counter())
        end = time.perf_counter() + 0.01
        while time.perf_counter() < end:
            pass
        yield

    board._fig.batch_update = slow_update
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 1.5:
        board.log("loss", "train", 0, 1.0)
    # an update costing >= 10 ms may run at most every >= 0.5 s: a few in 1.5 s, not thousands
    assert 1 <= len(calls) <= 4
    assert board._wait >= 0.01 / 0.02


def test_real_live_flush_sets_wait_from_its_cost():
    with mock.patch.object(ui, "has_frontend", lambda: True):
        board = ui.LiveBoard(["loss"], live=True, min_interval=0.0, budget=0.5)
    for i in range(2000):
        board.log("loss", "train", i, 1.0, flush=(i == 1999))
    assert list(board.fig.data[0].x) == list(range(2000))
    assert board._wait > 0.0  # measured cost / budget


def test_headless_runs_get_static_boards():
    try:
        ui.set_headless(True)
        assert not ui.has_frontend()
        assert not ui.LiveBoard(["loss"]).live
    finally:
        ui.set_headless(False)


def test_budget_is_validated():
    with pytest.raises(LabkitConfigError, match="budget=0"):
        ui.LiveBoard(["loss"], live=False, budget=0)


def test_a_series_keeps_one_colour_and_one_legend_entry_across_panels():
    from labkit.ui import LiveBoard

    board = LiveBoard(panels=["loss", "accuracy"], live=False)
    for panel in ("loss", "accuracy"):
        for series in ("dense", "rank 16"):
            board.log(panel, series, 1, 0.5)
    traces = board.fig.data
    colour = {}
    for t in traces:
        colour.setdefault(t.name, set()).add(t.line.color)
    assert all(len(c) == 1 for c in colour.values()) and len(colour) == 2
    assert colour["dense"] != colour["rank 16"]
    assert sorted(t.name for t in traces if t.showlegend) == ["dense", "rank 16"]
