"""labkit.save / labkit.load: a compressed model written as safetensors + a JSON recipe and
rebuilt with equal logits, for technique stacks on the tiny encoder and a post-norm BERT-like
config, with acceleration (sparse kernels, INT8 with mixed per-site choices) replayed from
recorded choices (timings injected: nothing here is timed). Then every bad input."""
import copy
import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import labkit
from labkit import accelerate as A
from labkit import kernels as K
from labkit import saving
from labkit.model import ModelConfig, build
from labkit.techniques import (
    EarlyExitConfig,
    FactorizedFFNConfig,
    FakeQuantConfig,
    Int8Config,
    KernelAttentionConfig,
    LayerPruneConfig,
    LoRAConfig,
    LowRankAttentionConfig,
    SharingConfig,
    SparsityConfig,
    apply_,
    cqil,
    registry,
)
from labkit.techniques import early_exit as EE
from labkit.techniques import int8 as I
from labkit.techniques import quant as Q
from labkit.techniques import sparsity as S

BASES = {"tiny": lambda: build("tiny"),
         "post-norm": lambda: build(ModelConfig(norm_position="post", type_vocab_size=2))}


def _model(base: str):
    """A base model with weights far from the init (as if trained), in eval mode."""
    m = BASES[base]()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return m.eval()


def _ids(m, n: int = 16):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(4, m.cfg.vocab_size, (3, n), generator=g)
    ids[:, 6] = m.cfg.sep_token_id  # two segments: token types matter in the BERT-like one
    return ids


def _logits(m, ids):
    with torch.no_grad():
        return m(ids)


def _timer(pick):
    """An injected timer: ``pick(layer) -> winning candidate`` (0.2 s), others 1 s; the
    whole model on the chosen paths is faster, so nothing reverts."""
    def timer(name, fn, mrt):
        layer, _, cand = name.rpartition("/")
        if layer == A.MODEL:
            return {"current": 1.0, "accelerated": 0.5}[cand]
        return 0.2 if cand == pick(layer) else 1.0
    return timer


def _site_rows(rows):
    return [r for r in rows if r["layer"] != A.MODEL]


# ---------------------------------------------------------------------------- simulate stage

@pytest.mark.parametrize("base", list(BASES))
def test_neuron_sparsity_fake_quant_layer_prune_round_trip_exactly(base, tmp_path):
    m = _model(base)
    ids = _ids(m)
    apply_(m, SparsityConfig(sparsity=0.5, structure="neuron"))
    apply_(m, FakeQuantConfig(bits=4, activations=True, act_bits=6,
                              bits_by_layer=(("blocks.1.attn.q", 3),)))
    Q.calibrate(m, [ids[:2], ids[2:]])
    apply_(m, LayerPruneConfig(keep=(1,)))
    ref = _logits(m, ids)

    labkit.save(m, tmp_path / "m")
    got = labkit.load(tmp_path / "m")
    assert torch.equal(_logits(got, ids), ref)
    assert got.applied_techniques == m.applied_techniques  # tuples restored from JSON lists
    assert got.cfg == m.cfg and got.cfg.n_layers == 1
    assert got.base_cfg == m.base_cfg and got.base_cfg.n_layers == 2
    for (n, a), (_, b) in zip(S.masked_linears(m).items(), S.masked_linears(got).items()):
        assert torch.equal(a.mask, b.mask), n
    recipe = json.loads((tmp_path / "m" / "recipe.json").read_text())
    assert [t["technique"] for t in recipe["techniques"]] == \
        ["SparsityConfig", "FakeQuantConfig", "LayerPruneConfig"]
    assert recipe["model_config"]["n_layers"] == 2  # the base config, before LayerPrune
    assert recipe["labkit_version"] == labkit.__version__
    assert recipe["torch_version"] == torch.__version__
    assert recipe["format_version"] == saving.FORMAT_VERSION


