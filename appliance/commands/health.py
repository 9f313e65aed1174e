"""``appliance health``: what is wrong and how to fix it, for a technician at the box.

It asks the running appliance (its ops listener, ``/health``) for every check; if the
appliance does not answer, that is the first failure reported, followed by the checks
of the machine that need no running process (disk, clock, temperature, power).
Output: a table, or ``--json``. Exit code: 0 all ok, 1 warnings, 2 failures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from appliance.commands.base import add_box_args, config_or_exit, find_box
from appliance.health.system import system_checks
from appliance.protocol.headline import headline
from appliance.protocol.health import Check, Status, exit_code, summary, worst
from appliance.protocol.text import Text
from appliance.services.i18n import LANGUAGES, gettext_for
from appliance.storage.secrets import read_secret

__all__ = ["register"]

_MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("health", help="run every health check (exit 0 ok, 1 warnings, 2 failures)")
    add_box_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="list passing checks too")
    p.add_argument("--refresh", action="store_true",
                   help="run the checks now instead of reading the last results (a few seconds old at most); "
                        "needs the admin token (from the config or the state directory)")
    p.set_defaults(func=cmd_health)


def _from_json(items: list[dict[str, Any]]) -> list[Check]:
    return [Check(name=i["name"], status=Status(i["status"]), message=i["message"], fix=i.get("fix", ""),
                  data=i.get("data", {})) for i in items]


def _down_fix() -> Text:
    if os.geteuid() == 0:
        return Text("`systemctl status appliance` and `journalctl -u appliance -n 50` say why; "
                    "started by hand, give its --port-offset or --config")
    return Text("start it (scripts/run --no-demo, or scripts/run for the demo); "
                "started by hand with other ports, give its --port-offset or --config")


def collect(host: str, ops_port: int, state_dir: Path, *, refresh_token: str | None = None,
            source: str = "", language: str | None = None) -> list[Check]:
    """The box's checks (in ``language`` if given, else as the box words them: English)."""
    url = f"http://{host}:{ops_port}/health"
    headers = {"Accept-Language": language} if language else {}
    try:
        if refresh_token is None:
            answer = httpx.get(url, timeout=15.0, headers=headers)
        else:
            answer = httpx.post(url, timeout=15.0, headers={**headers, "Authorization": f"Bearer {refresh_token}"})
        answer.raise_for_status()
        return _from_json(answer.json()["checks"])
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        down = Check(name="appliance.process", status=Status.FAIL,
                     message=Text("the appliance does not answer on {url} (from {source}): {error}", url=url,
                                  source=source, error=str(exc)) if source else
                     Text("the appliance does not answer on {url}: {error}", url=url, error=str(exc)),
                     fix=_down_fix())
        return [down, *trio.run(system_checks, state_dir)]


def cmd_health(args: argparse.Namespace) -> int:
    box = find_box(args)
    token = None
    if args.refresh:
        config = config_or_exit(args)
        try:
            token = config.admin.token or read_secret(Path(box.state_dir) / "admin.token")
        except OSError:
            token = None  # not readable by this user: said below
        if not token:
            print(f"appliance health --refresh: no admin token in the config nor readable in {box.state_dir}; "
                  "run it as root or the appliance user, or without --refresh", file=sys.stderr)
            return 2
    language = box.language if box.language in LANGUAGES else "en"
    checks = collect(box.host, box.ports["ops"], Path(box.state_dir), refresh_token=token, source=box.source,
                     language=None if args.json else language)
    if args.json:
        print(json.dumps({"status": str(worst(checks)), "summary": summary(checks),
                          "checks": [c.as_dict() for c in checks]}, indent=2))
        return exit_code(checks)
    counts = summary(checks)
    _ = gettext_for(language)
    checks = [c.in_language(_) for c in checks]  # the checks made here, when the box does not answer
    top = headline(checks, _)
    print(top.sentence)
    first = _("First:")
    if top.first_fix:
        print(f"{first} {top.first_fix}")
    print(_("health: {status} ({ok} ok, {warn} warning, {fail} failing)").format(
        status={Status.OK: _("ok"), Status.WARN: _("warn"),
                Status.FAIL: _("fail")}[worst(checks)], ok=counts["ok"], warn=counts["warn"], fail=counts["fail"]))
    fix = _("fix:")
    for c in checks:
        if c.status is Status.OK and not args.all:
            continue
        print(f"  {_MARK[c.status.value]}  {c.name}: {c.message}")
        if c.fix:
            print(f"        {fix} {c.fix}")
    sys.stdout.flush()
    return exit_code(checks)
