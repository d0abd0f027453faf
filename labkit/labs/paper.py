"""The seed paper's experiments at lab scale: its stack against LayerDrop, Q-BERT and SDN.

Paper: "Research on Inference and Training Acceleration of Large Language Model" (Chen,
CISAI 2024): architecture optimisation, sparsity and INT8, evaluated on MNLI and QNLI
against LayerDrop (Fan et al. 2019), Q-BERT (Shen et al. 2020) and Shallow-Deep Networks
(Kaya et al. 2019). Its claims, checked by notebook 10:

* Fig. 1: inference time falls with sparsity ``s`` in 0.1..0.5 for every method and is
  lowest for its stack;
* Fig. 2: its stack converges fastest (steps and seconds to a target accuracy) at every
  training-sample size;
* INT8 + 50% sparsity cuts memory by 50%;
* each method keeps accuracy close to the dense fine-tuned model.

Matched settings at sparsity ``s`` (a fraction of the dense model's work removed):

* ``ours``: FFN neurons pruned by weight magnitude and removed until ``s`` of the dense
  model's counted FLOPs are gone (the neuron fraction ``s / FFN share``: the architecture
  gets narrower; beyond 95% of the neurons the row says ``work_matched`` False), then INT8
  on the block linears through labkit's
  ``accelerate`` (per layer the fastest of fp32 / torchao W8A8 / torch dynamic INT8,
  reverted when the whole model got slower; the chosen paths are recorded);
* ``layerdrop``: ``round(s L)`` of the ``L`` blocks removed, evenly spread;
* ``qbert``: Hessian-aware mixed precision (Hutchinson traces, :mod:`labkit.techniques.
  hessian`) with the weight bytes of ``ours`` at the same ``s`` as budget; simulated (the
  weights are rounded to their bit-width and stored back in fp32: CPUs have no 2-4 bit
  GEMM), so its time is the dense time and its bytes are the packed size it would need;
* ``sdn``: internal classifiers after each block, exit threshold chosen on held-out data so
  the average fraction of blocks run is ``1 - s``; the blocks it then runs on the eval rows
  are reported beside the target (``blocks_on_target``: within 10%).

Every accuracy row carries ``work_removed``, the fraction of the dense model's counted FLOPs
the variant does not do (``torch.utils.flop_counter``; early exit: blocks not run), so the
operating points are compared at the work they really remove (Q-BERT removes none: its
budget is bytes).

Recovery (:func:`recovered`): the same operating point fine-tuned for a number of steps with
knowledge distillation from the dense model (:func:`labkit.recover.recover`), each method
keeping its constraint while it trains: ``ours``' removed neurons stay removed and INT8 is
placed after recovery; LayerDrop's removed blocks stay removed; Q-BERT's bits train as QAT
(fake quantization with the straight-through estimator at the Hessian bits); SDN's backbone
and exits train together (the SDN loss weights), its threshold chosen again on the held-out
rows. The paper reports its accuracies after fine-tuning; one-shot and recovered sit side by
side here at the same step budget.

Complexity: every timing is paired with the dense model (rotated rounds, median of
per-round ratios, :func:`labkit.measure.paired`); the spread over rounds is the error band.
"""
from __future__ import annotations

import copy
import itertools
import math
import warnings
from dataclasses import dataclass, field

import torch

from .. import accelerate as A
from .. import measure
from .. import model as M
from .. import train as T
from .. import validate as V
from ..cache import cached, digest
from ..techniques import hessian as H
from ..techniques import quant as Q
from .common import choice_list, float_list, int_list

METHODS = ("ours", "layerdrop", "qbert", "sdn")
INT8_PATHS = ("fp32", "int8_dynamic", "torch_dynamic")


class MethodUnavailable(RuntimeError):  # a recorded status, not a bug
    """A method's technique is not in this labkit (the row records why)."""


@dataclass
class Variant:
    method: str
    sparsity: float
    model: torch.nn.Module
    info: dict = field(default_factory=dict)  # paths chosen, bits, bytes, notes
    predict: object = None  # (ids, mask) -> logits when not model(ids, mask) (early exit)

    def logits(self, ids, mask):
        return self.predict(ids, mask) if self.predict is not None else self.model(ids, mask)


