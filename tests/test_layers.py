"""Imports flow one way: kernel (`core`) and gateway at the bottom, the apps above them in
a fixed order, the project root (`pantheon/`: settings, urls, asgi) on top."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Each package may import only the packages listed before it (and itself).
LAYERS = ["core", "llm_gateway", "accounts", "billing_app", "files_app", "sessions_app", "web", "pantheon"]
# The gateway is a library: it knows nothing of Pantheon's apps.
ALLOWED = {name: set(LAYERS[:i]) for i, name in enumerate(LAYERS)}
ALLOWED["llm_gateway"] = {"core"}  # only the pure core.text


def first_party_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(name.split(".")[0] for name in names if name.split(".")[0] in LAYERS)
    return found


@pytest.mark.parametrize("package", LAYERS)
def test_imports_flow_one_way(package):
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if "migrations" in path.parts:
            continue
        for imported in first_party_imports(path) - ALLOWED[package] - {package}:
            wrong.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not wrong, wrong
