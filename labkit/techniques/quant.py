"""Simulated (fake) quantization: 2-8 bit weights and activations, PTQ and QAT.

Papers: Q-BERT (Shen et al., AAAI 2020, "Hessian Based Ultra Low Precision Quantization of
BERT"), group-wise ranges; the INT8 weight/activation quantization of the seed paper that
notebook 10 reproduces, "Research on Inference and Training Acceleration of Large Language
Model" (Chen, CISAI 2024); the straight-through estimator of Bengio et al. (2013).

Idea: a real number ``x`` is mapped to one of ``2^b`` levels by an affine map with a scale
``s`` and zero point ``z`` shared by a *granule* of the tensor (the whole tensor, one output
channel, or a group of ``group_size`` consecutive output channels as in Q-BERT, which
groups the rows of each projection, e.g. per head). *Fake* quantization rounds and
dequantizes in floating point, so quality can be studied at any bit-width without a kernel;
it saves neither memory nor time (see :mod:`labkit.techniques.int8` for the real path).
The arithmetic (``s``, ``z``, ``q = clamp(round(x/s) + z)``, ``x_hat = s (q - z)``, packed
bytes) is :mod:`labkit.techniques.qmath`; this module is the technique: the config, the
weight and activation quantizers, the swap, calibration and the byte count of a model.

Calibration picks the range: ``minmax`` uses the extremes, ``percentile`` clips at the
p-th percentile of ``|x|`` (symmetric) or at the (100-p, p) percentiles (asymmetric).
QAT trains through the rounding with the straight-through estimator
``d x_hat / d x = 1`` inside the range (0 outside, i.e. clipped values get no gradient).

Weights are fake-quantized through ``torch.nn.utils.parametrize`` (``layer.weight`` is
recomputed from the float master weight, so QAT updates the master copy); activations
(the input of each quantized linear) through an observer that calibrates then quantizes.

Memory: a ``b``-bit tensor of ``n`` values packed densely takes ``ceil(n b / 8)`` bytes plus
``4`` bytes of fp32 scale per granule and ``1`` byte of zero point per granule when
asymmetric (:func:`~labkit.techniques.qmath.weight_bytes`).

Complexity: O(n) extra element-wise work per forward; no change in parameters or FLOPs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .. import validate as V
from ..accounting import rows
from ..kernels.base import copy_linear
from .qmath import (
    CALIBRATIONS,
    GRANULARITIES,
    check_bits,
    fake_quant_tensor,
    fake_quantize,
    qparams,
    range_to_qparams,
    weight_bytes,
)
from .registry import linear_selector, register, register_account, scope_fields, swap_modules

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
        new = copy_linear(lin, cls)
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


@register(FakeQuantConfig)
def fake_quantize_(model: nn.Module, config: FakeQuantConfig) -> nn.Module:
    """Swap selected linears for :class:`FakeQuantLinear` (weights quantized now;
    activation quantizers need :func:`calibrate` before use)."""
    known = set()
    swapped = swap_modules(model, linear_selector(model, config.layers, config.parts),
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


OBSERVER_BYTES = 16  # ActFakeQuant's state: fp32 lo and hi, an int64 batch count


@register_account(FakeQuantConfig)
def _account(table, model_cfg, config: FakeQuantConfig) -> dict:
    """Deployed bytes of the plain linears the selector takes: packed ``bits``-bit codes plus
    a scale (and zero point) per granule, :func:`~labkit.techniques.qmath.weight_bytes`,
    plus each activation observer's state; parameters and FLOPs unchanged (simulation)."""
    taken = {n: r for n, r in rows(table, config.layers, config.parts).items()
             if r.kind == "linear"}
    unknown = sorted(set(dict(config.bits_by_layer)) - set(taken))
    if unknown:
        raise V.LabkitConfigError("bits_by_layer", unknown[0],
                                  f"names of quantizable linears, e.g. {list(taken)[:3]}")
    codes = meta = n = 0
    for name, r in taken.items():
        shape = (r.out_features, r.in_features)
        if config.granularity == "group" and shape[0] % config.group_size:
            raise V.LabkitConfigError(
                "group_size", config.group_size,
                f"a divisor of every quantized layer's output channels ({name} has {shape[0]})")
        b = weight_bytes(shape, config.bits_for(name), config.granularity, config.group_size,
                         config.symmetric)
        codes, meta, n = codes + b["codes"], meta + b["metadata"], n + b["params"]
        r.weight_bytes = b["total"] + (OBSERVER_BYTES if config.activations else 0)
        r.kind = "fakequant"
    return {"quantized_params": n, "weight_bytes_fp32": 4 * n, "weight_bytes": codes + meta,
            "codes": codes, "metadata": meta}


__all__ = [
    "ActFakeQuant",
    "FakeQuantConfig",
    "FakeQuantLinear",
    "WeightFakeQuant",
    "calibrate",
    "fake_quant_tensor",
    "fake_quantize",
    "fake_quantize_",
    "linear_selector",
    "qparams",
    "quantized_bytes",
    "quantized_layers",
    "range_to_qparams",
    "weight_bytes",
]