def block_linear_shapes(model: torch.nn.Module) -> dict:
    return {n: tuple(w.shape) for n, w in H.linear_weights(model).items()}


def _ffn_fraction(cfg: M.ModelConfig) -> float:
    """Share of block-linear weights in the FFN (attention: 4 d^2, FFN: 2 d d_ff)."""
    attn, ffn = 4 * cfg.d_model ** 2, 2 * cfg.d_model * cfg.d_ff
    return ffn / (attn + ffn)


MAX_NEURON_FRACTION = 0.95  # an FFN keeps some neurons: beyond this s cannot be matched


def ffn_work_share(base: M.Transformer, sample: tuple) -> float:
    """The share of ``base``'s counted FLOPs on ``sample`` (ids, mask) in its FFN hidden
    neurons: removing half of them removes half of that share
    (:func:`labkit.measure.flops`, ``torch.utils.flop_counter``)."""
    from ..techniques.sparsity import compact_neurons_

    half = copy.deepcopy(base).eval()
    compact_neurons_(half, 0.5)
    with torch.inference_mode():
        dense = measure.flops(lambda: base.eval()(*sample))
        pruned = measure.flops(lambda: half(*sample))
    return 2 * (dense - pruned) / dense


def neuron_fraction(s: float, ffn_share: float) -> float:
    """The FFN neuron fraction that removes ``s`` of the dense model's work, at most
    :data:`MAX_NEURON_FRACTION` (then the row says the work is not matched)."""
    return min(s / ffn_share, MAX_NEURON_FRACTION) if ffn_share > 0 else 0.0


def work_removed(variant, dense: torch.nn.Module, sample: tuple) -> float:
    """The fraction of ``dense``'s counted FLOPs on ``sample`` that ``variant`` does not do
    (its own prediction: for early exit, what the batch ran)."""
    if not isinstance(variant, Variant):
        variant = Variant("dense", 0.0, variant)
    with torch.inference_mode():
        full = measure.flops(lambda: dense.eval()(*sample))
        done = measure.flops(lambda: variant.logits(*sample))
    return 1 - done / full


def ours(base: M.Transformer, s: float, inputs: tuple, min_run_time: float = 0.02,
         int8: str = "accelerate", plans: dict | None = None,
         ffn_share: float | None = None) -> Variant:
    """FFN neurons pruned and removed so that ``s`` of the dense model's work goes (the
    neuron fraction ``s / ffn_share``, :func:`neuron_fraction`; ``ffn_share`` measured on
    ``inputs`` when not given), then INT8. ``int8="accelerate"``: measured
    per-layer choice (for speed; ``plans`` reuses the measured choice of an identically
    shaped model, e.g. the other task's: ``info["plan"]`` says which); ``"torchao"``:
    torchao W8A8 everywhere (for bytes, counted by :func:`labkit.measure.model_bytes`);
    ``"none"``: sparsity only."""
    from ..techniques import apply_
    from ..techniques.int8 import Int8Config, accelerate_
    from ..techniques.sparsity import compact_neurons_

    V.choice("int8", int8, ("accelerate", "torchao", "none"))
    m = copy.deepcopy(base).eval()
    share = ffn_work_share(base, inputs[:2]) if ffn_share is None else ffn_share
    frac = neuron_fraction(s, share)
    if frac > 0:  # s = 0: INT8 alone
        compact_neurons_(m, frac)
    info = {"d_ff": m.blocks[0].ffn.up.out_features, "neuron_fraction": frac,
            "work_matched": share > 0 and s / share <= MAX_NEURON_FRACTION}
    if int8 == "accelerate":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows = accelerate_(m, inputs, candidates=INT8_PATHS, min_run_time=min_run_time,
                               plans=plans)
        for w in caught:  # recorded for the rows, and still shown
            warnings.warn(w.message, w.category, stacklevel=2)
        model_row = rows[-1] if rows and rows[-1]["layer"] == "<model>" else {}
        info["model_check"] = "reverted" if model_row.get("reverted") else "kept"
        info["paths"] = ["fp32 (reverted)"] if model_row.get("reverted") else \
            sorted({r["chosen"] for r in rows if r["layer"] != "<model>"})
        notes = [str(w.message) for w in caught] + [
            w for r in rows for w in (r.get("warnings") or "").split("; ")
            if w and w != A.REUSED]  # reuse is info["plan"]
        info["warnings"] = [w[:200] for w in dict.fromkeys(notes)]
        info["plan"] = "reused" if rows and rows[-1].get("reused") else "measured"
    elif int8 == "torchao":
        apply_(m, Int8Config("dynamic"))
        info["paths"] = ["int8_dynamic"]
    return Variant("ours", s, m, info)


