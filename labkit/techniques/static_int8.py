"""Whole-model static INT8 on the CPU: PT2E export, torchao's ``X86InductorQuantizer``,
activation ranges calibrated on training rows, ``torch.compile`` with Inductor.

Paper/tool: PyTorch 2 Export quantization with the x86 Inductor backend (torchao
``torchao.quantization.pt2e``: ``prepare_pt2e`` / ``convert_pt2e`` with
``X86InductorQuantizer``), the path behind PyTorch's reported 2.97x geomean INT8 speed-up
on x86 (Sapphire Rapids, AMX), beside dynamic INT8 (:mod:`labkit.techniques.int8`).

Idea: dynamic INT8 quantizes every linear's input at run time (a max pass, a divide, a
round, a rescale around each GEMM) and keeps everything between the linears in fp32.
Static INT8 fixes every activation's range once, from calibration batches, so the whole
graph is known ahead of time: ``torch.export`` captures it, the quantizer annotates the
linears (per-channel symmetric int8 weights, per-tensor affine uint8 activations with a
histogram observer), calibration records the ranges, ``convert_pt2e`` leaves
quantize/dequantize pairs around the int8 ops, and Inductor with freezing fuses each
``dequant -> linear -> (gelu) -> quant`` into one oneDNN ``qlinear_pointwise`` u8s8 kernel
with the weight prepacked:

    x_q = clamp(round(x / s_x) + z_x, 0, 255)            s_x, z_x fixed by calibration
    y   = s_x s_w[o] (x_q - z_x) @ W_q[o]^T + b[o]       int32 accumulate, W_q per channel

Like with like: it is compared with the *same* exported fp32 graph compiled the same way
(:func:`compiled_fp32`: Inductor, freezing, symbolic shapes). Symbolic shapes serve two
ends: one graph serves every batch shape (calibration, evaluation on length-sorted batches)
and Inductor then packs fp32 linears for oneDNN (with static shapes it calls MKL's sgemm,
which on a non-Intel CPU runs well below the machine's fp32 peak: ``labkit bench peak``).

Calibration size: stated as rows and non-padding tokens (``calibration_rows``,
``calibration_tokens``) on every model and row. Calibration batches come from the training
rows, never the eval rows.

Unavailable, never a silent fallback: a backend other than ``x86_inductor`` is an error; a
CPU without VNNI/AMX (the quantizer's full 0..255 activation range needs VNNI's u8s8
arithmetic) or a torch without oneDNN marks the path unavailable (:func:`unavailable`,
an error from :func:`static_int8`, a row and a warning from the model-level autotuner).

Complexity: one export, one calibration pass per batch, one Inductor compile (tens of
seconds on 2 cores for the small presets; recompiles only for a new grad mode or rank).
"""
from __future__ import annotations

import copy
import time
import warnings

import torch
from torch import nn

from .. import validate as V
from .int8 import cpu_int8_isa

BACKENDS = ("x86_inductor",)
INT8_ISAS = ("AMX", "AVX512-VNNI")
KERNEL_PATH = ("static INT8 (PT2E X86InductorQuantizer, per-channel int8 weights, "
               "calibrated per-tensor uint8 activations) -> Inductor + freezing -> "
               "onednn.qlinear_pointwise u8s8 ({isa})")
FP32_PATH = "fp32, same exported graph -> Inductor + freezing (symbolic shapes: oneDNN linear)"


class StaticInt8Unavailable(RuntimeError):
    """The static INT8 path cannot run on this CPU / torch build (the message says why)."""


def unavailable(backend: str = "x86_inductor") -> str | None:
    """Why static INT8 cannot run here (None when it can). An unknown ``backend`` is a
    :class:`~labkit.validate.LabkitConfigError`."""
    V.choice("backend", backend, BACKENDS)
    if not torch.backends.mkldnn.is_available():
        return "torch is built without oneDNN (torch.backends.mkldnn.is_available() is False)"
    isa = cpu_int8_isa()
    if isa not in INT8_ISAS:
        return (f"the CPU has {isa}: x86 Inductor's static INT8 needs AVX512-VNNI or AMX "
                "(its u8s8 kernels and the quantizer's full 0..255 activation range)")
    return None


