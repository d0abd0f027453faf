"""Standard widgets and the live plot board.

Controls are ipywidgets with the lab's ranges and ``continuous_update=False`` (a slider
fires once, when released), so an expensive re-run is not triggered on every pixel.
:func:`bind` wires controls to the *same* function the headless run calls.

:class:`LiveBoard` is a row of plotly panels (loss, latency, memory, ...). With a frontend
it is a ``FigureWidget`` updated inside ``batch_update()``; without one (papermill, a
report, ``interactive=False``) it is a plain ``Figure`` shown once at the end, so the HTML
report still has the plot. Updates are throttled to a wall-clock budget so plotting costs
little of a training step, in the kernel *and* in the browser that redraws the plot: at most
one update every ``min_interval`` seconds (2 a second by default), all panels in one
``batch_update``, at most ``max_points`` points a series sent (older points thinned).
When the cell that showed a live board ends, the widget is replaced by a static copy of the
figure (plotly's own mimetype plus HTML), so a saved or exported notebook still shows the
curves; logging to the board again brings the live widget back in the same place.

Figures follow the one house style of :mod:`labkit.figures`. :func:`progress` and
:func:`status` show progress for every wait of more than a few seconds.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import plotly.graph_objects as go

from . import figures as F
from . import validate as V

# --------------------------------------------------------------------------- controls

# a control keeps a usable width in a row of several (sliders were squeezed to ~40 px)
CONTROL_LAYOUT = dict(width="auto", min_width="300px", flex="1 1 300px")


def _slider(cls, description, value, lo, hi, step, **kw):
    import ipywidgets as W

    return getattr(W, cls)(value=value, min=lo, max=hi, step=step, description=description,
                           continuous_update=False, style={"description_width": "initial"},
                           layout=W.Layout(**CONTROL_LAYOUT), **kw)


def rank(value: int = 32, hi: int = 256, description: str = "rank k"):
    return _slider("IntSlider", description, value, 1, hi, 1)


def feature_count(value: int = 64, hi: int = 512, description: str = "features m"):
    return _slider("IntSlider", description, value, 1, hi, 1)


def sparsity(value: float = 0.5, description: str = "sparsity"):
    return _slider("FloatSlider", description, value, 0.0, 0.99, 0.01)


def bit_width(value: int = 8, description: str = "bits"):
    return _slider("IntSlider", description, value, 2, 8, 1)


def parallel_degree(value: int = 2, hi: int = 8, description: str = "parallel degree"):
    return _slider("IntSlider", description, value, 1, hi, 1)


def seq_len(value: int = 512, lo: int = 64, hi: int = 4096, description: str = "sequence n"):
    return _slider("IntSlider", description, value, lo, hi, lo)


def choice(options, value=None, description: str = ""):
    import ipywidgets as W

    return W.Dropdown(options=list(options), value=value if value is not None else options[0],
                      description=description, style={"description_width": "initial"},
                      layout=W.Layout(**CONTROL_LAYOUT))


def bind(fn: Callable, output=None, **controls):
    """Call ``fn(**values)`` now and whenever a control changes; errors (e.g. a
    :class:`~labkit.validate.LabkitConfigError`) are shown in the output, not swallowed.
    Live boards the call showed are made static when it returns (see :meth:`LiveBoard.finalize`).
    Returns the ``VBox`` to display; controls wrap onto new lines rather than shrink."""
    import ipywidgets as W

    out = output or W.Output()

    def run(_=None):
        out.clear_output(wait=True)
        with out:
            try:
                fn(**{k: c.value for k, c in controls.items()})
            except V.LabkitConfigError as e:
                print(f"invalid input: {e}")
            finally:
                finalize_boards()

    for c in controls.values():
        c.observe(run, names="value")
    run()
    row = W.HBox(list(controls.values()), layout=W.Layout(flex_flow="row wrap", width="100%"))
    return W.VBox([row, out], layout=W.Layout(width="100%"))


# --------------------------------------------------------------------------- progress

def progress(iterable=None, total: int | None = None, desc: str = "", **kw):
    """A progress bar (``tqdm.auto``: a widget in JupyterLab, text in papermill and the
    terminal) for any wait of more than a few seconds. Pass it to loops, or call
    ``.update(n)``; it is also a context manager."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, **kw)


@contextlib.contextmanager
def status(what: str, file=None):
    """Say what is being waited for *before* a wait whose length is unknown (training a
    baseline, loading a model) and how long it took after: ``with ui.status("training
    the dense baseline"): ...``."""
    import sys

    file = file or sys.stdout
    print(f"{what} ...", file=file, flush=True)
    t0 = time.perf_counter()
    try:
        yield
    except BaseException:
        print(f"{what}: failed after {time.perf_counter() - t0:.1f} s", file=file, flush=True)
        raise
    print(f"{what}: done in {time.perf_counter() - t0:.1f} s", file=file, flush=True)


