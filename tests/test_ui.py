"""labkit.ui.LiveBoard: cheap logging, static boards filled when read, live updates
kept under their wall-time budget, headless runs get static boards, live boards leave a
static copy when their cell ends; labkit.figures (the one style); labkit.noise."""
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
    sent = list(board.fig.data[0].x)  # thinned to max_points, the newest point kept
    assert len(sent) <= board.max_points and sent[0] == 0 and sent[-1] == 1999
    assert sent == sorted(sent) and board.data[("loss", "train")][0] == list(range(2000))
    assert list(board.static().data[0].x) == list(range(2000))  # the static copy keeps all
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


def _live_board(**kw):
    with mock.patch.object(ui, "has_frontend", lambda: True):
        return ui.LiveBoard(["loss", "accuracy"], live=True, **kw)


def test_live_updates_come_at_most_every_min_interval():
    board = _live_board(min_interval=0.4)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 1.0:  # thousands of points in one second
        board.log("loss", "train", 0, 1.0)
    assert 1 <= board.updates <= 3  # the first point, then at most 2 more in 1 s


class _Handle:
    def __init__(self):
        self.updates = []

    def update(self, obj, raw=False):
        self.updates.append((obj, raw))


def test_finalize_leaves_a_static_plotly_copy_and_logging_revives_the_widget():
    board = _live_board(min_interval=0.0)
    handle = _Handle()
    with mock.patch("IPython.display.display", lambda *a, **k: handle):
        board.show()
    assert board in ui._SHOWN
    for i in range(600):
        board.log("loss", "dense", i, 1.0 / (i + 1))
    board.log("accuracy", "dense", 599, 0.8)
    assert ui.finalize_boards() == 1 and board not in ui._SHOWN
    bundle, raw = handle.updates[-1]
    assert raw and "text/html" in bundle
    fig = bundle["application/vnd.plotly.v1+json"]
    loss = next(t for t in fig["data"] if t["xaxis"] == "x")
    assert len(loss["x"]) == 600 and loss["y"][-1] == pytest.approx(1 / 600)  # every point
    assert fig["config"]["responsive"] is True
    board.finalize()
    assert len(handle.updates) == 1  # idempotent
    board.log("loss", "dense", 600, 0.1, flush=True)  # the board goes live again
    assert handle.updates[-1][0] is board._fig and board in ui._SHOWN
    board.finalize()
    assert len(handle.updates) == 3 and handle.updates[-1][0] is not board._fig


def test_bind_finalizes_boards_shown_by_its_callback():
    import ipywidgets as W

    handle = _Handle()
    shown = []

    def run(r):
        board = _live_board()
        with mock.patch("IPython.display.display", lambda *a, **k: handle):
            board.show()
        board.log("loss", "x", r, 1.0)
        shown.append(board)

    box = ui.bind(run, r=ui.rank(4, hi=8))
    assert len(shown) == 1 and shown[0]._static and handle.updates
    slider = box.children[0].children[0]
    assert isinstance(slider, W.IntSlider) and slider.layout.min_width == "300px"
    slider.value = 5
    assert len(shown) == 2 and shown[1]._static


def test_figures_one_colour_a_series_one_legend_entry_log_axes_and_grid():
    import plotly.graph_objects as go

    from labkit import figures as F

    assert F.grid(2) == (1, 2) and F.grid(3) == (1, 3) and F.grid(4) == (2, 2)
    assert F.position(3, 4) == (2, 2)
    fig = F.subplots(["a", "b"])
    assert fig.layout.autosize is True and fig.layout.width is None
    fig.add_trace(go.Bar(x=["x"], y=[1.0], name="dense"), row=1, col=1)
    fig.add_trace(go.Bar(x=["x"], y=[300.0], name="int8"), row=1, col=1)
    fig.add_trace(go.Scatter(x=[1, 2], y=[0.5, 0.6], name="dense"), row=1, col=2)
    F.style(fig)
    assert fig.data[0].marker.color == fig.data[2].line.color == F.color("dense")
    assert F.color("int8") != F.color("dense")
    assert [t.showlegend for t in fig.data] == [True, True, False]
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type != "log"  # 300x vs 1.2x


