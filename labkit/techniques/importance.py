"""Which weights, neurons and heads matter on data: activation statistics gathered on
calibration rows, the removal error they predict, and bias compensation.

Papers: Wanda (Sun, Liu, Bair, Kolter, *A Simple and Effective Pruning Approach for Large
Language Models*, 2023) scores a weight by ``|W_ij| * ||X_j||_2``, its magnitude times the
norm of the input it multiplies; FLAP (An, Zhao, Yu, Tang, Wang, *Fluctuation-based
Adaptive Structured Pruning for Large Language Models*, AAAI 2024) scores a channel by how
much its output fluctuates over samples and folds the removed channels' mean output into
the bias.

Idea. An FFN neuron ``j`` with activation ``a_j`` (after the nonlinearity, the input of
``down``) and down column ``w_j`` adds ``w_j a_j`` to the block's output. Removing it costs,
in expected squared error of that output per token (cross terms between units ignored)::

    no compensation:    E[a_j^2]  ||w_j||^2
    with compensation:  Var[a_j]  ||w_j||^2      (w_j E[a_j] is added to down's bias)

A head ``h`` adds ``z_h = W_o[:, h] y_h`` (its slice of the output projection on its
output); removing it costs ``E||z_h||^2``, or with compensation ``E||z_h||^2 - ||E z_h||^2``
(``E z_h`` is added to the output projection's bias). Weight magnitude, labkit's default
score, sees neither what a unit outputs on real rows nor its mean. Only tokens that are not
padding count.

Complexity: one inference pass over the calibration rows with hooks; per token O(d_ff) for
neurons, O(D * H * Dh) for heads, O(d_in) for a linear.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import validate as V


class Moments:
    """Running count, sum and sum of squares over tokens (float64)."""

    def __init__(self):
        self.n, self.sum, self.sq = 0, None, None

    def add(self, x: torch.Tensor, sq: torch.Tensor | None = None) -> None:
        """``x`` (T, ...) values per token; ``sq`` their squared norms when not ``x**2``."""
        x = x.double()
        s, q = x.sum(0), (x * x).sum(0) if sq is None else sq.double().sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sq = q if self.sq is None else self.sq + q
        self.n += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.n

    @property
    def second(self) -> torch.Tensor:
        """``E[x^2]`` (or ``E||x||^2`` per unit)."""
        return self.sq / self.n


def _tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, N, F) -> (T, F) over the tokens that are not padding."""
    if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
        return x[~mask]
    return x.reshape(-1, x.shape[-1])


def calibration_batches(batches, rows: int) -> list[dict]:
    """The first batches of an iterator (e.g. ``workload.make_batches(seed)``) holding at
    least ``rows`` rows: the calibration set techniques that choose from data take."""
    V.integer("rows", rows, 1)
    out, n = [], 0
    for b in batches:
        out.append(b)
        n += len(b["input_ids"])
        if n >= rows:
            return out
    if not out:
        raise V.LabkitConfigError("calibration", "an empty iterator", "at least one batch")
    return out


def check_batches(calibration, model_cfg=None) -> list[dict]:
    """Calibration batches as a non-empty list of dicts with ``input_ids`` (B, N) whose
    ids fit the model's vocabulary; a named error otherwise."""
    if calibration is None:
        raise V.LabkitConfigError("calibration", None, "batches of training rows (dicts with "
                                  "input_ids), e.g. importance.calibration_batches("
                                  "workload.make_batches(0), 256)")
    batches = list(calibration)
    if not batches:
        raise V.LabkitConfigError("calibration", "[]", "at least one batch of training rows")
    for i, b in enumerate(batches):
        ids = b.get("input_ids") if isinstance(b, dict) else None
        if ids is None or ids.dim() != 2:
            raise V.LabkitConfigError(f"calibration[{i}]", type(b).__name__,
                                      "a dict whose input_ids is a (batch, tokens) tensor")
        if model_cfg is not None and int(ids.max()) >= model_cfg.vocab_size:
            raise V.LabkitConfigError(f"calibration[{i}].input_ids", int(ids.max()),
                                      f"token ids below the model's vocab_size="
                                      f"{model_cfg.vocab_size} (another tokenizer's rows?)")
    return batches


