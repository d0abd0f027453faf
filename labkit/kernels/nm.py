"""N:M sparsity (N kept in every M consecutive inputs; Mishra et al., 2021).

CPU only, on purpose: torch's semi-structured (2:4) kernels run on CUDA GPUs, and no GPU
was available to test a CUDA path, so labkit has none (an earlier untested one moved the
layer to CUDA fp16 while inputs stayed on CPU fp32). On CPU the layer is *simulated*: a
dense matmul on the masked weight, recorded as such in ``kernel_path``, so no N:M speed is
ever reported. Storage, counted analytically: 4*nnz values + ceil(log2 M) index bits per
kept value.
"""
from __future__ import annotations

from .base import DenseLinear

NM_CPU_NOTE = "N:M simulated on CPU (dense matmul on the masked weight): speed not measured"


class NMLinear(DenseLinear):
    """N:M weights run as a dense matmul, and saying so."""

    @classmethod
    def of_nm(cls, lin, n: int, m: int) -> NMLinear:
        new = cls.of(lin, f"nm-simulated ({n}:{m}, speed not measured on CPU)")
        new.n, new.m = n, m
        return new
