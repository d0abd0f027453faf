"""labkit: a notebook-driven lab for making transformers faster and smaller.

Every technique shows claimed (analytic) savings next to what is measured on this machine.
"""
from . import noise
from .validate import LabkitConfigError

noise.install()  # known third-party noise is recorded, not shown as errors (labkit.noise)

__version__ = "0.1.0"
__all__ = ["LabkitConfigError", "__version__"]
