"""The house rules that keep the tree maintainable, checked on the source itself.

- ``appliance/protocol/`` is sans-I/O: it imports no I/O, clock or concurrency module and
  nothing of the appliance outside ``protocol``.
- Imports run one way: cli/commands -> supervisor -> services -> health -> protocol/storage
  -> config; inside ``services/`` sideways imports are ruled too (:data:`SERVICES_PLUMBING`,
  :data:`BUILT_ON`); ``setupfile`` (the boot partition's settings) sits beside ``config``.
- The port map is one truth: ``PORT_ROLES``, ``Ports``, the listener factories, ``lan-check``
  and the port table of docs/architecture.md agree.
- Every piece of runtime state has one writer (:data:`STATE_WRITERS`); no other module
  writes it.
- The repository cites only itself.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import attrs
import pytest

from appliance.config import LISTENER_ROLES, PORT_ROLES, Ports
from appliance.devkit import lancheck
from appliance.services.assembly import LISTENER_APPS
from appliance.services.runtime import Runtime

REPO = Path(__file__).resolve().parent.parent
ROOT = REPO / "appliance"

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
    "services": {"protocol", "storage", "health", "config", "logs", "setupfile"},
    # The boot partition's setup file: its schema and merge (commands/setup.py does the I/O).
    "setupfile": {"protocol", "config"},
    "devkit": {"protocol", "storage", "health", "config", "services", "logs"},
    "supervisor": {"protocol", "storage", "health", "config", "services", "logs"},
    "logs": {"protocol"},  # the pure redaction of credentials in each line
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


# --- sideways imports inside services/ -----------------------------------------------------

# What every service may import: the runtime, its records and the shared plumbing. These
# import only each other.
SERVICES_PLUMBING = {
    "runtime", "state", "board", "metrics", "signal", "spec", "timestamps", "http", "netif", "systemd",
    "wan", "servicebus", "queue_consumer", "device_link", "media_files", "event_hub", "keyring", "guard",
    "budget", "download", "i18n", "h11_serving",
}
# The services a feature service is built on (besides the plumbing).
BUILT_ON = {
    "pairing": {"owner"},
    "sync": {"pairing", "sync_health"},
    "sync_health": {"pairing"},
    "support_channel": {"orders", "bundle"},
    "bundle": {"log_ring"},
    "log_shipping": {"log_ring"},
    "media": {"media_health", "media_through"},
    "ticket": {"dispatcher"},
    "firmware": {"installer"},
    "firmware_intake": {"firmware", "installer"},
}
# What every web module may import, besides the plumbing and the services it is the face of.
WEB_SHARED = {"web.kit", "web.common", "web.parts", "web.cors", "web.device_auth", "web.contract"}


def services_module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT / "services").with_suffix("").parts)


def sideways_problems(module: str, targets: list[str]) -> list[str]:
    out = []
    for target in targets:
        if target == module or module == "assembly" or module in ("__init__", "web.__init__"):
            continue
        if module in SERVICES_PLUMBING or module == "web.kit":
            ok = target in SERVICES_PLUMBING
        elif module in WEB_SHARED:
            # web.device_auth (who is calling) is built on web.common (errors, bodies).
            ok = target in SERVICES_PLUMBING or target == "web.kit" or (module, target) == ("web.device_auth",
                                                                                           "web.common")
        elif module.startswith("web."):
            ok = target in SERVICES_PLUMBING or target in WEB_SHARED or not target.startswith(("web", "assembly"))
        else:
            ok = target in SERVICES_PLUMBING or target in BUILT_ON.get(module, set())
        if not ok:
            out.append(f"services.{module} imports services.{target}")
    return out


def services_targets(path: Path) -> list[str]:
    targets = []
    for name in imports_of(path):
        if name.startswith("appliance.services."):
            targets.append(name.removeprefix("appliance.services."))
    tree = ast.parse(path.read_text("utf-8"))
    for node in ast.walk(tree):  # from appliance.services.web import admin, api, ...
        if isinstance(node, ast.ImportFrom) and node.module in ("appliance.services", "appliance.services.web"):
            prefix = "" if node.module == "appliance.services" else "web."
            targets.extend(prefix + alias.name for alias in node.names)
    return [t for t in targets if t not in ("web",)]


def test_sideways_imports_inside_services_are_ruled() -> None:
    problems = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        problems += sideways_problems(services_module(path), services_targets(path))
    assert not problems, "sideways imports against the rule (SERVICES_PLUMBING, BUILT_ON):\n" + "\n".join(problems)


def test_the_sideways_rule_catches_a_violation() -> None:
    assert sideways_problems("wan", ["sync"]) == ["services.wan imports services.sync"]
    assert sideways_problems("web.orders", ["web.admin"]) == ["services.web.orders imports services.web.admin"]
    assert sideways_problems("orders", ["dispatcher"]) == ["services.orders imports services.dispatcher"]
    assert sideways_problems("sync", ["pairing", "runtime"]) == []


# --- the port map: one truth ---------------------------------------------------------------


def _docs_port_table() -> list[tuple[str, int, str, str]]:
    text = (REPO / "docs" / "architecture.md").read_text("utf-8")
    rows = re.findall(r"^\| (\w+) \| (\d+)/(tcp|udp) \| ([a-z+]+) \|", text, flags=re.M)
    return [(role, int(port), transport, direction) for role, port, transport, direction in rows]


def test_the_port_map_agrees_everywhere() -> None:
    roles = [r.role for r in PORT_ROLES]
    assert roles == [f.name for f in attrs.fields(Ports)], "PORT_ROLES and the Ports fields differ"
    assert set(LISTENER_APPS) == set(LISTENER_ROLES), "a listener role without its app factory (or one too many)"
    assert set(lancheck.HTTP_ROLES) == set(LISTENER_ROLES), "lan-check's HTTP_ROLES differ from the listeners"
    defaults = Ports()
    expected = [(r.role, getattr(defaults, r.role), str(r.transport), str(r.direction)) for r in PORT_ROLES]
    assert _docs_port_table() == expected, "the port table of docs/architecture.md differs from PORT_ROLES/Ports"
    readme = (REPO / "README.md").read_text("utf-8")
    missing = [f"{port}/{transport}" for _, port, transport, _ in expected if f"| {port}/{transport} |" not in readme]
    assert not missing, f"README's port table lacks {missing}"


# --- one writer per piece of runtime state -------------------------------------------------

# Runtime field -> the modules that may write it (assign to it or into it, or call its
# mutators). Everyone else reads.
STATE_WRITERS = {
    "ports": {"services.http", "services.discovery"},
    "store": {"services.pairing"},
    "sync_status": {"services.sync", "services.pairing"},
    "device_links": {"services.dispatcher"},
    "orders_link": {"services.orders", "services.queue_consumer"},
    "support_link": {"services.support_channel", "services.queue_consumer"},
    "support_window": {"services.support_channel"},
    "media": {"services.media"},
    # The hub's ring by the event-log service; its subscriber count by the events listener.
    "event_hub": {"services.event_log", "services.web.events"},
    "log_ring": {"services.log_ring"},
    "log_shipping": {"services.log_shipping"},
    "firmware": {"services.firmware", "services.firmware_intake", "services.sync"},
    "admin": {"services.owner"},
    # The language, taken at once from the homepage's Settings card.
    "config": {"services.settings"},
}
# Methods that change a record (reading methods are free to call).
MUTATORS = {"bind", "set_store", "open", "open_until", "close", "record_failure", "clear", "pop", "update",
            "setdefault", "append", "failed", "succeeded", "__setitem__"}


def _chain(node: ast.expr) -> list[str]:
    """``runtime.device_links.links[x]`` -> ["runtime", "device_links", "links"]."""
    out: list[str] = []
    while True:
        if isinstance(node, ast.Attribute):
            out.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Subscript):
            node = node.value
        elif isinstance(node, ast.Name):
            out.append(node.id)
            return out[::-1]
        else:
            return []


def state_writes(source: str) -> list[tuple[int, str]]:
    """(line, runtime field) of every write to runtime state in ``source``, also through a
    name or attribute bound to it (``board = runtime.device_links``)."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}  # "self.board" -> "device_links"

    def field_of(chain: list[str]) -> str | None:
        for i in range(len(chain) - 1):
            if chain[i] in ("runtime", "rt") and chain[i + 1] in STATE_WRITERS:
                return chain[i + 1]
        for n in range(len(chain), 0, -1):
            if ".".join(chain[:n]) in aliases:
                return aliases[".".join(chain[:n])]
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            value = _chain(node.value)
            field = field_of(value) if value and value[-1] in STATE_WRITERS else None
            if field is not None and (target := _chain(node.targets[0])):
                aliases[".".join(target)] = field
    writes = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = [t for tgt in node.targets for t in (tgt.elts if isinstance(tgt, ast.Tuple) else [tgt])]
        elif isinstance(node, ast.AugAssign | ast.AnnAssign) and node.value is not None:
            targets = [node.target]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
            chain = _chain(node.func.value)
            if chain and (field := field_of(chain)) is not None:
                writes.append((node.lineno, field))
            elif node.func.attr == "set_store":
                writes.append((node.lineno, "store"))
        for target in targets:
            chain = _chain(target)
            # Binding an alias is not a write; writing through one (or into the runtime) is.
            field = field_of(chain[:-1] if isinstance(target, ast.Attribute) else chain) if len(chain) >= 2 else None
            if field is not None and ".".join(chain) not in aliases:
                writes.append((node.lineno, field))
    return sorted(writes)


