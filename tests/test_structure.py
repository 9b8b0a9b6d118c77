"""The package's shape: no import cycles, every module imports on its own, short modules and functions."""

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "peftlab"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 85


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """peftlab modules ``path`` imports, at module or function level (TYPE_CHECKING blocks aside)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name in modules)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([child.module] if child.module else []))
                for a in child.names:  # `from . import lora` names a module, `from . import Method` a package
                    target = f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    if target in modules:
                        found.add(target)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    found.discard(name)
    return found


def test_no_import_cycles_among_peftlabs_modules():
    modules = _modules()
    graph = {m: _imports(p, modules) for m, p in modules.items()}
    state: dict[str, str] = {}
    cycles = []

    def walk(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n] if n in stack else [m, n])
            elif n not in state:
                walk(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            walk(m, [m])
    assert cycles == []
    assert "peftlab.methods" not in graph["peftlab.recipe"] and "peftlab.tasks" not in graph["peftlab.recipe"]


def test_every_module_imports_on_its_own():
    def load(name: str) -> tuple[str, int, str]:
        res = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        return name, res.returncode, res.stderr[-500:]

    with ThreadPoolExecutor(max_workers=4) as pool:
        failures = [r for r in pool.map(load, sorted(_modules())) if r[1] != 0]
    assert failures == []


def test_modules_and_functions_are_short():
    long_modules, long_functions = [], []
    for name, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}")
    assert long_modules == [] and long_functions == []


def test_shared_helpers_exist_once():
    """Device, JSON, bitsandbytes and schema-error helpers live in one module each, not copied."""
    defined: dict[str, list[str]] = {}
    for name, path in _modules().items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef):
                defined.setdefault(node.name, []).append(name)
    for helper in ("_device", "_is_bnb", "_read_json", "_yaml_line", "_node_line", "_spec_error", "cpu_cores",
                   "count_parameters", "_split_examples"):
        assert helper not in defined or helper == "cpu_cores", (helper, defined.get(helper))
    assert defined["cpu_cores"] == ["peftlab.system"]
    for helper in ("default_device", "read_json", "is_bnb_model", "format_validation_error", "yaml_line"):
        assert len(defined[helper]) == 1, (helper, defined[helper])