@pytest.mark.parametrize("base", list(BASES))
def test_low_rank_attention_and_factorized_ffn_round_trip_exactly(base, tmp_path):
    m = _model(base)
    ids = _ids(m)
    apply_(m, LowRankAttentionConfig(k=8, share="layerwise", seq_len=16))
    apply_(m, FactorizedFFNConfig(rank=8, init="svd"))
    ref = _logits(m, ids)
    labkit.save(m, tmp_path / "m")
    got = labkit.load(tmp_path / "m")
    assert torch.equal(_logits(got, ids), ref)
    # the one layerwise projection is stored once and stays one parameter
    assert got.blocks[0].attn.E is got.blocks[1].attn.E
    tied = json.loads((tmp_path / "m" / "recipe.json").read_text())["tied"]
    assert tied == {"blocks.1.attn.E": "blocks.0.attn.E"}


def test_decoder_tied_head_shared_blocks_and_kernel_attention(tmp_path):
    m = build("tiny", kind="decoder", vocab_size=128)
    apply_(m, KernelAttentionConfig(feature_map="favor", num_features=16, seed=3))
    apply_(m, SharingConfig(parts=("ffn",)))
    apply_(m, LoRAConfig(rank=4))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ids = _ids(m.eval())
    labkit.save(m, tmp_path / "m")
    got = labkit.load(tmp_path / "m")
    assert torch.equal(_logits(got, ids), _logits(m, ids))
    assert got.head.weight is got.embed.weight
    assert got.blocks[0].ffn is got.blocks[1].ffn


@pytest.mark.parametrize("base", list(BASES))
def test_early_exit_keeps_threshold_temperatures_and_exiting(base, tmp_path):
    m = _model(base)
    apply_(m, EarlyExitConfig(exits=(0,), q=0.9))
    ids = _ids(m)
    ex = m.executor
    ex.temperature.copy_(torch.tensor([0.5, 1.5]))
    ex.calibrated, ex.q = True, 0.4  # set after apply_, as the labs do: not in the config
    ref_logits, ref_blocks = EE.predict(m, ids)
    ex.exiting = True
    ref = _logits(m, ids)
    labkit.save(m, tmp_path / "m")
    got = labkit.load(tmp_path / "m")
    assert (got.executor.q, got.executor.calibrated, got.executor.exiting) == (0.4, True, True)
    assert torch.equal(_logits(got, ids), ref)
    got.executor.exiting = False
    logits, blocks = EE.predict(got, ids)
    assert torch.equal(logits, ref_logits) and torch.equal(blocks, ref_blocks)
    assert bool((ref_blocks == 1).any())  # some samples really left at the exit


def test_cqil_executor_round_trips(tmp_path):
    m = _model("tiny")
    apply_(m, cqil.CQILConfig(start=0, end=2, P=2))
    ids = _ids(m)
    labkit.save(m, tmp_path / "m")
    got = labkit.load(tmp_path / "m")
    assert isinstance(got.executor, cqil.CQILExecutor)
    assert torch.equal(_logits(got, ids), _logits(m, ids))


# ---------------------------------------------------------------------------- accelerated

@pytest.mark.parametrize("base", list(BASES))
def test_sparsity_accelerated_with_mixed_kernels_replays_exactly(base, tmp_path):
    m = _model(base)
    ids = _ids(m)
    apply_(m, SparsityConfig(sparsity=0.75, structure="block", block=16, parts=("attn", "ffn")))
    fast = copy.deepcopy(m)
    paths = {"attn.q": "bsr", "attn.k": "csr", "attn.v": "block-gathered-dense",
             "attn.o": "dense", "ffn.up": "csr", "ffn.down": "bsr"}
    rows = S.accelerate(fast, ids, rounds=1, timer=_timer(
        lambda layer: paths[".".join(layer.split(".")[-2:])]))
    chosen = {r["layer"]: r["chosen"] for r in _site_rows(rows)}
    assert len(set(chosen.values())) == 4  # mixed: every path above but one won somewhere

    labkit.save(m, tmp_path / "m", acceleration=rows)
    got = labkit.load(tmp_path / "m")
    for name in chosen:
        assert type(got.get_submodule(name)) is type(fast.get_submodule(name)), name
    assert torch.equal(_logits(got, ids), _logits(fast, ids))
    assert all(r["replayed"] for r in got.acceleration)
    assert _site_rows(got.acceleration)[0]["bsr_ms"] == _site_rows(rows)[0]["bsr_ms"]
    sim = labkit.load(tmp_path / "m", accelerate=False)
    assert torch.equal(_logits(sim, ids), _logits(m, ids))
    assert not any(isinstance(x, K.SparseLinearBase) for x in sim.modules())


