"""Quantization arithmetic shared by fake quantization, the Hessian bit allocation and the
byte counts: integer ranges, scales and zero points per granule, (fake) quantize and
dequantize with the straight-through estimator, and the packed size of a quantized weight.

Papers: the affine (scale, zero point) quantizer of Jacob et al. (CVPR 2018, "Quantization
and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference"); Q-BERT's
group-wise ranges (Shen et al., AAAI 2020); the straight-through estimator of Bengio et al.
(2013, "Estimating or Propagating Gradients Through Stochastic Neurons").

Equations, per granule (the whole tensor, one output channel, or ``group_size`` consecutive
output channels)::

    symmetric:   s = max|x| / (2^(b-1) - 1),  z = 0,  q = clamp(round(x/s), -(2^(b-1)-1), 2^(b-1)-1)
    asymmetric:  s = (max x - min x) / (2^b - 1),  z = round(-min x / s),
                 q = clamp(round(x/s) + z, 0, 2^b - 1)
    dequant:     x_hat = s (q - z);  |x - x_hat| <= s/2 inside the range
    bytes:       ceil(n b / 8) codes + 4 (fp32 scale) [+ 1 zero point] per granule

Complexity: O(n) element-wise work per call (a quantile is O(n log n) per granule).
"""
from __future__ import annotations

import math
import warnings

import torch

from .. import validate as V

GRANULARITIES = ("tensor", "channel", "group")
CALIBRATIONS = ("minmax", "percentile")
SCALE_BYTES = 4  # fp32 scale per granule
ZERO_POINT_BYTES = 1  # int8/uint8 zero point per granule (asymmetric only)


def check_bits(name: str, bits) -> int:
    return V.integer(name, bits, 2, 8)


# --------------------------------------------------------------------------- primitives

def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of a ``bits``-bit code (symmetric drops -2^(b-1))."""
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def _granules(x: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    """View ``x`` as (G, n) rows of values that share one range."""
    if granularity == "tensor" or x.dim() < 2:
        return x.reshape(1, -1)
    rows = x.reshape(x.shape[0], -1)  # (out, in)
    if granularity == "channel":
        return rows
    if rows.shape[0] % group_size:
        raise V.LabkitConfigError("group_size", group_size,
                                  f"a divisor of the {rows.shape[0]} output channels")
    return rows.reshape(rows.shape[0] // group_size, -1)  # (out/g, g*in)


def qparams(x: torch.Tensor, bits: int, symmetric: bool = True, granularity: str = "tensor",
            group_size: int = 1, calibration: str = "minmax", percentile: float = 99.9):
    """Scale and zero point per granule, shaped (G, 1), from the values of ``x``."""
    check_bits("bits", bits)
    V.choice("granularity", granularity, GRANULARITIES)
    V.choice("calibration", calibration, CALIBRATIONS)
    g = _granules(x.detach().float(), granularity, group_size)  # (G, n)
    if calibration == "percentile":
        p = percentile / 100.0
        if symmetric:
            hi = _quantile(g.abs(), p)
            lo = -hi
        else:
            lo, hi = _quantile(g, 1 - p), _quantile(g, p)
    else:
        lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
    return range_to_qparams(lo, hi, bits, symmetric)


def _quantile(g: torch.Tensor, p: float) -> torch.Tensor:
    """Per-row quantile (G, 1); rows longer than torch.quantile's limit use a strided
    sample of 2^24 values (a warning, not a silent change)."""
    if g.shape[1] >= 2 ** 24:
        warnings.warn(f"percentile calibration on {g.shape[1]} values per granule: using a "
                      f"strided sample of 2^24 (torch.quantile's limit)", stacklevel=2)
        g = g[:, :: g.shape[1] // 2 ** 24 + 1]
    return torch.quantile(g, p, dim=1, keepdim=True)


def range_to_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool):
    qmin, qmax = qrange(bits, symmetric)
    eps = torch.finfo(torch.float32).tiny
    if symmetric:
        scale = torch.maximum(hi.abs(), lo.abs()).clamp_min(eps) / qmax
        zero = torch.zeros_like(scale)
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # zero must be exactly representable
        scale = (hi - lo).clamp_min(eps) / (qmax - qmin)
        zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero


def quantize(x, scale, zero, bits: int, symmetric: bool, granularity: str = "tensor",
             group_size: int = 1) -> torch.Tensor:
    """Integer codes of ``x`` (as float tensor of integers, same shape as ``x``)."""
    qmin, qmax = qrange(bits, symmetric)
    g = _granules(x, granularity, group_size)
    return torch.clamp(torch.round(g / scale) + zero, qmin, qmax).reshape(x.shape)


def dequantize(q, scale, zero, granularity: str = "tensor", group_size: int = 1):
    g = _granules(q, granularity, group_size)
    return ((g - zero) * scale).reshape(q.shape)


class _RoundSTE(torch.autograd.Function):
    """round() whose gradient is the identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def fake_quantize(x, scale, zero, bits: int, symmetric: bool, granularity: str = "tensor",
                  group_size: int = 1) -> torch.Tensor:
    """Quantize-dequantize in float with the STE; clipped values get zero gradient."""
    qmin, qmax = qrange(bits, symmetric)
    g = _granules(x, granularity, group_size)  # (G, n)
    q = torch.clamp(_RoundSTE.apply(g / scale) + zero, qmin, qmax)
    return ((q - zero) * scale).reshape(x.shape)


def fake_quant_tensor(x, bits: int, symmetric: bool = True, granularity: str = "tensor",
                      group_size: int = 1, calibration: str = "minmax",
                      percentile: float = 99.9) -> torch.Tensor:
    """One call: choose the range of ``x`` and return its fake-quantized copy."""
    s, z = qparams(x, bits, symmetric, granularity, group_size, calibration, percentile)
    return fake_quantize(x, s, z, bits, symmetric, granularity, group_size)


def n_granules(shape, granularity: str, group_size: int) -> int:
    if granularity == "tensor" or len(shape) < 2:
        return 1
    return shape[0] if granularity == "channel" else shape[0] // group_size


def weight_bytes(shape, bits: int, granularity: str = "channel", group_size: int = 1,
                 symmetric: bool = True) -> dict:
    """Bytes of one quantized weight: packed codes plus scale/zero-point metadata."""
    n = math.prod(shape)
    g = n_granules(shape, granularity, group_size)
    codes = math.ceil(n * bits / 8)
    meta = g * (SCALE_BYTES + (0 if symmetric else ZERO_POINT_BYTES))
    return {"params": n, "codes": codes, "metadata": meta, "total": codes + meta,
            "bytes_per_param": (codes + meta) / n}


__all__ = [
    "CALIBRATIONS",
    "GRANULARITIES",
    "SCALE_BYTES",
    "ZERO_POINT_BYTES",
    "check_bits",
    "dequantize",
    "fake_quant_tensor",
    "fake_quantize",
    "n_granules",
    "qparams",
    "qrange",
    "quantize",
    "range_to_qparams",
    "weight_bytes",
]
