"""The layering, checked on the source: no import cycles between files, `qat.kernels` (the
folder kernels/) below everything (it imports nothing else of `qat`), `qat.models` (models/)
knows nothing of quantization, the library never imports scripts, `qat.scaling` imports
without torch; and the import names: nothing is importable as a top-level `kernels` or
`models`, so neither Hugging Face's `kernels` nor any other distribution is shadowed; and no
source file over MAX_LINES lines (STYLE.md: about 300 lines, one concept per file)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qat", "models", "kernels")
MAPPED = {"kernels": "qat.kernels", "models": "qat.models"}  # folder -> import name (pyproject)
MAX_LINES = 400  # the ceiling above STYLE.md's "about 300 lines per file"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    parts = MAPPED.get(parts[0], parts[0]).split(".") + parts[1:]
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
    assert "qat.quant.config" in graph["qat.quant.quantizer"] and "qat.kernels.support" in graph["qat.quant.fused"]
    assert "qat.models.llama" in graph["qat.train.lifecycle"] and "qat.train.lifecycle" in graph["train"]


def test_no_import_cycles_between_files():
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_kernels_are_the_lowest_layer_and_models_know_no_quantization():
    for name, deps in _graph().items():
        if name.startswith("qat.kernels"):
            assert all(d.startswith("qat.kernels.") for d in deps), (name, deps)
        if name.startswith("qat.models"):
            assert all(d.startswith("qat.models.") for d in deps), (name, deps)
        if name != "train":
            assert "train" not in deps, name


def test_no_source_file_is_over_the_line_limit():
    """A file past the limit holds more than one concept: split it along its seams."""
    sources = [ROOT / "train.py", *(p for folder in (*PACKAGES, "scripts") for p in (ROOT / folder).rglob("*.py"))]
    too_long = {str(p.relative_to(ROOT)): n for p in sources if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not too_long, f"source files over {MAX_LINES} lines (path: lines): {too_long}"


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


# ---- import names: nothing of ours answers to another distribution's top-level name ----------


def test_mapped_folders_are_not_top_level_packages():
    """A folder with an __init__.py on sys.path (the checkout root, for `python train.py` and
    pytest) would shadow Hugging Face's `kernels`; a namespace portion never does."""
    for folder in MAPPED:
        assert not (ROOT / folder / "__init__.py").exists(), folder
    for pkg in PACKAGES:
        for path in [*(ROOT / pkg).rglob("*.py"), ROOT / "train.py", *(ROOT / "scripts").glob("*.py"), *(ROOT / "tests").glob("*.py")]:
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                assert not [n for n in names if n.split(".")[0] in MAPPED], (path, names)


def test_pyproject_lists_every_package():
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {_module_name(p.parent) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    packages = {p.removesuffix(".__init__") for p in packages}
    assert set(cfg["packages"]) == packages
    assert cfg["package-dir"] == {v: k for k, v in MAPPED.items()}


_IMPORT_BOTH = """
import sys
order = sys.argv[1]
if order == "transformers-first":
    import transformers
    from transformers import LlamaConfig
import torch
from qat import Quantizer, QuantizerConfig
from qat.quant.fused import fused_unsupported_reason
Quantizer(QuantizerConfig(bits=4))(torch.randn(2, 128))
import qat.kernels.support, qat.models.llama
import transformers
from transformers import LlamaConfig
import kernels
assert not kernels.__file__ or not kernels.__file__.startswith(sys.argv[2]), kernels.__file__
print("ok")
"""


@pytest.mark.slow  # subprocesses or compilation: out of the quick loop, in CI's suite
@pytest.mark.parametrize("order", ["transformers-first", "qat-first"])
@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_transformers_and_qat_import_together(order, where, tmp_path):
    """Both orders, from the checkout root (on sys.path: `python -c`, pytest) and from elsewhere
    (a notebook, another project): Hugging Face's `kernels` is the one transformers gets."""
    pytest.importorskip("transformers")
    cwd = ROOT if where == "root" else tmp_path
    cmd = [sys.executable, "-c", _IMPORT_BOTH, order, str(ROOT / "kernels")]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
