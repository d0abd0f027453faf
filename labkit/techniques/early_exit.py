"""Early exit: Shallow-Deep Networks, calibrated by temperature scaling (The Right Tool).

Papers: Kaya, Hong & Dumitras, "Shallow-Deep Networks: Understanding and Mitigating Network
Overthinking" (ICML 2019); Schwartz, Stanovsky, Swayamdipta, Dodge & Smith, "The Right Tool
for the Job: Matching Model and Instance Complexities" (ACL 2020).

Idea: put an internal classifier (IC) after some blocks. Train them jointly with the
backbone, the weight of each IC's loss growing over training (SDN), or on a frozen trained
backbone. At inference, each sample stops at the first classifier confident enough: its
maximum softmax probability reaches a threshold ``q``. Easy samples leave after a few blocks,
hard ones run the whole model. The Right Tool adds one temperature per classifier, fitted on
held-out data, so "confidence >= q" means the same at every exit.

Equations. SDN loss at training progress ``t`` in [0, 1], IC ``k`` after block ``i_k`` of
``L`` (depth fraction ``tau_k = (i_k + 1) / L``)::

    loss = CE(final) + sum_k w_k(t) CE(IC_k),   w_k(t) = 0.01 + (tau_k - 0.01) t

Exit rule with temperatures ``T_k`` (1 when uncalibrated)::

    exit at the first k with  max_c softmax(z_k / T_k)_c >= q,   never when q = 1

(a float32 softmax rounds to exactly 1.0 once the top logit leads by ~17, so ``>= 1`` alone
would still exit: ``q = 1`` is the documented "run every block").

``T_k = argmin_T NLL(softmax(z_k / T), y)`` on held-out rows. Expected calibration error,
15 equal-width confidence bins: ``ECE = sum_b |B_b|/n |acc(B_b) - conf(B_b)|``.

Complexity: a sample exiting after ``i + 1`` blocks costs ``(i + 1) / L`` of the block FLOPs
plus its ICs (``O(d^2 + d C)`` each, on one token). Batched inference really stops computing
exited samples: the active rows shrink at every exit (per-sample masks, not a padded batch).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import validate as V
from ..accounting import Linear
from ..model import BlockContext, BlockExecutor
from ..train import StepStrategy
from .registry import register, register_account


@dataclass(frozen=True)
class EarlyExitConfig:
    """Internal classifiers after blocks ``exits`` (``None``: after every block but the
    last, whose classifier is the model's own head); exit threshold ``q`` in (0, 1]."""

    exits: tuple | None = None
    q: float = 0.9

    def __post_init__(self):
        if self.exits is not None:
            V.layer_indices("exits", self.exits)
            object.__setattr__(self, "exits", tuple(self.exits))
        V.number("q", self.q, 0.0, 1.0, lo_open=True)

    def check(self, model_cfg) -> None:
        """The one model check (``apply_`` and ``expected`` both call it)."""
        self.exits_for(model_cfg)

    def exits_for(self, model_cfg) -> tuple[int, ...]:
        """The exit blocks in a model of ``model_cfg`` (checked): an encoder, indices in
        ``[0, n_layers - 2]``, strictly increasing."""
        if model_cfg.kind != "encoder":
            raise V.LabkitConfigError("model kind", model_cfg.kind, "'encoder' (exits classify)")
        n = model_cfg.n_layers
        exits = tuple(range(n - 1)) if self.exits is None else self.exits
        for i in exits:
            if not 0 <= i < n - 1:
                raise V.LabkitConfigError("exits", self.exits,
                                          f"block indices in [0, {n - 2}] (the last "
                                          f"block's exit is the model's head)")
        if list(exits) != sorted(set(exits)):
            raise V.LabkitConfigError("exits", self.exits, "strictly increasing block indices")
        return exits


def confident(conf: torch.Tensor, q: float) -> torch.Tensor:
    """Which confidences exit at threshold ``q``: ``conf >= q``, and none at ``q = 1``."""
    return conf >= q if q < 1.0 else torch.zeros_like(conf, dtype=torch.bool)


class ExitHead(nn.Module):
    """An internal classifier shaped like the encoder's own head: norm, pooled [CLS], linear."""

    def __init__(self, d_model: int, num_labels: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.pooler = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, num_labels)

    def forward(self, x):  # (B, N, D) -> (B, C)
        return self.out(torch.tanh(self.pooler(self.norm(x[:, 0]))))


class EarlyExitExecutor(BlockExecutor):
    """Runs blocks with internal classifiers after ``exits``.

    * ``exiting`` False (training, calibration): every block runs and ``internal`` holds
      each IC's logits (B, C) of the latest pass.
    * ``exiting`` True (eval): per-sample exits at threshold ``q``; after the forward pass
      ``exit_logits`` (B, C), ``exited`` (B,) and ``blocks_run`` (B,) say where each sample
      left. Use :func:`predict`, which combines them with the model's final head.
    """

    # plain attributes a saved model keeps besides its tensors (labkit.save / labkit.load)
    saved_attributes = ("q", "calibrated", "exiting")

    def __init__(self, n_layers: int, d_model: int, num_labels: int, exits: tuple, q: float):
        super().__init__()
        self.exits = tuple(exits)
        self.heads = nn.ModuleList(ExitHead(d_model, num_labels) for _ in exits)
        self.n_layers = n_layers
        self.q = V.number("q", q, 0.0, 1.0, lo_open=True)
        # one temperature per IC plus the final head (The Right Tool)
        self.register_buffer("temperature", torch.ones(len(exits) + 1))
        self.calibrated = False  # apply the temperatures when True
        self.exiting = False
        self.internal: list[torch.Tensor] = []

    def temps(self) -> torch.Tensor:
        return self.temperature if self.calibrated else torch.ones_like(self.temperature)

    def forward(self, blocks: nn.ModuleList, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        where = {b: k for k, b in enumerate(self.exits)}
        if not self.exiting or self.training:
            self.internal = []
            for i, block in enumerate(blocks):
                x = ctx.call(block, x)  # (B, N, D)
                if i in where:
                    self.internal.append(self.heads[where[i]](x))  # (B, C)
            return x
        b = x.shape[0]
        temps = self.temps()
        out = x.clone()  # rows of exited samples keep their state at exit (unused)
        self.exit_logits = x.new_zeros(b, self.heads[0].out.out_features) if self.heads \
            else x.new_zeros(b, 0)
        self.exited = torch.zeros(b, dtype=torch.bool)
        self.blocks_run = torch.full((b,), len(blocks), dtype=torch.long)
        active = torch.arange(b)
        mask = ctx.key_padding_mask
        sub = ctx
        for i, block in enumerate(blocks):
            x = sub.call(block, x)  # (B_active, N, D)
            if i not in where or i == len(blocks) - 1:
                continue
            logits = self.heads[where[i]](x) / temps[where[i]]  # (B_active, C)
            done = confident(logits.softmax(-1).amax(-1), self.q)  # (B_active,)
            if not bool(done.any()):
                continue
            rows = active[done]
            self.exit_logits[rows] = logits[done]
            self.exited[rows] = True
            self.blocks_run[rows] = i + 1
            out[rows] = x[done]
            stay = ~done
            active, x = active[stay], x[stay]  # exited samples stop being computed
            sub = BlockContext(None if mask is None else mask[active], ctx.rope)
            if len(active) == 0:
                return out
        out[active] = x
        return out

    def extra_repr(self) -> str:
        return f"exits={self.exits}, q={self.q}, calibrated={self.calibrated}"


@register(EarlyExitConfig)
def _apply(model, config: EarlyExitConfig):
    cfg = model.cfg
    exits = config.exits_for(cfg)
    device = next(model.parameters()).device
    model.set_executor(EarlyExitExecutor(cfg.n_layers, cfg.d_model, cfg.num_labels, exits,
                                         config.q).to(device))
    return model


@register_account(EarlyExitConfig)
def _account(table, cfg, config: EarlyExitConfig) -> dict:
    """Each internal classifier (norm, pooler d -> d, out d -> C on the [CLS] token) adds
    its parameters, and the temperatures a buffer. FLOPs are the no-exit worst case: every
    block and every classifier runs; a sample that exits early costs less."""
    exits = config.exits_for(cfg)
    d, c = cfg.d_model, cfg.num_labels
    for i in exits:
        table.head[f"executor.heads.{i}.pooler"] = Linear(d, d, True, 1)
        table.head[f"executor.heads.{i}.out"] = Linear(d, c, True, 1)
    table.other_params += 2 * d * len(exits)  # the LayerNorms
    table.buffer_bytes += 4 * (len(exits) + 1)  # one temperature per exit and the head
    return {"exits": list(exits)}


def sdn_weights(exits: tuple, n_layers: int, progress: float) -> list[float]:
    """SDN's IC loss weights at training progress in [0, 1]: 0.01 growing to depth fraction."""
    t = min(max(progress, 0.0), 1.0)
    return [0.01 + ((i + 1) / n_layers - 0.01) * t for i in exits]


class SDNStrategy(StepStrategy):
    """Forward + backward with the SDN loss (final CE plus weighted IC CEs); the weights grow
    with ``state.step / total_steps``. With a frozen backbone only the ICs get gradients."""

    def __init__(self, total_steps: int):
        self.total_steps = V.integer("steps", total_steps, 1)

    def loss(self, model, batch, state):
        ex = model.executor
        logits = model(batch["input_ids"], batch.get("padding_mask"))  # (B, C)
        y = batch["labels"]
        final = F.cross_entropy(logits, y)
        w = sdn_weights(ex.exits, ex.n_layers, state.step / self.total_steps)
        return final + sum(wk * F.cross_entropy(z, y) for wk, z in zip(w, ex.internal))


def freeze_backbone_(model) -> int:
    """Only the exit heads train; returns the number of trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.executor.heads.parameters():
        p.requires_grad_(True)
    return sum(p.numel() for p in model.executor.heads.parameters())


@torch.no_grad()
def exit_logits(model, tensors, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw logits of every exit on every row, ``(K + 1, n, C)`` (the ICs, then the final
    head), and the labels ``(n,)``: one full pass, nothing exits. ``tensors``: a dict of
    equal-length tensors, or a list of such batches (e.g. length-trimmed ones)."""
    if isinstance(tensors, list):
        parts = [exit_logits(model, b, batch_size) for b in tensors]
        return torch.cat([z for z, _ in parts], 1), torch.cat([y for _, y in parts])
    ex = model.executor
    was, ex.exiting = ex.exiting, False
    model.eval()
    outs = []
    try:
        for i in range(0, len(tensors["input_ids"]), batch_size):
            final = model(tensors["input_ids"][i:i + batch_size],
                          tensors["padding_mask"][i:i + batch_size])
            outs.append(torch.stack([*ex.internal, final]))
    finally:
        ex.exiting = was
    return torch.cat(outs, 1), tensors["labels"]


def fit_temperatures(logits: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """One temperature per exit minimising held-out NLL of ``softmax(z / T)`` (LBFGS on
    ``log T``). ``logits``: (K, n, C)."""
    log_t = torch.zeros(logits.shape[0], requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")
    y = labels.expand(logits.shape[0], -1).reshape(-1)

    def closure():
        opt.zero_grad()
        z = logits / log_t.exp()[:, None, None]
        loss = F.cross_entropy(z.reshape(-1, z.shape[-1]), y, reduction="sum")
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return log_t.detach().exp()


def calibrate_(model, tensors: dict) -> torch.Tensor:
    """Fit the executor's temperatures on held-out ``tensors`` and turn calibration on."""
    z, y = exit_logits(model, tensors)
    t = fit_temperatures(z, y)
    model.executor.temperature.copy_(t)
    model.executor.calibrated = True
    return t


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict:
    """ECE and the reliability diagram (per-bin confidence, accuracy, count) of ``probs``
    (n, C)."""
    V.integer("bins", bins, 1)
    conf, pred = probs.max(-1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    rows, ece = [], 0.0
    for lo, hi in itertools.pairwise(edges):
        sel = (conf > lo) & (conf <= hi)
        n = int(sel.sum())
        if n:
            acc, cf = float(correct[sel].mean()), float(conf[sel].mean())
            ece += n / len(labels) * abs(acc - cf)
            rows.append({"lo": float(lo), "hi": float(hi), "count": n, "accuracy": acc,
                         "confidence": cf})
    return {"ece": ece, "bins": rows}


def simulate(logits: torch.Tensor, labels: torch.Tensor, q: float, exits: tuple,
             n_layers: int, temperature: torch.Tensor | None = None) -> dict:
    """Accuracy and mean blocks executed of the exit rule on precomputed exit logits
    ``(K + 1, n, C)``; the measured per-sample runs (:func:`predict`) must agree with it."""
    V.number("q", q, 0.0, 1.0, lo_open=True)
    k1, _n, _ = logits.shape
    t = torch.ones(k1) if temperature is None else temperature
    probs = (logits / t[:, None, None]).softmax(-1)  # (K + 1, n, C)
    done = confident(probs.amax(-1), q)  # (K + 1, n)
    done[-1] = True  # the final head always answers
    first = done.float().argmax(0)  # (n,)
    depth = torch.tensor([*(i + 1 for i in exits), n_layers], dtype=torch.float)
    pred = probs.argmax(-1).gather(0, first[None]).squeeze(0)
    return {"q": q, "accuracy": float((pred == labels).float().mean()),
            "blocks": float(depth[first].mean()), "exit_index": first}


@torch.no_grad()
def predict(model, ids: torch.Tensor, padding_mask: torch.Tensor | None = None):
    """Per-sample early exit for real: returns ``(logits (B, C), blocks_run (B,))``; logits
    of exited samples come from their IC, the others from the final head (temperature-scaled
    when calibrated)."""
    model.eval()
    ex = model.executor
    was, ex.exiting = ex.exiting, True
    try:
        final = model(ids, padding_mask) / ex.temps()[-1]  # (B, C)
    finally:
        ex.exiting = was
    if ex.exit_logits.shape[-1]:
        final = torch.where(ex.exited[:, None], ex.exit_logits, final)
    return final, ex.blocks_run.clone()


def choose_q(logits: torch.Tensor, labels: torch.Tensor, qs, exits: tuple, n_layers: int,
             temperature: torch.Tensor | None = None, max_loss: float = 0.01) -> dict | None:
    """The threshold of ``qs`` with the fewest mean blocks whose simulated accuracy on these
    rows is within ``max_loss`` of the final head's on the same rows (ties: the higher
    accuracy), as its :func:`simulate` row; None when no threshold is. Give it calibration
    rows, never the rows the choice is then scored on."""
    V.number("max_loss", max_loss, 0.0, 1.0)
    full = float((logits[-1].argmax(-1) == labels).float().mean())
    sims = [simulate(logits, labels, q, exits, n_layers, temperature) for q in qs]
    ok = [r for r in sims if r["accuracy"] >= full - max_loss]
    return min(ok, key=lambda r: (r["blocks"], -r["accuracy"])) if ok else None


def _paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean of ``a - b`` over rows (0/1 correctness) and its standard error."""
    d = a.float() - b.float()
    n = len(d)
    return float(d.mean()), float(d.std(unbiased=True) / n ** 0.5) if n > 1 else float("inf")


VERDICTS = ("met", "not met", "inconclusive")


def verdict(first: torch.Tensor, final: torch.Tensor, chosen: torch.Tensor | None,
            blocks: torch.Tensor | None, n_layers: int, required: float,
            max_loss: float = 0.01) -> dict:
    """Whether early exit saved blocks at no more than ``max_loss`` accuracy, on test rows.

    ``first``, ``final``, ``chosen``: per-row correctness (n,) of the first exit, the final
    head and early exit at the chosen threshold (None: no threshold was chosen); ``blocks``
    (n,): blocks each row ran. "inconclusive" unless the final head beats the first exit by
    more than two standard errors of their paired difference: where one block answers as
    well as all of them, exiting after one block costs nothing by construction and proves
    nothing. Otherwise "met" when ``n_layers / mean(blocks) >= required`` and the paired
    accuracy loss ``final - chosen`` is at most ``max_loss``; else "not met", with why."""
    gain, gain_se = _paired(final, first)
    out = {"depth_gain": gain, "depth_gain_se": gain_se, "blocks_ratio": None,
           "accuracy_loss": None, "accuracy_loss_se": None}
    if chosen is not None:
        loss, loss_se = _paired(final, chosen)
        out.update(blocks_ratio=n_layers / float(blocks.float().mean()), accuracy_loss=loss,
                   accuracy_loss_se=loss_se)
    depth = f"the final head beats the first exit by {gain:+.3f} (s.e. {gain_se:.3f})"
    if not gain > 2 * gain_se:
        return {**out, "verdict": "inconclusive",
                "why": f"{depth}, not by more than two standard errors: depth does not "
                       f"matter on these rows, so fewer blocks cost nothing by construction"}
    if chosen is None:
        return {**out, "verdict": "not met",
                "why": f"no threshold kept accuracy within {max_loss:.3f} of the final head "
                       f"on the calibration rows; {depth}"}
    ratio, loss, loss_se = out["blocks_ratio"], out["accuracy_loss"], out["accuracy_loss_se"]
    why = []
    if ratio < required:
        why.append(f"{ratio:.2f}x fewer blocks, below the required {required:.2f}x")
    if loss > max_loss:
        why.append(f"accuracy loss {loss:.3f} (s.e. {loss_se:.3f}) above {max_loss:.3f}")
    return {**out, "verdict": "not met" if why else "met",
            "why": "; ".join(why + [depth]) if why else
            f"{ratio:.2f}x fewer blocks at an accuracy loss of {loss:+.3f} (s.e. "
            f"{loss_se:.3f}); {depth}"}
