import dataclasses

import pytest
import torch

from labkit import model as M
from labkit import validate as V
from labkit.techniques import registry as R


def test_messages_name_parameter_value_and_allowed():
    with pytest.raises(V.LabkitConfigError) as e:
        V.integer("rank", 0, 1, 64)
    assert str(e.value) == "rank=0 is not allowed: expected an integer in [1, 64]"
    with pytest.raises(V.LabkitConfigError, match=r"sparsity=1.0 .* in \[0.0, 1.0\)"):
        V.number("sparsity", 1.0, 0.0, 1.0, hi_open=True)
    with pytest.raises(V.LabkitConfigError, match="feature_map='relu'.*'elu'"):
        V.choice("feature_map", "relu", ["elu", "favor"])
    with pytest.raises(V.LabkitConfigError, match="steps=True"):
        V.integer("steps", True, 1)
    got = V.params({"k": 3, "extra": object()}, {"k": ("int", 1, 8)})
    assert got == {"k": 3}


@dataclasses.dataclass(frozen=True)
class _Double:
    factor: int = 2


def test_registry_apply_walker_and_record():
    @R.register(_Double)
    def _apply(model, cfg):
        R.swap_modules(model, lambda n, m: isinstance(m, M.MLP),
                       lambda n, m: torch.nn.Sequential(m, torch.nn.Identity()))
        return model

    m = M.build("tiny")
    R.apply_(m, _Double())
    assert all(isinstance(b.ffn, torch.nn.Sequential) for b in m.blocks)
    assert m.applied_techniques == [{"technique": "_Double", "factor": 2}]
    with pytest.raises(TypeError, match="no technique is registered"):
        R.apply_(m, M.ModelConfig())


def test_apply_keeps_the_models_mode():
    """A technique that adds modules (early exit adds its heads in train mode, Dropout
    included) must not flip an eval model back to training, or its logits turn random."""
    from labkit.techniques.early_exit import EarlyExitConfig

    for mode in (False, True):
        m = M.build("tiny").train(mode)
        R.apply_(m, EarlyExitConfig(q=0.5))
        assert {mod.training for mod in m.modules()} == {mode}
