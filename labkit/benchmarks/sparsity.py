"""Sparsity benchmark: every structure on every execution path against the dense matmul.

One fp32 linear ``y = x W^T`` on ``(T, in)`` token activations, CPU, inference, at transformer
FFN shapes (BERT-base ``up`` 3072 x 768 and ``down`` 768 x 3072) and a square 1024 x 1024,
over sparsity 0.1 ... 0.99, for

* ``unstructured`` on ``csr`` (torch.sparse_csr, ``W_csr @ x^T``),
* ``block`` (32 x 32) on ``bsr`` (torch.sparse_bsr) and ``block-gathered-dense`` (labkit's
  bucketed gather + batched dense matmul, :class:`~labkit.kernels.
  BlockGatheredLinear`),
* ``row`` (whole output neurons) on ``compacted-dense`` (the kept rows as a smaller matrix),
* ``nm`` (2:4, 1:4, 1:8) on ``nm-simulated``: torch's semi-structured kernels are CUDA only,
  so on a CPU the rows say so and carry no speedup.

Side by side (:func:`labkit.measure.paired`): each round times dense and every path once,
order rotated between rounds; a speedup is the median over rounds of the per-round ratio
dense / path (times are medians of ``torch.utils.benchmark``), with its min and max. Bytes are values plus index
metadata per path (int64 indices, as torch stores them). The break-even sparsity of a path is
the lowest swept sparsity from which on it is at least as fast as dense.

Targets (side by side in one run): compacted FFN at 50% neuron sparsity >= 1.8x the dense
FFN; BSR 32 x 32 at 90% >= 2.5x dense (the block-gathered path reported next to it);
after :func:`~labkit.techniques.sparsity.accelerate` a pruned model is never below 0.95x the
dense model at any sparsity; weight memory at 90% unstructured, indices counted, vs dense.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .. import accelerate as A
from .. import kernels as K
from .. import measure
from .. import validate as V
from ..kernels import masks as MK
from ..model import MLP, ModelConfig, Transformer
from ..techniques import registry as R
from ..techniques import sparsity as S
from . import peak as P

NAME = "sparsity"
SHAPES = ((3072, 768), (768, 3072), (1024, 1024))  # (out, in)
TOKENS = 256
SPARSITIES = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
STRUCTURE_PATHS = {"unstructured": ("csr",), "block": ("bsr", "block-gathered-dense"),
                   "row": ("compacted-dense",)}
NM_PATTERNS = ((2, 4), (1, 4), (1, 8))


def _masked_linear(out_f: int, in_f: int, structure: str, sparsity: float, block: int,
                   n: int = 2, m: int = 4, gen=None) -> nn.Linear:
    lin = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=gen) * 0.02)
        mask = MK.make_mask(lin.weight, structure, sparsity, n=n, m=m, block=block)
        lin.weight.mul_(mask)
    return lin.eval().requires_grad_(False)


def _bytes(mod: nn.Module, path: str, weight, block: int, n: int, m: int) -> int:
    if path == "nm-simulated":
        return K.storage_bytes(weight, "nm", n=n, m=m)["total"]
    return measure.model_bytes(mod)["total"]


def _call(mod, *inputs):
    def run():
        with torch.inference_mode():
            mod(*inputs)
    return run


def _time_layers(mods: dict, x, rounds: int, min_run_time: float) -> measure.Paired:
    """Every module on ``x`` side by side (:func:`labkit.measure.paired`), dense first."""
    return measure.paired({k: _call(v, x) for k, v in mods.items()}, reference="dense",
                          rounds=rounds, min_run_time=min_run_time)


def sweep(shapes=SHAPES, sparsities=SPARSITIES, tokens: int = TOKENS,
          structures=("unstructured", "block", "row", "nm"), block: int = 32,
          rounds: int = 3, min_run_time: float = 0.05, threads: int | None = None,
          seed: int = 0, peak: dict | None = None) -> list[dict]:
    """Tidy rows, one per (shape, structure, sparsity, path), dense included, each with the
    machine's fp32 peak beside it (:func:`labkit.benchmarks.peak.with_peak`, on the FLOPs
    the path really does: ``2 T nnz``; ``peak`` default: measured at ``threads``)."""
    V.integer("tokens", tokens, 1)
    V.integer("rounds", rounds, 1)
    for st in structures:
        V.choice("structure", st, (*STRUCTURE_PATHS, "nm"))
    for s in sparsities:
        MK.check_sparsity(s)
    with measure.num_threads(threads):
        peak = peak if peak is not None else P.bench_peaks(False)
        rows = []
        gen = torch.Generator().manual_seed(seed)
        for out_f, in_f in shapes:
            MK.check_block(block, (out_f, in_f))
            x = torch.randn(tokens, in_f, generator=gen)  # (T, in)
            dense = _masked_linear(out_f, in_f, "unstructured", 0.0, block, gen=gen)
            points = [(st, s, 2, 4) for s in sparsities for st in structures if st != "nm"]
            if "nm" in structures:
                points += [("nm", 1 - n / m, n, m) for n, m in NM_PATTERNS if in_f % m == 0]
            for sp in sorted({p[1] for p in points}):
                mods, meta = {"dense": dense}, {"dense": ("dense", "dense", 2, 4, dense.weight)}
                for st, s, n, m in points:
                    if s != sp:
                        continue
                    lin = _masked_linear(out_f, in_f, st, s, block, n, m, gen)
                    ref = lin(x)
                    paths = ("nm-simulated",) if st == "nm" else STRUCTURE_PATHS[st]
                    for p in paths:
                        mod = K.linear_path(lin, p, block=block, n=n, m=m)
                        torch.testing.assert_close(mod(x), ref, atol=1e-4, rtol=1e-3)
                        mods[f"{st}/{p}"] = mod
                        meta[f"{st}/{p}"] = (st, p, n, m, lin.weight)
                times = _time_layers(mods, x, rounds, min_run_time)
                dense_bytes = out_f * in_f * 4
                for key, sec in times.seconds.items():
                    st, p, n, m, w = meta[key] if key != "dense" else meta["dense"]
                    nnz = int(w.count_nonzero())
                    measured = p != "nm-simulated"
                    b = _bytes(mods[key], p, w, block, n, m)
                    rows.append({
                        "shape": f"{out_f}x{in_f}", "d_out": out_f, "d_in": in_f,
                        "tokens": tokens, "structure": st,
                        "pattern": f"{n}:{m}" if st == "nm" else (f"{block}x{block}"
                                                                  if st == "block" else ""),
                        "sparsity": sp if key != "dense" else 0.0,
                        "sweep_sparsity": sp, "path": p,
                        "median_ms": sec * 1e3, "min_ms": times.spread[key][0] * 1e3,
                        "max_ms": times.spread[key][1] * 1e3, "rounds": rounds,
                        "speedup": times.ratio[key] if measured else None,
                        "speed_measured": measured,
                        "gflops_effective": 2 * tokens * out_f * in_f / sec / 1e9,
                        "gflops_useful": 2 * tokens * nnz / sec / 1e9,
                        "bytes": b, "bytes_vs_dense": b / dense_bytes,
                        "threads": torch.get_num_threads(),
                        "note": K.NM_CPU_NOTE if not measured else ""})
                    P.with_peak(rows[-1], 2 * tokens * nnz, "fp32", peak,
                                times.ratio[key] if measured and key != "dense" else None,
                                reference_flops=2 * tokens * out_f * in_f)
        return rows


def break_even(rows: list[dict]) -> list[dict]:
    """Per (shape, structure, path): the lowest swept sparsity from which on the path is at
    least as fast as dense (None when it never is, or when its speed is not measured)."""
    groups: dict = {}
    for r in rows:
        if r["path"] == "dense":
            continue
        groups.setdefault((r["shape"], r["structure"], r["path"]), []).append(r)
    out = []
    for (shape, st, p), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["sparsity"])
        be = None
        if all(r["speed_measured"] for r in rs):
            for i, r in enumerate(rs):
                if all(q["speedup"] >= 1.0 for q in rs[i:]):
                    be = r["sparsity"]
                    break
        out.append({"shape": shape, "structure": st, "path": p, "break_even_sparsity": be,
                    "max_speedup": max((r["speedup"] or 0.0) for r in rs) if be is not None
                    or rs[0]["speed_measured"] else None,
                    "note": "" if rs[0]["speed_measured"] else K.NM_CPU_NOTE})
    return out


# --------------------------------------------------------------------------- targets
def ffn_compaction(d_model: int = 768, d_ff: int = 3072, tokens: int = TOKENS,
                   sparsity: float = 0.5, rounds: int = 5, min_run_time: float = 0.1):
    """Dense GELU MLP vs the same MLP with ``sparsity`` of its hidden neurons removed."""
    torch.manual_seed(0)
    holder = nn.Module()  # one block holding the FFN: what SparsityConfig's parts select
    holder.blocks = nn.ModuleList([nn.Module()])
    holder.blocks[0].ffn = MLP(d_model, d_ff).eval()
    dense = copy.deepcopy(holder.blocks[0].ffn).requires_grad_(False)
    x = torch.randn(tokens, d_model)
    R.apply_(holder, S.SparsityConfig(sparsity=sparsity, structure="neuron"))
    with torch.no_grad():
        ref = holder.blocks[0].ffn(x)
    comp = S.convert(holder, "compacted-dense").blocks[0].ffn
    torch.testing.assert_close(comp(x), ref, atol=1e-4, rtol=1e-3)
    t = _time_layers({"dense": dense, "compacted": comp}, x, rounds, min_run_time)
    return t.ratio["compacted"], t, comp.up.out_features


def block_sparse(out_f: int = 3072, in_f: int = 768, tokens: int = TOKENS,
                 sparsity: float = 0.9, block: int = 32, rounds: int = 5,
                 min_run_time: float = 0.1):
    gen = torch.Generator().manual_seed(0)
    lin = _masked_linear(out_f, in_f, "block", sparsity, block, gen=gen)
    dense = _masked_linear(out_f, in_f, "unstructured", 0.0, block, gen=gen)
    x = torch.randn(tokens, in_f, generator=gen)
    mods = {"dense": dense, "bsr": K.BSRLinear(lin, block),
            "block-gathered-dense": K.BlockGatheredLinear(lin, block)}
    t = _time_layers(mods, x, rounds, min_run_time)
    return {k: t.ratio[k] for k in mods if k != "dense"}, t


def accelerate_floor(model_cfg: ModelConfig, sparsities, structures, batch: int = 4,
                     seq: int = 128, rounds: int = 3, min_run_time: float = 0.02,
                     final_rounds: int = 9, final_min_run_time: float = 0.1):
    """For each (structure, sparsity): prune, :func:`accelerate`, then time the accelerated
    model against its dense original side by side. Returns rows."""
    rows = []
    ids = torch.randint(0, model_cfg.vocab_size, (batch, seq),
                        generator=torch.Generator().manual_seed(0))
    for st in structures:
        for s in sparsities:
            torch.manual_seed(0)
            dense = Transformer(model_cfg).eval().requires_grad_(False)
            model = copy.deepcopy(dense)
            extra = {"block": 32} if st == "block" else {}
            R.apply_(model, S.SparsityConfig(sparsity=s, structure=st, **extra))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                acc = S.accelerate(model, ids, rounds=rounds, min_run_time=min_run_time)
            t = measure.paired({"dense": _call(dense, ids), "accelerated": _call(model, ids)},
                               rounds=final_rounds, min_run_time=final_min_run_time)
            paths = S.chosen_paths(acc)
            notes = sorted({str(w.message) for w in caught} | {
                r["warnings"] for r in acc if r.get("warnings")})
            rows.append({"structure": st, "sparsity": s,
                         "speedup": t.ratio["accelerated"],
                         "dense_ms": t.seconds["dense"] * 1e3,
                         "accelerated_ms": t.seconds["accelerated"] * 1e3,
                         "reverted": bool(A.summary(acc)["reverted"]),
                         "warnings": "; ".join(notes),
                         "paths": ", ".join(sorted(set(paths.values()))),
                         "paths_per_layer": paths})
    return rows


def run(quick: bool = False) -> dict:
    """The benchmark contract: ``{"name", "rows", "targets", "env"}``.

    Full: targets at one thread and at the current thread count (an oversubscribed
    multi-threaded GEMM on a shared machine can be slower than a single-threaded one, and
    would then decide the ratio), the sweep at one thread."""
    if quick:
        shapes, spars, tokens, rounds, mrt = ((256, 128),), (0.5, 0.9), 32, 2, 0.005
        ffn = {"d_model": 128, "d_ff": 512, "tokens": 32, "rounds": 2, "min_run_time": 0.005}
        bs = {"out_f": 256, "in_f": 128, "tokens": 32, "rounds": 2, "min_run_time": 0.005}
        acc_cfg = ModelConfig(d_model=64, d_ff=256, n_layers=1, n_heads=2, vocab_size=64)
        acc = {"sparsities": (0.5,), "structures": ("unstructured",), "batch": 2, "seq": 16,
                   "rounds": 1, "min_run_time": 0.002, "final_rounds": 2, "final_min_run_time": 0.002}
        thread_counts = (1,)
    else:
        shapes, spars, tokens, rounds, mrt = SHAPES, SPARSITIES, TOKENS, 3, 0.05
        ffn, bs = {}, {}
        acc_cfg = ModelConfig(d_model=256, d_ff=1024, n_layers=2, n_heads=4, vocab_size=1024)
        acc = {"sparsities": (0.1, 0.5, 0.9, 0.99), "structures": ("unstructured", "block",
                                                               "neuron")}
        thread_counts = tuple(sorted({1, torch.get_num_threads()}))
    qnote = "quick mode: small shapes, not the contract; " if quick else ""
    with measure.num_threads(1):
        pk = P.bench_peaks(quick)
    rows = [{"table": "sweep", **r} for r in sweep(shapes, spars, tokens, rounds=rounds,
                                                    min_run_time=mrt, threads=1, peak=pk)]
    rows += [{"table": "break_even", **r} for r in break_even(
        [r for r in rows if r["table"] == "sweep"])]
    targets = []
    before = torch.get_num_threads()
    try:
        for th in thread_counts:
            torch.set_num_threads(th)
            sp, t, kept = ffn_compaction(**ffn)
            rows.append({"table": "target_ffn", "threads": th, "speedup": sp, "kept_neurons":
                         kept, **{f"{k}_ms": v * 1e3 for k, v in t.seconds.items()}})
            targets.append({"target": f"compacted FFN at 50% neuron sparsity vs dense FFN "
                            f"(threads={th})", "measured": sp, "required": 1.8, "unit": "x",
                            "met": bool(sp >= 1.8),
                            "note": qnote + "GELU MLP d=768, d_ff=3072 -> 1536, T=256 tokens, "
                            "fp32, paired median of per-round ratios"})
            sps, t = block_sparse(**bs)
            rows.append({"table": "target_bsr", "threads": th, **{f"speedup_{k}": v for k, v
                                                                  in sps.items()},
                         **{f"{k}_ms": v * 1e3 for k, v in t.seconds.items()}})
            for k, v in sps.items():
                targets.append({
                    "target": f"block-sparse 32x32 at 90% vs dense, path {k} (threads={th})",
                    "measured": v, "required": 2.5, "unit": "x", "met": bool(v >= 2.5),
                    "note": qnote + "linear 3072x768 (FFN up), T=256, fp32; "
                    + ("torch.sparse_bsr @ dense (CPU)" if k == "bsr" else
                       "labkit's bucketed gather + bmm on the same 32x32 blocks")})
            arows = accelerate_floor(acc_cfg, **acc)
            rows += [{"table": "target_accelerate", "threads": th,
                      **{k: v for k, v in r.items() if k != "paths_per_layer"}}
                     for r in arows]
            worst = min(arows, key=lambda r: r["speedup"])
            targets.append({
                "target": f"accelerated pruned model never below 0.95x dense at any sparsity "
                          f"(threads={th})",
                "measured": worst["speedup"], "required": 0.95, "unit": "x",
                "met": bool(worst["speedup"] >= 0.95),
                "note": qnote + f"minimum over {len(arows)} (structure, sparsity) configs, worst "
                f"{worst['structure']} at {worst['sparsity']} (paths: {worst['paths']}); "
                f"encoder d={acc_cfg.d_model}, d_ff={acc_cfg.d_ff}, FFN pruned"})
    finally:
        torch.set_num_threads(before)
    gen = torch.Generator().manual_seed(0)
    out_f, in_f = (3072, 768) if not quick else (256, 128)
    w = _masked_linear(out_f, in_f, "unstructured", 0.9, 32, gen=gen).weight
    dense_b = K.storage_bytes(w, "dense")["total"]
    csr = K.storage_bytes(w, "csr")
    csr32 = K.storage_bytes(w, "csr", index_bytes=4)
    rows.append({"table": "target_memory", "dense_bytes": dense_b, "csr_values": csr["values"],
                 "csr_index_int64": csr["index"], "csr_total_int64": csr["total"],
                 "csr_total_int32": csr32["total"]})
    targets.append({
        "target": "weight memory at 90% unstructured (CSR, int64 indices counted) vs dense "
                  "fp32: dense bytes / sparse bytes",
        "measured": dense_b / csr["total"], "required": 1.0, "unit": "x",
        "met": bool(dense_b / csr["total"] > 1.0),
        "note": qnote + f"{out_f}x{in_f}: dense {dense_b} B, CSR {csr['total']} B "
        f"({csr['values']} values + {csr['index']} index); with int32 indices "
        f"{csr32['total']} B ({dense_b / csr32['total']:.2f}x smaller)"})
    return {"name": NAME, "rows": rows, "targets": targets, "env": measure.environment()}


__all__ = [
    "NAME",
    "NM_PATTERNS",
    "SHAPES",
    "SPARSITIES",
    "STRUCTURE_PATHS",
    "accelerate_floor",
    "block_sparse",
    "break_even",
    "ffn_compaction",
    "run",
    "sweep",
]