@torch.no_grad()
def collect(model: nn.Module, calibration, neurons: dict | None = None,
            heads: dict | None = None, linears: dict | None = None) -> dict:
    """Run ``model`` over the calibration batches and gather, keyed by the names given:

    * ``neurons`` ``{name: MLP}``: moments of the input of ``mlp.down`` per hidden unit;
    * ``heads`` ``{name: Attention}``: moments of each head's ``z_h`` (sum and squared norm);
    * ``linears`` ``{name: Linear}``: ``E[x_j^2]`` of each input column.
    """
    batches = check_batches(calibration, getattr(model, "cfg", None))
    stats: dict[str, Moments] = {}
    state = {"mask": None}
    hooks = []

    def on_down(name):
        def hook(mod, args):
            stats.setdefault(name, Moments()).add(_tokens(args[0], state["mask"]).float())
        return hook

    def on_o(name, attn):
        def hook(mod, args):
            y = _tokens(args[0], state["mask"]).float()  # (T, H*Dh)
            h, dh = attn.n_heads, attn.head_dim
            w = mod.weight.detach().float().view(-1, h, dh)  # (D, H, Dh)
            z = torch.einsum("thk,dhk->thd", y.view(-1, h, dh), w)  # (T, H, D)
            m = stats.setdefault(name, Moments())
            m.add(z, sq=(z * z).sum(-1))  # sum (H, D); squared norms (H,)
        return hook

    def on_linear(name):
        def hook(mod, args):
            x = _tokens(args[0], state["mask"]).float()
            stats.setdefault(name, Moments()).add(x)
        return hook

    for name, mlp in (neurons or {}).items():
        hooks.append(mlp.down.register_forward_pre_hook(on_down(name)))
    for name, attn in (heads or {}).items():
        hooks.append(attn.o.register_forward_pre_hook(on_o(name, attn)))
    for name, lin in (linears or {}).items():
        hooks.append(lin.register_forward_pre_hook(on_linear(name)))
    was = model.training
    model.eval()
    try:
        for b in batches:
            state["mask"] = b.get("padding_mask")
            model(b["input_ids"], b.get("padding_mask"), b.get("token_type_ids"))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    missing = [n for n in [*(neurons or {}), *(heads or {}), *(linears or {})]
               if n not in stats]
    if missing:
        raise RuntimeError(f"calibration never reached {missing[:3]}: are they used by "
                           "model(ids, padding_mask, token_type_ids)?")
    return stats


def neuron_scores(m: Moments, down_weight: torch.Tensor, compensate: bool) -> torch.Tensor:
    """(d_ff,) predicted squared output error of removing each neuron: ``Var[a_j]`` (with
    compensation) or ``E[a_j^2]`` (without), times ``||w_j||^2`` of its down column."""
    energy = m.second - m.mean ** 2 if compensate else m.second
    return (energy.clamp_min(0) * down_weight.detach().double().pow(2).sum(0)).float()


def head_scores(m: Moments, compensate: bool) -> torch.Tensor:
    """(H,) ``E||z_h||^2``, or ``E||z_h - E z_h||^2`` with compensation."""
    energy = m.second - (m.mean ** 2).sum(-1) if compensate else m.second
    return energy.clamp_min(0).float()


def wanda_scores(m: Moments, weight: torch.Tensor) -> torch.Tensor:
    """(out, in) ``|W_ij| * ||X_j||`` (Wanda), ``||X_j||`` the RMS of input column ``j``."""
    return weight.detach().abs() * m.second.float().sqrt()[None, :]


@torch.no_grad()
def compensate_neurons(down: nn.Linear, weight: torch.Tensor, m: Moments,
                       removed: torch.Tensor) -> None:
    """Fold the removed neurons' mean output into ``down``'s bias: ``b += W[:, r] E[a_r]``
    (``weight``: down's weight before the mask; ``removed`` (d_ff,) bool)."""
    _need_bias(down, "down")
    r = removed.nonzero().squeeze(1)
    down.bias += weight.detach()[:, r].double() @ m.mean[r] if len(r) else 0.0


@torch.no_grad()
def compensate_heads(o: nn.Linear, m: Moments, removed: torch.Tensor) -> None:
    """Fold the removed heads' mean output ``E z_h`` (D,) into the output projection's bias."""
    _need_bias(o, "o")
    if bool(removed.any()):
        o.bias += m.mean[removed].sum(0).to(o.bias.dtype)


def _need_bias(lin: nn.Linear, name: str) -> None:
    if lin.bias is None:
        raise V.LabkitConfigError("compensate", True, f"False: the {name} projection has no "
                                  "bias to fold the removed units' mean output into")


__all__ = ["Moments", "calibration_batches", "check_batches", "collect", "compensate_heads",
           "compensate_neurons", "head_scores", "neuron_scores", "wanda_scores"]