def qbert_sensitivity(base: M.Transformer, batch: dict, samples: int = 4,
                      bits=(2, 3, 4, 8), seed: int = 0) -> list[dict]:
    """Per block linear: Hutchinson trace of the task loss Hessian on ``batch`` and the
    HAWQ-V2 sensitivity at each bit-width (computed once per model, reused for every s)."""
    def compute():
        m = copy.deepcopy(base).eval()  # eval: no dropout noise in the Hessian
        with H._sdpa_math():  # double backward needs the math SDPA kernel
            return {"rows": H.sensitivity(m, lambda: m.loss(batch), samples=samples,
                                          bits=bits, seed=seed)}

    return _cached("qbert-hessian", {"base": digest(base), "batch": digest(batch),
                                     "samples": samples, "bits": list(bits), "seed": seed},
                   compute)["rows"]


def qbert(base: M.Transformer, s: float, rows: list[dict], bits=(2, 3, 4, 8)) -> Variant:
    """Mixed precision at the weight bytes of ``ours`` at ``s`` (simulated, see above)."""
    shapes = block_linear_shapes(base)
    int8 = H.budget_bytes(rows, 8, shapes=shapes)
    budget = int(int8 * (1 - s * _ffn_fraction(base.cfg)))
    assign = H.assign_bits(rows, budget, bits, shapes)
    m = copy.deepcopy(base).eval()
    with torch.no_grad():
        for name, b in assign.items():
            w = m.get_submodule(name).weight
            w.copy_(Q.fake_quant_tensor(w, b, True, "channel", 1))
    used = sum(Q.weight_bytes(shapes[k], b, "channel", 1, True)["total"]
               for k, b in assign.items())
    avg = sum(b * math.prod(shapes[k]) for k, b in assign.items()) / sum(
        math.prod(v) for v in shapes.values())
    # layers whose trace order the probes did not resolve (hessian.ranked_traces)
    unstable = sorted(r["layer"] for r in rows if not r.get("rank_stable", True))
    return Variant("qbert", s, m, {"avg_bits": avg, "packed_bytes": used, "budget": budget,
                                   "bits": dict(assign), "paths": ["fp32 (simulated)"],
                                   "trace_probes": rows[0].get("trace_probes"),
                                   "rank_unstable_layers": unstable})


def kept_blocks(n_layers: int, s: float) -> tuple[int, ...]:
    """``n_layers - round(s n_layers)`` evenly spread block indices (LayerDrop's rule)."""
    from ..techniques.layerdrop import evenly_spread

    keep = n_layers - round(s * n_layers)
    if keep < 1:
        raise V.LabkitConfigError("sparsity", s, f"a value that keeps a block of {n_layers}")
    return evenly_spread(n_layers, keep)


def layerdrop(base: M.Transformer, s: float) -> Variant:
    """Blocks removed for real at inference (LayerDrop's pruning, ``LayerPruneConfig``).
    The base was fine-tuned without LayerDrop: the paper's point is that such a model
    degrades when pruned; notebook 08 trains with it."""
    from ..techniques import apply_
    from ..techniques.layerdrop import LayerPruneConfig

    m = copy.deepcopy(base).eval()
    keep = kept_blocks(base.cfg.n_layers, s)
    apply_(m, LayerPruneConfig(keep=keep))
    return Variant("layerdrop", s, m, {"kept": list(keep), "paths": ["fp32"]})