def test_table_numbers_are_positional_and_missing_values_blank():
    import pandas as pd

    from labkit import figures as F

    assert [F.number(v) for v in (1.2345e-5, 0.5, 12.345, 123456.7, 42, None, float("nan"))] \
        == ["0.0000123", "0.5", "12.3", "123,457", "42", "", ""]
    html = F.table(pd.DataFrame({"speedup": [2.5e-5, None], "ms": [1234.5, 3.0]})).to_html()
    assert "e-05" not in html and "nan" not in html.lower() and "0.000025" in html


def test_known_third_party_noise_is_recorded_not_shown(caplog):
    import logging
    import warnings

    from labkit import noise

    noise.install()
    before = len(noise.recorded())
    with caplog.at_level(logging.INFO, logger="labkit.noise"):
        logging.getLogger("torchao").warning("Failed to load /x/_C_mxfp8.so: nope")
    assert noise.recorded()[before:] == [
        {"source": "torchao", "message": "Failed to load /x/_C_mxfp8.so: nope"}]
    assert "recorded, not shown" in caplog.text  # still in the log, at INFO
    with caplog.at_level(logging.WARNING, logger="torchao"):
        logging.getLogger("torchao").warning("something else")
    assert "something else" in caplog.text and len(noise.recorded()) == before + 1
    shown = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        original = warnings.showwarning
        noise._installed = False
        warnings.showwarning = lambda *a, **k: shown.append(str(a[0]))
        try:
            noise.install()
            warnings.warn("torch.ao.quantization is deprecated and will go", DeprecationWarning)  # noqa: B028
            warnings.warn("labkit: accuracy dropped", UserWarning)  # noqa: B028
        finally:
            warnings.showwarning = original
    assert shown == ["labkit: accuracy dropped"]
    assert noise.recorded()[-1]["source"] == "DeprecationWarning"


def test_status_says_what_is_awaited_and_how_long(capsys):
    with ui.status("training the dense baseline"):
        pass
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "training the dense baseline ..." and out[1].startswith(
        "training the dense baseline: done in ")
    import io

    text = io.StringIO()
    with ui.progress(total=3, desc="training", file=text) as bar:
        bar.update(3)
    assert "training" in text.getvalue() and "3/3" in text.getvalue()


def test_four_panels_sit_on_a_grid_and_axes_find_their_panel():
    board = ui.LiveBoard(["loss", "eval loss", "sparsity", "accuracy"], live=False)
    board.log("accuracy", "dense", 1, 0.5)
    board.axes("accuracy", y={"title_text": "acc"})
    trace = board.fig.data[0]
    assert (trace.xaxis, trace.yaxis) == ("x4", "y4")  # row 2, col 2 of a 2 x 2 grid
    assert board.fig.layout.yaxis4.title.text == "acc"
    assert board.fig.layout.xaxis2.domain[0] > board.fig.layout.xaxis.domain[1] + 0.05  # room
    with pytest.raises(LabkitConfigError, match="panel='speed'"):
        board.axes("speed", y={"type": "log"})


def test_static_boards_go_logarithmic_only_where_data_spans_decades():
    board = ui.LiveBoard(["latency ms", "loss"], live=False)
    for n, ms in ((128, 0.05), (1024, 0.9), (4096, 12.0)):
        board.log("latency ms", "sdpa", n, ms)
        board.log("loss", "dense", n, 1.0 / n ** 0.1)
    board.axes("loss", y={"type": "linear"})
    fig = board.fig
    assert fig.layout.yaxis.type == "log" and fig.layout.xaxis.type != "log"  # 240x; 32x
    assert fig.layout.yaxis2.type == "linear"  # an explicit choice is kept
