"""``appliance health``: what is wrong and how to fix it, for a technician at the box.

It asks the running appliance (its ops listener, ``/health``) for every check; if the
appliance does not answer, that is the first failure reported, followed by the checks
of the machine that need no running process (disk, clock, temperature, power).
Output: a table, or ``--json``. Exit code: 0 all ok, 1 warnings, 2 failures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from appliance.commands.base import add_config_arg, config_or_exit
from appliance.health.system import system_checks
from appliance.protocol.health import Check, Status, exit_code, summary, worst

__all__ = ["register"]

_MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("health", help="run every health check (exit 0 ok, 1 warnings, 2 failures)")
    add_config_arg(p)
    p.add_argument("--port-offset", type=int, default=0, metavar="N", help="as given to `appliance run`")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="list passing checks too")
    p.set_defaults(func=cmd_health)


def _from_json(items: list[dict[str, Any]]) -> list[Check]:
    return [Check(name=i["name"], status=Status(i["status"]), message=i["message"], fix=i.get("fix", ""),
                  data=i.get("data", {})) for i in items]


def collect(host: str, ops_port: int, state_dir: Path) -> list[Check]:
    url = f"http://{host}:{ops_port}/health"
    try:
        answer = httpx.get(url, timeout=15.0)
        answer.raise_for_status()
        return _from_json(answer.json()["checks"])
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        down = Check(name="appliance.process", status=Status.FAIL,
                     message=f"the appliance does not answer on {url}: {exc}",
                     fix="`systemctl status appliance` and `journalctl -u appliance -n 50` say why")
        return [down, *trio.run(system_checks, state_dir)]


def cmd_health(args: argparse.Namespace) -> int:
    config = config_or_exit(args)
    host = config.lan.bind if config.lan.bind not in ("0.0.0.0", "::", "") else "127.0.0.1"
    ops_port = config.lan.ports.with_offset(args.port_offset).ops
    checks = collect(host, ops_port, Path(config.storage.dir))
    if args.json:
        print(json.dumps({"status": str(worst(checks)), "summary": summary(checks),
                          "checks": [c.as_dict() for c in checks]}, indent=2))
        return exit_code(checks)
    counts = summary(checks)
    print(f"health: {worst(checks)} ({counts['ok']} ok, {counts['warn']} warning, {counts['fail']} failing)")
    for c in checks:
        if c.status is Status.OK and not args.all:
            continue
        print(f"  {_MARK[c.status.value]}  {c.name}: {c.message}")
        if c.fix:
            print(f"        fix: {c.fix}")
    sys.stdout.flush()
    return exit_code(checks)
