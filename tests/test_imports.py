"""The import graph: no cycle between modules, counting imports inside functions too (an import moved
into a function to dodge a cycle is still a cycle), and the library never imports the converter."""

import ast
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Package name -> its folder (the converter installs as convert_wan_weights from tools/).
PACKAGES = {"sama_jax": ROOT / "sama_jax", "convert_wan_weights": ROOT / "tools" / "convert_wan_weights"}


def module_name(package: str, folder: pathlib.Path, path: pathlib.Path) -> str:
    parts = (package,) + path.relative_to(folder).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(packages: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """module -> the modules of `packages` it imports anywhere in its file (module level or inside
    a function); `tools.*` imports are kept as written (none should exist)."""
    modules = {
        module_name(pkg, folder, p): p for pkg, folder in packages.items() for p in folder.rglob("*.py")
    }
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import submodule` needs the submodule; `from mod import name` needs mod.
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t for t in subs if t in modules] or [node.module]
            deps |= {t for t in targets if (t in modules or t.split(".")[0] == "tools") and t != name}
        graph[name] = deps
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_an_import_inside_a_function_counts(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("from pkg import b\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from pkg import a\n    return a\n")
    assert find_cycle(import_graph({"pkg": tmp_path / "pkg"})) == ["pkg.a", "pkg.b", "pkg.a"]


def test_package_has_no_import_cycle():
    graph = import_graph(PACKAGES)
    assert "sama_jax.conditioning" in graph and "convert_wan_weights.dit" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_library_never_imports_the_converter():
    graph = import_graph(PACKAGES)
    offenders = {
        name: sorted(d for d in deps if d.split(".")[0] in ("tools", "convert_wan_weights"))
        for name, deps in graph.items()
        if name.startswith("sama_jax")
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    assert all(not d.startswith("tools") for deps in graph.values() for d in deps)


def test_installed_packages_have_names_of_their_own(tmp_path):
    """Outside the checkout, the installed project provides sama_jax and convert_wan_weights, and no
    top-level `tools` (which any other project's tools would collide with)."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = lambda code: subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=environ, capture_output=True, text=True
    )
    assert run("import sama_jax, convert_wan_weights").returncode == 0
    missing = run("import tools")
    assert missing.returncode != 0 and "No module named 'tools'" in missing.stderr