def recovered(method: str, base: M.Transformer, s: float, workload, steps: int, lr: float,
              cache: dict, sample: tuple, min_run_time: float = 0.02,
              teacher_cache=None) -> Variant:
    """``method``'s variant at ``s`` recovered for ``steps`` steps of ``workload``'s training
    batches at ``lr``, distilled from ``base`` (see the module docstring). ``cache``: the
    :func:`sweep`'s (Q-BERT's Hessian rows, SDN's trained exits and held-out rows, INT8
    plans); ``teacher_cache``: a :class:`labkit.recover.TeacherCache` of ``base`` shared
    across methods (the same batches: the teacher's logits are computed once)."""
    from ..recover import RecoverConfig, recover
    from ..techniques import apply_
    from ..techniques.int8 import accelerate_
    from ..techniques.sparsity import compact_neurons_

    V.choice("method", method, METHODS)
    V.integer("recover_steps", steps, 1)
    config = RecoverConfig(steps=steps, lr=lr, warmup=0.1 if steps >= 10 else 0.0)
    if method == "ours":
        m = copy.deepcopy(base).eval()
        if "ffn_share" not in cache:
            cache["ffn_share"] = ffn_work_share(base, (cache.get("int8_sample") or sample)[:2])
        frac = neuron_fraction(s, cache["ffn_share"])
        if frac > 0:
            compact_neurons_(m, frac)
    elif method == "layerdrop":
        m = layerdrop(base, s).model
    elif method == "qbert":
        from ..techniques.quant import FakeQuantConfig

        bits = qbert(base, s, cache["qbert_rows"]).info["bits"]
        m = copy.deepcopy(base).eval()
        apply_(m, FakeQuantConfig(granularity="channel", bits_by_layer=tuple(bits.items())))
    else:  # the exits were trained on a frozen backbone: now both train (SDN's joint form)
        m = copy.deepcopy(cache["sdn_model"]).eval()
        for p in m.parameters():
            p.requires_grad_(True)
    res = recover(m, base, workload, config, cache=teacher_cache)
    info = {"recover_steps": res.steps, "recover_seconds": res.seconds}
    if method == "ours":
        rows = accelerate_(m, cache.get("int8_sample") or sample, candidates=INT8_PATHS,
                           min_run_time=min_run_time, plans=cache.get("int8_plans"))
        info["paths"] = sorted({r["chosen"] for r in rows if r["layer"] != "<model>"})
    if method == "sdn":
        from ..techniques.early_exit import exit_logits

        v = sdn(base, s, m, cache["sdn_held_out"], exit_logits(m, cache["sdn_held_out"]))
        v.info.update(info)
        return v
    return Variant(method, s, m, info)


def sdn_exits(base: M.Transformer, batches, steps: int, lr: float = 1e-3) -> M.Transformer:
    """A copy of ``base`` with SDN internal classifiers after every block but the last,
    trained on the frozen fine-tuned backbone (Kaya et al.'s frozen-backbone variant) with
    the SDN loss weights."""
    from ..techniques import apply_
    from ..techniques.early_exit import EarlyExitConfig, SDNStrategy, freeze_backbone_

    m = copy.deepcopy(base)
    apply_(m, EarlyExitConfig())
    freeze_backbone_(m)
    first = next(batches)
    batches = itertools.chain([first], batches)

    def compute():
        T.fit(m, batches, steps=steps, lr=lr, strategy=SDNStrategy(steps), progress=False)
        m.executor.internal = []  # the last pass's IC logits hold the graph (no deepcopy)
        return {"heads": m.executor.state_dict()}

    saved = _cached("sdn-exits", {"base": digest(base), "batch": digest(first),
                                  "steps": steps, "lr": lr}, compute)
    m.executor.load_state_dict(saved["heads"])
    return m.eval()


def _cached(kind: str, args: dict, compute) -> dict:
    """``compute()`` once per machine (:func:`labkit.cache.cached`): the Hessian traces and
    SDN's exit heads are what a cached run of notebook 10 skips; everything it measures is
    measured again."""
    return cached(f"paper-{kind}", args, compute).value


