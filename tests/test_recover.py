"""Recovery by distillation: the loss is the stated formula, alpha and the teacher mean what
they say, every technique's constraint survives training, and bad input is refused."""
import copy

import pytest
import torch
import torch.nn.functional as F
import toy

from labkit import model as M
from labkit import recover as R
from labkit import train as T
from labkit.labs.workloads import Workload
from labkit.techniques import (
    EarlyExitConfig,
    FakeQuantConfig,
    LayerPruneConfig,
    SparsityConfig,
    apply_,
)
from labkit.techniques import quant as Q
from labkit.techniques import sparsity as S
from labkit.validate import LabkitConfigError

_rows, _batches = toy.rows, toy.batches


@pytest.fixture(scope="module")
def setup():
    teacher = toy.teacher()
    return teacher, toy.workload(teacher.cfg)


def _kl(student, teacher, rows):
    with torch.no_grad():
        s, t = student(rows["input_ids"]), teacher(rows["input_ids"])
    return float(R.kd_loss(s, t, 1.0))


def test_kd_loss_is_t_squared_kl_of_softened_distributions():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g) * 3
    temp = 2.0
    pt, ps = (t / temp).softmax(-1), (s / temp).softmax(-1)
    manual = (pt * (pt.log() - ps.log())).sum(-1).mean() * temp ** 2
    assert float(R.kd_loss(s, t, temp)) == pytest.approx(float(manual), rel=1e-5)
    assert float(R.kd_loss(t, t, temp)) == pytest.approx(0.0, abs=1e-6)
    # a language model's logits (B, N, V): averaged over every token
    s3, t3 = s.view(2, 4, 3), t.view(2, 4, 3)
    assert float(R.kd_loss(s3, t3, temp)) == pytest.approx(float(manual), rel=1e-5)


def test_recovery_closes_the_gap_to_the_teacher_and_masks_stay(setup):
    teacher, work = setup
    student = copy.deepcopy(teacher)
    apply_(student, SparsityConfig(sparsity=0.6, structure="neuron"))
    sparsity = S.actual_sparsity(student)
    one_shot = _kl(student, teacher, work.eval_set)
    res = R.recover(student, teacher, work, R.RecoverConfig(steps=120, lr=3e-3, alpha=1.0),
                    eval_set=work.eval_set)
    assert _kl(student, teacher, work.eval_set) < 0.5 * one_shot
    assert res.after["accuracy"] >= res.before["accuracy"]
    assert S.actual_sparsity(student) == pytest.approx(sparsity)  # nothing revived
    assert res.steps == 120 and res.teacher_misses == 120 and res.trainable > 0


def test_teacher_outputs_are_cached_per_batch_and_checked(setup):
    teacher, work = setup
    cache = R.TeacherCache(teacher)
    for _ in range(2):
        student = copy.deepcopy(teacher)
        apply_(student, SparsityConfig(sparsity=0.5, structure="neuron"))
        res = R.recover(student, teacher, work, R.RecoverConfig(steps=5), cache=cache)
    assert (res.teacher_hits, res.teacher_misses) == (5, 0)
    # another batch stream under the same key is recomputed, never served stale
    other = Workload("nli", work.cfg, lambda s: _batches(s + 50), work.eval_set, work.sample)
    res = R.recover(copy.deepcopy(teacher), teacher, other, R.RecoverConfig(steps=5),
                    cache=cache)
    assert (res.teacher_hits, res.teacher_misses) == (0, 5)
    with pytest.raises(LabkitConfigError, match="cache"):
        R.recover(copy.deepcopy(teacher), copy.deepcopy(teacher), work,
                  R.RecoverConfig(steps=1), cache=cache)


def _weights_after(teacher, work, config):
    student = copy.deepcopy(teacher)
    apply_(student, SparsityConfig(sparsity=0.5, structure="neuron"))
    R.recover(student, teacher, work, config)
    return torch.cat([p.detach().flatten() for p in student.parameters()])


def test_alpha_weighs_distillation_against_the_labels(setup):
    teacher, work = setup
    shuffled = Workload("nli", work.cfg, lambda s: ({**b, "labels": (b["labels"] + 1) % 3}
                                                    for b in _batches(s)),
                        work.eval_set, work.sample)
    kd_only = R.RecoverConfig(steps=6, alpha=1.0)
    # alpha = 1: labels play no part
    assert torch.equal(_weights_after(teacher, work, kd_only),
                       _weights_after(teacher, shuffled, kd_only))
    ce_only = R.RecoverConfig(steps=6, alpha=0.0)
    assert not torch.equal(_weights_after(teacher, work, ce_only),
                           _weights_after(teacher, shuffled, ce_only))
    mixed = R.RecoverConfig(steps=6, alpha=0.5)
    assert not torch.equal(_weights_after(teacher, work, mixed),
                           _weights_after(teacher, shuffled, mixed))


