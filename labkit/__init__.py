"""labkit: a notebook-driven lab for making transformers faster and smaller.

Every technique shows claimed (analytic) savings next to what is measured on this machine.
"""
from . import noise
from .validate import LabkitConfigError

noise.install()  # known third-party noise is recorded, not shown as errors (labkit.noise)

__version__ = "0.1.0"
__all__ = ["LabkitConfigError", "__version__", "load", "save"]


def __getattr__(name):
    # labkit.save / labkit.load (labkit.saving), imported on first use: `import labkit`
    # stays light for the command line
    if name in ("save", "load"):
        from . import saving

        return getattr(saving, name)
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")
