"""labkit: a notebook-driven lab for making transformers faster and smaller.

Every technique shows claimed (analytic) savings next to what is measured on this machine.
"""
from .validate import LabkitConfigError

__version__ = "0.1.0"
__all__ = ["LabkitConfigError", "__version__"]
