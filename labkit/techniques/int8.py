"""Real INT8 on the CPU through torchao, and an ``accelerate`` step that keeps what is fast.

Paper: the INT8 weight/activation quantization of the seed paper that notebook 10 reproduces,
"Research on Inference and Training Acceleration of Large Language Model" (Chen, CISAI 2024); torchao's
``quantize_(model, Int8DynamicActivationInt8WeightConfig())`` is the implementation.

Idea: fake quantization (:mod:`labkit.techniques.quant`) only studies quality. To save
time and memory the weights must be *stored* as int8 and the matmul must run on int8:

    dynamic (W8A8):  x_q = round(x / s_x) per row (s_x computed at run time),
                     y = (x_q @ W_q^T) * s_x * s_w + b          (int32 accumulate)
    weight-only (W8A16/32): y = x @ (W_q * s_w)^T + b            (dequantize, float matmul)

On this torchao (0.18) the CPU dynamic path is ``Int8Tensor`` -> ``int_scaled_matmul`` ->
``torch._int_mm`` (s8s8, oneDNN, AMX tiles where the CPU has them, u8s8 VNNI otherwise);
weight-only casts the int8 weight to float at every call then runs the float GEMM, so it
saves memory but rarely time in eager mode. ``torch.ao.quantization.quantize_dynamic``
(fbgemm/x86 ``quantized::linear_dynamic``, one fused op) still exists in torch 2.13 but
warns that it is deprecated; it is a candidate too, because at small batches it is often the
fastest INT8 path on this CPU. ``fp32_onednn`` runs the same fp32 arithmetic on oneDNN's
sgemm instead of the BLAS ``aten.linear`` calls (MKL in torch's x86 wheels), which on a
non-Intel CPU runs well below the machine's fp32 peak (``labkit bench peak``): without it
every INT8 speedup would be measured against a slow reference. The per-row activation
quantization costs
several element-wise passes, which dominate at batch 1 and for tiny layers: there INT8
*loses*. :func:`accelerate_` therefore times every candidate on the layer's real input
shape and keeps the fastest, and the model-level check reverts when the whole model got
slower. The kernel that ran is recorded (``kernel_path``) and verified with the profiler
(:func:`matmul_ops`).

Memory: int8 codes (1 byte a weight) + fp32 scale and int8 zero point per output row:
``(K + 5) / (4 K)`` of fp32 for a (N, K) weight.

Complexity: same FLOPs; int8 GEMM throughput is 2-4x fp32 on VNNI/AMX CPUs.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .. import accelerate as A
from .. import validate as V
from ..accounting import rows
from .registry import linear_selector, register, register_account, scope_fields, swap_modules

MODES = ("dynamic", "weight_only")
CANDIDATES = ("fp32", "fp32_onednn", "bf16", "int8_dynamic", "int8_weight_only",
              "torch_dynamic")


def cpu_int8_isa() -> str:
    """Which int8 instructions the CPU offers (what torchao's ``_int_mm`` path uses)."""
    try:
        from torchao.kernel.intmm import _cpu_is_amx_tile_supported, _cpu_is_vnni_supported

        if _cpu_is_amx_tile_supported():
            return "AMX"
        if _cpu_is_vnni_supported():
            return "AVX512-VNNI"
    except ImportError:  # pragma: no cover - older torchao without these probes
        return "unknown ISA (torchao has no CPU probe)"
    return "no VNNI/AMX"


def kernel_path_of(candidate: str) -> str:
    isa = cpu_int8_isa()
    return {
        "fp32": "fp32 aten.linear (BLAS sgemm: MKL in this torch build)",
        "fp32_onednn": "fp32 mkldnn._linear_pointwise (oneDNN sgemm, weight reordered per call)",
        "bf16": "bf16 aten.linear (oneDNN, casts at the boundary)",
        "int8_dynamic": f"torchao Int8Tensor W8A8 dynamic -> torch._int_mm s8s8 ({isa})",
        "int8_weight_only": "torchao Int8Tensor weight-only -> int8->fp32 cast + fp32 mm",
        "torch_dynamic": ("torch.ao quantize_dynamic (deprecated) -> "
                          f"quantized::linear_dynamic ({torch.backends.quantized.engine})"),
    }[candidate]


def _torchao_config(mode: str):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    return Int8DynamicActivationInt8WeightConfig() if mode == "dynamic" else Int8WeightOnlyConfig()


class CastLinear(nn.Module):
    """A linear run in bf16: input cast down, output cast back (forward(x) -> x dtype)."""

    def __init__(self, lin: nn.Linear, dtype=torch.bfloat16):
        super().__init__()
        self.inner = copy.deepcopy(lin).to(dtype)
        self.dtype = dtype

    def forward(self, x):
        return self.inner(x.to(self.dtype)).to(x.dtype)


class OneDNNLinear(nn.Module):
    """An fp32 linear run by oneDNN (``mkldnn._linear_pointwise``, the op Inductor's
    freezing packs fp32 linears into when the batch is symbolic) instead of the BLAS sgemm
    ``aten.linear`` calls: on a CPU where that BLAS is slow (MKL outside Intel's CPUs) the
    same fp32 arithmetic runs several times faster. ``forward(x) -> y`` like ``nn.Linear``;
    the weight stays a plain fp32 parameter (reordered per call: nothing opaque stored)."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        if not torch.backends.mkldnn.is_available():
            raise RuntimeError("fp32_onednn needs torch built with oneDNN (mkldnn): "
                               "torch.backends.mkldnn.is_available() is False")
        self.weight = nn.Parameter(lin.weight.detach().float().clone(), requires_grad=False)
        self.bias = None if lin.bias is None else nn.Parameter(
            lin.bias.detach().float().clone(), requires_grad=False)

    def forward(self, x):  # (..., in) -> (..., out)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def make_candidate(lin: nn.Linear, candidate: str) -> nn.Module:
    """A copy of ``lin`` executed on ``candidate``'s path."""
    V.choice("candidate", candidate, CANDIDATES)
    lin = copy.deepcopy(lin).float()
    if candidate == "fp32":
        return lin
    if candidate == "fp32_onednn":
        return OneDNNLinear(lin)
    if candidate == "bf16":
        return CastLinear(lin)
    if candidate == "torch_dynamic":
        # torch warns that quantize_dynamic is deprecated: kept as a row note, not hidden
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mod = torch.ao.quantization.quantize_dynamic(
                nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)[0]
        mod.labkit_warnings = sorted({str(w.message).splitlines()[0] for w in caught})
        return mod
    from torchao.quantization import quantize_

    holder = nn.Sequential(lin)
    quantize_(holder, _torchao_config("dynamic" if candidate == "int8_dynamic" else "weight_only"))
    return holder[0]


class AcceleratedLinear(nn.Module):
    """Runs one linear on a chosen path; ``forward(x) -> y`` like ``nn.Linear``."""

    def __init__(self, lin: nn.Linear, candidate: str, timings: dict | None = None):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.candidate = candidate
        self.inner = make_candidate(lin, candidate)
        self.kernel_path = kernel_path_of(candidate)
        self.labkit_warnings = list(getattr(self.inner, "labkit_warnings", ()))
        self.timings = dict(timings or {})

    def forward(self, x):
        return self.inner(x)

    def extra_repr(self):
        return f"{self.in_features}->{self.out_features}, path={self.candidate}"


@dataclass(frozen=True)
class Int8Config:
    """Real INT8 through torchao on every selected linear.

    mode: ``dynamic`` (int8 activations computed per call, int8 weights) or
    ``weight_only``; ``layers``/``parts``: which linears (the registry's vocabulary)."""

    mode: str = "dynamic"
    layers: tuple[int, ...] = ()
    parts: tuple[str, ...] = ("attn", "ffn")

    def __post_init__(self):
        V.choice("mode", self.mode, MODES)
        scope_fields(self)


@register(Int8Config)
def int8_(model: nn.Module, config: Int8Config) -> nn.Module:
    cand = "int8_dynamic" if config.mode == "dynamic" else "int8_weight_only"
    swap_modules(model, linear_selector(model, config.layers, config.parts, exact=True),
                 lambda n, m: AcceleratedLinear(m, cand))
    return model


@register_account(Int8Config)
def _account(table, model_cfg, config: Int8Config) -> dict:
    """The plain linears the selector takes store int8 codes plus an fp32 scale and an int8
    zero point per output row (what torchao's Int8Tensor stores): ``out (in + 5)`` bytes.
    Multiply-adds are unchanged (int8 instead of fp32). A row that neuron or head pruning
    only resized (``sparse`` with no kept count and no own storage) is a plain, smaller
    ``nn.Linear`` once deployed (compacted dense), so it is taken too."""
    def plain(r):
        return r.kind == "linear" or (r.kind == "sparse" and r.kept is None
                                      and r.weight_bytes is None)

    taken = [r for r in rows(table, config.layers, config.parts).values() if plain(r)]
    n = sum(r.weight_params for r in taken)
    for r in taken:
        r.weight_bytes, r.kind = r.out_features * (r.in_features + 5), "int8"
    q = sum(r.weight_bytes for r in taken)
    return {"quantized_params": n, "weight_bytes_fp32": 4 * n, "weight_bytes": q}


def matmul_ops(module: nn.Module, x: torch.Tensor) -> list[str]:
    """The matmul-like aten ops one forward of ``module`` really dispatches (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        module(x)
    keys = ("mm", "linear", "matmul", "addmm", "int_mm", "quantized")
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if any(k in n for k in keys))


@dataclass(frozen=True)
class AccelerateConfig:
    """Measure-and-keep: time each selected linear on every candidate path with the input
    shape it sees on an example batch ``(batch_size, seq_len)`` and keep the fastest;
    then time the whole model and revert to fp32 if it got slower."""

    batch_size: int = 1
    seq_len: int = 32
    candidates: tuple = CANDIDATES
    min_run_time: float = 0.05
    layers: tuple[int, ...] = ()
    parts: tuple[str, ...] = ("attn", "ffn")

    def __post_init__(self):
        V.integer("batch_size", self.batch_size, 1)
        V.integer("seq_len", self.seq_len, 1)
        if not self.candidates:
            raise V.LabkitConfigError("candidates", self.candidates, f"a subset of {CANDIDATES}")
        for c in self.candidates:
            V.choice("candidates", c, CANDIDATES)
        V.number("min_run_time", self.min_run_time, 0.0, lo_open=True)
        scope_fields(self)


def sites(candidates=CANDIDATES, layers: tuple = (), parts: tuple = ("attn", "ffn")):
    """The :func:`labkit.accelerate.accelerate` sites: each selected plain linear, with one
    :class:`AcceleratedLinear` per candidate; ``fp32`` is the current path."""
    for c in candidates:
        V.choice("candidates", c, CANDIDATES)
    cands = tuple(dict.fromkeys(("fp32", *candidates)))  # fp32 is what others must beat

    def for_model(model):
        select = linear_selector(model, layers, parts, exact=True)

        def site(name, m):
            if not select(name, m):
                return None
            built = {c: AcceleratedLinear(m, c) for c in cands if unavailable(c) is None}
            built["fp32"].labkit_warnings += [f"{c} not timed: {unavailable(c)}"
                                              for c in cands if unavailable(c)]
            return A.Site(name, m, built, "fp32")
        return site
    return for_model


def unavailable(candidate: str) -> str | None:
    """Why ``candidate`` cannot run on this torch build / CPU (None when it can); such a
    candidate is left out of :func:`sites` and its rows say so."""
    V.choice("candidate", candidate, CANDIDATES)
    if candidate == "fp32_onednn" and not torch.backends.mkldnn.is_available():
        return "torch.backends.mkldnn.is_available() is False"
    return None


def model_variants(model: nn.Module, names=CANDIDATES) -> dict:
    """``{name: model}`` with every linear on one path: ``fp32`` (``model`` itself), ``bf16``
    (a bf16 copy), torchao's ``int8_dynamic`` / ``int8_weight_only`` (:class:`Int8Config`), or
    every plain linear on one :class:`AcceleratedLinear` path (``torch_dynamic``,
    ``fp32_onednn``). The set the INT8 lab and ``labkit bench quant`` time side by side; a
    path :func:`unavailable` on this build is left out."""
    from .registry import apply_

    out = {}
    for name in names:
        V.choice("variant", name, CANDIDATES)
        if name == "fp32":
            out[name] = model
        elif name == "bf16":
            out[name] = copy.deepcopy(model).to(torch.bfloat16)
        elif name in ("int8_dynamic", "int8_weight_only"):
            out[name] = apply_(copy.deepcopy(model), Int8Config(name.removeprefix("int8_")))
        elif unavailable(name) is None:
            m = copy.deepcopy(model)
            swap_modules(m, linear_selector(m, exact=True),
                         lambda n, lin, name=name: AcceleratedLinear(lin, name))
            out[name] = m
    return out


def accelerate_(model: nn.Module, inputs: tuple, candidates=CANDIDATES,
                min_run_time: float = 0.05, layers: tuple = (),
                parts: tuple = ("attn", "ffn"), check_model: bool = True, margin: float = 0.05, rounds: int = 3,
                timer=None, kwargs=None, plans: dict | None = None) -> list[dict]:
    """Per layer: keep the fastest candidate measured side by side on the layer's real
    input when it beats fp32 by ``margin``; per model: revert to fp32 when the result got
    slower end to end (a warning and a recorded row). The rule and the row schema are
    :mod:`labkit.accelerate`'s, shared with sparsity; ``plans`` reuses a measurement of
    identically shaped sites (:func:`labkit.accelerate.accelerate`)."""
    V.number("margin", margin, 0.0, 1.0)
    return A.accelerate(model, inputs, sites(candidates, layers, parts),
                        margin=margin,
                        rounds=rounds, min_run_time=min_run_time, timer=timer,
                        verify=check_model, verify_rounds=max(rounds, 3), kwargs=kwargs,
                        plans=plans)


@register(AccelerateConfig)
def _accelerate_cfg(model: nn.Module, config: AccelerateConfig) -> nn.Module:
    vocab = model.cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, vocab, (config.batch_size, config.seq_len), generator=g)
    model.accelerate_report = accelerate_(model, (ids,), config.candidates,
                                          config.min_run_time, config.layers, config.parts)
    return model


# --------------------------------------------------------------------------- memory

def int8_weight_bytes(shape, structure: str = "dense", sparsity: float = 0.5, n: int = 2,
                      m: int = 4) -> dict:
    """Deployed bytes of an INT8 (N, K) weight, optionally 50%-sparse, metadata counted
    (:func:`labkit.kernels.storage.layout_bytes` at one byte a code).

    dense: N*K codes + per-row fp32 scale + int8 zero point (torchao ``Int8Tensor``);
    row / column: the pruned rows/columns are removed (compacted dense; no index, as for
    FFN neurons removed in pairs);
    nm: kept codes + ``ceil(log2 M)`` index bits per kept value (the 2:4 layout);
    unstructured: kept codes + a 1-bit-per-entry bitmap.
    """
    from ..kernels.masks import check_nm, check_sparsity, n_pruned
    from ..kernels.storage import layout_bytes

    V.choice("structure", structure, ("dense", "row", "column", "nm", "unstructured"))
    rows, cols = shape
    kept_rows = rows
    if structure in ("dense", "row", "column"):
        kr = rows - n_pruned(check_sparsity(sparsity), rows) if structure == "row" else rows
        kc = cols - n_pruned(check_sparsity(sparsity), cols) if structure == "column" else cols
        # index_bytes=0: removed as FFN neurons are, in pairs (up's rows with down's
        # columns), so no layer keeps its outer shape and none needs an index
        got, kept_rows = layout_bytes("compacted", rows, cols, element_bytes=1, index_bytes=0,
                                      kept_rows=kr, kept_cols=kc), kr
    elif structure == "nm":
        check_nm(n, m, cols)
        got = layout_bytes("nm", rows, cols, rows * cols * n // m, element_bytes=1, m=m)
    else:
        kept = rows * cols - n_pruned(check_sparsity(sparsity), rows * cols)
        got = layout_bytes("bitmap", rows, cols, kept, element_bytes=1)
    scales = kept_rows * (4 + 1)  # a per-row fp32 scale and int8 zero point
    total = got["total"] + scales
    return {"structure": structure, "codes": got["values"], "index": got["index"],
            "scales": scales, "total": total, "fp32": 4 * rows * cols,
            "ratio": total / (4 * rows * cols)}


__all__ = [
    "CANDIDATES",
    "AccelerateConfig",
    "AcceleratedLinear",
    "CastLinear",
    "Int8Config",
    "OneDNNLinear",
    "accelerate_",
    "model_variants",
    "cpu_int8_isa",
    "int8_weight_bytes",
    "kernel_path_of",
    "make_candidate",
    "matmul_ops",
    "sites",
    "unavailable",
]
