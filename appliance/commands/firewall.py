"""``appliance firewall render`` and ``appliance firewall check``.

render: the nftables file derived from the port map and the configuration, on stdout
(or ``--out FILE``, written whole or not at all).
check: the loaded ``table inet appliance`` (``nft list``, or ``--loaded FILE``) against
the rendered one, each difference in words. Exit 0 same, 1 differs, 2 cannot read.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Final

from appliance.commands.base import EXIT_OK, add_config_arg, config_or_exit, fail, run_group
from appliance.config import find_config_path
from appliance.health.firewall import Loaded, differences, read_loaded, render_config
from appliance.protocol.firewall import FirewallError
from appliance.protocol.firewall_compare import RulesetParseError

__all__ = ["register"]

EXIT_DIFFERS: Final = 1
EXIT_CANNOT_READ: Final = 2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fw = sub.add_parser("firewall", help="render the nftables ruleset from the port map, or check the loaded one")
    fw_sub = fw.add_subparsers(dest="firewall_cmd", required=True, metavar="{render,check}")
    p = fw_sub.add_parser("render", help="print the nftables ruleset derived from the port map and config")
    add_config_arg(p)
    p.add_argument("--out", metavar="FILE", help="write it to FILE (atomically) instead of stdout")
    p.set_defaults(func=cmd_render)
    p = fw_sub.add_parser("check", help="compare the loaded ruleset with the rendered one (exit 0 same, "
                                        "1 differs, 2 cannot read)")
    add_config_arg(p)
    p.add_argument("--loaded", metavar="FILE", help="read the loaded table from FILE (`nft list table inet "
                                                    "appliance` output) instead of running nft")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="how long nft may take")
    p.set_defaults(func=cmd_check)


def _rendered(args: argparse.Namespace) -> str:
    config = config_or_exit(args)
    path = find_config_path(args.config)
    try:
        return render_config(config, str(path) if path else "the embedded defaults")
    except FirewallError as exc:
        raise fail(f"cannot render the firewall: {exc}") from exc


def cmd_render(args: argparse.Namespace) -> int:
    text = _rendered(args)
    if not args.out:
        sys.stdout.write(text)
        return EXIT_OK
    target = Path(args.out)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or Path("."))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        raise fail(f"cannot write {target}: {exc.strerror or exc}") from exc
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    config = config_or_exit(args)
    _rendered(args)  # a config the firewall cannot be rendered from fails here, with exit 2
    if args.loaded:
        try:
            loaded = Loaded(text=Path(args.loaded).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            print(f"cannot read the firewall: {args.loaded}: {exc}", file=sys.stderr)
            return EXIT_CANNOT_READ
    else:
        loaded = read_loaded(args.timeout)
    if loaded.error:
        print(f"cannot read the firewall: {loaded.error}", file=sys.stderr)
        print(f"fix: {loaded.fix}", file=sys.stderr)
        return EXIT_CANNOT_READ
    try:
        diffs = differences(config, loaded)
    except RulesetParseError as exc:
        print(f"cannot read the firewall: {exc}", file=sys.stderr)
        return EXIT_CANNOT_READ
    if not diffs:
        print("the loaded firewall matches the one rendered from the port map")
        return EXIT_OK
    print(f"the loaded firewall differs from the one rendered from the port map ({len(diffs)}):")
    for line in diffs:
        print(f"  - {line}")
    print("fix: systemctl restart appliance-firewall nftables (renders the ruleset again and loads it)")
    return EXIT_DIFFERS


def main(argv: list[str] | None = None) -> int:
    """``python3 -m appliance.commands.firewall render|check``: the same commands without
    importing the whole appliance (the boot-time renderer runs before anything else)."""
    return run_group("firewall", register, argv)


if __name__ == "__main__":
    sys.exit(main())
