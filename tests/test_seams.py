"""The depth seam (model.executor), the training seam (hooks, strategy, log rank) and the
paired-timing helper with an injected timer."""
import pytest
import torch

from labkit import measure, model, train
from labkit.model import BlockContext, BlockExecutor


class SkipOdd(BlockExecutor):
    def forward(self, blocks, x, ctx):
        for i, block in enumerate(blocks):
            if i % 2 == 0:
                x = ctx.call(block, x)
        return x


def test_executor_swap_changes_which_blocks_run():
    m = model.build("tiny", n_layers=4).eval()
    ids = torch.randint(0, 100, (2, 16))
    full = m(ids)
    before = m.set_executor(SkipOdd())
    assert type(before) is BlockExecutor
    skipped = m(ids)
    # the same model with blocks 1 and 3 removed gives the same logits
    short = model.build("tiny", n_layers=2).eval()
    short.load_state_dict({k.replace("blocks.2.", "blocks.1."): v
                           for k, v in m.state_dict().items()
                           if not k.startswith(("blocks.1.", "blocks.3."))})
    torch.testing.assert_close(skipped, short(ids))
    assert not torch.allclose(full, skipped)
    m.set_executor(before)
    torch.testing.assert_close(m(ids), full)


def test_set_executor_refuses_other_types():
    m = model.build("tiny")
    with pytest.raises(TypeError, match="BlockExecutor"):
        m.set_executor(torch.nn.Identity())


def test_block_context_passes_mask_and_rope():
    m = model.build("tiny", kind="decoder").eval()
    ids = torch.randint(0, 100, (1, 8))
    seen = []

    class Spy(BlockExecutor):
        def forward(self, blocks, x, ctx):
            seen.append(ctx)
            return super().forward(blocks, x, ctx)

    m.set_executor(Spy())
    m(ids)
    assert isinstance(seen[0], BlockContext) and seen[0].rope is m.rope


def _batches(n=8):
    g = torch.Generator().manual_seed(0)
    while True:
        yield {"input_ids": torch.randint(0, 100, (n, 12), generator=g),
               "labels": torch.randint(0, 3, (n,), generator=g)}


class Recorder(train.Callback):
    def __init__(self, log):
        self.log = log

    def before_backward(self, state, loss):
        assert loss.requires_grad
        self.log.append("before_backward")

    def after_backward(self, state):
        self.log.append("after_backward")

    def before_optimizer_step(self, state):
        self.log.append("before_optimizer_step")

    def after_optimizer_step(self, state):
        self.log.append("after_optimizer_step")

    def on_step(self, state):
        self.log.append("on_step")


def test_hooks_run_in_order_around_backward_and_step():
    log = []
    train.fit(model.build("tiny"), _batches(), steps=2, callbacks=[Recorder(log)],
              progress=False)
    one = ["before_backward", "after_backward", "before_optimizer_step",
           "after_optimizer_step", "on_step"]
    assert log == one * 2


def test_after_backward_sees_gradients_and_can_change_them():
    m = model.build("tiny")

    class ZeroGrads(train.Callback):
        def after_backward(self, state):
            assert m.head.weight.grad is not None
            for p in m.parameters():
                p.grad = torch.zeros_like(p)

    before = {k: v.clone() for k, v in m.state_dict().items()}
    train.fit(m, _batches(), steps=2, callbacks=[ZeroGrads()], progress=False)
    for k, v in m.state_dict().items():  # AdamW with zero grads and no decay: no change
        torch.testing.assert_close(v, before[k])


def test_strategy_owns_forward_backward():
    calls = []

    class Half(train.StepStrategy):
        def forward_backward(self, model, batch, state, callbacks, extra_loss=None):
            calls.append(state.step)
            loss = model.loss(batch)
            (0.5 * loss).backward()
            return loss.detach()

    res = train.fit(model.build("tiny"), _batches(), steps=3, strategy=Half(), progress=False)
    assert calls == [1, 2, 3] and res.steps == 3


def test_only_the_logging_rank_runs_logging_hooks():
    log, log_all = [], []

    class Everywhere(Recorder):
        all_ranks = True

    train.fit(model.build("tiny"), _batches(), steps=1, log_rank=1,
              callbacks=[Recorder(log), Everywhere(log_all)], progress=False)
    assert "on_step" not in log and "after_backward" in log  # rank 0 is not the logger
    assert "on_step" in log_all


def test_paired_rotates_order_and_takes_median_of_per_round_ratios():
    order = []
    times = {"dense": [1.0, 1.0, 4.0], "fast": [0.5, 0.25, 2.0]}

    def timer(name, fn, mrt):
        order.append(name)
        return times[name].pop(0)

    p = measure.paired({"dense": None, "fast": None}, rounds=3, timer=timer)
    assert order == ["dense", "fast", "fast", "dense", "dense", "fast"]
    assert p.ratio["fast"] == 2.0  # per-round ratios 2, 4, 2
    assert p.ratio_spread["fast"] == (2.0, 4.0)
    assert p.seconds["dense"] == 1.0 and p.ratio["dense"] == 1.0


@pytest.mark.parametrize("speedup,spread,flops,verdict", [
    (1.5, (1.3, 1.7), 2.0, "measured"),
    (1.2, (0.8, 1.6), 2.0, "noise: spread"),
    (2.7, (2.5, 2.9), 1.77, "noise: above the FLOP ratio"),
])
def test_speedup_verdict(speedup, spread, flops, verdict):
    assert measure.speedup_verdict(speedup, spread, flops).startswith(verdict)
