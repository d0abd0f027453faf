"""The import graph, read from the source (ast): every labkit module sits in one layer, no
module imports one above it (lazy imports inside functions count too), and no modules
import each other in a circle. The layers, lowest first, as README's layout states them:

    validate/figures -> model/train/data -> measure/accounting/accelerate ->
    techniques/kernels -> labs/benchmarks/dist/plan -> report/cli

``accelerate`` sits with ``measure``: it is the measuring rule (keep the fastest candidate
timed side by side, revert when the model got slower) that every technique's
``accelerate_`` calls, and it imports no technique."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "labkit"

LAYERS = [
    ("validate", "figures", "noise", "scope"),
    ("model", "train", "data", "glue_files", "pretrained", "ui"),
    ("measure", "roofline", "accounting", "accelerate"),
    ("techniques", "kernels"),
    ("notebook", "cache"),  # plumbing: parameters, figures, atomic result files, the cache
    ("labs", "benchmarks", "dist", "classifiers", "zoo", "baselines", "plan", "recover",
     "accuracy", "saving"),
    ("report", "report_html", "cli", "jupyterlab_app"),
]


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for p in root.rglob("*.py"):
        parts = p.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def imports(root: Path = ROOT, top_level_only: bool = False) -> dict[str, set[str]]:
    """``{module: labkit modules it imports}``; ``from . import x`` of a submodule names the
    submodule, not its package."""
    mods = modules(root)
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        nodes = tree.body if top_level_only else ast.walk(tree)
        for node in nodes:
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in mods]
                found = subs if len(subs) == len(node.names) else [mod, *subs]
            else:
                continue
            for m in found:
                if m in mods and m != name and m != "labkit":  # the package's lazy facade
                    edges.setdefault(name, set()).add(m)
    return edges


def layer(module: str) -> int | None:
    rel = module.removeprefix("labkit.")
    for i, names in enumerate(LAYERS):
        if rel.split(".")[0] in names:
            return i
    return None


def upward(edges) -> list[str]:
    return [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
            for a, bs in sorted(edges.items()) if a != "labkit"
            for b in sorted(bs) if layer(b) > layer(a)]


def circles(edges) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, count = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = count[0]
        count[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    assert [m for m in modules() if m != "labkit" and layer(m) is None] == []


def test_no_module_imports_one_above_it():
    assert upward(imports()) == []


def test_no_import_circle_lazy_imports_included():
    assert circles(imports()) == []


@pytest.mark.parametrize("line", ["from ..report import run\n",
                                  "def f():\n    from ..labs import paper\n"])
def test_an_upward_import_is_caught(tmp_path, line):
    import shutil

    copy = tmp_path / "labkit"
    shutil.copytree(ROOT, copy)
    with open(copy / "techniques" / "registry.py", "a") as f:
        f.write("\n" + line)
    assert any(u.startswith("labkit.techniques.registry") for u in upward(imports(copy)))


def test_a_circle_is_caught():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_one_registry_holds_apply_and_account_of_a_toy_technique():
    """A technique defined here only: registered in one call, applied by ``apply_``,
    counted by ``expected``, listed by ``registered``; then removed from the table."""
    from dataclasses import dataclass

    from labkit import model as M
    from labkit.techniques import registry as R

    @dataclass(frozen=True)
    class HalveHeadConfig:  # scales the classifier head: a change both sides can see
        factor: float = 0.5

    def apply(model, config):
        model.head.weight.data.mul_(config.factor)
        return model

    def account(table, cfg, config):
        return {"head_factor": config.factor}

    R.register(HalveHeadConfig, apply=apply, account=account)
    try:
        m = M.build("tiny").eval()
        w = m.head.weight.detach().clone()
        R.apply_(m, HalveHeadConfig(0.25))
        assert (m.head.weight == 0.25 * w).all()
        assert m.applied_techniques[-1] == {"technique": "HalveHeadConfig", "factor": 0.25}
        assert R.expected(m.cfg, HalveHeadConfig(0.25))["detail"] == {"head_factor": 0.25}
        assert "HalveHeadConfig" in R.registered()
    finally:
        R._TECHNIQUES.pop(HalveHeadConfig, None)
    with pytest.raises(TypeError, match="no technique is registered for HalveHeadConfig"):
        R.apply_(M.build("tiny"), HalveHeadConfig())
