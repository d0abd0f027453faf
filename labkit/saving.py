"""Save and load a compressed model: tensors in safetensors, the recipe in JSON.

A saved model is a folder of two files::

    <path>/recipe.json          how to rebuild it (below)
    <path>/weights.safetensors  every tensor of the simulate-stage model (no pickle on load)
    <path>/tokenizer.json       with save(..., tokenizer=a WordTokenizer): its vocabulary

``recipe.json``::

    {"format": "labkit.saved-model", "format_version": 1,
     "labkit_version": "0.1.0", "torch_version": "2.13.0+cpu",
     "model_config": {...},             # dataclasses.asdict of the ModelConfig before any technique
     "techniques": [{"technique": "SparsityConfig", "sparsity": 0.5, ...}, ...],   # in order
     "module_state": {"executor": {"q": 0.8, "calibrated": true, "exiting": false}},
     "tied": {"head.weight": "embed.weight"},     # tensors stored once, under the first name
     "tokenizer": {"kind": "word", "file": "tokenizer.json"},   # or {"kind": "minilm"}, null
     "acceleration": [{"sites": "int8", "builder": "labkit.techniques.int8.sites",
                       "arguments": {...}, "choices": {"blocks.0.attn.q": "int8_dynamic"},
                       "rows": [...]}]}           # the timing rows, kept for the record

What is saved is the *simulate* stage (masks, fake quant, swapped attention, executors),
because accelerated modules hold packed weights or tensor subclasses that safetensors does
not carry and that no config rebuilds; they are rebuilt from the simulate stage
deterministically. The acceleration is handed over as the rows :func:`labkit.accelerate.
accelerate` returned for a copy of the model (``int8.accelerate_``, ``sparsity.accelerate``),
and replayed on load by :func:`labkit.accelerate.place`, without timing::

    fast = copy.deepcopy(model)
    rows = int8.accelerate_(fast, (ids,))            # or sparsity.accelerate(fast, ids)
    labkit.save(model, "my-model", acceleration=rows)   # several stages: [rows1, rows2]
    labkit.load("my-model")                          # logits == fast's
    labkit.load("my-model", accelerate=False)        # logits == model's (e.g. to recover more)

Loading builds the base model from ``model_config``, re-applies the techniques in order under
:func:`labkit.techniques.registry.restoring` (structure only: no masks, SVDs or calibration
computed), sets the modules' ``saved_attributes`` (plain state outside the tensors, e.g. an
early-exit threshold), loads every tensor with ``load_state_dict(strict=True)`` and replays
the acceleration. :func:`save` checks this before publishing: it rebuilds the model from the
new files and compares logits on a probe batch (exactly), so a model that its recipe does not
describe (a module swapped outside ``apply_``) is refused at save time, not at load time.

Writing is atomic: both files go into a temporary folder beside ``path``, which is then
renamed into place; ``overwrite=True`` swaps it with an existing saved model in one
``renameat2(RENAME_EXCHANGE)`` (Linux), so a reader sees the old or the new model, never
half of one. Nothing but a labkit saved model folder is ever replaced.
"""
from __future__ import annotations

import copy
import ctypes
import dataclasses
import errno
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import accelerate as A
from . import validate as V
from .model import Attention, ModelConfig, Transformer
from .notebook import atomic_write, write_json_atomic

FORMAT = "labkit.saved-model"
FORMAT_VERSION = 1  # what this labkit writes; it reads every version up to this one
RECIPE, WEIGHTS, TOKENIZER = "recipe.json", "weights.safetensors", "tokenizer.json"
# techniques that put a model on real kernels: saved as acceleration rows, never re-applied
ACCELERATE_STEPS = ("Int8Config", "AccelerateConfig")


class SavedModelError(V.LabkitConfigError):
    """A saved model (or a model to save) that labkit cannot write or rebuild."""


# ---------------------------------------------------------------------------- site kinds

@dataclass(frozen=True)
class _SiteKind:
    """A site builder whose choices :func:`load` can replay: its candidate names, the
    arguments recorded for a set of chosen candidates, and the builder itself."""

    builder: str  # its dotted name, for the reader of recipe.json
    make: Callable
    candidates: tuple[str, ...]
    argument: str  # the builder's argument that lists the candidates to build
    fixed: tuple = ()  # other arguments, (name, value) pairs

    def arguments(self, chosen: set[str]) -> dict:
        return {self.argument: sorted(chosen), **{k: list(v) for k, v in self.fixed}}

    def build(self, arguments: dict):
        return self.make(**{k: tuple(v) for k, v in arguments.items()})


