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

def has_frontend() -> bool:
    """True inside a live Jupyter kernel that can render widgets (anywidget installed)."""
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
    """

    def __init__(self, panels=("loss",), title: str = "", live: bool | None = None,
                 min_interval: float = 0.25, height: int = 320, xaxis: dict | None = None,
                 yaxis: dict | None = None):
        self.panels = list(panels)
        self.live = has_frontend() if live is None else (live and has_frontend())
        self.min_interval = min_interval
        fig = make_subplots(rows=1, cols=len(self.panels), subplot_titles=self.panels)
        fig.update_layout(title=title, height=height, margin=dict(t=60, b=40, l=50, r=20),
                          legend=dict(orientation="h", y=-0.2))
        for i, name in enumerate(self.panels, start=1):
            fig.update_xaxes(title_text=(xaxis or {}).get(name, "step"), row=1, col=i)
            if (yaxis or {}).get(name):
                fig.update_yaxes(title_text=yaxis[name], row=1, col=i)
        self.fig = go.FigureWidget(fig) if self.live else fig
        self._trace: dict[tuple[str, str], int] = {}
        self._pending: dict[int, tuple[list, list]] = {}
        self._last = 0.0
        self.data: dict[tuple[str, str], tuple[list, list]] = {}

    def _index(self, panel: str, series: str) -> int:
        key = (panel, series)
        if key not in self._trace:
            if panel not in self.panels:
                raise V.LabkitConfigError("panel", panel, f"one of {self.panels}")
            col = self.panels.index(panel) + 1
            first = all(s != series for _, s in self._trace)  # one legend entry a series
            self.fig.add_trace(go.Scatter(x=[], y=[], mode="lines+markers", name=series,
                                          legendgroup=series, showlegend=first), row=1, col=col)
            self._trace[key] = len(self.fig.data) - 1
            self.data[key] = ([], [])
        return self._trace[key]

    def log(self, panel: str, series: str, x, y, flush: bool = False):
        i = self._index(panel, series)
        xs, ys = self.data[(panel, series)]
        xs.append(x)
        ys.append(y)
        self._pending[i] = (xs, ys)
        now = time.perf_counter()
        if flush or now - self._last >= self.min_interval:
            self.flush()
            self._last = now

    def flush(self):
        """Push pending points to the figure in one ``batch_update``."""
        if not self._pending:
            return
        if self.live:
            with self.fig.batch_update():
                for i, (xs, ys) in self._pending.items():
                    self.fig.data[i].x, self.fig.data[i].y = list(xs), list(ys)
        else:
            for i, (xs, ys) in self._pending.items():
                self.fig.data[i].x, self.fig.data[i].y = list(xs), list(ys)
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
