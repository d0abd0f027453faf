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


def _correct(n_right, n=200):
    return torch.arange(n) < n_right  # the first n_right rows right


@pytest.mark.parametrize("first,final,chosen,blocks,want,why", [
    # depth does not matter: the first exit is as good as the final head
    (150, 150, 150, 1.0, "inconclusive", "not by more than two standard errors"),
    # a gain inside two standard errors (3 of 200 rows: gain 0.015, paired s.e. 0.0086)
    (147, 150, 150, 1.0, "inconclusive", "not by more than two standard errors"),
    (120, 190, 190, 2.0, "met", "3.00x fewer blocks"),
    (120, 190, 190, 5.0, "not met", "1.20x fewer blocks, below the required 1.50x"),
    (120, 190, 170, 2.0, "not met", "accuracy loss 0.100"),
    (120, 190, None, None, "not met", "no threshold kept accuracy")])
def test_verdict_gives_each_verdict(first, final, chosen, blocks, want, why):
    v = E.verdict(_correct(first), _correct(final),
                  None if chosen is None else _correct(chosen),
                  None if blocks is None else torch.full((200,), blocks), 6, 1.5, 0.01)
    assert v["verdict"] == want and why in v["why"], v["why"]
    assert v["depth_gain"] == pytest.approx((final - first) / 200)
    if chosen is not None:
        assert v["blocks_ratio"] == pytest.approx(6 / blocks)
        assert v["accuracy_loss"] == pytest.approx((final - chosen) / 200)


def test_verdict_uses_the_paired_standard_error():
    # the same 10-point gain: paired on the same rows (conclusive) vs a gain made of many
    # rows flipping both ways (the paired s.e. is large: inconclusive)
    n = 100
    first = torch.zeros(n, dtype=torch.bool)
    first[:40] = True
    final = torch.zeros(n, dtype=torch.bool)
    final[:50] = True
    assert E.verdict(first, final, final, torch.full((n,), 2), 6, 1.5)["verdict"] == "met"
    flip = torch.zeros(n, dtype=torch.bool)
    flip[40:90] = True  # right where first is wrong and wrong where it is right
    v = E.verdict(first, flip, flip, torch.full((n,), 2), 6, 1.5)
    assert v["depth_gain"] == pytest.approx(0.1) and v["verdict"] == "inconclusive"


def test_choose_q_takes_the_fewest_blocks_within_the_loss_on_the_rows_given():
    # 2 exits + final on 4 rows: exit 0 confident and right on rows 0-1, unsure elsewhere
    z = torch.tensor([[[4.0, 0], [4, 0], [0.2, 0], [0, 0.2]],
                      [[3.0, 0], [3, 0], [0, 3], [0, 3]],
                      [[5.0, 0], [5, 0], [0, 5], [0, 5]]])
    y = torch.tensor([0, 0, 1, 1])
    best = E.choose_q(z, y, [0.5, 0.9, 0.99, 1.0], (0, 1), 3)
    assert best["q"] == 0.9 and best["accuracy"] == 1.0 and best["blocks"] == 1.5
    # q=0.5 exits rows 2-3 at the first exit (half wrong); q=1.0 runs everything
    assert E.choose_q(z, y, [0.5], (0, 1), 3) is None
    assert E.choose_q(z, y, [0.5], (0, 1), 3, max_loss=0.5)["q"] == 0.5
    assert E.choose_q(z, y, [1.0], (0, 1), 3)["blocks"] == 3.0


def test_pointer_task_rows_follow_the_rule_balanced_and_disjoint():
    from labkit import data as D
    from labkit.labs import depth as L

    rows = L.pointer_rows(400, 3, "train")
    assert rows == L.pointer_rows(400, 3, "train")  # seeded
    assert sum(r["label"] for r in rows) == 200 and {r["hops"] for r in rows} == {1, 2}
    for r in rows:
        vals = [int(w[1:]) for w in r["sentence"].split()]
        at = 0
        for _ in range(int(r["question"][3:])):
            at = vals[at]
        assert r["label"] == int(vals[at] >= 4)
    ev = L.pointer_rows(200, 4, "eval")
    assert all(D.in_eval_part(r["question"], r["sentence"]) for r in ev)
    assert not {(r["question"], r["sentence"]) for r in ev} & {
        (r["question"], r["sentence"]) for r in rows}
    task = L.pointer_task(64, 32, seed=0)
    assert task.train["input_ids"].shape == (64, 1 + 1 + 1 + 8 + 1)
    assert task.eval["hops"].shape == (32,) and task.num_labels == 2
    with pytest.raises(LabkitConfigError, match="hops"):
        L.pointer_rows(4, 0, hops=())


def test_exit_choice_chooses_q_on_the_calibration_rows_and_scores_on_the_test_rows():
    """Calibration labels are the first exit's answers, test labels the final head's: chosen
    on the calibration rows, the lowest q (everything exits at block 1) keeps accuracy there
    and then loses it on the test rows; chosen on the test rows it would have run deeper."""
    from labkit.labs import depth as L

    _, ids, mask = _setup(q=0.5, b=64)
    m = M.build("tiny", kind="encoder", n_layers=4, num_labels=2, seed=0).eval()
    apply_(m, EarlyExitConfig(q=0.5))
    rows = {"input_ids": ids, "padding_mask": mask, "labels": torch.zeros(64, dtype=torch.long)}
    z, _ = E.exit_logits(m, rows)
    calib = {**rows, "labels": z[0].argmax(-1)}
    test = {**rows, "labels": z[-1].argmax(-1)}
    agree = float((z[0].argmax(-1) == z[-1].argmax(-1)).float().mean())
    assert agree < 0.9  # the heads disagree on enough rows for the test to mean something
    qs = [0.5, 0.99, 1.0]
    c = L.exit_choice(m, calib, test, qs, calibrated=False)
    assert c["q"] == 0.5 and c["calib_accuracy"] == 1.0 and c["calib_blocks"] == 1.0
    assert c["exit_accuracy"] == pytest.approx(agree) and c["full_accuracy"] == 1.0
    assert c["verdict"] == "not met" and "accuracy loss" in c["why"]
    on_test = L.exit_choice(m, test, test, qs, calibrated=False)
    assert on_test["q"] != 0.5