def sdn(base: M.Transformer, s: float, trained: M.Transformer, held_out: dict,
        logits: tuple | None = None) -> Variant:
    """Early exit at the threshold ``q`` whose average blocks run on ``held_out`` is closest
    to ``(1 - s) L`` (the exit rule simulated on the exits' logits, then run for real).
    ``logits``: ``exit_logits(trained, held_out)`` when already computed (they do not depend
    on ``s``: one pass per task serves every sparsity)."""
    from ..techniques.early_exit import exit_logits, predict, simulate

    L = base.cfg.n_layers
    m = copy.deepcopy(trained).eval()
    z, y = logits if logits is not None else exit_logits(m, held_out)
    grid = [1 - 10 ** (-k / 4) for k in range(1, 25)] + [1.0]
    sims = [simulate(z, y, q, m.executor.exits, L) for q in grid]
    best = min(sims, key=lambda r: abs(r["blocks"] - (1 - s) * L))
    m.executor.q = best["q"]
    return Variant("sdn", s, m, {"q": best["q"], "blocks_expected": best["blocks"],
                                 "paths": ["fp32 early exit"]},
                   predict=lambda ids, mask: predict(m, ids, mask)[0])


def _call(variant, ids, mask):
    def run():
        with torch.inference_mode():
            variant.logits(ids, mask)
    return run


def time_variants(dense, variants: dict, sample: tuple, rounds: int = 3,
                  min_run_time: float = 0.05, timer=None) -> list[dict]:
    """Paired timing of every variant against ``dense`` on ``sample`` (ids, mask)."""
    fns = {"dense": _call(Variant("dense", 0.0, dense), *sample),
           **{k: _call(v, *sample) for k, v in variants.items()}}
    p = measure.paired(fns, reference="dense", rounds=rounds, min_run_time=min_run_time,
                       timer=timer)
    return p.rows()


@torch.no_grad()
def accuracy(variant, eval_set) -> float:
    """Accuracy of a :class:`Variant` (or a model) on a dict of tensors or a list of
    batches, through its own prediction (early exit included)."""
    if not isinstance(variant, Variant):
        variant = Variant("dense", 0.0, variant)
    variant.model.eval()
    chunks = eval_set if isinstance(eval_set, list) else [
        {k: v[i: i + 256] for k, v in eval_set.items()}
        for i in range(0, len(eval_set["labels"]), 256)]
    right = total = 0
    for b in chunks:
        pred = variant.logits(b["input_ids"], b.get("padding_mask")).argmax(-1)
        right += int((pred == b["labels"]).sum())
        total += len(b["labels"])
    return right / total


BLOCKS_TOLERANCE = 0.10  # early exit's blocks run on the eval rows vs its target


def operating_point(variant: Variant, dense, sample: tuple, eval_set) -> dict:
    """Where ``variant`` really operates: ``work_removed`` (counted FLOPs on ``sample``,
    :func:`work_removed`), and for early exit the mean blocks run on the eval rows against
    its target ``(1 - s) L`` (``blocks_on_target``: within :data:`BLOCKS_TOLERANCE`)."""
    out = {"work_removed": work_removed(variant, dense, sample)}
    if "neuron_fraction" in variant.info:
        out.update(neuron_fraction=variant.info["neuron_fraction"],
                   work_matched=variant.info["work_matched"])
    if variant.method == "sdn":
        from ..techniques.early_exit import predict

        L = dense.cfg.n_layers
        chunks = eval_set if isinstance(eval_set, list) else [
            {k: v[i: i + 256] for k, v in eval_set.items()}
            for i in range(0, len(eval_set["labels"]), 256)]
        with torch.inference_mode():
            run = torch.cat([predict(variant.model, b["input_ids"], b.get("padding_mask"))[1]
                             for b in chunks]).float()
        target = (1 - variant.sparsity) * L
        out.update(blocks_run_eval=float(run.mean()), blocks_target=target,
                   blocks_on_target=abs(float(run.mean()) - target) <= BLOCKS_TOLERANCE * target,
                   work_removed=1 - float(run.mean()) / L)
    return out