def test_runtime_state_has_one_writer_each() -> None:
    fields = {f.alias for f in attrs.fields(Runtime)}
    assert set(STATE_WRITERS) <= fields, "STATE_WRITERS names a field Runtime lacks"
    problems = []
    for path in all_sources():
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for line, field in state_writes(path.read_text("utf-8")):
            if module not in STATE_WRITERS[field]:
                problems.append(f"{path.relative_to(REPO)}:{line} writes runtime.{field} (its writers: "
                                f"{', '.join(sorted(STATE_WRITERS[field]))})")
    assert not problems, "runtime state written outside its owner:\n" + "\n".join(problems)


def test_the_writer_check_catches_writes() -> None:
    source = """
def f(runtime, other):
    runtime.ports.bind("api", 1)
    board = runtime.device_links
    board.links["a"] = other
    self.board = runtime.device_links
    self.board.backlog_at = 1.0
    runtime.support_window.open(5)
    runtime.set_store(None)
    runtime.orders_link.phase = other
    runtime.sync_status.push.last_error = None
    print(runtime.ports.of("api"), board.all(), runtime.support_link.as_dict())
"""
    assert [f for _, f in state_writes(source)] == ["ports", "device_links", "device_links", "support_window",
                                                      "store", "orders_link", "sync_status"]


# --- the repository cites only itself -----------------------------------------------------------


def test_no_citation_of_files_outside_the_repository() -> None:
    texts = [*ROOT.rglob("*.py"), *ROOT.rglob("*.sql"), *(REPO / "docs").glob("*.md"), REPO / "README.md",
             *(REPO / "image" / "files").rglob("*.service")]  # not image/work: a build's root tree
    outside = re.compile(r"\b(DESIGN|FINDINGS)\b|STYLE\.md")
    bad = [str(p.relative_to(REPO)) for p in texts if outside.search(p.read_text("utf-8"))]
    assert not bad, f"cites documents a clone does not have: {bad}"
