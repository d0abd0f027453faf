"""The quantization lab's steps, shared by notebook 06 (through :mod:`.quant_study`), its
widgets and the report.

Each function does one measured step and returns tidy rows (dicts): simulate a config on a
trained classifier (PTQ or QAT) or on all-MiniLM-L6-v2's embeddings, rank layers by Hessian
sensitivity (Q-BERT) and assign bits under a byte budget, time fp32 / bf16 / INT8 /
accelerated side by side, and count bytes per parameter. Fake quantization
``x_hat = s (clamp(round(x / s) + z) - z)`` measures quality only; INT8 runs for real.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch.nn.utils import parametrize

from .. import accelerate as A
from .. import measure, train
from .. import roofline as RF
from .. import validate as V
from ..techniques import apply_
from ..techniques import hessian as H
from ..techniques import int8 as I
from ..techniques import quant as Q
from ..techniques.static_int8 import StaticQLinear
from . import common as C

MODES = ("ptq", "qat")


# --------------------------------------------------------------------------- simulate

def fake_config(bits=8, granularity="channel", group_size=1, symmetric=True,
                activations=False, act_bits=8, calibration="minmax", bits_by_layer=()):
    return Q.FakeQuantConfig(bits=bits, granularity=granularity, group_size=group_size,
                             symmetric=symmetric, activations=activations, act_bits=act_bits,
                             calibration=calibration, bits_by_layer=tuple(bits_by_layer))


def quantized_copy(base, config: Q.FakeQuantConfig, calib=(), forward=None):
    """A fake-quantized copy of ``base``; activation ranges calibrated on ``calib``."""
    model = copy.deepcopy(base)
    apply_(model, config)
    if config.activations:
        Q.calibrate(model, calib, forward)
    return model


def evaluate_nli(model, work) -> dict:
    """Eval metrics of ``model`` on the :class:`~labkit.labs.workloads.Workload`'s eval set."""
    with parametrize.cached():
        return train.evaluate(model, work.eval_set)


def simulate_nli(base, work, config: Q.FakeQuantConfig, mode: str = "ptq",
                 qat_steps: int = 50, lr: float = 3e-4, calib_batches: int = 4,
                 seed: int = 0) -> tuple:
    """PTQ (calibrate, evaluate) or QAT (calibrate, fine-tune through the STE, evaluate)
    of a trained classifier (tiny or MiniLM) on its workload ``work``. Returns
    ``(model, row)``."""
    V.choice("mode", mode, MODES)
    it = work.make_batches(seed + 1)
    calib = [next(it) for _ in range(calib_batches)]
    model = quantized_copy(base, config, calib)
    if mode == "qat":
        train.fit(model, it, qat_steps, lr=lr, progress=False, seed=seed)
    q = Q.quantized_bytes(model)
    return model, {"model": "labkit", "mode": mode, "bits": config.bits,
                   "granularity": config.granularity, "group_size": config.group_size,
                   "symmetric": config.symmetric, "activations": config.activations,
                   **evaluate_nli(model, work), "bytes": q["total"],
                   "quantized_ratio": q["quantized_ratio"]}


# --------------------------------------------------------------------------- MiniLM

class MiniLM:
    """all-MiniLM-L6-v2 with a fixed batch of real sentences and its fp32 embeddings."""

    def __init__(self, n_sentences: int | None = None, max_len: int = 64):
        from .. import pretrained as PT

        self.PT = PT
        self.model, self.tok = PT.load_minilm()
        self.batch = PT.encode(self.tok, PT.sentences(n_sentences), max_len)
        with torch.no_grad():
            self.ref = PT.embed(self.model, self.batch)

    def cosine(self, model) -> dict:
        with torch.no_grad(), parametrize.cached():
            return self.PT.cosine_to(self.ref, self.PT.embed(model, self.batch))

    def simulate(self, config: Q.FakeQuantConfig) -> tuple:
        fwd = (lambda m, b: m(**b))
        model = quantized_copy(self.model, config, [self.batch], fwd)
        q = Q.quantized_bytes(model)
        return model, {"model": "minilm", "bits": config.bits,
                       "granularity": config.granularity, "group_size": config.group_size,
                       "symmetric": config.symmetric, "activations": config.activations,
                       **self.cosine(model), "bytes": q["total"],
                       "quantized_ratio": q["quantized_ratio"]}

    def hessian_loss(self):
        """Loss whose Hessian at the fp32 weights measures embedding sensitivity:
        ``sum ||e(W) - e(W0)||^2`` (Gauss-Newton ``2 J^T J``, PSD), on an eager-attention
        copy (double backward)."""
        eager, _ = self.PT.load_minilm(attn_implementation="eager")
        ref = self.ref

        def loss():
            return (self.PT.embed(eager, self.batch) - ref).pow(2).sum()

        return eager, loss


