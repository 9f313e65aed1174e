"""The diagnostics bundle: one ``.tar.gz`` a technician or support takes off a box.

Built the same way by ``GET /v1/bundle`` on 8005, by a support request through the remote
support channel, and by ``appliance bundle`` at the box's shell with the service stopped
(it then has no live state and says so). Every part in :data:`PARTS` is always in the
archive: a part that cannot be read holds ``{"error": ...}`` and ``manifest.json`` lists
each part with ``ok`` or its error. Every part passes through the one redaction
(:mod:`appliance.protocol.redact`) with every secret the box knows.

The database is read on a connection of its own, read-only (WAL): building a bundle
never takes the writer, so it never holds up a sale or an order, and ``PRAGMA
integrity_check`` runs against a consistent snapshot.

Blocking: :func:`build_bundle` reads files, runs ``nft`` and checks the database; call it
in a worker thread.
"""

from __future__ import annotations

import io
import json
import os
import platform
import shutil
import sqlite3
import sys
import tarfile
import time
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from appliance import __version__
from appliance.config import Config, find_config_path, to_toml_dict
from appliance.health.firewall import read_loaded, read_snapshot, render_config
from appliance.protocol.redact import Redactor
from appliance.services.log_ring import current_redactor
from appliance.services.runtime import Runtime
from appliance.storage import DATABASE_FILE, connect
from appliance.storage.devices import list_devices
from appliance.storage.events import outbox_stats
from appliance.storage.logring import last_lines, load_cursor
from appliance.storage.outbox import backlogs

__all__ = ["DEFAULT_LOG_RECORDS", "MAX_LOG_RECORDS", "PARTS", "BundleInput", "build_bundle", "bundle_of"]

DEFAULT_LOG_RECORDS: Final = 5000
# The last N records in a bundle: about 200 bytes each before gzip, 30 to 40 after.
MAX_LOG_RECORDS: Final = 100_000
# nft may hang on a sick box; the bundle goes out without the loaded ruleset then.
NFT_TIMEOUT_S: Final = 5.0
PACKAGES: Final = ("trio", "hypercorn", "starlette", "httpx", "httpcore", "h11", "anyio", "trio-websocket",
                   "azure-servicebus", "cattrs", "attrs")

# name -> what it holds (the manifest says it in these words).
PARTS: Final = {
    "health.json": "every health check (from the running box, or the machine's own checks if it is stopped)",
    "config.json": "the effective configuration, secrets masked",
    "logs.ndjson": "the last log records of the ring, one JSON object a line",
    "devices.json": "the device registry and each device link's state",
    "queues.json": "outbox and event queue depths",
    "database.json": "database statistics and PRAGMA integrity_check",
    "firewall-rendered.nft": "the firewall rendered from the port map",
    "firewall-loaded.nft": "the firewall loaded in the kernel (or its copy saved at boot)",
    "versions.json": "firmware, Python and library versions",
    "system.json": "disk and memory figures",
    "live.json": "services, links, log shipping: the running box's own state",
}


@attrs.frozen(kw_only=True)
class BundleInput:
    """What a bundle is built from. ``health`` and ``live`` come from the running box
    (None when it is stopped); the rest is read from the state directory."""

    config: Config
    redactor: Redactor
    log_records: int = DEFAULT_LOG_RECORDS
    health: list[dict[str, Any]] | None = None
    live: Mapping[str, Any] | None = None
    live_links: list[dict[str, Any]] | None = None
    process_rss_kib: int | None = None


def _json(data: Any) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True, default=str).encode() + b"\n"


def _db(config: Config) -> sqlite3.Connection:
    path = Path(config.storage.dir) / DATABASE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no database at {path}")
    return connect(path, readonly=True)


def _database(inp: BundleInput) -> bytes:
    conn = _db(inp.config)
    try:
        pragma = {name: conn.execute(f"PRAGMA {name}").fetchone()[0]
                  for name in ("page_size", "page_count", "freelist_count", "journal_mode", "user_version")}
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        started = time.monotonic()
        integrity = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        took = time.monotonic() - started
        counts = {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}
    finally:
        conn.close()
    path = Path(inp.config.storage.dir) / DATABASE_FILE
    wal = path.with_name(path.name + "-wal")
    return _json({"file": str(path), "bytes": path.stat().st_size, "wal_bytes": wal.stat().st_size if wal.exists()
                  else 0, "pragma": pragma, "rows": counts, "integrity_check": integrity,
                  "integrity_check_s": round(took, 3)})


def _devices(inp: BundleInput) -> bytes:
    conn = _db(inp.config)
    try:
        conn.execute("BEGIN")
        devices = [d.as_dict() for d in list_devices(conn)]
    finally:
        conn.close()
    return _json({"registry": devices, "links": inp.live_links if inp.live_links is not None
                  else "the appliance is not running: no link states"})


def _queues(inp: BundleInput) -> bytes:
    conn = _db(inp.config)
    try:
        conn.execute("BEGIN")
        events = attrs.asdict(outbox_stats(conn))
        commands = [attrs.asdict(b) for b in backlogs(conn)]
    finally:
        conn.close()
    return _json({"events_to_platform": events, "device_commands": commands,
                  "device_commands_pending": sum(c["depth"] for c in commands)})


def _logs(inp: BundleInput) -> bytes:
    lines = last_lines(Path(inp.config.storage.dir) / "logs", inp.log_records)
    return b"".join(line + b"\n" for line in lines)