def test_neuron_sparsity_compacted_in_one_block_dense_in_the_other(tmp_path):
    m = _model("post-norm")
    ids = _ids(m)
    apply_(m, SparsityConfig(sparsity=0.5, structure="neuron"))
    fast = copy.deepcopy(m)
    with warnings.catch_warnings(record=True):
        rows = S.accelerate(fast, ids, rounds=1, timer=_timer(
            lambda layer: "compacted-dense" if layer == "blocks.0.ffn" else "dense"))
    assert [r["chosen"] for r in _site_rows(rows)] == ["compacted-dense", "dense"]
    labkit.save(m, tmp_path / "m", acceleration=rows)
    got = labkit.load(tmp_path / "m")
    assert isinstance(got.blocks[0].ffn, K.CompactedMLP)
    assert not isinstance(got.blocks[1].ffn, K.CompactedMLP)
    assert torch.equal(_logits(got, ids), _logits(fast, ids))


INT8_PICK = {"attn.q": "int8_dynamic", "attn.k": "torch_dynamic", "attn.v": "bf16",
             "attn.o": "int8_weight_only", "ffn.up": "int8_dynamic", "ffn.down": "fp32"}


def _int8_fast(m, ids):
    fast = copy.deepcopy(m)
    with warnings.catch_warnings(record=True):
        rows = I.accelerate_(fast, (ids,), rounds=1, timer=_timer(
            lambda layer: INT8_PICK[".".join(layer.split(".")[-2:])]))
    return fast, rows


@pytest.mark.parametrize("base", list(BASES))
def test_int8_accelerated_with_mixed_choices_replays_exactly(base, tmp_path):
    m = _model(base)
    apply_(m, EarlyExitConfig(exits=(0,)))  # a simulate technique under the INT8 sites
    ids = _ids(m)
    fast, rows = _int8_fast(m, ids)
    chosen = {r["layer"]: r["chosen"] for r in _site_rows(rows)}
    assert set(chosen.values()) == set(INT8_PICK.values())

    labkit.save(m, tmp_path / "m", acceleration=rows)
    with warnings.catch_warnings(record=True):
        got = labkit.load(tmp_path / "m")
    for name, cand in chosen.items():
        assert got.get_submodule(name).candidate == cand, name
    # the same kernels rebuilt from the same fp32 weights: equal to the last bit
    assert torch.equal(_logits(got, ids), _logits(fast, ids))
    recipe = json.loads((tmp_path / "m" / "recipe.json").read_text())
    stage = recipe["acceleration"][0]
    assert stage["sites"] == "int8" and stage["choices"] == chosen
    assert stage["rows"][-1]["layer"] == A.MODEL  # the timing rows, for the record


