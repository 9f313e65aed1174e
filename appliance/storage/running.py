"""Where a running appliance says which ports it is bound to, so the tools find it.

Once every listener is bound, the process writes ``box.json`` (its pid, bind address,
bound port map, state directory and configuration with secrets masked) into its runtime
directory, and removes it when it stops. ``appliance health``, ``ports`` and ``config
show`` read it when given no ``--port-offset`` or ``--config``, so a box run with an
offset, with ports chosen by the kernel, or from the demo is found without options.

The runtime directory, for the process and the tools alike:

- ``$RUNTIME_DIRECTORY/`` when systemd sets it (``RuntimeDirectory=appliance``);
- ``/run/appliance/`` for root;
- ``$XDG_RUNTIME_DIR/appliance/`` for a normal user, else ``~/.local/state/appliance-run/``.

The tools look in their own user's place first, then in ``/run/appliance/`` (the service's).
A file whose process is gone is ignored. The file is written atomically, mode 0600.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from appliance.storage.secrets import write_secret

__all__ = ["PUBLISHED_FILE", "RunningBox", "find_running", "publish", "published_path", "withdraw"]

PUBLISHED_FILE: Final = "box.json"
SYSTEM_RUNTIME_DIR: Final = Path("/run/appliance")
# A box.json larger than this is not ours: the configuration is a few kilobytes.
MAX_PUBLISHED_BYTES: Final = 256 * 1024


@attrs.frozen(kw_only=True)
class RunningBox:
    """What a running appliance published about itself."""

    pid: int
    appliance_id: str
    bind: str
    ports: dict[str, int]
    state_dir: str
    config: dict[str, Any]
    path: Path

    @property
    def host(self) -> str:
        """Where a tool on this machine reaches the box's listeners."""
        return self.bind if self.bind not in ("0.0.0.0", "::", "") else "127.0.0.1"


def _user_runtime_dir(env: Mapping[str, str]) -> Path:
    if env.get("RUNTIME_DIRECTORY"):
        return Path(env["RUNTIME_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return SYSTEM_RUNTIME_DIR
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "appliance"
    state = Path(env["XDG_STATE_HOME"]) if env.get("XDG_STATE_HOME") else Path.home() / ".local" / "state"
    return state / "appliance-run"


def published_path(env: Mapping[str, str] = os.environ) -> Path:
    """Where this process publishes (and where this user's tools look first)."""
    return _user_runtime_dir(env) / PUBLISHED_FILE


def publish(*, appliance_id: str, bind: str, ports: Mapping[str, int], state_dir: str, config: dict[str, Any],
            env: Mapping[str, str] = os.environ) -> Path:
    """Write this process's ``box.json``; returns its path. Blocking (call from a thread)."""
    path = published_path(env)
    body = {"pid": os.getpid(), "appliance_id": appliance_id, "bind": bind, "ports": dict(ports),
            "state_dir": state_dir, "config": config}
    write_secret(path, json.dumps(body, indent=2) + "\n")
    return path


def withdraw(path: Path) -> None:
    """Remove ``path`` if this process published it (a newer process may have replaced it)."""
    box = _read(path)
    if box is not None and box.pid == os.getpid():
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process (the service's): alive
    return True


def _read(path: Path) -> RunningBox | None:
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_PUBLISHED_BYTES + 1)
    except OSError:
        return None
    if len(raw) > MAX_PUBLISHED_BYTES:
        return None
    try:
        data = json.loads(raw)
        ports = {str(k): int(v) for k, v in data["ports"].items()}
        return RunningBox(pid=int(data["pid"]), appliance_id=str(data["appliance_id"]), bind=str(data["bind"]),
                          ports=ports, state_dir=str(data["state_dir"]), config=dict(data["config"]), path=path)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None  # half-understood: the tools fall back to the configuration


def find_running(env: Mapping[str, str] = os.environ) -> RunningBox | None:
    """The box this user's tools should talk to, if one has published itself and still runs."""
    for path in dict.fromkeys((published_path(env), SYSTEM_RUNTIME_DIR / PUBLISHED_FILE)):
        box = _read(path)
        if box is not None and _alive(box.pid):
            return box
    return None