# --------------------------------------------------------------------------- live board

_HEADLESS = False


def set_headless(flag: bool) -> None:
    """Declare a run headless (papermill, a report): :func:`has_frontend` is then False.
    :func:`labkit.notebook.start` calls it with ``not interactive``, because a papermill
    kernel looks like any other kernel but nothing will ever render its widgets."""
    global _HEADLESS
    _HEADLESS = bool(flag)


def has_frontend() -> bool:
    """True inside a live Jupyter kernel that can render widgets (anywidget installed)."""
    if _HEADLESS:
        return False
    try:
        import anywidget  # noqa: F401  plotly>=6 FigureWidget needs it
        from IPython import get_ipython

        return get_ipython() is not None and "IPKernelApp" in get_ipython().config
    except ImportError:
        return False


_SHOWN: list[LiveBoard] = []  # live boards on screen, made static when their cell ends
_HOOKED = False


def finalize_boards() -> int:
    """Replace every live board on screen by its static copy; returns how many."""
    boards = list(_SHOWN)
    for board in boards:
        board.finalize()
    return len(boards)


def _hook_cell_end() -> None:
    """Finalize live boards when a cell ends (IPython's ``post_run_cell`` runs before the
    kernel replies, so the static copy lands in the output of the cell that ran)."""
    global _HOOKED
    if _HOOKED:
        return
    try:
        from IPython import get_ipython

        ip = get_ipython()
    except ImportError:  # pragma: no cover
        return
    if ip is not None:
        ip.events.register("post_run_cell", lambda *_: finalize_boards())
        _HOOKED = True


_PLOTLYJS_SENT = False


def static_bundle(fig) -> dict:
    """The mime bundle of a static copy of ``fig``: plotly's mimetype (JupyterLab renders it
    in a saved, even untrusted, notebook) and HTML (nbconvert and other frontends), both
    filling the cell's width (``responsive``). plotly.js itself is sent once a session."""
    import copy

    import plotly.io as pio

    global _PLOTLYJS_SENT
    fig_dict = go.Figure(fig).to_dict()
    bundle = {}
    for name in ("notebook", "plotly_mimetype"):
        renderer = copy.copy(pio.renderers[name])  # the session's renderers stay unchanged
        renderer.config = {**getattr(renderer, "config", {}), "responsive": True}
        if name == "notebook" and not _PLOTLYJS_SENT:
            renderer.activate()  # displays plotly.js for the HTML copies (nbconvert)
            _PLOTLYJS_SENT = True
        bundle.update(renderer.to_mimebundle(dict(fig_dict)))
    return bundle


