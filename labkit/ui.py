"""Standard widgets and the live plot board.

Controls are ipywidgets with the lab's ranges and ``continuous_update=False`` (a slider
fires once, when released), so an expensive re-run is not triggered on every pixel.
:func:`bind` wires controls to the *same* function the headless run calls.

:class:`LiveBoard` is a row of plotly panels (loss, latency, memory, ...). With a frontend
it is a ``FigureWidget`` updated inside ``batch_update()``; without one (papermill, a
report, ``interactive=False``) it is a plain ``Figure`` shown once at the end, so the HTML
report still has the plot. Updates are throttled so plotting costs little of a training step.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import validate as V


# --------------------------------------------------------------------------- controls

def _slider(cls, description, value, lo, hi, step, **kw):
    import ipywidgets as W

    return getattr(W, cls)(value=value, min=lo, max=hi, step=step, description=description,
                           continuous_update=False, style={"description_width": "initial"}, **kw)


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
                      description=description, style={"description_width": "initial"})


def bind(fn: Callable, output=None, **controls):
    """Call ``fn(**values)`` now and whenever a control changes; errors (e.g. a
    :class:`~labkit.validate.LabkitConfigError`) are shown in the output, not swallowed.
    Returns the ``VBox`` to display."""
    import ipywidgets as W

    out = output or W.Output()

    def run(_=None):
        out.clear_output(wait=True)
        with out:
            try:
                fn(**{k: c.value for k, c in controls.items()})
            except V.LabkitConfigError as e:
                print(f"invalid input: {e}")

    for c in controls.values():
        c.observe(run, names="value")
    run()
    return W.VBox([W.HBox(list(controls.values())), out])


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


class LiveBoard:
    """Panels of line plots that update as a run progresses.

    ``board.log(panel, series, x, y)`` appends a point; ``board.show()`` displays it
    (call it once, before the loop when live, after it when static).

    Cost: a point is appended to a list (microseconds). A static figure is only filled
    when read (``board.fig``, ``show()``), once. A live figure re-sends whole series, which
    grows with the run, so updates come at most every ``min_interval`` seconds and never
    take more than ``budget`` of the wall time (the interval stretches as series grow).
    """

    def __init__(self, panels=("loss",), title: str = "", live: bool | None = None,
                 min_interval: float = 0.25, height: int = 320, xaxis: dict | None = None,
                 yaxis: dict | None = None, budget: float = 0.02):
        self.panels = list(panels)
        self.live = has_frontend() if live is None else (live and has_frontend())
        self.min_interval = min_interval
        self.budget = V.number("budget", budget, 0.0, 1.0, lo_open=True)
        fig = make_subplots(rows=1, cols=len(self.panels), subplot_titles=self.panels)
        fig.update_layout(title=title, height=height, margin=dict(t=60, b=40, l=50, r=20),
                          legend=dict(orientation="h", y=-0.2))
        for i, name in enumerate(self.panels, start=1):
            fig.update_xaxes(title_text=(xaxis or {}).get(name, "step"), row=1, col=i)
            if (yaxis or {}).get(name):
                fig.update_yaxes(title_text=yaxis[name], row=1, col=i)
        self._fig = go.FigureWidget(fig) if self.live else fig
        self._trace: dict[tuple[str, str], int] = {}
        self._pending: dict[int, tuple[list, list]] = {}
        self._last = 0.0
        self._wait = min_interval  # seconds until the next live update may run
        self.data: dict[tuple[str, str], tuple[list, list]] = {}

    def _index(self, panel: str, series: str) -> int:
        key = (panel, series)
        if key not in self._trace:
            if panel not in self.panels:
                raise V.LabkitConfigError("panel", panel, f"one of {self.panels}")
            col = self.panels.index(panel) + 1
            names = list(dict.fromkeys(s for _, s in self._trace))
            first = series not in names  # one legend entry, and one colour, a series
            palette = plotly.colors.qualitative.Plotly
            color = palette[(names.index(series) if not first else len(names)) % len(palette)]
            self._fig.add_trace(go.Scatter(x=[], y=[], mode="lines+markers", name=series,
                                           legendgroup=series, showlegend=first,
                                           line=dict(color=color)), row=1, col=col)
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
        """The plotly figure (a ``FigureWidget`` when live), with every logged point."""
        if not self.live:
            self.flush()
        return self._fig

    def flush(self):
        """Push pending points to the figure in one ``batch_update``."""
        if not self._pending:
            return
        if self.live:
            start = time.perf_counter()
            with self._fig.batch_update():
                for i, (xs, ys) in self._pending.items():
                    self._fig.data[i].x, self._fig.data[i].y = list(xs), list(ys)
            self._last = time.perf_counter()
            # keep updates under `budget` of the wall time as the series grow
            self._wait = max(self.min_interval, (self._last - start) / self.budget)
        else:
            for i, (xs, ys) in self._pending.items():
                self._fig.data[i].x, self._fig.data[i].y = list(xs), list(ys)
        self._pending.clear()

    def show(self):
        from IPython.display import display

        self.flush()
        display(self.fig)
        return self

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
