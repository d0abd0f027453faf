"""Techniques: one module each, a validated config plus a registered ``apply_``.

Importing this package registers every technique.
"""
from .registry import apply_, expected, register, register_expected, registered, swap_modules

__all__ = ["apply_", "expected", "register", "register_expected", "registered", "swap_modules"]
