"""The package's layers: an import graph that is a line (no cycle, lazy imports included), one
caller of torch.ops.lori, and one router every caller goes through."""
import ast
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "lori_kernels"

# Bottom to top; a module may import only modules of its own layer or below (lazily too).
LAYERS = [
    {"spec", "packing", "reference", "_C"},
    {"rules", "_library", "testing"},
    {"validation", "triton"},
    {"backends"},
    {"ops"},
    {"pool"},
    {"nn"},
    {"workflow", "distributed"},
    {"config"},
    {"model"},
    {"serving"},
    {"integrations"},
    {"__init__"},
]


def _layer_of(mod: str) -> int:
    top = mod.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"module lori_kernels.{mod} is in no layer of tests/test_layering.py")


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: pathlib.Path) -> set[str]:
    """lori_kernels modules imported anywhere in the file (function bodies included)."""
    mod = _module_name(path)
    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    if mod == "__init__":
        pkg = []
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("lori_kernels"):
                    base = node.module.split(".")[1:]
                else:
                    continue
            else:
                base = (pkg[:len(pkg) - (node.level - 1)] if node.level > 1 else pkg) + (
                    node.module.split(".") if node.module else [])
            if node.module is None:  # from . import x, y: each is a module of the package
                out.update(".".join(base + [a.name]) for a in node.names)
            else:
                out.add(".".join(base))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("lori_kernels."):
                    out.add(a.name.split(".", 1)[1])
    return {m for m in out if m and m != mod}


def _graph():
    g = {}
    for path in PKG.rglob("*.py"):
        g[_module_name(path)] = _imports(path)
    return g


def test_every_import_goes_down_the_layers():
    bad = []
    for mod, deps in _graph().items():
        for d in deps:
            top_m, top_d = mod.split(".")[0], d.split(".")[0]
            if top_m == top_d:
                continue  # inside one subpackage: checked for cycles below
            if _layer_of(d) > _layer_of(mod):
                bad.append(f"{mod} -> {d}")
    assert not bad, "imports that go up a layer: " + ", ".join(sorted(bad))


def test_no_import_cycle():
    g = _graph()
    state = {}

    def visit(m, stack):
        state[m] = 1
        for d in g.get(m, ()):
            d = d if d in g else d.split(".")[0]
            if d not in g:
                continue
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [m, d]))
            if d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in g:
        if m not in state:
            visit(m, [])


def test_ops_is_the_only_caller_of_torch_ops_lori():
    """torch.ops.lori is called by ops.py; the Triton backend's own autograd calls its backward
    op (as csrc/autograd*.cpp does in C++); _library only names the namespace."""
    allowed = {"ops.py", "_library.py", os.path.join("triton", "ops.py")}
    offenders = []
    for path in PKG.rglob("*.py"):
        rel = str(path.relative_to(PKG))
        if rel in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "lori" and \
                    isinstance(node.value, ast.Attribute) and node.value.attr == "ops":
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, f"torch.ops.lori used outside ops.py: {offenders}"


_ROUTING_SCRIPT = textwrap.dedent("""
    import torch
    import lori_kernels as L
    from lori_kernels import ops, workflow
    calls = {"sparse": 0, "merge": 0, "batched": 0}
    def counting(table, key):
        inner = table["triton"]
        def f(*a, **k):
            calls[key] += 1
            return inner(*a, **k)
        table["triton"] = f
    counting(ops._SPARSE_DELTA, "sparse")
    counting(ops._MERGE, "merge")
    counting(ops._BATCHED, "batched")
    assert L.get_backend() == "triton"
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.Linear(24, 8))
    L.inject(model, ["0", "1"], rank=4, alpha=8.0, seed=5)
    for layer in workflow.lori_layers(model).values():
        layer.adapters["default"].values.data.normal_(generator=g)
    x = torch.randn(3, 40, generator=g)
    y_triton = model(x)
    assert calls["sparse"] == 2, calls
    L.merge(model)
    assert calls["merge"] == 2, calls
    lin = torch.nn.Linear(40, 24)
    pool = L.AdapterPool(40, 24, 4)
    pool.add("t", L.testing.random_packed(24, 4, generator=g), seed=9)
    layer = L.LoRIPoolLinear(lin, pool)
    layer.set_adapter_ids(["t", None, "t"])
    layer(x)
    assert calls["batched"] == 1, calls
    print("routed", calls)
""")


def test_lori_backend_env_routes_every_layer_to_triton():
    """LORI_BACKEND=triton (read once at import) reaches LoRILinear, merge and the pool layer."""
    pytest.importorskip("triton")
    env = {**os.environ, "LORI_BACKEND": "triton", "TRITON_INTERPRET": "1",
           "PYTHONPATH": str(PKG.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = "import lori_kernels.testing\n" + _ROUTING_SCRIPT
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "routed" in r.stdout


def test_set_backend_validates_and_round_trips():
    import lori_kernels as L

    with pytest.raises(ValueError, match="backend must be one of"):
        L.set_backend("cuda")
    prev = L.set_backend("cpp")
    assert L.get_backend() == "cpp"
    L.set_backend(prev)
    with pytest.raises(ValueError, match="validation must be one of"):
        L.set_validation("sometimes")
