"""Techniques: one module each, a validated config plus a registered ``apply_``.

Importing this package registers every technique, so ``apply_(model, Config(...))`` works
for any of them, and ``registered()`` lists them.
"""
from . import pruning, sparsity_expected  # noqa: E402, F401  (gradual pruning; SparsityConfig's counts)
from .cqil import CQILConfig, LoRAConfig
from .early_exit import EarlyExitConfig
from .embedding_int8 import EmbeddingInt8Config
from .factorized_ffn import FactorizedFFNConfig
from .int8 import AccelerateConfig, Int8Config
from .kernel_attention import KernelAttentionConfig
from .layerdrop import LayerDropConfig, LayerPruneConfig
from .low_rank_attention import LowRankAttentionConfig
from .quant import FakeQuantConfig
from .registry import (
    PARTS,
    apply_,
    check,
    expected,
    linears,
    modules,
    register,
    registered,
    swap_modules,
)
from .sharing import SharingConfig
from .sparsity import SparsityConfig

__all__ = [
    "PARTS",
    "AccelerateConfig",
    "CQILConfig",
    "EarlyExitConfig",
    "EmbeddingInt8Config",
    "FactorizedFFNConfig",
    "FakeQuantConfig",
    "Int8Config",
    "KernelAttentionConfig",
    "LayerDropConfig",
    "LayerPruneConfig",
    "LoRAConfig",
    "LowRankAttentionConfig",
    "SharingConfig",
    "SparsityConfig",
    "apply_",
    "check",
    "expected",
    "linears",
    "modules",
    "register",
    "registered",
    "swap_modules",
]
