"""Simulated (fake) quantization: 2-8 bit weights and activations, PTQ and QAT.

Papers: Q-BERT (Shen et al., AAAI 2020, "Hessian Based Ultra Low Precision Quantization of
BERT"), group-wise ranges; the INT8 weight/activation quantization of the LLM-optimisation
paper; the straight-through estimator of Bengio et al. (2013).

Idea: a real number ``x`` is mapped to one of ``2^b`` levels by an affine map with a scale
``s`` and zero point ``z`` shared by a *granule* of the tensor (the whole tensor, one output
channel, or a group of ``group_size`` consecutive output channels as in Q-BERT, which
groups the rows of each projection, e.g. per head). *Fake* quantization rounds and
dequantizes in floating point, so quality can be studied at any bit-width without a kernel;
it saves neither memory nor time (see :mod:`labkit.techniques.int8` for the real path).

Equations (per granule)::

    symmetric:   s = max|x| / (2^(b-1) - 1),  z = 0,  q = clamp(round(x/s), -(2^(b-1)-1), 2^(b-1)-1)
    asymmetric:  s = (max x - min x) / (2^b - 1),  z = round(-min x / s),
                 q = clamp(round(x/s) + z, 0, 2^b - 1)
    dequant:     x_hat = s (q - z);  |x - x_hat| <= s/2 inside the range

Calibration picks the range: ``minmax`` uses the extremes, ``percentile`` clips at the
p-th percentile of ``|x|`` (symmetric) or at the (100-p, p) percentiles (asymmetric).
QAT trains through the rounding with the straight-through estimator
``d x_hat / d x = 1`` inside the range (0 outside, i.e. clipped values get no gradient).

Weights are fake-quantized through ``torch.nn.utils.parametrize`` (``layer.weight`` is
recomputed from the float master weight, so QAT updates the master copy); activations
(the input of each quantized linear) through an observer that calibrates then quantizes.

Memory: a ``b``-bit tensor of ``n`` values packed densely takes ``ceil(n b / 8)`` bytes plus
``4`` bytes of fp32 scale per granule and ``1`` byte of zero point per granule when
asymmetric (:func:`weight_bytes`).

Complexity: O(n) extra element-wise work per forward; no change in parameters or FLOPs.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .. import validate as V
from .registry import (
    block_indices,
    expand_parts,
    linears,
    register,
    register_expected,
    scope_fields,
    swap_modules,
)

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
                      f"strided sample of 2^24 (torch.quantile's limit)")
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


# --------------------------------------------------------------------------- config

@dataclass(frozen=True)
class FakeQuantConfig:
    """Simulated quantization of every selected ``nn.Linear``.

    bits: weight bits (2..8); granularity: tensor | channel | group (``group_size``
    consecutive output channels share a range, Q-BERT); activations: also fake-quantize
    each linear's input at ``act_bits`` (ranges from calibration batches, per tensor);
    calibration: minmax | percentile (``percentile`` of |x|); ``layers`` (block indices,
    ``()`` = every block) and ``parts`` (``attn``, ``ffn``, ``head`` or fine names such as
    ``ffn.up``) say which linears, in the registry's vocabulary. ``bits_by_layer``
    overrides ``bits`` per layer name (a mixed-precision assignment, e.g. from
    :func:`labkit.techniques.hessian.assign_bits`).
    """

    bits: int = 8
    granularity: str = "channel"
    group_size: int = 1
    symmetric: bool = True
    activations: bool = False
    act_bits: int = 8
    calibration: str = "minmax"
    percentile: float = 99.9
    layers: tuple[int, ...] = ()
    parts: tuple[str, ...] = ("attn", "ffn")
    bits_by_layer: tuple = ()  # ((layer name, bits), ...)

    def __post_init__(self):
        check_bits("bits", self.bits)
        V.choice("granularity", self.granularity, GRANULARITIES)
        V.integer("group_size", self.group_size, 1)
        V.boolean("symmetric", self.symmetric)
        V.boolean("activations", self.activations)
        check_bits("act_bits", self.act_bits)
        V.choice("calibration", self.calibration, CALIBRATIONS)
        V.number("percentile", self.percentile, 50.0, 100.0)
        scope_fields(self)
        for item in self.bits_by_layer:
            if not (isinstance(item, (tuple, list)) and len(item) == 2
                    and isinstance(item[0], str)):
                raise V.LabkitConfigError("bits_by_layer", item, "(layer name, bits) pairs")
            check_bits(f"bits_by_layer[{item[0]}]", item[1])

    def bits_for(self, name: str) -> int:
        return dict(self.bits_by_layer).get(name, self.bits)


class WeightFakeQuant(nn.Module):
    """Parametrization ``W -> Q(W)``: the range is recomputed from the master weight at
    every call (so QAT tracks it); gradients pass straight through."""

    def __init__(self, bits, symmetric, granularity, group_size, calibration, percentile):
        super().__init__()
        self.bits, self.symmetric = bits, symmetric
        self.granularity, self.group_size = granularity, group_size
        self.calibration, self.percentile = calibration, percentile

    def forward(self, w):
        s, z = qparams(w, self.bits, self.symmetric, self.granularity, self.group_size,
                       self.calibration, self.percentile)
        return fake_quantize(w, s, z, self.bits, self.symmetric, self.granularity,
                             self.group_size)


class ActFakeQuant(nn.Module):
    """Per-tensor activation fake quant with a calibrated range.

    ``calibrating=True``: records the range of each batch (min/max, or the percentile)
    and passes ``x`` through unchanged; the running range is the min/max over batches
    (``minmax``) or the mean of per-batch percentiles (``percentile``). Afterwards ``x`` is
    fake-quantized with the fixed range (gradient straight through inside it: QAT)."""

    def __init__(self, bits, symmetric, calibration, percentile):
        super().__init__()
        self.bits, self.symmetric = bits, symmetric
        self.calibration, self.percentile = calibration, percentile
        self.calibrating = False
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))
        self.register_buffer("batches", torch.tensor(0))

    @torch.no_grad()
    def observe(self, x):
        flat = x.detach().float().reshape(-1)
        if flat.numel() > 2 ** 20:  # quantile() limit; a strided sample is enough
            flat = flat[:: flat.numel() // 2 ** 20 + 1]
        if self.calibration == "percentile":
            p = self.percentile / 100
            lo, hi = torch.quantile(flat, 1 - p), torch.quantile(flat, p)
            k = self.batches.item()
            self.lo.copy_(lo if k == 0 else (self.lo * k + lo) / (k + 1))
            self.hi.copy_(hi if k == 0 else (self.hi * k + hi) / (k + 1))
        else:
            self.lo.copy_(torch.minimum(self.lo, flat.min()))
            self.hi.copy_(torch.maximum(self.hi, flat.max()))
        self.batches += 1

    def forward(self, x):
        if self.calibrating:
            self.observe(x)
            return x
        if self.batches.item() == 0:
            raise RuntimeError("activation quantizer was never calibrated: call "
                               "labkit.techniques.quant.calibrate(model, batches) first")
        s, z = range_to_qparams(self.lo.reshape(1, 1), self.hi.reshape(1, 1), self.bits,
                                self.symmetric)
        return fake_quantize(x, s, z, self.bits, self.symmetric)


class FakeQuantLinear(nn.Linear):
    """``nn.Linear`` whose weight is parametrized by :class:`WeightFakeQuant` and whose
    input optionally goes through an :class:`ActFakeQuant`. forward(x) -> y like Linear."""

    kernel_path = "fake-quant simulate (fp32 aten.linear on dequantized weights)"

    @classmethod
    def from_linear(cls, lin: nn.Linear, config: FakeQuantConfig, bits: int):
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None,
                  device=lin.weight.device, dtype=lin.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(lin.weight)
            if lin.bias is not None:
                new.bias.copy_(lin.bias)
        if config.granularity == "group" and lin.out_features % config.group_size:
            raise V.LabkitConfigError(
                "group_size", config.group_size,
                f"a divisor of every quantized layer's output channels "
                f"(a layer has {lin.out_features})")
        new.bits, new.config = bits, config
        parametrize.register_parametrization(new, "weight", WeightFakeQuant(
            bits, config.symmetric, config.granularity, config.group_size,
            config.calibration, config.percentile))
        new.act = ActFakeQuant(config.act_bits, config.symmetric, config.calibration,
                               config.percentile) if config.activations else None
        return new

    def forward(self, x):  # (..., in) -> (..., out)
        if self.act is not None:
            x = self.act(x)
        return F.linear(x, self.weight, self.bias)

    def float_weight(self) -> torch.Tensor:
        return self.parametrizations.weight.original

    def weight_bytes(self) -> dict:
        c = self.config
        return weight_bytes(tuple(self.float_weight().shape), self.bits, c.granularity,
                            c.group_size, c.symmetric)


def linear_selector(model: nn.Module, layers: tuple = (), parts: tuple = ("attn", "ffn"),
                    exact: bool = False, skip: tuple = ()):
    """The one rule for which linears a quantization technique takes, as a
    :func:`~labkit.techniques.registry.swap_modules` ``select(name, module)``: the linears
    of ``parts`` in the blocks ``layers`` (the registry's vocabulary, which also reads a
    Hugging Face BERT such as all-MiniLM-L6-v2). ``exact``: only plain ``nn.Linear`` (not a
    subclass another technique swapped in); ``skip``: classes never taken."""
    chosen = {id(m) for m in linears(model, layers, parts).values()}

    def select(name, m):
        if id(m) not in chosen or not isinstance(m, nn.Linear) or isinstance(m, skip):
            return False
        return not exact or type(m) is nn.Linear
    return select


@register(FakeQuantConfig)
def fake_quantize_(model: nn.Module, config: FakeQuantConfig) -> nn.Module:
    """Swap selected linears for :class:`FakeQuantLinear` (weights quantized now;
    activation quantizers need :func:`calibrate` before use)."""
    known = set()
    swapped = swap_modules(model, linear_selector(model, config.layers, config.parts,
                                                  skip=(FakeQuantLinear,)),
                           lambda name, m: (known.add(name),
                                            FakeQuantLinear.from_linear(
                                                m, config, config.bits_for(name)))[1])
    unknown = sorted(set(dict(config.bits_by_layer)) - known)
    if unknown:
        raise V.LabkitConfigError("bits_by_layer", unknown[0],
                                  f"names of quantizable linears, e.g. {swapped[:3]}")
    return model


def quantized_layers(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


@torch.no_grad()
def calibrate(model: nn.Module, batches, forward=None) -> int:
    """PTQ calibration: run ``batches`` through the model with every activation quantizer
    observing. ``forward(model, batch)`` defaults to ``model(**batch)`` for dicts with
    ``input_ids`` (labkit models) and ``model(batch)`` otherwise. Returns batches seen."""
    acts = [m.act for m in quantized_layers(model).values() if m.act is not None]
    for a in acts:
        a.calibrating = True
    n = 0
    try:
        for batch in batches:
            if forward is not None:
                forward(model, batch)
            elif isinstance(batch, dict) and "input_ids" in batch:
                model(batch["input_ids"], batch.get("padding_mask"))
            else:
                model(batch)
            n += 1
    finally:
        for a in acts:
            a.calibrating = False
    return n


def dequantize_(model: nn.Module) -> nn.Module:
    """Bake the fake-quantized weights into plain ``nn.Linear`` (removes the simulation)."""
    def make(name, m):
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(m.weight)
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        return lin
    swap_modules(model, lambda n, m: isinstance(m, FakeQuantLinear), make)
    return model


def quantized_bytes(model: nn.Module) -> dict:
    """Counted storage of the model as it would be deployed: quantized linears at their
    bit-width with metadata, everything else (embeddings, norms, biases) at its dtype."""
    q_params = q_codes = q_meta = 0
    inside = set()
    for m in quantized_layers(model).values():
        b = m.weight_bytes()
        q_params += b["params"]
        q_codes += b["codes"]
        q_meta += b["metadata"]
        inside.add(id(m.float_weight()))
    rest = 0
    seen = set()
    for p in model.parameters():
        if id(p) in inside or id(p) in seen:
            continue
        seen.add(id(p))
        rest += p.numel() * p.element_size()
    fp32_q = q_params * 4
    return {"quantized_params": q_params, "codes": q_codes, "metadata": q_meta,
            "other": rest, "total": q_codes + q_meta + rest,
            "quantized_fp32": fp32_q,
            "quantized_ratio": (q_codes + q_meta) / fp32_q if fp32_q else float("nan")}


def linear_shapes(model_cfg, layers: tuple = (), parts: tuple = ("attn", "ffn")) -> dict:
    """``{name: (out, in)}`` of the linears ``layers``/``parts`` select, read off
    :func:`labkit.accounting.linear_shapes` (the one shape table)."""
    from ..accounting import linear_shapes as shapes_of

    idx = set(block_indices(model_cfg.n_layers, layers))
    fine = set(expand_parts(parts))
    head = "head" in fine and model_cfg.kind == "encoder"  # a decoder's LM head is tied
    out = {}
    for name, shape in shapes_of(model_cfg, head=head).items():
        bits = name.split(".")
        if bits[0] != "blocks" or (int(bits[1]) in idx and ".".join(bits[2:4]) in fine):
            out[name] = shape
    return out


@register_expected(FakeQuantConfig)
def expected(model_cfg, config: FakeQuantConfig) -> dict:
    """Analytic: parameters and FLOPs unchanged (simulation); deployed weight bytes of the
    quantized linears including scales and zero points."""
    shapes = linear_shapes(model_cfg, config.layers, config.parts)
    codes = meta = n = 0
    for name, shape in shapes.items():
        if config.granularity == "group" and shape[0] % config.group_size:
            raise V.LabkitConfigError(
                "group_size", config.group_size,
                f"a divisor of every quantized layer's output channels ({name} has {shape[0]})")
        b = weight_bytes(shape, config.bits_for(name), config.granularity, config.group_size,
                         config.symmetric)
        codes, meta, n = codes + b["codes"], meta + b["metadata"], n + b["params"]
    return {"params_delta": 0, "flops_delta": 0, "quantized_params": n,
            "weight_bytes_fp32": 4 * n, "weight_bytes": codes + meta, "codes": codes,
            "metadata": meta, "bytes_ratio": (codes + meta) / (4 * n)}


__all__ = [
    "ActFakeQuant",
    "FakeQuantConfig",
    "FakeQuantLinear",
    "WeightFakeQuant",
    "calibrate",
    "dequantize",
    "dequantize_",
    "expected",
    "fake_quant_tensor",
    "fake_quantize",
    "fake_quantize_",
    "linear_selector",
    "linear_shapes",
    "qparams",
    "qrange",
    "quantize",
    "quantized_bytes",
    "quantized_layers",
    "range_to_qparams",
    "weight_bytes",
]