def test_sparse_then_int8_stages_replay_in_order(tmp_path):
    m = _model("tiny")
    ids = _ids(m)
    apply_(m, SparsityConfig(sparsity=0.5, structure="neuron"))
    fast = copy.deepcopy(m)
    with warnings.catch_warnings(record=True):
        sparse_rows = S.accelerate(fast, ids, rounds=1,
                                   timer=_timer(lambda layer: "compacted-dense"))
        int8_rows = I.accelerate_(fast, (ids,), rounds=1,
                                  timer=_timer(lambda layer: "int8_dynamic"))
    # the second stage's sites exist only after the first: the compacted FFN's plain linears
    assert "blocks.0.ffn.up" in {r["layer"] for r in _site_rows(int8_rows)}
    labkit.save(m, tmp_path / "m", acceleration=[sparse_rows, int8_rows])
    with warnings.catch_warnings(record=True):
        got = labkit.load(tmp_path / "m")
    assert isinstance(got.blocks[0].ffn, K.CompactedMLP)
    assert isinstance(got.blocks[0].attn.q, I.AcceleratedLinear)
    assert isinstance(got.blocks[0].ffn.up, I.AcceleratedLinear)
    assert torch.equal(_logits(got, ids), _logits(fast, ids))
    with pytest.raises(saving.SavedModelError, match=r"acceleration\[0\].site='blocks.0.ffn.up'"):
        labkit.save(m, tmp_path / "n", acceleration=[int8_rows, sparse_rows])  # wrong order


def test_place_puts_each_site_on_its_choice_and_rejects_unknown_ones():
    m = _model("tiny")
    choices = {"blocks.0.attn.q": "int8_dynamic", "blocks.1.ffn.down": "bf16"}
    with warnings.catch_warnings(record=True):
        rows = A.place(m, I.sites(("int8_dynamic", "bf16")), choices)
    assert {r["layer"]: r["chosen"] for r in rows} == choices
    assert m.blocks[0].attn.q.candidate == "int8_dynamic"
    assert m.blocks[1].ffn.down.candidate == "bf16"
    assert type(m.blocks[0].attn.k) is torch.nn.Linear  # not named: left as it was
    with pytest.raises(labkit.LabkitConfigError, match="site='blocks.9.attn.q'"):
        A.place(_model("tiny"), I.sites(), {"blocks.9.attn.q": "fp32"})
    with pytest.raises(labkit.LabkitConfigError, match="candidate of blocks.0.attn.q='csr'"):
        A.place(_model("tiny"), I.sites(), {"blocks.0.attn.q": "csr"})


# ---------------------------------------------------------------------------- restoring mode

def test_restoring_builds_structure_only(monkeypatch):
    cfg = SparsityConfig(sparsity=0.5, structure="unstructured")
    m = _model("tiny")
    with registry.restoring():
        assert registry.is_restoring()
        apply_(m, cfg)
    assert not registry.is_restoring()
    assert all(bool(lin.mask.all()) for lin in S.masked_linears(m).values())
    apply_(pruned := _model("tiny"), cfg)
    assert not any(bool(lin.mask.all()) for lin in S.masked_linears(pruned).values())

    def no_svd(*a, **k):
        raise AssertionError("restoring computed an SVD")
    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    with registry.restoring():
        apply_(_model("tiny"), FactorizedFFNConfig(rank=8, init="svd"))
    with pytest.raises(AssertionError, match="SVD"):
        apply_(_model("tiny"), FactorizedFFNConfig(rank=8, init="svd"))


def test_load_computes_no_masks_and_leaves_the_global_rng_alone(tmp_path, monkeypatch):
    m = _model("tiny")
    apply_(m, SparsityConfig(sparsity=0.5, structure="neuron"))
    labkit.save(m, tmp_path / "m")

    def no_masks(*a, **k):
        raise AssertionError("load computed masks")
    monkeypatch.setattr(S, "compute_masks", no_masks)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    got = labkit.load(tmp_path / "m")
    assert torch.equal(torch.rand(1), expected_next)
    ids = _ids(m)
    assert torch.equal(_logits(got, ids), _logits(m, ids))


# ---------------------------------------------------------------------------- writing

