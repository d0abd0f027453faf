import math

import pytest
import torch

from labkit import model as M
from labkit import train as T
from labkit.techniques import EarlyExitConfig, apply_, expected
from labkit.techniques import early_exit as E
from labkit.validate import LabkitConfigError


def _setup(q=0.5, n=4, b=8, seed=0):
    m = M.build("tiny", kind="encoder", n_layers=n, seed=seed).eval()
    apply_(m, EarlyExitConfig(q=q))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (b, 16), generator=g)
    mask = torch.zeros(b, 16, dtype=torch.bool)
    for i in range(b):
        mask[i, 8 + i % 8:] = True
    # spread the exit heads so confidences differ between samples
    with torch.no_grad():
        for h in m.executor.heads:
            h.out.weight.normal_(0, 2.0, generator=g)
    return m, ids, mask


def test_q_one_never_exits_and_equals_the_model():
    m, ids, mask = _setup(q=1.0)
    m.executor.exiting = False
    full = m(ids, mask)
    logits, blocks = E.predict(m, ids, mask)
    assert torch.equal(blocks, torch.full((8,), 4))
    assert torch.allclose(logits, full)


def test_batched_exits_equal_batch_one_and_the_simulation():
    m, ids, mask = _setup(q=0.998)
    logits, blocks = E.predict(m, ids, mask)
    assert 1 < len(set(blocks.tolist()))  # samples leave at different depths
    for i in range(len(ids)):
        li, bi = E.predict(m, ids[i:i + 1], mask[i:i + 1])
        assert int(bi) == int(blocks[i])
        assert torch.allclose(li[0], logits[i], atol=1e-5)
    labels = torch.zeros(len(ids), dtype=torch.long)
    z, _ = E.exit_logits(m, {"input_ids": ids, "padding_mask": mask, "labels": labels})
    sim = E.simulate(z, labels, 0.998, m.executor.exits, 4)
    assert sim["blocks"] == pytest.approx(float(blocks.float().mean()))
    assert torch.equal(logits.argmax(-1), z.gather(0, sim["exit_index"][None, :, None].expand(
        1, -1, z.shape[-1]))[0].argmax(-1))


def test_exited_samples_stop_being_computed():
    m, ids, mask = _setup(q=0.998)
    rows = []
    hooks = [b.register_forward_pre_hook(lambda mod, a: rows.append(a[0].shape[0]))
             for b in m.blocks]
    _, blocks = E.predict(m, ids, mask)
    for h in hooks:
        h.remove()
    want = [int((blocks > i).sum()) for i in range(4)]
    assert rows == [w for w in want if w]


def test_temperature_fit_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(2, 4000, 5, generator=g) * 2
    labels = torch.multinomial(true[0].softmax(-1), 1, generator=g).squeeze(1)
    t = E.fit_temperatures(true * torch.tensor([3.0, 0.5])[:, None, None], labels)
    assert float(t[0]) == pytest.approx(3.0, rel=0.1)
    # exit 1 has other logits with the same labels: a different temperature, fitted apart
    assert float(t[1]) != pytest.approx(float(t[0]), rel=0.1)


def test_ece_low_when_calibrated_high_when_overconfident_and_fixed_by_temperature():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(20000, 3, generator=g) * 1.5
    y = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(1)
    good = E.reliability(z.softmax(-1), y)["ece"]
    bad = E.reliability((z * 4).softmax(-1), y)
    assert good < 0.02 and bad["ece"] > 0.1
    assert sum(r["count"] for r in bad["bins"]) == len(y)
    t = E.fit_temperatures((z * 4)[None], y)
    assert E.reliability((z * 4 / t).softmax(-1), y)["ece"] < 0.02


def test_sdn_weights_grow_to_depth_fraction():
    assert E.sdn_weights((0, 1, 2), 4, 0.0) == pytest.approx([0.01] * 3)
    assert E.sdn_weights((0, 1, 2), 4, 1.0) == pytest.approx([0.25, 0.5, 0.75])
    assert E.sdn_weights((0,), 4, 0.5) == pytest.approx([0.13])


def _cls_task(n, seed):
    """Label = first token mod 3: a random backbone's [CLS] state carries it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 60, (n, 8), generator=g)
    return {"input_ids": ids, "padding_mask": torch.zeros(n, 8, dtype=torch.bool),
            "labels": ids[:, 0] % 3}


def test_sdn_training_with_a_frozen_backbone_trains_only_the_heads():
    from labkit import data as D

    m = M.build("tiny", kind="encoder", n_layers=3, vocab_size=60, max_len=8, num_labels=3)
    apply_(m, EarlyExitConfig(q=0.9))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    n = E.freeze_backbone_(m)
    e = expected(m.cfg, EarlyExitConfig())
    assert n == e["params_after"] - e["params_before"]
    ev = _cls_task(256, 1)
    z0, y = E.exit_logits(m, ev)
    T.fit(m, D.batches(_cls_task(512, 0), 64), steps=40, lr=1e-2, strategy=E.SDNStrategy(40),
          progress=False)
    after = m.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]) != k.startswith("executor.heads"), k
    z1, _ = E.exit_logits(m, ev)
    ce = torch.nn.functional.cross_entropy
    for k in range(2):  # both internal classifiers learned; the frozen final head did not
        assert float(ce(z1[k], y)) < 0.8 * float(ce(z0[k], y))
    assert torch.equal(z1[-1], z0[-1])


@pytest.mark.parametrize("q", [0.0, 1.5, -0.2, math.nan])
def test_bad_q(q):
    with pytest.raises(LabkitConfigError, match=r"q=.*\(0\.0, 1\.0\]"):
        EarlyExitConfig(q=q)


def test_bad_exits_and_kind():
    m = M.build("tiny", kind="encoder", n_layers=4)
    with pytest.raises(LabkitConfigError, match=r"exits=\(0, 3\).*\[0, 2\]"):
        apply_(m, EarlyExitConfig(exits=(0, 3)))
    with pytest.raises(LabkitConfigError, match="exits=()"):
        EarlyExitConfig(exits=())
    with pytest.raises(LabkitConfigError, match="model kind='decoder'"):
        apply_(M.build("tiny", kind="decoder", n_layers=4), EarlyExitConfig())


def test_q_one_never_exits_even_when_a_softmax_rounds_to_one():
    m, ids, mask = _setup(q=1.0)
    with torch.no_grad():  # every exit head says class 0 with a lead of 100: softmax == 1.0
        for h in m.executor.heads:
            h.out.weight.zero_()
            h.out.bias.fill_(0.0)[0] = 100.0
    labels = torch.zeros(len(ids), dtype=torch.long)
    z, _ = E.exit_logits(m, {"input_ids": ids, "padding_mask": mask, "labels": labels})
    assert bool((z[:-1].softmax(-1).amax(-1) == 1.0).all())  # float32 reached exactly 1
    _, blocks = E.predict(m, ids, mask)
    assert torch.equal(blocks, torch.full((8,), 4))
    assert E.simulate(z, labels, 1.0, m.executor.exits, 4)["blocks"] == 4.0
    m.executor.q = 0.999  # below 1 the same heads exit at the first block
    assert torch.equal(E.predict(m, ids, mask)[1], torch.ones(8, dtype=torch.long))
    assert E.simulate(z, labels, 0.999, m.executor.exits, 4)["blocks"] == 1.0