# --------------------------------------------------------------------------- Hessian

BITS = tuple(range(2, 9))  # candidate widths for mixed precision


def sensitivity(model, loss_fn, samples=8, eig_iters=0, bits=BITS,
                granularity="channel", group_size=1, symmetric=True,
                trace_group=None) -> list[dict]:
    return H.sensitivity(model, loss_fn, samples, eig_iters, bits, granularity, group_size,
                         symmetric, trace_group=trace_group)


def layer_shapes(model) -> dict:
    return {n: tuple(w.shape) for n, w in H.linear_weights(model).items()}


def mixed_assignment(rows, shapes, budget_bits: int, bits=BITS,
                     granularity="channel", group_size=1, symmetric=True) -> tuple:
    """Bits per layer under the byte budget of uniform ``budget_bits`` (same metadata)."""
    Q.check_bits("budget_bits", budget_bits)
    budget = H.budget_bytes(rows, budget_bits, granularity, group_size, symmetric, shapes)
    assign = H.assign_bits(rows, budget, bits, shapes, granularity, group_size, symmetric)
    used = sum(Q.weight_bytes(shapes[k], b, granularity, group_size, symmetric)["total"]
               for k, b in assign.items())
    return assign, budget, used


# --------------------------------------------------------------------------- accelerate