# --------------------------------------------------------------------------- inputs

def as_args(batch) -> tuple:
    """``(ids, padding_mask or None, token_type_ids or None)`` from a batch dict (the
    training batches' ``input_ids``/``padding_mask``/``token_type_ids``) or a tuple of
    positional model arguments."""
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise V.LabkitConfigError("batch", sorted(batch), "a dict with 'input_ids' "
                                      "(and optionally 'padding_mask', 'token_type_ids')")
        return (batch["input_ids"], batch.get("padding_mask"), batch.get("token_type_ids"))
    if isinstance(batch, torch.Tensor):
        return (batch, None, None)
    batch = tuple(batch)
    if not 1 <= len(batch) <= 3:
        raise V.LabkitConfigError("batch", f"a tuple of {len(batch)}",
                                  "(ids,), (ids, padding_mask) or (ids, padding_mask, "
                                  "token_type_ids)")
    return batch + (None,) * (3 - len(batch))


def owned(args: tuple) -> tuple:
    """The tensors of ``args`` with storage of their own: a column slice (what trimming a
    padded batch gives) is a view whose base has another width, and an exported graph
    guards on the base's size, so it would refuse (or recompile for) every trimmed batch."""
    return tuple(a.clone() if isinstance(a, torch.Tensor) and a._base is not None else a
                 for a in args)


def check_batch(name: str, args: tuple, cfg, pattern: tuple | None = None) -> tuple:
    """Validate one ``(ids, mask, token types)`` against the model config ``cfg``: 2-D
    integer ids in ``[0, vocab_size)`` no longer than ``max_len``, a bool mask and integer
    token types of the same shape (types below ``type_vocab_size``), and the same present
    / absent inputs as ``pattern``. Errors name ``name`` (e.g. ``calibration[3]``)."""
    ids, mask, tt = args
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (
            torch.int64, torch.int32):
        got = (f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor)
               else type(ids).__name__)
        raise V.LabkitConfigError(f"{name} ids", got, "a 2-D (batch, seq) int64 tensor")
    if ids.numel() == 0:
        raise V.LabkitConfigError(f"{name} ids", tuple(ids.shape), "a non-empty batch")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise V.LabkitConfigError(f"{name} ids", f"values in [{lo}, {hi}]",
                                  f"token ids in [0, {cfg.vocab_size - 1}] (the model's "
                                  "vocab_size): a batch from another tokenizer?")
    if ids.shape[1] > cfg.max_len:
        raise V.LabkitConfigError(f"{name} ids", tuple(ids.shape),
                                  f"at most max_len={cfg.max_len} tokens")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                             or mask.shape != ids.shape):
        got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else mask
        raise V.LabkitConfigError(f"{name} padding_mask", got,
                                  f"a bool tensor shaped like the ids {tuple(ids.shape)}")
    if tt is not None:
        if not isinstance(tt, torch.Tensor) or tt.shape != ids.shape or tt.is_floating_point():
            raise V.LabkitConfigError(f"{name} token_type_ids", getattr(tt, "shape", tt),
                                      f"an integer tensor shaped like the ids "
                                      f"{tuple(ids.shape)}")
        if cfg.type_vocab_size and int(tt.max()) >= cfg.type_vocab_size:
            raise V.LabkitConfigError(f"{name} token_type_ids", int(tt.max()),
                                      f"segment ids below type_vocab_size="
                                      f"{cfg.type_vocab_size}")
    present = (mask is not None, tt is not None)
    if pattern is not None and present != pattern:
        want = ", ".join(n for n, p in zip(("padding_mask", "token_type_ids"), pattern) if p)
        raise V.LabkitConfigError(f"{name} inputs", _present(present),
                                  f"the inputs the model was exported with: ids"
                                  f"{', ' + want if want else ''}")
    return args


