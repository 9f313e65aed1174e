"""The house rules that keep the tree maintainable, checked on the source itself.

- ``appliance/protocol/`` is sans-I/O: it imports no I/O, clock or concurrency module and
  nothing of the appliance outside ``protocol``.
- Imports run one way: cli/commands -> supervisor -> services -> health -> protocol/storage.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "appliance"

# Modules that do I/O, read clocks or schedule work: never in a protocol core.
IO_MODULES = {
    "asyncio", "trio", "anyio", "socket", "ssl", "select", "selectors", "time", "datetime", "threading",
    "subprocess", "os", "sqlite3", "httpx", "httpcore", "hypercorn", "starlette", "trio_websocket",
    "azure", "urllib", "http", "shutil", "signal", "fcntl", "pathlib", "io", "logging",
}

# What each part of the package may import from the appliance (besides itself).
ALLOWED = {
    "protocol": {"protocol"},
    "config": {"protocol"},
    "storage": {"protocol", "config"},
    "health": {"protocol", "storage", "config"},
    "services": {"protocol", "storage", "health", "config", "logs"},
    "devkit": {"protocol", "storage", "health", "config", "services", "logs"},
    "supervisor": {"protocol", "storage", "health", "config", "services", "logs"},
    "logs": set(),
    "cli": {"*"},
    "commands": {"*"},
    "__main__": {"*"},
    "__init__": set(),
}


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text("utf-8"), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            if node.module == "appliance":
                names.extend(f"appliance.{alias.name}" for alias in node.names)
    return names


def part_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py")


def all_sources() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def test_sources_found() -> None:
    assert len(all_sources()) > 20
    assert (ROOT / "protocol").is_dir()


@pytest.mark.parametrize("path", sorted((ROOT / "protocol").rglob("*.py")), ids=lambda p: p.name)
def test_protocol_is_sans_io(path: Path) -> None:
    bad = [name for name in imports_of(path) if name.split(".")[0] in IO_MODULES]
    assert not bad, f"{path.relative_to(ROOT.parent)} imports I/O modules {bad}; protocol cores stay pure"


def test_imports_run_one_way() -> None:
    problems = []
    for path in all_sources():
        part = part_of(path)
        allowed = ALLOWED.get(part)
        assert allowed is not None, f"{path}: new top-level part {part!r}: add it to ALLOWED with its rule"
        if "*" in allowed:
            continue
        for name in imports_of(path):
            if not name.startswith("appliance."):
                continue
            target = name.split(".")[1]
            if target in {part, "__init__"} or target in allowed:
                continue
            if name == "appliance" or target == "__version__":
                continue
            problems.append(f"{path.relative_to(ROOT.parent)} ({part}) imports {name}")
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_the_checker_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("import trio\nfrom appliance.services import runtime\n")
    assert imports_of(bad) == ["trio", "appliance.services"]