def _kinds() -> dict[str, _SiteKind]:
    from .techniques import int8, sparsity

    # int8: every linear, head included, is a possible site; the rows name the real ones
    return {"sparsity": _SiteKind("labkit.techniques.sparsity.sites", sparsity.sites,
                                  tuple(sparsity.PATHS), "paths"),
            "int8": _SiteKind("labkit.techniques.int8.sites", int8.sites,
                              tuple(int8.CANDIDATES), "candidates",
                              (("parts", ("attn", "ffn", "head")),))}


def _stage(rows: list[dict]) -> dict:
    """One acceleration stage from the rows ``accelerate`` returned: which site builder made
    them (told by the candidate names), the chosen candidate of every site it replaced."""
    kinds = _kinds()
    sites = [r for r in rows if r.get("layer") != A.MODEL]
    names = {r.get(k) for r in sites for k in ("current", "chosen")}
    kind = next((k for k, s in kinds.items() if names <= set(s.candidates)), None)
    if kind is None:
        raise SavedModelError(
            "acceleration", sorted(map(str, names)),
            "rows of " + " or ".join(f"{s.builder} (candidates {', '.join(s.candidates)})"
                                     for s in kinds.values()))
    choices = {r["layer"]: r["chosen"] for r in sites if "kernel_path" in r}  # the replaced
    return {"sites": kind, "builder": kinds[kind].builder,
            "arguments": kinds[kind].arguments(set(choices.values())), "choices": choices,
            "rows": json.loads(json.dumps(rows, default=str))}


def _stages(acceleration) -> list[dict]:
    if acceleration is None:
        return []
    allowed = ("the rows accelerate returned for a copy of the model (a list of dicts), or "
               "a list of such lists in the order they were applied")
    if not isinstance(acceleration, (list, tuple)) or not acceleration:
        raise SavedModelError("acceleration", type(acceleration).__name__, allowed)
    stages = [acceleration] if all(isinstance(r, dict) for r in acceleration) else acceleration
    if not all(isinstance(s, (list, tuple)) and all(isinstance(r, dict) for r in s)
               for s in stages):
        raise SavedModelError("acceleration", type(acceleration).__name__, allowed)
    return [_stage(list(s)) for s in stages]


def _replay(model: nn.Module, stages: list[dict]) -> None:
    """Put every site on its recorded candidate, stage by stage (no timing)."""
    kinds = _kinds()
    for i, st in enumerate(stages):
        kind = kinds.get(st.get("sites"))
        if kind is None:
            raise SavedModelError(f"acceleration[{i}].sites", st.get("sites"),
                                  "one of " + ", ".join(map(repr, kinds)))
        args = st.get("arguments", {})
        want = set(kind.arguments(set()))
        if set(args) != want:
            raise SavedModelError(f"acceleration[{i}].arguments", sorted(args),
                                  f"the arguments {sorted(want)} of {kind.builder}")
        for c in args[kind.argument]:
            if c not in kind.candidates:
                raise SavedModelError(f"acceleration[{i}].arguments.{kind.argument}", c,
                                      "one of " + ", ".join(kind.candidates))
        choices = st.get("choices", {})
        if not isinstance(choices, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in choices.items()):
            raise SavedModelError(f"acceleration[{i}].choices", choices,
                                  "a JSON object {site name: candidate name}")
        try:
            A.place(model, kind.build(args), choices)
        except V.LabkitConfigError as e:  # stages replay in order: a site may come from one
            raise _prefixed(f"acceleration[{i}]", e) from None
        model.acceleration = [{**r, "replayed": True} for r in st.get("rows", [])]


# ---------------------------------------------------------------------------- checks

