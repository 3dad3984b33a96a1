"""Data flows one way: peft <- task <- client / server <- simulations. Checked on every import
statement of every module, so a shortcut (the server importing client code, peft importing Flower)
fails here with the file and line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

# folder -> the fedmeld packages its modules may import (besides their own); None: any
ALLOWED = {"peft": set(), "task": {"peft"}, "client": {"peft", "task"}, "server": {"peft", "task"},
           "simulations": None}
FORBIDDEN_THIRD_PARTY = {"peft": {"flwr", "medmnist"}}  # the adapter library is plain PyTorch


def _imports(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``; relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside this package
                found.append((node.lineno, f"fedmeld.{package}"))
            elif node.module:
                found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_folder_imports_only_what_lies_below_it(package, repo):
    allowed, bad = ALLOWED[package], []
    for path in sorted((repo / package).rglob("*.py")):
        if "results" in path.relative_to(repo).parts:  # scratch scripts kept with measured results
            continue
        for line, name in _imports(path, package):
            top = name.split(".")
            if top[0] in FORBIDDEN_THIRD_PARTY.get(package, set()):
                bad.append(f"{path.relative_to(repo)}:{line} imports {name}")
            if top[0] == "fedmeld" and allowed is not None and len(top) > 1 and top[1] not in allowed | {package}:
                bad.append(f"{path.relative_to(repo)}:{line} imports {name}")
    assert not bad, "\n".join(bad)
