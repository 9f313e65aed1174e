"""``appliance version``, ``appliance ports``, ``appliance config check|show``."""

from __future__ import annotations

import argparse
import json
import sys

from appliance import __version__
from appliance.commands.base import EXIT_OK, EXIT_USAGE, add_box_args, add_config_arg, config_or_exit, find_box
from appliance.config import DIRECTION_WORDS, PORT_ROLES, ConfigError, load_config, to_toml_dict
from appliance.protocol.text import Text, say
from appliance.services.i18n import LANGUAGES, gettext_for
from appliance.storage.running import find_running

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("version", help="print the firmware version")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("ports", help="the port map (the running box's, else the configuration's), as a table or JSON")
    add_box_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ports)

    cfg = sub.add_parser("config", help="check or show the configuration")
    cfg_sub = cfg.add_subparsers(dest="config_cmd", required=True, metavar="{check,show}")
    p = cfg_sub.add_parser("check", help="validate the configuration (exit 0, or 2 with path-named errors)")
    add_config_arg(p)
    p.set_defaults(func=cmd_config_check)
    p = cfg_sub.add_parser("show", help="the effective configuration, secrets masked, as JSON")
    add_config_arg(p)
    p.set_defaults(func=cmd_config_show)


def cmd_version(args: argparse.Namespace) -> int:
    print(__version__)
    return EXIT_OK


def cmd_ports(args: argparse.Namespace) -> int:
    box = find_box(args)
    rows = [{"role": r.role, "port": box.ports[r.role], "transport": str(r.transport),
             "direction": str(r.direction), "description": r.description} for r in PORT_ROLES]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    _ = gettext_for(box.language if box.language in LANGUAGES else "en")  # [admin] language
    print(say(Text("ports of {source}:", source=box.source), _))
    port, direction, role, service = _("port"), _("dir"), _("role"), _("service")
    print(f"{port:>10}  {direction:6}  {role:13} {service}")
    for row, port_role in zip(rows, PORT_ROLES, strict=True):
        direction = say(DIRECTION_WORDS.get(port_role.direction, port_role.direction), _)
        print(f"{str(row['port']) + '/' + str(row['transport']):>10}  {direction:6}  "
              f"{row['role']:13} {say(port_role.description, _)}")
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        _, path = load_config(args.config)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"config error: {line}", file=sys.stderr)
        return EXIT_USAGE
    print(f"configuration OK ({path if path else 'embedded defaults'})")
    return EXIT_OK


def cmd_config_show(args: argparse.Namespace) -> int:
    running = None if args.config else find_running()
    if running is not None:  # what the box really runs with (the demo's, or `run --state-dir`'s)
        print(f"# the configuration of the running box (pid {running.pid}), secrets masked", file=sys.stderr)
        print(json.dumps(running.config, indent=2))
        return EXIT_OK
    config = config_or_exit(args)
    print(json.dumps(to_toml_dict(config), indent=2))
    return EXIT_OK