def _config(inp: BundleInput) -> bytes:
    source = find_config_path(None)
    return _json({"source": str(source) if source else "embedded defaults",
                  "config": to_toml_dict(inp.config, mask_secrets=True)})


def _rendered(inp: BundleInput) -> bytes:
    return render_config(inp.config, "the effective configuration").encode()


def _loaded(inp: BundleInput) -> bytes:
    loaded = read_loaded(NFT_TIMEOUT_S)
    if loaded.permission:
        loaded = read_snapshot() or loaded
    if loaded.error:
        return f"# cannot read the loaded firewall: {loaded.error}\n# fix: {loaded.fix}\n".encode()
    if loaded.absent:
        return b"# the table inet appliance is not loaded\n"
    note = "# as saved when it was loaded at boot\n" if loaded.snapshot else "# live\n"
    return (note + loaded.text).encode()


def _versions(inp: BundleInput) -> bytes:
    packages: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return _json({"firmware": __version__, "python": sys.version, "platform": platform.platform(),
                  "packages": packages})


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree"):
                out[key + "_kib"] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def _system(inp: BundleInput) -> bytes:
    state = Path(inp.config.storage.dir)
    disk = shutil.disk_usage(state if state.exists() else "/")
    ring = state / "logs"
    ring_bytes = sum(p.stat().st_size for p in ring.glob("seg-*")) if ring.is_dir() else 0
    return _json({"state_dir": str(state), "disk_total_bytes": disk.total, "disk_free_bytes": disk.free,
                  "log_ring_bytes": ring_bytes, "memory": _meminfo(), "appliance_rss_kib": inp.process_rss_kib,
                  "load_average": os.getloadavg(), "at": time.time()})


def _live(inp: BundleInput) -> bytes:
    cursor, dropped = load_cursor(Path(inp.config.storage.dir) / "logs")
    if inp.live is None:
        return _json({"running": False, "note": "the appliance is not running: built from its files alone",
                      "log_shipping_cursor": cursor, "log_records_dropped_total": dropped})
    return _json({"running": True, **inp.live})


def _health(inp: BundleInput) -> bytes:
    return _json({"checks": inp.health} if inp.health is not None else {"error": "no health report"})


_BUILDERS: Final[dict[str, Callable[[BundleInput], bytes]]] = {
    "health.json": _health,
    "config.json": _config,
    "logs.ndjson": _logs,
    "devices.json": _devices,
    "queues.json": _queues,
    "database.json": _database,
    "firewall-rendered.nft": _rendered,
    "firewall-loaded.nft": _loaded,
    "versions.json": _versions,
    "system.json": _system,
    "live.json": _live,
}


def build_bundle(inp: BundleInput) -> tuple[bytes, dict[str, Any]]:
    """The ``.tar.gz`` bytes and its manifest. Never raises for one part: it says why."""
    manifest: dict[str, Any] = {"appliance_firmware": __version__, "built_at": time.time(), "parts": {}}
    parts: list[tuple[str, bytes]] = []
    for name, build in _BUILDERS.items():
        try:
            content = build(inp)
            manifest["parts"][name] = {"status": "ok", "what": PARTS[name]}
        except Exception as exc:  # noqa: BLE001  # one unreadable part must not cost the others
            content = _json({"error": f"{type(exc).__name__}: {exc}"})
            manifest["parts"][name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                                       "what": PARTS[name]}
        parts.append((name, inp.redactor.redact_bytes(content)))
    parts.insert(0, ("manifest.json", inp.redactor.redact_bytes(_json(manifest))))
    buffer = io.BytesIO()
    stamp = int(time.time())
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
        for name, content in parts:
            info = tarfile.TarInfo(f"appliance-bundle/{name}")
            info.size, info.mtime, info.mode = len(content), stamp, 0o600
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue(), manifest


def _rss_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


async def bundle_of(runtime: Runtime, *, log_records: int = DEFAULT_LOG_RECORDS) -> tuple[bytes, dict[str, Any]]:
    """The running box's bundle: its live state gathered on the event loop (no I/O), the
    rest built in a worker thread. The log ring is flushed first so the last records are in."""
    health = [c.as_dict() for c in await runtime.health.run_all()]
    ring = runtime.log_ring
    live = {
        "appliance_id": runtime.appliance_id,
        "uptime_s": round(runtime.uptime_s(), 1),
        "ports": dict(runtime.ports),
        "services": [s.as_dict() for s in runtime.board.all()],
        "sync": {"pull": runtime.sync_status.pull.as_dict(), "push": runtime.sync_status.push.as_dict(),
                 "heartbeat": runtime.sync_status.heartbeat.as_dict(), "blocked": runtime.sync_status.blocked},
        "orders_link": runtime.orders_link.as_dict(),
        "support_link": runtime.support_link.as_dict(),
        "log_shipping": runtime.log_shipping.as_dict(),
        "log_ring": ring.stats().as_dict() if ring else None,
        "paired_store": runtime.store.store_id if runtime.store else None,
    }
    links = [link.as_dict() for link in runtime.device_links.all()]
    if ring is not None:
        await trio.to_thread.run_sync(ring.flush, 2.0)
    inp = BundleInput(config=runtime.config, redactor=current_redactor(runtime), log_records=log_records,
                      health=health, live=live, live_links=links, process_rss_kib=_rss_kib())
    return await trio.to_thread.run_sync(build_bundle, inp)