def _accelerated(model: nn.Module) -> list[str]:
    """Modules (and tensors) of the accelerate stage: real kernels a config cannot rebuild."""
    from . import kernels as K
    from .techniques import int8

    kinds = (K.DenseLinear, K.SparseLinearBase, K.CompactedMLP, K.CompactedAttention,
             int8.AcceleratedLinear, int8.CastLinear)
    out = [f"{n}: {type(m).__name__}" for n, m in model.named_modules()
           if isinstance(m, kinds) or type(m).__module__.startswith("torch.ao.nn.quantized")]
    if not out:
        out = [f"{n}: {type(t).__name__} ({t.layout})" for n, t in model.state_dict().items()
               if not _plain(t)]
    return out


def _plain(t) -> bool:
    return (isinstance(t, torch.Tensor) and type(t) in (torch.Tensor, nn.Parameter)
            and t.layout == torch.strided and not t.is_quantized)


def _literal(name: str, value):
    """A JSON literal (tuples become lists; :func:`_tuples` turns them back)."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        raise SavedModelError(name, value, "a plain literal (number, string, bool, None or a "
                                           "tuple of them)") from None


def _tuples(value):
    """JSON lists back to the tuples labkit configs hold (``layers``, ``bits_by_layer``)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _version(text: str) -> tuple[int, ...]:
    m = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(text))
    return tuple(int(x or 0) for x in m.groups()) if m else (0,)


def _labkit_version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------------------- save

def _recipe(model: nn.Module, acceleration) -> dict:
    if not isinstance(model, Transformer):
        raise SavedModelError("model", type(model).__name__,
                              "a labkit.model.Transformer (model.build, or pretrained."
                              "minilm_transformer) with its techniques applied by apply_")
    fix = ("save the model as it was before accelerating and pass the rows accelerate "
           "returned for a copy of it: fast = copy.deepcopy(model); rows = "
           "int8.accelerate_(fast, (ids,)) (or sparsity.accelerate(fast, ids)); "
           "labkit.save(model, path, acceleration=rows)")
    held = _accelerated(model)
    if held:
        raise SavedModelError("model", f"accelerated ({', '.join(held[:3])}"
                                       f"{', ...' if len(held) > 3 else ''})",
                              "a simulate-stage model (accelerated kernels cannot be rebuilt "
                              "from a config): " + fix)
    techniques = [dict(t) for t in getattr(model, "applied_techniques", [])]
    for i, t in enumerate(techniques):
        if t.get("technique") in ACCELERATE_STEPS:
            raise SavedModelError(f"techniques[{i}]", t["technique"],
                                  "a simulate-stage technique: " + fix)
    state = {}
    for name, m in model.named_modules():
        attrs = getattr(type(m), "saved_attributes", ())
        if attrs:
            state[name] = {a: _literal(f"{name}.{a}", getattr(m, a)) for a in attrs}
    base = getattr(model, "base_cfg", model.cfg)
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "labkit_version": _labkit_version(), "torch_version": torch.__version__,
            "model_config": dataclasses.asdict(base),
            "techniques": _literal("techniques", techniques), "module_state": state,
            "tied": {}, "acceleration": _stages(acceleration)}