def _present(present) -> str:
    return "ids" + "".join(f", {n}" for n, p in zip(("padding_mask", "token_type_ids"),
                                                     present) if p)


def check_calibration(calibration, cfg, pattern: tuple) -> list[tuple]:
    """A non-empty list of batches, each checked by :func:`check_batch`."""
    if isinstance(calibration, (dict, torch.Tensor)) or not hasattr(calibration, "__iter__"):
        raise V.LabkitConfigError("calibration", type(calibration).__name__,
                                  "a list of batches from the training rows")
    batches = [check_batch(f"calibration[{i}]", as_args(b), cfg, pattern)
               for i, b in enumerate(calibration)]
    if not batches:
        raise V.LabkitConfigError("calibration", "[]", "at least one batch of training rows")
    return batches


def calibration_size(batches: list[tuple]) -> dict:
    """Rows and non-padding tokens in the calibration batches."""
    rows = sum(int(b[0].shape[0]) for b in batches)
    tokens = sum(int(b[0].numel() if b[1] is None else (~b[1]).sum()) for b in batches)
    return {"calibration_batches": len(batches), "calibration_rows": rows,
            "calibration_tokens": tokens}


# --------------------------------------------------------------------------- build

def export_model(model: nn.Module, example: tuple) -> torch.fx.GraphModule:
    """``torch.export`` of ``model(ids, mask, token types)`` with batch and sequence length
    symbolic (``Dim.AUTO``: specialised only where the model requires it)."""
    from torch.export import Dim, export

    dims = tuple(None if a is None else {0: Dim.AUTO, 1: Dim.AUTO} for a in example)
    with torch.no_grad():
        return export(model.eval(), example, dynamic_shapes=dims).module()


def _compile(graph: nn.Module, example: tuple):
    """Inductor with freezing (weights as constants: prepacked, quantize ops folded),
    symbolic shapes; compiled now on ``example`` so timing never includes it."""
    import torch._inductor.config as ic

    t0 = time.perf_counter()
    fn = torch.compile(graph, dynamic=True)
    with torch.inference_mode(), ic.patch(freezing=True):  # the mode every call runs in
        fn(*example)
    return fn, time.perf_counter() - t0