def latency_rows(model, inputs: tuple, min_run_time=0.1, label="labkit",
                 accelerate=True, kwargs=None, rounds: int = 3) -> list[dict]:
    """fp32, bf16, torchao INT8 (dynamic, weight-only), torch's deprecated dynamic INT8, fp32
    on oneDNN's sgemm and accelerate (per-layer fastest of all of them), timed side by side
    in rotated rounds
    (:func:`labkit.measure.paired`, speedup = median of per-round fp32 / variant)."""
    kwargs = kwargs or {}
    variants = I.model_variants(model, ("fp32", "bf16", "int8_dynamic", "int8_weight_only",
                                         "torch_dynamic", "fp32_onednn"))
    td = variants["torch_dynamic"]
    notes = {"torch_dynamic": "; ".join(sorted({w for m in td.modules()
                                                for w in getattr(m, "labkit_warnings", ())}))}
    chosen = None
    if accelerate:
        acc = copy.deepcopy(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = I.accelerate_(acc, inputs, min_run_time=min_run_time / 5, kwargs=kwargs)
        variants["accelerated"] = acc
        summary = A.summary(report)
        chosen = summary["chosen"] + " (reverted)" if summary["reverted"] else "+".join(
            sorted({r["chosen"] for r in report if r["layer"] != A.MODEL}))
        notes["accelerated"] = "; ".join(sorted({str(w.message)[:160] for w in caught}))

    times = C.timed(variants, inputs, "fp32", rounds=rounds, min_run_time=min_run_time,
                    kwargs=kwargs)
    shape = ",".join(str(tuple(x.shape)) for x in inputs if torch.is_tensor(x)) or \
        ",".join(f"{k}{tuple(v.shape)}" for k, v in kwargs.items() if torch.is_tensor(v))
    rows = []
    for t in times:
        k = t["variant"]
        path = I.kernel_path_of(k) if k != "accelerated" else f"per layer: {chosen}"
        rows.append({"model": label, "variant": k, "input": shape, "latency_ms": t["median_ms"],
                     "min_ms": t["min_ms"], "max_ms": t["max_ms"],
                     "speedup_vs_fp32": t["speedup"], "speedup_min": t["speedup_min"],
                     "speedup_max": t["speedup_max"], "rounds": rounds, "verdict": t["verdict"],
                     "bytes": measure.model_bytes(variants[k])["total"], "kernel_path": path,
                     "warnings": notes.get(k, "")})
    return rows


# --------------------------------------------------------------------------- roofline

ROOFLINE_PATHS = ("fp32", "fp32_onednn", "bf16", "int8_dynamic", "torch_dynamic",
                  "static_int8_kernel")
_WEIGHT_BYTES = {"fp32": 4, "fp32_onednn": 4, "bf16": 2, "int8_dynamic": 1,
                 "torch_dynamic": 1, "static_int8_kernel": 1}


def roofline_rows(d_in: int, d_out: int, batches, peak: dict, paths=ROOFLINE_PATHS,
                  rounds: int = 3, min_run_time: float = 0.05, timer=None) -> list[dict]:
    """One linear ``d_in -> d_out`` on every path at each batch size, side by side per
    batch, each row against the machine's ``peak`` (:func:`labkit.roofline.peaks`):
    achieved GFLOP/s, fraction of its kind's peak, and its roofline regime
    (:func:`labkit.roofline.regime`: memory-, dispatch- or compute-bound; bytes moved = the
    weight in its storage + fp32 input (uint8 for the static kernel) + fp32 output)."""
    from ..benchmarks.quant import kind_of

    lin = torch.nn.Linear(d_in, d_out).eval()
    rows = []
    for b in batches:
        V.integer("batch", b, 1)
        x = torch.randn(b, d_in)
        xq = torch.randint(0, 256, (b, d_in), dtype=torch.uint8)
        mods, inputs = {}, {}
        for pth in paths:
            V.choice("paths", pth, ROOFLINE_PATHS)
            if pth == "static_int8_kernel":
                mods[pth], inputs[pth] = StaticQLinear(lin, b), xq
            elif I.unavailable(pth) is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # quantize_dynamic's deprecation
                    mods[pth], inputs[pth] = I.AcceleratedLinear(lin, pth), x

        def call(mod, inp):
            def fn():
                with torch.inference_mode():
                    mod(inp)
            return fn

        p = measure.paired({k: call(m, inputs[k]) for k, m in mods.items()},
                           reference=next(iter(mods)), rounds=rounds,
                           min_run_time=min_run_time, timer=timer)
        flops = 2 * b * d_in * d_out
        for k, mod in mods.items():
            kind = kind_of(k.replace("_kernel", ""))
            moved = _WEIGHT_BYTES[k] * d_in * d_out + (1 if k.startswith("static") else 4) \
                * b * d_in + 4 * b * d_out
            sec = p.seconds[k]
            rows.append({"path": k, "batch": b, "shape": f"{d_in}->{d_out}",
                         "median_ms": sec * 1e3, "min_ms": p.spread[k][0] * 1e3,
                         "max_ms": p.spread[k][1] * 1e3, "bytes_moved": moved,
                         "kernel_path": getattr(mod, "kernel_path", k),
                         **RF.roofline(flops, sec, kind, peak),
                         **RF.regime(flops, moved, sec, kind, peak)})
    return rows


# --------------------------------------------------------------------------- memory

def memory_rows(shapes: dict, bits_list=(8, 4, 3, 2), granularity="channel", group_size=1,
                symmetric=True) -> list[dict]:
    """Bytes per parameter of the selected linears at each bit-width, metadata counted,
    and INT8 with 50% sparsity (structured rows, 2:4 with indices)."""
    n = sum(a * b for a, b in shapes.values())
    rows = [{"variant": "fp32", "bytes": 4 * n, "bytes_per_param": 4.0, "ratio_vs_fp32": 1.0}]
    for b in bits_list:
        tot = sum(Q.weight_bytes(s, b, granularity, group_size, symmetric)["total"]
                  for s in shapes.values())
        rows.append({"variant": f"{b}-bit {granularity}", "bytes": tot,
                     "bytes_per_param": tot / n, "ratio_vs_fp32": tot / (4 * n)})
    for structure in ("row", "nm"):
        tot = sum(I.int8_weight_bytes(s, structure, 0.5)["total"] for s in shapes.values())
        name = "int8 + 50% rows removed" if structure == "row" else "int8 + 2:4 (+2-bit idx)"
        rows.append({"variant": name, "bytes": tot, "bytes_per_param": tot / n,
                     "ratio_vs_fp32": tot / (4 * n)})
    return rows


__all__ = [
    "BITS",
    "MODES",
    "ROOFLINE_PATHS",
    "MiniLM",
    "StaticQLinear",
    "evaluate_nli",
    "fake_config",
    "latency_rows",
    "layer_shapes",
    "memory_rows",
    "mixed_assignment",
    "quantized_copy",
    "roofline_rows",
    "sensitivity",
    "simulate_nli",
]