def test_fake_quantized_model_trains_as_qat_and_stays_quantized(setup):
    teacher, work = setup
    student = copy.deepcopy(teacher)
    apply_(student, FakeQuantConfig(bits=4))
    before = {n: m.float_weight().detach().clone() for n, m in Q.quantized_layers(student).items()}
    R.recover(student, teacher, work, R.RecoverConfig(steps=10, lr=1e-2))
    for name, layer in Q.quantized_layers(student).items():
        assert not torch.equal(layer.float_weight(), before[name])  # master weights trained
        w = layer.weight.detach()  # the 4-bit grid: at most 16 levels per output channel
        assert max(len(torch.unique(row)) for row in w) <= 16


def test_removed_blocks_stay_removed(setup):
    teacher, work = setup
    student = copy.deepcopy(teacher)
    apply_(student, LayerPruneConfig(keep=(0, 2)))
    kept = [id(b) for b in student.blocks]
    R.recover(student, teacher, work, R.RecoverConfig(steps=5, lr=1e-2))
    assert [id(b) for b in student.blocks] == kept and student.cfg.n_layers == 2


def test_exit_heads_are_distilled_with_sdn_weights(setup):
    teacher, work = setup
    student = copy.deepcopy(teacher)
    apply_(student, EarlyExitConfig(exits=(0,), q=0.9))
    heads = copy.deepcopy(student.executor.heads.state_dict())
    R.recover(student, teacher, work, R.RecoverConfig(steps=5, lr=1e-2))
    changed = [k for k, v in student.executor.heads.state_dict().items()
               if not torch.equal(v, heads[k])]
    assert changed  # the internal classifier got a loss


def test_gradual_pruning_runs_its_schedule_during_recovery(setup):
    teacher, work = setup
    student = copy.deepcopy(teacher)
    cfg = SparsityConfig(sparsity=0.6, method="gradual", initial_sparsity=0.0, start_step=0,
                         prune_steps=4, prune_every=5)
    apply_(student, cfg)
    assert S.actual_sparsity(student) == pytest.approx(0.0)
    R.recover(student, teacher, work, R.RecoverConfig(steps=25), prune=cfg)
    assert S.actual_sparsity(student) == pytest.approx(0.6, abs=0.02)
    with pytest.raises(LabkitConfigError, match="prune"):
        R.recover(student, teacher, work, R.RecoverConfig(steps=1),
                  prune=SparsityConfig(sparsity=0.6))


def test_hidden_state_distillation_adds_its_term(setup):
    teacher, work = setup
    a, b = copy.deepcopy(teacher), copy.deepcopy(teacher)
    for m in (a, b):
        apply_(m, SparsityConfig(sparsity=0.5, structure="neuron"))
    R.recover(a, teacher, work, R.RecoverConfig(steps=4, hidden=0.0))
    R.recover(b, teacher, work, R.RecoverConfig(steps=4, hidden=10.0))
    assert not torch.equal(a.blocks[0].ffn.up.weight, b.blocks[0].ffn.up.weight)


def test_bad_input_is_refused_with_the_parameter_named(setup):
    teacher, work = setup
    other = M.build(toy.config(num_labels=2))
    with pytest.raises(LabkitConfigError, match="teacher.*num_labels"):
        R.recover(copy.deepcopy(teacher), other, work, R.RecoverConfig(steps=1))
    accelerated = copy.deepcopy(teacher)
    apply_(accelerated, SparsityConfig(sparsity=0.5))
    S.convert(accelerated, "csr")
    with pytest.raises(LabkitConfigError, match="accelerated kernel path"):
        R.recover(accelerated, teacher, work, R.RecoverConfig(steps=1))
    for field, value in (("steps", -1), ("alpha", 1.5), ("temperature", 0.0), ("lr", 0.0)):
        with pytest.raises(LabkitConfigError, match=field):
            R.RecoverConfig(**{field: value})
    with pytest.raises(LabkitConfigError, match="config"):
        R.recover(copy.deepcopy(teacher), teacher, work, {"steps": 3})


def test_zero_steps_changes_nothing(setup):
    teacher, work = setup
    student = copy.deepcopy(teacher)
    res = R.recover(student, teacher, work, R.RecoverConfig(steps=0), eval_set=work.eval_set)
    assert res.steps == 0 and res.after == res.before
    for p, q in zip(student.parameters(), teacher.parameters()):
        assert torch.equal(p, q)


def test_distill_step_loss_matches_its_formula(setup):
    teacher, _ = setup
    student = copy.deepcopy(teacher)
    apply_(student, SparsityConfig(sparsity=0.5, structure="neuron"))
    cfg = R.RecoverConfig(alpha=0.3, temperature=3.0)
    step = R.DistillStep(cfg, R.TeacherCache(teacher))
    batch = next(_batches(0))
    got = step.loss(student, batch, T.TrainState(step=1))
    with torch.no_grad():
        zs, zt = student(batch["input_ids"]), teacher(batch["input_ids"])
    want = 0.3 * R.kd_loss(zs, zt, 3.0) + 0.7 * F.cross_entropy(zs, batch["labels"])
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_the_toy_teacher_learned_its_task(setup):
    """Every recovery and planner test distils from this teacher: at chance it would have
    nothing to teach and the tests above would pass or fail for no reason."""
    from labkit import train as T

    teacher, work = setup
    assert T.evaluate(teacher, work.eval_set)["accuracy"] > 0.9