class CompiledModel(nn.Module):
    """A compiled, inference-only graph with the model's forward signature
    ``forward(ids, padding_mask=None, token_type_ids=None) -> logits`` (the inputs present
    at export must be present, the absent ones absent). ``kernel_path`` says what runs;
    :meth:`stored_tensors` is what :func:`labkit.measure.model_bytes` counts: the tensors
    the graph reads (int8 weights, scales, fp32 embeddings, norms, biases), not the unused
    fp32 copies a converted graph still carries."""

    def __init__(self, graph: nn.Module, compiled, cfg, pattern: tuple, kernel_path: str,
                 info: dict):
        super().__init__()
        object.__setattr__(self, "graph", graph)  # not a submodule: train() must not reach
        object.__setattr__(self, "compiled", compiled)
        self.cfg, self.pattern, self.kernel_path = cfg, pattern, kernel_path
        self.info = dict(info)
        self.eval()

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError(f"{type(self).__name__} is a compiled inference graph: it "
                               "cannot train (recover the eager model, then rebuild)")
        return super().train(False)

    def forward(self, ids, padding_mask=None, token_type_ids=None):  # (B, N) -> (B, labels)
        import torch._inductor.config as ic

        present = (padding_mask is not None, token_type_ids is not None)
        if present != self.pattern:
            raise V.LabkitConfigError("inputs", _present(present),
                                      f"what the model was exported with: "
                                      f"{_present(self.pattern)}")
        # always inference mode (a call under no_grad or grad would recompile), freezing on
        # in case a new rank recompiles (the INT8 graph only lowers with it); a plain flag
        # set (~6 us) rather than config.patch (~30 us a call)
        prev = ic.freezing
        ic.freezing = True
        try:
            with torch.inference_mode():
                return self.compiled(*owned((ids, padding_mask, token_type_ids)))
        finally:
            ic.freezing = prev

    def loss(self, batch: dict) -> torch.Tensor:
        """Cross-entropy of an encoder batch, as :meth:`labkit.model.Transformer.loss`."""
        logits = self(batch["input_ids"], batch.get("padding_mask"),
                      batch.get("token_type_ids"))
        return torch.nn.functional.cross_entropy(logits, batch["labels"])

    def stored_tensors(self) -> list[torch.Tensor]:
        out, seen = [], set()
        for node in self.graph.graph.nodes:
            if node.op == "get_attr":
                t = self.graph
                for part in node.target.split("."):
                    t = getattr(t, part)
                if isinstance(t, torch.Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
        return out

    def extra_repr(self) -> str:
        return self.kernel_path


def _example(model, example_inputs) -> tuple:
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise TypeError(f"{type(model).__name__} has no .cfg: static INT8 takes labkit's "
                        "Transformer (ids, padding_mask, token_type_ids)")
    if cfg.kind != "encoder":
        raise V.LabkitConfigError("model", cfg.kind, "an encoder classifier (kind='encoder')")
    args = owned(check_batch("example_inputs", as_args(example_inputs), cfg))
    return cfg, args, (args[1] is not None, args[2] is not None)


def compiled_fp32(model: nn.Module, example_inputs) -> CompiledModel:
    """The fp32 reference for static INT8, like with like: the same export, compiled the
    same way (Inductor, freezing, symbolic shapes)."""
    cfg, ex, pattern = _example(model, example_inputs)
    graph = export_model(copy.deepcopy(model), ex)
    fn, seconds = _compile(graph, ex)
    return CompiledModel(graph, fn, cfg, pattern, FP32_PATH, {"compile_seconds": seconds})


def check_keep_fp32(model: nn.Module, keep_fp32) -> tuple[str, ...]:
    """``keep_fp32`` as a tuple of names of ``model``'s ``nn.Linear`` modules (an error
    names each one that is not)."""
    if isinstance(keep_fp32, str) or not hasattr(keep_fp32, "__iter__"):
        raise V.LabkitConfigError("keep_fp32", keep_fp32, "a list of linear module names")
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for n in keep_fp32:
        if n not in linears:
            raise V.LabkitConfigError("keep_fp32", n, f"names of the model's linears, e.g. "
                                      f"{sorted(linears)[:3]}")
    return tuple(keep_fp32)


def quantized_graph(model: nn.Module, batches: list[tuple], example: tuple,
                    keep_fp32: tuple = ()) -> torch.fx.GraphModule:
    """The exported graph of ``model`` quantized by ``X86InductorQuantizer`` (static,
    per-channel weights) with ranges calibrated on ``batches`` (checked tuples), every
    linear in ``keep_fp32`` left fp32; not compiled (its outputs are the INT8 numerics:
    what :func:`rank_fp32_fallback` compares)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    graph = export_model(copy.deepcopy(model), example)
    quantizer = xiq.X86InductorQuantizer().set_global(
        xiq.get_default_x86_inductor_quantization_config())  # static, per-channel weights
    for name in keep_fp32:
        quantizer.set_module_name_qconfig(name, None)
    with warnings.catch_warnings():  # observers warn per batch about reduce_range: see doc
        warnings.simplefilter("ignore", UserWarning)
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for i, b in enumerate(batches):
                try:
                    prepared(*b)
                except Exception as e:  # a shape the export specialised away
                    raise V.LabkitConfigError(
                        f"calibration[{i}]", tuple(b[0].shape),
                        f"batches the exported graph accepts ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]})") from e
        return convert_pt2e(prepared)


def static_int8(model: nn.Module, calibration, example_inputs,
                backend: str = "x86_inductor", keep_fp32=()) -> CompiledModel:
    """``model`` (labkit's encoder classifier, left unchanged) quantized to static INT8 and
    compiled; returns a :class:`CompiledModel` with the model's forward signature.

    ``calibration``: a list of batches from the training rows (dicts as the training
    batches, or ``(ids, padding_mask, token_type_ids)`` tuples) that set the activation
    ranges; ``example_inputs``: the batch the model is compiled on (the timed batch),
    which fixes which inputs are present; ``keep_fp32``: names of linears left in fp32
    (mixed precision, e.g. from :func:`rank_fp32_fallback`). ``info`` states the
    calibration size (batches, rows, tokens), the linears kept fp32 and the export,
    calibration and compile seconds."""
    why = unavailable(backend)
    if why is not None:
        raise StaticInt8Unavailable(f"static INT8 ({backend}) is unavailable here: {why}")
    keep = check_keep_fp32(model, keep_fp32)
    cfg, ex, pattern = _example(model, example_inputs)
    batches = check_calibration(calibration, cfg, pattern)
    t0 = time.perf_counter()
    converted = quantized_graph(model, batches, ex, keep)
    t2 = time.perf_counter()
    fn, seconds = _compile(converted, ex)
    info = {**calibration_size(batches), "keep_fp32": list(keep),
            "quantize_seconds": t2 - t0, "compile_seconds": seconds, "backend": backend}
    path = KERNEL_PATH.format(isa=cpu_int8_isa()) + (
        f"; {len(keep)} linear(s) kept fp32" if keep else "")
    return CompiledModel(converted, fn, cfg, pattern, path, info)


def ffn_down_names(model: nn.Module) -> list[str]:
    """Every block's FFN down projection (``blocks.<i>.ffn.down``) that is a linear."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("blocks.") and n.endswith("ffn.down")]


def rank_fp32_fallback(model: nn.Module, calibration, check, example_inputs,
                       names=None) -> list[dict]:
    """Which linears, kept in fp32, bring static INT8 closest to fp32.

    In BERT-like encoders the FFN's output carries the few very large activations that one
    per-tensor INT8 range cannot hold (*Understanding and Overcoming the Challenges of
    Efficient Transformer Quantization*, Bondarenko, Nagel, Blankevoort), so ``names``
    defaults to every block's FFN down projection. For each name: the model quantized with
    only that linear fp32, and on ``check`` (batches of training rows the calibration did
    not use: labels are not needed) the KL divergence of its logits from fp32's and the
    fraction of predictions it flips. Rows ``{"name", "kl", "flipped"}`` sorted by KL,
    lowest (the most helpful to keep) first; the row ``name=None`` is everything
    quantized. Cost: one export and calibration per name, no compile."""
    names = check_keep_fp32(model, ffn_down_names(model) if names is None else names)
    cfg, ex, pattern = _example(model, example_inputs)
    batches = check_calibration(calibration, cfg, pattern)
    checks = [check_batch(f"check[{i}]", as_args(b), cfg, pattern)
              for i, b in enumerate(check)]
    if not checks:
        raise V.LabkitConfigError("check", "[]", "at least one batch of training rows")

    def logits(m):
        with torch.inference_mode():
            return torch.cat([m(*b) for b in checks]).float()

    ref = logits(model.eval())
    return sorted((_divergence(logits(quantized_graph(model, batches, ex, keep)), ref, keep)
                   for keep in [(), *((n,) for n in names)]), key=lambda r: r["kl"])


def _divergence(out: torch.Tensor, ref: torch.Tensor, keep: tuple) -> dict:
    """KL of logits ``out`` from fp32's ``ref`` and the fraction of flipped predictions."""
    kl = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1),
                                    log_target=True, reduction="batchmean")
    return {"name": keep[-1] if keep else None, "keep_fp32": list(keep), "kl": float(kl),
            "flipped": float((out.argmax(-1) != ref.argmax(-1)).float().mean())}


