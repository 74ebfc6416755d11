"""The package's shape, read from its imports: methods import the core, never each other; deploy and
serve import SN-Net's public names only; no private name crosses modules; no import cycles."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import snnet

PACKAGE = Path(snnet.__file__).parent
METHODS = {"sn_net", "stitchnet", "general_stitching"}
ROLES = {"deploy", "serve"}
APPLICATION = {"snnet", "snnet.cli", "snnet.commands", "snnet.trainer_cli"}  # may import every public name
ALLOWED = {"deploy": {"core", "sn_net", "deploy"}, "serve": {"core", "sn_net", "deploy", "serve"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def group(module: str) -> str:
    """'core' for the flat modules, families and models; the sub-package for methods and roles."""
    if module in APPLICATION:
        return "application"
    part = module.split(".")[1]
    return part if part in METHODS | ROLES else "core"


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports(module: str) -> list[tuple[str, str | None]]:
    """(imported snnet module, name taken from it or None) for every import statement in ``module``,
    at any depth (functions too), except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(MODULES[module].read_text())
    found: list[tuple[str, str | None]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((a.name, None) for a in node.names if a.name.split(".")[0] == "snnet")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "snnet":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.append((submodule, None) if submodule in MODULES else (node.module, alias.name))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def edges(module: str) -> set[str]:
    """The modules importing ``module`` runs: each imported module and the packages above it (but
    not ``module``'s own packages, which are already importing when it runs)."""
    out = set()
    for target, _ in imports(module):
        parts = target.split(".")
        out.update(".".join(parts[:n]) for n in range(1, len(parts) + 1))
    own = {module.rsplit(".", n)[0] for n in range(1, module.count(".") + 1)}
    return {m for m in out if m in MODULES and m != module and m not in own}


def test_the_rules_see_the_imports():
    """A rule over no imports passes vacuously: the reader must find the package's real imports."""
    assert len(MODULES) > 50
    assert ("snnet.sn_net.network", "StitchableNetwork") in imports("snnet.deploy.export")
    assert sum(len(imports(m)) for m in MODULES) > 200


@pytest.mark.parametrize("module", sorted(MODULES))
def test_methods_import_the_core_never_each_other(module):
    mine = group(module)
    for target, _ in imports(module):
        theirs = group(target)
        if mine == "core":
            assert theirs == "core", f"{module} (core) imports {target} ({theirs}): the core serves every method"
        elif mine in METHODS:
            assert theirs in ("core", mine), f"{module} ({mine}) imports {target} ({theirs}): methods import only the core"
        elif mine in ROLES:
            assert theirs in ALLOWED[mine], f"{module} ({mine}) imports {target} ({theirs}): {mine} builds on {ALLOWED[mine]}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_name_crosses_modules(module):
    for target, name in imports(module):
        private = name if name is not None else target.rsplit(".", 1)[-1]
        assert not (private.startswith("_") and private != "__init__"), f"{module} imports private {target}.{name}"


def test_no_import_cycles():
    graph = {m: edges(m) for m in MODULES}
    state: dict[str, str] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