def memory(model, sample: tuple) -> dict:
    """Whole-model bytes (parameters and buffers, packed INT8 counted with its scales) and
    peak inference memory (those bytes plus the peak of live activations)."""
    weights = measure.model_bytes(model)["total"]
    act = measure.peak_activation_bytes(model, *sample)
    return {"model_bytes": weights, "activation_peak_bytes": act,
            "inference_peak_bytes": weights + act}


TASKS = ("nli", "qnli", "mnli", "synthetic-nli", "synthetic-qnli")


def setup(params: dict) -> dict:
    """Notebook 10's parameters past their types (:func:`labkit.notebook.declared`): the
    lists parsed (``tasks``, ``methods``, ``sparsities``, ``sample_sizes``) and every range
    checked before any work, each error naming the parameter, its value and what is allowed."""
    from ..classifiers import MODELS

    V.choice("model", params["model"], MODELS)
    s_list = list(float_list("sparsities", params["sparsities"], 0.0, 1.0, True, True))
    if params["operating_sparsity"] not in s_list:
        raise V.LabkitConfigError("operating_sparsity", params["operating_sparsity"],
                                  f"one of the swept sparsities {s_list}")
    for name, lo, hi in (("baseline_steps", 0, None), ("hessian_samples", 1, 64),
                         ("sdn_steps", 1, None), ("conv_steps", 1, None),
                         ("conv_eval_every", 1, None), ("recover_steps", 1, None)):
        V.integer(name, params[name], lo, hi)
    V.integer("n_eval", params["n_eval"], 8)
    V.number("conv_lr", params["conv_lr"], 0.0, 1.0, lo_open=True)
    V.number("target_accuracy", params["target_accuracy"], 0.0, 1.0)
    return {"tasks": list(choice_list("tasks", params["tasks"], TASKS)),
            "methods": list(choice_list("methods", params["methods"], METHODS)),
            "sparsities": s_list,
            "sample_sizes": list(int_list("sample_sizes", params["sample_sizes"], 8))}


def shaped_like(sample: tuple, like: tuple) -> tuple:
    """``sample`` (ids (B, N), padding mask (B, N), True at padding) with its columns cut or
    right-padded to ``like``'s ``N``: a task's own rows in the shape of another workload
    (the shape, not the text, decides which INT8 kernel is faster)."""
    from ..data import PAD

    ids, mask = sample
    n, have = like[0].shape[1], ids.shape[1]
    if have >= n:
        return ids[:, :n], mask[:, :n]
    extra = n - have
    return (torch.cat([ids, ids.new_full((len(ids), extra), PAD)], 1),
            torch.cat([mask, mask.new_ones((len(mask), extra))], 1))


def build(method: str, base, s: float, sample: tuple, batch: dict, cache: dict,
          min_run_time: float = 0.02, hessian_samples: int = 4) -> Variant:
    """The ``method``'s variant of ``base`` at sparsity ``s`` (see the module docstring).
    ``cache`` keeps per-model work across sparsities: the Hessian sensitivity, the SDN
    exits (``cache["sdn_train"]``: a callable training them, its model kept) and their
    held-out logits, and ``cache["int8_plans"]`` (INT8 choices of measured shapes)."""
    from ..techniques.early_exit import exit_logits

    V.choice("method", method, METHODS)
    if method == "ours":
        if "ffn_share" not in cache:  # on the timed batch: one share for every task
            cache["ffn_share"] = ffn_work_share(base, (cache.get("int8_sample") or sample)[:2])
        return ours(base, s, cache.get("int8_sample") or sample, min_run_time,
                    plans=cache.get("int8_plans"), ffn_share=cache["ffn_share"])
    if method == "qbert":
        if "qbert_rows" not in cache:
            cache["qbert_rows"] = qbert_sensitivity(base, batch, samples=hessian_samples)
        return qbert(base, s, cache["qbert_rows"])
    if method == "layerdrop":
        return layerdrop(base, s)
    if "sdn_model" not in cache:
        if "sdn_train" not in cache:
            raise MethodUnavailable("SDN needs training batches (sweep(sdn_batches=...))")
        cache["sdn_model"] = cache["sdn_train"]()
        cache["sdn_logits"] = exit_logits(cache["sdn_model"], cache["sdn_held_out"])
    return sdn(base, s, cache["sdn_model"], cache["sdn_held_out"], cache["sdn_logits"])