def choose_fp32_fallback(model: nn.Module, calibration, check, example_inputs, ranking,
                         kl_fraction: float = 0.5) -> tuple[list[str], list[dict]]:
    """The fewest linears to keep fp32: in :func:`rank_fp32_fallback`'s order (only those
    that alone bring INT8 closer to fp32 than everything quantized), add one at a time
    until the KL from fp32 on ``check`` is at most ``kl_fraction`` of all-INT8's. Returns
    the names and one row per prefix tried (``keep_fp32``, ``kl``, ``flipped``); when no
    prefix gets there, every helpful linear is kept (the last row says how close)."""
    V.number("kl_fraction", kl_fraction, 0.0, 1.0, lo_open=True)
    base = next((r for r in ranking if r["name"] is None), None)
    if base is None:
        raise V.LabkitConfigError("ranking", "no row with name=None",
                                  "rank_fp32_fallback's rows (they include all-INT8)")
    helpful = [r["name"] for r in ranking if r["name"] is not None and r["kl"] < base["kl"]]
    cfg, ex, pattern = _example(model, example_inputs)
    batches = check_calibration(calibration, cfg, pattern)
    checks = [check_batch(f"check[{i}]", as_args(b), cfg, pattern)
              for i, b in enumerate(check)]
    with torch.inference_mode():
        ref = torch.cat([model.eval()(*b) for b in checks]).float()
    tried = []
    for k in range(1, len(helpful) + 1):
        g = quantized_graph(model, batches, ex, tuple(helpful[:k]))
        with torch.inference_mode():
            out = torch.cat([g(*b) for b in checks]).float()
        tried.append(_divergence(out, ref, tuple(helpful[:k])))
        if tried[-1]["kl"] <= kl_fraction * base["kl"]:
            break
    return (tried[-1]["keep_fp32"] if tried else []), tried