class LiveBoard:
    """Panels of line plots that update as a run progresses.

    ``board.log(panel, series, x, y)`` appends a point; ``board.show()`` displays it
    (call it once, before the loop when live, after it when static).

    Cost: a point is appended to a list (microseconds). A static figure is only filled
    when read (``board.fig``, ``show()``), once. A live figure re-sends its series, so
    updates come at most every ``min_interval`` seconds (the browser redraws on every
    update, on the same cores as the kernel), never take more than ``budget`` of the
    kernel's wall time (the interval stretches as series grow), and send at most
    ``max_points`` points a series (evenly thinned, the newest point always kept).
    The board's ``data`` and its static copy keep every point.
    """

    def __init__(self, panels=("loss",), title: str = "", live: bool | None = None,
                 min_interval: float = 0.5, height: int | None = None,
                 xaxis: dict | None = None, yaxis: dict | None = None, budget: float = 0.02,
                 max_points: int = 400, mode: str = "lines+markers"):
        self.panels = list(panels)
        self.mode = V.choice("mode", mode, ["lines+markers", "lines", "markers"])
        self.live = has_frontend() if live is None else (live and has_frontend())
        self.min_interval = V.number("min_interval", min_interval, 0.0, 60.0)
        self.budget = V.number("budget", budget, 0.0, 1.0, lo_open=True)
        self.max_points = V.integer("max_points", max_points, 2, None)
        fig = F.subplots(self.panels, title=title, xaxis=xaxis, yaxis=yaxis)
        if height:
            fig.update_layout(height=height)
        self._fig = go.FigureWidget(fig) if self.live else fig
        self._trace: dict[tuple[str, str], int] = {}
        self._pending: dict[int, tuple[list, list]] = {}
        self._last = 0.0
        self._wait = self.min_interval  # seconds until the next live update may run
        self._handle = None  # the display of a shown live board
        self._static = False  # True while the display shows the static copy
        self.updates = 0  # live figure updates sent
        self.data: dict[tuple[str, str], tuple[list, list]] = {}

    def _index(self, panel: str, series: str) -> int:
        key = (panel, series)
        if key not in self._trace:
            if panel not in self.panels:
                raise V.LabkitConfigError("panel", panel, f"one of {self.panels}")
            row, col = F.position(self.panels.index(panel), len(self.panels))
            first = series not in {s for _, s in self._trace}  # one legend entry a series
            color = F.color(series)  # and one colour, in every panel and figure
            self._fig.add_trace(go.Scatter(x=[], y=[], mode=self.mode, name=series,
                                           legendgroup=series, showlegend=first,
                                           line=dict(color=color), marker=dict(color=color)),
                                row=row, col=col)
            self._trace[key] = len(self._fig.data) - 1
            self.data[key] = ([], [])
        return self._trace[key]

    def log(self, panel: str, series: str, x, y, flush: bool = False):
        i = self._index(panel, series)
        xs, ys = self.data[(panel, series)]
        xs.append(x)
        ys.append(y)
        self._pending[i] = (xs, ys)
        if not self.live:
            return  # nobody sees a static figure before it is read: fill it then, once
        if flush or time.perf_counter() - self._last >= self._wait:
            self.flush()

    @property
    def fig(self):
        """The plotly figure (a ``FigureWidget`` when live), with every logged point.
        A static figure gets log axes where its data spans decades (:mod:`labkit.figures`)."""
        if not self.live:
            self.flush()
            F.log_axes(self._fig)
        return self._fig

    def axes(self, panel: str, x: dict | None = None, y: dict | None = None):
        """Set a panel's axes wherever it sits in the grid: ``board.axes("latency ms",
        x={"type": "log"}, y={"type": "log", "title_text": "ms"})``."""
        if panel not in self.panels:
            raise V.LabkitConfigError("panel", panel, f"one of {self.panels}")
        row, col = F.position(self.panels.index(panel), len(self.panels))
        if x:
            self._fig.update_xaxes(row=row, col=col, **x)
        if y:
            self._fig.update_yaxes(row=row, col=col, **y)
        return self

    def _thin(self, xs: list, ys: list) -> tuple[list, list]:
        """At most ``max_points`` points: every k-th, plus the newest."""
        n = len(xs)
        if n <= self.max_points:
            return list(xs), list(ys)
        k = -(-n // (self.max_points - 1))  # ceil
        idx = list(range(0, n - 1, k)) + [n - 1]
        return [xs[j] for j in idx], [ys[j] for j in idx]

    def flush(self):
        """Push pending points to the figure in one ``batch_update``."""
        if not self._pending:
            return
        if self.live:
            if self._static:
                self._revive()
            start = time.perf_counter()
            with self._fig.batch_update():
                for i, (xs, ys) in self._pending.items():
                    trace = self._fig.data[i]
                    trace.x, trace.y = self._thin(xs, ys)
                    if len(xs) > 50 and trace.mode != "lines":
                        trace.mode = "lines"  # markers cost the browser more than lines
            self._last = time.perf_counter()
            self.updates += 1
            # keep updates under `budget` of the wall time as the series grow
            self._wait = max(self.min_interval, (self._last - start) / self.budget)
        else:
            for i, (xs, ys) in self._pending.items():
                self._fig.data[i].x, self._fig.data[i].y = list(xs), list(ys)
        self._pending.clear()

    def static(self) -> go.Figure:
        """A static copy of the figure with every logged point."""
        fig = go.Figure(self._fig)
        for (panel, series), i in self._trace.items():
            xs, ys = self.data[(panel, series)]
            fig.data[i].x, fig.data[i].y = list(xs), list(ys)
        F.log_axes(fig)
        return fig

    def show(self):
        from IPython.display import display

        self.flush()
        if not self.live:
            display(self.fig)
            return self
        self._handle = display(self._fig, display_id=True)
        self._static = False
        self._track()
        return self

    def _track(self):
        """Remember this board as shown, so the cell's end replaces it by a static copy."""
        if self not in _SHOWN:
            _SHOWN.append(self)
        _hook_cell_end()

    def finalize(self):
        """Replace the shown live widget by a static copy (every point), so a saved or
        exported notebook keeps the curves (ipywidgets state is not saved with it)."""
        if self in _SHOWN:
            _SHOWN.remove(self)
        if not self.live or self._handle is None or self._static:
            return self
        self._handle.update(static_bundle(self.static()), raw=True)
        self._static = True
        return self

    def _revive(self):
        """Logging after :meth:`finalize`: the live widget takes the static copy's place."""
        self._handle.update(self._fig)
        self._static = False
        self._track()

    def callback(self, panel: str = "loss", series: str = "train", every: int = 1):
        """A :class:`labkit.train.Callback` that logs training loss (and eval metrics)."""
        from .train import Callback

        board = self

        class _Log(Callback):
            def on_step(self, state):
                if state.step % every == 0:
                    board.log(panel, series, state.step, state.loss)

            def on_eval(self, state):
                for k, v in state.metrics.items():
                    if k in board.panels:
                        board.log(k, f"{series} eval", state.step, v, flush=True)

        return _Log()
