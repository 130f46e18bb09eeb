"""The layering, checked on the source: no import cycles between files, `kernels/` below
`qat/` (it imports neither `qat` nor `models`), `models/` knows nothing of quantization,
the library never imports scripts, and `qat.scaling` imports without torch."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qat", "models", "kernels")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    found["train"] = ROOT / "train.py"
    return found


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every project module this file imports, at any level (function bodies and
    TYPE_CHECKING blocks included: a type-only import is still a dependency)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import sub` imports the submodule when there is one, else pkg itself
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names]
        else:
            continue
        out.update(n for n in names if n in known)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_imports():
    graph = _graph()
    assert "qat.quant.config" in graph["qat.quant.quantizer"] and "kernels" in graph["qat.quant.fused"]
    assert "models" in graph["qat.train.lifecycle"] and "qat.train.lifecycle" in graph["train"]


def test_no_import_cycles_between_files():
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_kernels_are_the_lowest_layer_and_models_know_no_quantization():
    for name, deps in _graph().items():
        if name.split(".")[0] == "kernels":
            assert not {d for d in deps if d.split(".")[0] in ("qat", "models")}, name
        if name.split(".")[0] == "models":
            assert not {d for d in deps if d.split(".")[0] in ("qat", "kernels")}, name
        if name != "train":
            assert "train" not in deps, name


def test_library_never_imports_scripts():
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module:
                    assert not node.module.startswith("scripts"), path
                if isinstance(node, ast.Import):
                    assert not any(a.name.startswith("scripts") for a in node.names), path


def test_scaling_imports_without_torch():
    code = (
        "import sys\n"
        "import qat.scaling, qat.scaling.law, qat.scaling.solver, qat.scaling.results, qat.scaling.runs, "
        "qat.scaling.precision, qat.scaling.plots\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