def test_never_clobbers_and_overwrites_atomically(tmp_path):
    a, b = _model("tiny"), _model("post-norm")
    ids = _ids(a)
    labkit.save(a, tmp_path / "m")
    before = (tmp_path / "m" / "weights.safetensors").read_bytes()
    with pytest.raises(saving.SavedModelError, match="path=.*does not exist yet, or overwrite=True"):
        labkit.save(b, tmp_path / "m")
    assert (tmp_path / "m" / "weights.safetensors").read_bytes() == before
    labkit.save(b, tmp_path / "m", overwrite=True)
    assert torch.equal(_logits(labkit.load(tmp_path / "m"), ids), _logits(b, ids))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp folder left

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(saving.SavedModelError, match="nothing else is replaced"):
        labkit.save(a, other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"


def test_overwrite_without_atomic_exchange_warns_and_still_replaces(tmp_path, monkeypatch):
    labkit.save(_model("tiny"), tmp_path / "m")
    monkeypatch.setattr(saving, "_renameat2", lambda *a: False)
    b = _model("post-norm")
    with pytest.warns(UserWarning, match="two renames"):
        labkit.save(b, tmp_path / "m", overwrite=True)
    ids = _ids(b)
    assert torch.equal(_logits(labkit.load(tmp_path / "m"), ids), _logits(b, ids))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(saving, "write_json_atomic", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        labkit.save(_model("tiny"), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- refused models

def test_an_accelerated_model_is_refused_with_what_to_save_instead(tmp_path):
    m = _model("tiny")
    fast, _ = _int8_fast(m, _ids(m))
    with pytest.raises(saving.SavedModelError) as e:
        labkit.save(fast, tmp_path / "m")
    msg = str(e.value)
    assert "AcceleratedLinear" in msg and "copy.deepcopy(model)" in msg
    assert "labkit.save(model, path, acceleration=rows)" in msg
    m2 = _model("tiny")
    apply_(m2, Int8Config())
    with pytest.raises(saving.SavedModelError, match="accelerated"):
        labkit.save(m2, tmp_path / "m")
    sparse = _model("tiny")
    S.compact_neurons_(sparse, 0.5)  # compacted for real, outside apply_
    with pytest.raises(saving.SavedModelError, match="CompactedMLP"):
        labkit.save(sparse, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_a_model_its_recipe_does_not_describe_is_refused(tmp_path, monkeypatch):
    m = _model("tiny")
    apply_(m, LoRAConfig(rank=4))
    cqil.merge_lora_(m)  # modules swapped outside apply_: the recipe still says LoRA
    with pytest.raises(saving.SavedModelError, match="not rebuilt by its recipe"):
        labkit.save(m, tmp_path / "m")

    m = _model("tiny")
    apply_(m, EarlyExitConfig(exits=(0,), q=0.34))  # 3 labels: every sample exits at once
    m.executor.exiting = True
    monkeypatch.setattr(EE.EarlyExitExecutor, "saved_attributes", ())  # state not declared
    with pytest.raises(saving.SavedModelError, match="rebuilt with different logits"):
        labkit.save(m, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(saving.SavedModelError, match="labkit.model.Transformer"):
        labkit.save(torch.nn.Linear(2, 2), tmp_path / "m")


def test_acceleration_rows_of_an_unknown_site_builder_are_refused(tmp_path):
    rows = [{"layer": "blocks.0.attn.q", "current": "fp32", "chosen": "fp4-magic",
             "kernel_path": "?"}]
    with pytest.raises(saving.SavedModelError, match="acceleration=.*int8.sites"):
        labkit.save(_model("tiny"), tmp_path / "m", acceleration=rows)
    with pytest.raises(saving.SavedModelError, match="acceleration='str'"):
        labkit.save(_model("tiny"), tmp_path / "m", acceleration="rows")


# ---------------------------------------------------------------------------- bad files

@pytest.fixture
def saved(tmp_path):
    m = _model("tiny")
    apply_(m, SparsityConfig(sparsity=0.5, structure="neuron"))
    labkit.save(m, tmp_path / "m")
    return tmp_path / "m"


def _edit(folder, fn):
    path = folder / "recipe.json"
    recipe = json.loads(path.read_text())
    fn(recipe)
    path.write_text(json.dumps(recipe))


def test_unknown_technique_names_it_and_what_is_known(saved):
    _edit(saved, lambda r: r["techniques"][0].update(technique="MagicConfig"))
    with pytest.raises(saving.SavedModelError) as e:
        labkit.load(saved)
    assert e.value.name == "techniques[0].technique" and e.value.value == "MagicConfig"
    assert "SparsityConfig" in e.value.allowed
    assert "Int8Config" not in re.findall(r"\w+", e.value.allowed)  # an accelerate step


def test_unknown_or_bad_technique_field_is_named(saved):
    _edit(saved, lambda r: r["techniques"][0].update(wings=2))
    with pytest.raises(saving.SavedModelError, match=r"techniques\[0\].wings=2 .*sparsity"):
        labkit.load(saved)
    _edit(saved, lambda r: (r["techniques"][0].pop("wings"),
                            r["techniques"][0].update(sparsity=1.5)))
    with pytest.raises(saving.SavedModelError, match=r"techniques\[0\].sparsity=1.5"):
        labkit.load(saved)
    _edit(saved, lambda r: (r["techniques"][0].update(sparsity=0.5),
                            r["model_config"].update(d_model=63)))
    with pytest.raises(saving.SavedModelError, match="model_config.n_heads"):
        labkit.load(saved)


def test_accelerate_step_in_the_techniques_is_refused(saved):
    _edit(saved, lambda r: r["techniques"].append({"technique": "AccelerateConfig"}))
    with pytest.raises(saving.SavedModelError, match=r"techniques\[1\].technique='AccelerateConfig'"):
        labkit.load(saved)


def test_format_and_labkit_versions_say_what_is_had_and_needed(saved):
    _edit(saved, lambda r: r.update(format_version=2))
    with pytest.raises(saving.SavedModelError) as e:
        labkit.load(saved)
    assert e.value.name == "format_version" and e.value.value == 2
    assert f"1 to {saving.FORMAT_VERSION}" in e.value.allowed and "format version 2" in e.value.allowed
    _edit(saved, lambda r: r.update(format_version=1, labkit_version="9.1.0"))
    with pytest.raises(saving.SavedModelError) as e:
        labkit.load(saved)
    assert f"this is labkit {labkit.__version__}" in e.value.allowed
    assert "needs labkit >= 9.1.0" in e.value.allowed
    _edit(saved, lambda r: r.update(labkit_version="0.0.9"))  # older files load
    labkit.load(saved)
    _edit(saved, lambda r: r.update(format="something-else"))
    with pytest.raises(saving.SavedModelError, match="format='something-else'"):
        labkit.load(saved)


def test_a_bad_acceleration_record_is_named(tmp_path):
    m = _model("tiny")
    _, rows = _int8_fast(m, _ids(m))
    labkit.save(m, tmp_path / "m", acceleration=rows)
    folder = tmp_path / "m"
    _edit(folder, lambda r: r["acceleration"][0].update(sites="gpu"))
    with pytest.raises(saving.SavedModelError, match=r"acceleration\[0\].sites='gpu'.*'int8'"):
        labkit.load(folder)
    _edit(folder, lambda r: r["acceleration"][0].update(sites="int8", choices={
        "blocks.0.attn.q": "fp4"}))
    with pytest.raises(saving.SavedModelError, match=r"candidate of blocks.0.attn.q='fp4'"):
        labkit.load(folder)
    _edit(folder, lambda r: r["acceleration"][0].update(choices=["blocks.0.attn.q"]))
    with pytest.raises(saving.SavedModelError, match=r"acceleration\[0\].choices"):
        labkit.load(folder)
    assert labkit.load(folder, accelerate=False) is not None  # the simulate stage still loads


def _rewrite_weights(folder, fn):
    path = folder / "weights.safetensors"
    state = dict(load_file(path))
    fn(state)
    save_file(state, path)


def test_missing_extra_and_mismatched_tensors_are_named(saved):
    original = dict(load_file(saved / "weights.safetensors"))
    _rewrite_weights(saved, lambda s: s.pop("blocks.1.attn.q.weight"))
    with pytest.raises(saving.SavedModelError, match="tensor='blocks.1.attn.q.weight'.*missing"):
        labkit.load(saved)
    _rewrite_weights(saved, lambda s: s.update(original, **{"blocks.1.attn.q.weight":
                                                            torch.zeros(64, 32)}))
    with pytest.raises(saving.SavedModelError,
                       match=r"tensor blocks.1.attn.q.weight='\(64, 32\) torch.float32'.*"
                             r"shape \(64, 64\)"):
        labkit.load(saved)
    _rewrite_weights(saved, lambda s: s.update(original, **{"blocks.1.attn.q.weight":
                                                            torch.zeros(64, 64).half()}))
    with pytest.raises(saving.SavedModelError, match="float16"):
        labkit.load(saved)
    _rewrite_weights(saved, lambda s: s.update(original, extra=torch.zeros(1)))
    with pytest.raises(saving.SavedModelError, match="tensor='extra'"):
        labkit.load(saved)
    (saved / "weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(saving.SavedModelError, match="a readable safetensors file"):
        labkit.load(saved)


def test_not_a_saved_model_folder(tmp_path):
    with pytest.raises(saving.SavedModelError, match="a folder written by labkit.save"):
        labkit.load(tmp_path)
    (tmp_path / "recipe.json").write_text("{")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(saving.SavedModelError, match="valid JSON"):
        labkit.load(tmp_path)


def test_word_tokenizer_is_saved_beside_the_model(tmp_path):
    from labkit.data import WordTokenizer

    tok = WordTokenizer.fit(["the cat sat on the mat", "a dog ran"])
    m = _model("tiny")
    labkit.save(m, tmp_path / "m", tokenizer=tok)
    got = saving.load_tokenizer(tmp_path / "m")
    assert got.vocab == tok.vocab
    assert got.encode_pair("the cat", "a dog", 16) == tok.encode_pair("the cat", "a dog", 16)
    labkit.save(m, tmp_path / "n")
    with pytest.raises(saving.SavedModelError, match="tokenizer=None"):
        saving.load_tokenizer(tmp_path / "n")
    with pytest.raises(saving.SavedModelError, match="tokenizer='dict'"):
        labkit.save(m, tmp_path / "o", tokenizer={"a": 1})
    big = WordTokenizer([f"w{i}" for i in range(2000)])
    with pytest.raises(saving.SavedModelError, match="vocab_size=1024"):
        labkit.save(m, tmp_path / "o", tokenizer=big)


def test_a_model_that_cannot_run_yet_is_saved_after_the_structural_check(tmp_path):
    m = _model("tiny")
    apply_(m, FakeQuantConfig(bits=8, activations=True))  # never calibrated: forward raises
    with pytest.warns(UserWarning, match="structural check only"):
        labkit.save(m, tmp_path / "m")
    ids = _ids(m)
    Q.calibrate(m, [ids])
    got = labkit.load(tmp_path / "m")
    Q.calibrate(got, [ids])
    assert torch.equal(_logits(got, ids), _logits(m, ids))


def test_labkit_exports_save_and_load():
    assert labkit.save is saving.save and labkit.load is saving.load


def test_activation_aware_compensated_pruning_round_trips(tmp_path):
    """Scores and compensated biases come from calibration rows at apply time; the file
    holds the masks and biases, so a reload needs no calibration and gives the same logits."""
    import copy

    from labkit.techniques import SparsityConfig, apply_

    torch.manual_seed(0)
    m = build(ModelConfig(norm_position="post", type_vocab_size=2), seed=0)
    cal = [{"input_ids": torch.randint(5, 1000, (8, 16))}]
    apply_(m, SparsityConfig(sparsity=0.5, structure="neuron", score="activation",
                             compensate=True), calibration=cal)
    labkit.save(copy.deepcopy(m), tmp_path / "m")
    again = labkit.load(tmp_path / "m")
    ids = torch.randint(5, 1000, (4, 16))
    with torch.no_grad():
        assert torch.equal(again(ids), m(ids))