def _tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``({name: tensor}, {alias: kept name})``: a tensor reachable under several names (tied
    embeddings, shared layers) is stored once; safetensors refuses shared memory."""
    out, tied, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        t = t.detach()
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t.contiguous()
    by_storage: dict = {}
    for name, t in out.items():  # other overlaps (two views of one storage): own copies
        if t.numel():
            by_storage.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(name)
    for names in by_storage.values():
        for name in names[1:]:
            out[name] = out[name].clone()
    return out, tied


def _probe_ids(model: Transformer) -> torch.Tensor:
    """A fixed (2, n) batch within every length limit of the model (Linformer's n)."""
    limits = [m.seq_len for m in model.modules()
              if isinstance(m, Attention) and isinstance(getattr(m, "seq_len", None), int)]
    n = min(8, model.cfg.max_len, *limits)
    return torch.randint(0, model.cfg.vocab_size, (2, n),
                         generator=torch.Generator().manual_seed(0))


def _verify(model: Transformer, folder: Path) -> None:
    """Rebuild from the new files and compare logits with the model's, exactly."""
    ref_model = copy.deepcopy(model).eval()
    ids = _probe_ids(model)
    try:
        recipe = read_recipe(folder)
        got_model = _rebuild(folder, recipe)
    except V.LabkitConfigError as e:
        raise SavedModelError("model", "not rebuilt by its recipe",
                              f"a model whose modules were all swapped by apply_ (rebuilding "
                              f"it from the recipe failed: {e})") from e
    with torch.no_grad():
        try:
            ref = ref_model(ids)
        except (RuntimeError, ValueError) as e:  # e.g. activation quantizers not calibrated
            warnings.warn(f"the model does not run on a probe batch ({str(e)[:120]}): saved "
                          "after the structural check only (every tensor rebuilt, strict "
                          "load), logits not compared", stacklevel=3)
            ref = None
        got = got_model(ids) if ref is not None else None
    if ref is not None and not torch.equal(ref, got):
        diff = float((ref.float() - got.float()).abs().max())
        raise SavedModelError(
            "model", f"rebuilt with different logits (max |diff| {diff:.3g})",
            "a model that its recipe and tensors describe: some state lives outside the "
            "state_dict and apply_ (declare plain attributes in the module's "
            "saved_attributes; swap modules only through labkit.techniques.apply_)")
    _replay(got_model, recipe["acceleration"])  # the choices place on this model


def _tokenizer(tokenizer, vocab_size: int) -> tuple[dict | None, list | None]:
    """The recipe's ``tokenizer`` entry and the vocabulary to write (a WordTokenizer's)."""
    from .data import WordTokenizer
    from .pretrained import PairTokenizer

    if tokenizer is None:
        return None, None
    if isinstance(tokenizer, (WordTokenizer, PairTokenizer)) and len(tokenizer) > vocab_size:
        raise SavedModelError("tokenizer", f"{len(tokenizer)} tokens",
                              f"at most the model's vocab_size={vocab_size}")
    if isinstance(tokenizer, WordTokenizer):
        return {"kind": "word", "file": TOKENIZER}, list(tokenizer.vocab)
    if isinstance(tokenizer, PairTokenizer):  # MiniLM's WordPiece, from its package
        return {"kind": "minilm"}, None
    raise SavedModelError("tokenizer", type(tokenizer).__name__,
                          "None, a labkit.data.WordTokenizer or a labkit.pretrained."
                          "PairTokenizer")


def save(model: nn.Module, path, acceleration=None, tokenizer=None, overwrite: bool = False,
         verify: bool = True) -> Path:
    """Write ``model`` (simulate stage) and its recipe to the folder ``path``; returns it.

    ``acceleration``: the rows ``accelerate`` returned for a copy of ``model`` (or a list of
    such lists, in order), replayed by :func:`load`. ``tokenizer``: the one that made the
    model's ids (a ``WordTokenizer``'s vocabulary is written beside the weights; MiniLM's
    ``PairTokenizer`` is recorded by name), for :func:`load_tokenizer`. ``overwrite``: replace
    an existing saved model at ``path`` (atomically); anything else at ``path`` is never
    replaced. ``verify``: rebuild from the written files and require equal logits on a
    probe batch before publishing."""
    path = Path(path)
    V.boolean("overwrite", overwrite)
    V.boolean("verify", verify)
    check_target(path, overwrite)
    recipe = _recipe(model, acceleration)
    recipe["tokenizer"], vocab = _tokenizer(tokenizer, model.cfg.vocab_size)
    tensors, recipe["tied"] = _tensors(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".saving"))
    try:
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
        atomic_write(tmp / WEIGHTS, lambda p: save_file(tensors, p, metadata=meta))
        write_json_atomic(tmp / RECIPE, recipe)
        if vocab is not None:
            write_json_atomic(tmp / TOKENIZER, vocab)
        if verify:
            _verify(model, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp made it private
        _publish(tmp, path, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a rename, or a failed save
    return path


def is_saved_model(path) -> bool:
    """True when ``path`` is a folder written by :func:`save`."""
    try:
        return json.loads((Path(path) / RECIPE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_target(path, overwrite: bool = False) -> None:
    """Raise :class:`SavedModelError` now when :func:`save` would refuse ``path`` (call it
    before a long search whose result goes there)."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise SavedModelError("path", str(path), "a path that does not exist yet, or "
                                                 "overwrite=True to replace the saved model there")
    if path.is_symlink() or not is_saved_model(path):
        raise SavedModelError("path", str(path), "with overwrite=True, a folder written by "
                                                 "labkit.save (nothing else is replaced)")


_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2``; False where the platform or file system lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    if err == errno.EEXIST:
        raise SavedModelError("path", str(dst), "a path that does not exist yet (it was "
                                                "created while saving)")
    raise OSError(err, os.strerror(err), str(dst))


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished folder ``tmp`` to ``path`` in one rename (or one exchange)."""
    check_target(path, overwrite)
    if not (path.exists() or path.is_symlink()):
        if not _renameat2(tmp, path, _RENAME_NOREPLACE):
            os.rename(tmp, path)  # POSIX refuses a non-empty folder: a saved model survives
        return
    if _renameat2(tmp, path, _RENAME_EXCHANGE):
        return  # tmp now holds the old model; the caller removes it
    warnings.warn(f"no atomic folder exchange here (renameat2): {path} is replaced in two "
                  "renames, and for an instant does not exist", stacklevel=3)
    old = tmp.with_name(tmp.name + ".old")
    os.rename(path, old)
    os.rename(tmp, path)
    os.rename(old, tmp)


# ---------------------------------------------------------------------------- load

def read_recipe(path) -> dict:
    """The checked ``recipe.json`` of the saved model at ``path``."""
    path = Path(path)
    if not (path / RECIPE).is_file() or not (path / WEIGHTS).is_file():
        raise SavedModelError("path", str(path), f"a folder written by labkit.save ({RECIPE} "
                                                 f"and {WEIGHTS})")
    try:
        recipe = json.loads((path / RECIPE).read_text())
    except ValueError as e:
        raise SavedModelError(RECIPE, str(path / RECIPE), f"valid JSON ({e})") from None
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        got = recipe.get("format") if isinstance(recipe, dict) else type(recipe).__name__
        raise SavedModelError("format", got, repr(FORMAT))
    ours = _labkit_version()
    fv = recipe.get("format_version")
    if isinstance(fv, bool) or not isinstance(fv, int) or not 1 <= fv <= FORMAT_VERSION:
        raise SavedModelError(
            "format_version", fv,
            f"a format version this labkit reads: 1 to {FORMAT_VERSION} (this is labkit "
            f"{ours}; the file needs a labkit that reads format version {fv})")
    lv = recipe.get("labkit_version")
    if not isinstance(lv, str) or _version(lv) > _version(ours):
        raise SavedModelError("labkit_version", lv,
                              f"a model saved by labkit <= {ours} (this is labkit {ours}; the "
                              f"file needs labkit >= {lv}: pip install -U labkit)")
    for key, kind in (("model_config", dict), ("techniques", list), ("module_state", dict),
                      ("tied", dict), ("acceleration", list)):
        if not isinstance(recipe.get(key), kind):
            raise SavedModelError(key, recipe.get(key), f"a JSON {kind.__name__} (see "
                                                        "labkit.saving's docstring)")
    return recipe


def _prefixed(prefix: str, e: V.LabkitConfigError) -> SavedModelError:
    return SavedModelError(f"{prefix}.{e.name}", e.value, e.allowed)


def _build(recipe: dict) -> Transformer:
    """The base model with the recipe's techniques applied in restoring mode."""
    from .techniques import registry

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg_fields = recipe["model_config"]
    for k in cfg_fields:
        if k not in fields:
            raise SavedModelError(f"model_config.{k}", cfg_fields[k],
                                  "fields of ModelConfig: " + ", ".join(sorted(fields)))
    try:
        cfg = ModelConfig(**{k: _tuples(v) for k, v in cfg_fields.items()})
    except V.LabkitConfigError as e:
        raise _prefixed("model_config", e) from None
    with torch.random.fork_rng(devices=[]), registry.restoring():  # the user's RNG untouched
        model = Transformer(cfg)
        for i, t in enumerate(recipe["techniques"]):
            name = t.get("technique") if isinstance(t, dict) else None
            cls = registry.config_class(name) if isinstance(name, str) else None
            if cls is None or name in ACCELERATE_STEPS:
                raise SavedModelError(f"techniques[{i}].technique", name,
                                      "a simulate-stage technique this labkit knows: " +
                                      ", ".join(n for n in registry.registered()
                                                if n not in ACCELERATE_STEPS))
            known = {f.name for f in dataclasses.fields(cls)}
            for k in t:
                if k != "technique" and k not in known:
                    raise SavedModelError(f"techniques[{i}].{k}", t[k],
                                          f"fields of {name}: " + ", ".join(sorted(known)))
            try:
                config = cls(**{k: _tuples(v) for k, v in t.items() if k != "technique"})
                registry.apply_(model, config)
            except V.LabkitConfigError as e:
                raise _prefixed(f"techniques[{i}]", e) from None
    for name, attrs in recipe["module_state"].items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise SavedModelError("module_state", name, "a module the recipe builds") from None
        allowed = getattr(type(mod), "saved_attributes", ())
        for a, v in attrs.items():
            if a not in allowed:
                raise SavedModelError(f"module_state.{name}", a,
                                      f"one of {type(mod).__name__}.saved_attributes "
                                      f"{tuple(allowed)}")
            setattr(mod, a, _tuples(v))
    return model


def _load_tensors(model: nn.Module, file: Path, tied: dict) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(file)
    except (SafetensorError, OSError) as e:
        raise SavedModelError(WEIGHTS, str(file), f"a readable safetensors file ({e})") from None
    for alias, kept in tied.items():
        if kept not in state:
            raise SavedModelError(f"tied.{alias}", kept, f"a tensor stored in {WEIGHTS}")
        state[alias] = state[kept]
    want = model.state_dict()
    for name, t in want.items():
        if name not in state:
            n = sum(k not in state for k in want)
            raise SavedModelError("tensor", name, f"present in {WEIGHTS}: the recipe builds it "
                                                  f"({n} of {len(want)} tensors missing)")
        got = state[name]
        if tuple(got.shape) != tuple(t.shape) or got.dtype != t.dtype:
            raise SavedModelError(f"tensor {name}", f"{tuple(got.shape)} {got.dtype}",
                                  f"shape {tuple(t.shape)} {t.dtype}, as the recipe builds it")
    for name in state:
        if name not in want:
            raise SavedModelError("tensor", name, f"only tensors the recipe builds (this "
                                                  f"one is in {WEIGHTS} but not in the model)")
    model.load_state_dict(state, strict=True)


def _rebuild(path: Path, recipe: dict) -> Transformer:
    model = _build(recipe)
    _load_tensors(model, path / WEIGHTS, recipe["tied"])
    return model.eval()


def load(path, accelerate: bool = True) -> Transformer:
    """The model saved at ``path`` by :func:`save`, in eval mode: base model, techniques
    re-applied in restoring mode, every tensor loaded (strict), then (``accelerate``) each
    site put on its recorded kernel without timing. ``accelerate=False``: the simulate
    stage. Raises :class:`SavedModelError` naming what in the file cannot be built."""
    V.boolean("accelerate", accelerate)
    path = Path(path)
    recipe = read_recipe(path)
    model = _rebuild(path, recipe)
    if accelerate and recipe["acceleration"]:
        if recipe.get("torch_version") != torch.__version__:
            warnings.warn(f"saved with torch {recipe.get('torch_version')}, loaded with "
                          f"{torch.__version__}: the accelerated kernels are rebuilt by this "
                          "torch and may round differently", stacklevel=2)
        _replay(model, recipe["acceleration"])
    model.saved_recipe = recipe
    return model


def load_tokenizer(path):
    """The tokenizer saved with the model at ``path`` (``save(..., tokenizer=)``): a
    :class:`labkit.data.WordTokenizer`, or MiniLM's :class:`labkit.pretrained.PairTokenizer`
    (which needs ``labkit[pretrained]``)."""
    from .data import WordTokenizer

    path = Path(path)
    entry = read_recipe(path).get("tokenizer")
    if entry == {"kind": "word", "file": TOKENIZER}:
        return WordTokenizer.load(path / TOKENIZER)
    if entry == {"kind": "minilm"}:
        from .pretrained import PairTokenizer

        return PairTokenizer()
    raise SavedModelError("tokenizer", entry, "a model saved with labkit.save(..., tokenizer=a "
                                              "WordTokenizer or PairTokenizer)")


__all__ = ["ACCELERATE_STEPS", "FORMAT", "FORMAT_VERSION", "SavedModelError",
           "check_target", "is_saved_model", "load", "load_tokenizer", "read_recipe", "save"]