class StaticQLinear(nn.Module):
    """The kernel one linear of a static INT8 graph runs: oneDNN ``qlinear_pointwise`` u8s8
    on an input already quantized (the previous op's fused quantize makes it), a prepacked
    per-channel int8 weight, fp32 out. ``forward(x_u8) -> y``."""

    kernel_path = "onednn.qlinear_pointwise u8s8 (static INT8 graph's linear; input given u8)"

    def __init__(self, lin: nn.Linear, batch: int):
        super().__init__()
        w = lin.weight.detach()
        self.w_scale = w.abs().amax(1).clamp_min(1e-12) / 127  # (out,)
        codes = torch.round(w / self.w_scale[:, None]).clamp(-128, 127).to(torch.int8)
        self.packed = torch.ops.onednn.qlinear_prepack(codes, [batch, w.shape[1]])
        self.w_zp = torch.zeros(w.shape[0], dtype=torch.long)
        self.bias = lin.bias.detach() if lin.bias is not None else None

    def forward(self, xq):  # (B, in) uint8 -> (B, out) fp32
        return torch.ops.onednn.qlinear_pointwise(
            xq, 0.05, 128, self.packed, self.w_scale, self.w_zp, self.bias, 1.0, 0,
            torch.float32, "none", [], "")


__all__ = [
    "BACKENDS",
    "CompiledModel",
    "StaticInt8Unavailable",
    "StaticQLinear",
    "as_args",
    "calibration_size",
    "check_batch",
    "check_calibration",
    "compiled_fp32",
    "check_keep_fp32",
    "choose_fp32_fallback",
    "export_model",
    "ffn_down_names",
    "quantized_graph",
    "rank_fp32_fallback",
    "static_int8",
    "unavailable",
]
