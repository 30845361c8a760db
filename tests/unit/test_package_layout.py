"""The package's shape: no import cycles, imports pointing one way, no module over ~600 lines.

Read from the source with `ast` (nothing is imported), counting imports inside functions too, so a lazy
import cannot hide a cycle.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "ampd_plugin"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The module an imported dotted name lives in (`pkg.mod.Name` -> `pkg.mod`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("ampd_plugin"):
                owner = _owner(name)
                if owner:
                    found.add(owner)
    return found


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_no_import_cycles():
    # A package importing its own submodules (re-exports) is not a cycle.
    edges = {m: {d for d in deps if not _in(d, m) and not _in(m, d)} for m, deps in GRAPH.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(edges.get(module, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
    assert cycles == []


@pytest.mark.parametrize("package, forbidden", [
    ("ampd_plugin.router_policy", ("ampd_plugin.router", "ampd_plugin.planner", "ampd_plugin.connector")),
    ("ampd_plugin.costmodel", ("ampd_plugin.router", "ampd_plugin.router_policy", "ampd_plugin.planner")),
    ("ampd_plugin.connector", ("ampd_plugin.router", "ampd_plugin.router_policy", "ampd_plugin.planner")),
    ("ampd_plugin.planner", ("ampd_plugin.router",)),
])
def test_imports_point_one_way(package, forbidden):
    bad = sorted((m, d) for m, deps in GRAPH.items() if _in(m, package) for d in deps
                 if any(_in(d, f) for f in forbidden))
    assert bad == []


def test_the_checks_see_the_packages():
    assert {"ampd_plugin.router.server", "ampd_plugin.costmodel.roofline", "ampd_plugin.router_policy.ampd"} <= set(MODULES)
    assert "ampd_plugin.router_policy.registry" in GRAPH["ampd_plugin.router.server"]


def test_no_module_is_too_long():
    long = sorted((str(p.relative_to(ROOT.parent)), n) for p in MODULES.values()
                  if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES)
    assert long == []


def test_router_policy_public_api_is_importable():
    import ampd_plugin.router_policy as api

    missing = [name for name in api.__all__ if not hasattr(api, name)]
    assert missing == [] and {"hookimpl", "BasePolicy", "Route", "Layout", "ClusterState", "CostModel"} <= set(api.__all__)