def sweep(base, sparsities, methods, sample: tuple, batch: dict, eval_set, task: str,
          rounds: int = 3, min_run_time: float = 0.05, timed: bool = True, timer=None,
          sdn_batches=None, sdn_steps: int = 100, held_out: dict | None = None,
          hessian_samples: int = 4, plans: dict | None = None,
          int8_sample: tuple | None = None, cache: dict | None = None):
    """Fig. 1 and the accuracy at every point on one task: for each ``s``, every method's
    variant of ``base`` evaluated on ``eval_set`` and (``timed``) timed side by side with the
    dense model. A method whose technique is missing gives an ``unavailable`` row per ``s``
    and a warning.

    SDN's exits are trained once (``sdn_steps`` steps on ``sdn_batches``) and its threshold
    chosen on ``held_out`` (training rows, never the eval set). Q-BERT's Hessian traces use
    ``hessian_samples`` Hutchinson probes. ``plans`` (a dict shared across calls, e.g.
    across tasks): "ours"'s INT8 paths are measured once per distinct set of layer and
    input shapes and reused where they repeat (the other task's model at the same ``s``);
    each variant's ``info["plan"]`` says "measured" or "reused". ``int8_sample``: the
    (ids, mask) "ours"' INT8 paths are chosen on (default ``sample``; the notebook gives
    every task its own rows :func:`shaped_like` the timed workload).

    ``cache``: a dict the sweep keeps its per-model work in (Q-BERT's Hessian rows, SDN's
    trained exits), given so :func:`recovered` can reuse it.

    Returns (timing rows, accuracy rows, variants {(method, s): Variant})."""
    times, accs, variants = [], [], {}
    cache = {} if cache is None else cache
    cache.update({"int8_plans": plans, "int8_sample": int8_sample})
    if sdn_batches is not None and held_out is not None:
        cache["sdn_train"] = lambda: sdn_exits(base, sdn_batches, sdn_steps)
        cache["sdn_held_out"] = held_out
    accs.append({"method": "dense", "sparsity": 0.0, "task": task,
                 "accuracy": accuracy(base, eval_set)})
    for s in float_list("sparsities", sparsities, 0.0, 1.0, True, True):
        built = {}
        for method in methods:
            try:
                built[method] = build(method, base, s, sample, batch, cache,
                                       hessian_samples=hessian_samples)
            except MethodUnavailable as e:
                warnings.warn(f"{method}: {e}", stacklevel=2)
                accs.append({"method": method, "sparsity": s, "task": task,
                             "accuracy": float("nan"), "status": f"unavailable: {e}"})
                if timed:
                    times.append({"method": method, "sparsity": s,
                                  "status": f"unavailable: {e}"})
        if timed:
            for r in time_variants(base, built, sample, rounds, min_run_time, timer):
                info = built[r["variant"]].info if r["variant"] in built else {}
                paths = info.get("paths", ["fp32"])
                r.update(method=r["variant"], sparsity=s, status="measured",
                         simulated=any("simulated" in p for p in paths), paths=",".join(paths),
                         warnings="; ".join(info.get("warnings", [])))
                times.append(r)
        for method, v in built.items():
            variants[(method, s)] = v
            accs.append({"method": method, "sparsity": s, "task": task,
                         "accuracy": accuracy(v, eval_set), "status": "measured",
                         **operating_point(v, base, sample[:2], eval_set),
                         "warnings": "; ".join(v.info.get("warnings", [])),
                         **({"int8_plan": v.info["plan"]} if "plan" in v.info else {}),
                         **({"hessian_unstable_layers": len(v.info["rank_unstable_layers"])}
                            if "rank_unstable_layers" in v.info else {})})
    return times, accs, variants
