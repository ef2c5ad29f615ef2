"""The package's layers as a tested fact: imports run one way, sizes stay small, extras stay out.

Rooms and their ranks (a module may import from a lower rank or from its own room only):
core (0) ← operators (1) ← {models, estimators} (2) ← metrics (3) ← front ends
(differentiable, distributed, tasks: 4; monitor: 5; integrations, cli: 6) ← ``ntkscope`` (7).
Lazy (function-local) imports count the same as top-level ones.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import ntkscope

ROOT = Path(ntkscope.__file__).parent
RANK = {
    "core": 0,
    "operators": 1,
    "models": 2,
    "estimators": 2,
    "metrics": 3,
    "differentiable": 4,
    "distributed": 4,
    "tasks": 4,
    "monitor": 5,
    "integrations": 6,
    "cli": 6,
    "__init__": 7,
    "__main__": 7,
}
# what the analysis layers may import from outside the standard library
CORE_THIRD_PARTY = {"torch", "numpy", "scipy"}
EXTRAS = ["typer", "rich", "matplotlib", "sklearn", "mnist1d", "lightning", "transformers", "tensorboard", "wandb"]
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 120


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(ROOT.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(["ntkscope", *parts])] = p
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported ntkscope module or third-party top-level name, line) for every import, lazy ones included."""
    pkg = name if _is_package(name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append((sub if sub in MODULES else target, node.lineno))
    return found


def _room(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_imports_run_one_way() -> None:
    bad = []
    for name, path in MODULES.items():
        room = _room(name)
        for target, line in _imports(name, path):
            if not target.startswith("ntkscope"):
                continue
            other = _room(target)
            if other != room and RANK[other] >= RANK[room]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({other}, rank {RANK[other]} >= {RANK[room]})")
    assert not bad, "imports against the layer direction:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    graph = {n: {t for t, _ in _imports(n, p) if t in MODULES and t != n} for n, p in MODULES.items()}
    # a package importing its own submodules (re-exports) is not a cycle with them
    for n in graph:
        graph[n] = {t for t in graph[n] if not (_is_package(t) and n.startswith(t + "."))}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for t in sorted(graph[n]):
            if state.get(t) == 1:
                return stack[stack.index(t) :] + [t]
            if t not in state and (cyc := visit(t)):
                return cyc
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (cyc := visit(n)):
            pytest.fail("import cycle: " + " -> ".join(cyc))


def test_analysis_layers_import_only_torch_numpy_scipy() -> None:
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    bad = []
    for name, path in MODULES.items():
        if RANK[_room(name)] > RANK["metrics"]:
            continue
        for target, line in _imports(name, path):
            top = target.split(".")[0]
            if top != "ntkscope" and top not in stdlib and top not in CORE_THIRD_PARTY:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_import_ntkscope_loads_no_extras() -> None:
    code = f"import sys, ntkscope; print(' '.join(m for m in {EXTRAS!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [], f"import ntkscope loads the optional {out}"


def test_modules_and_functions_stay_small() -> None:
    big = []
    for path in MODULES.values():
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES:
            big.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > MAX_FUNCTION_LINES:
                    big.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not big, "over the size limits:\n" + "\n".join(big)


def test_every_returned_type_is_exported() -> None:
    for name in ["TransformerNTK", "Structure", "BlockEstimate", "Eigen", "SpectralDensity", "Estimate", "ParameterBlocks", "RecurrentNTK"]:
        assert name in ntkscope.__all__ and hasattr(ntkscope, name), name
