"""``appliance pair CODE``: pair this box with its store (the code comes from the back office).

Runs in its own process, next to a running appliance or not: it saves the pairing in the
state directory (0600), and a running appliance picks it up within a few seconds.
Exit 0 paired; 2 the code or a setting is wrong (a person must act); 1 the platform could
not be reached (the message names the failing hop: DNS, TCP, proxy, TLS, HTTP).
"""

from __future__ import annotations

import argparse
import sqlite3
from functools import partial
from pathlib import Path

import attrs
import trio

from appliance.commands.base import EXIT_OK, EXIT_USAGE, add_config_arg, config_or_exit, fail
from appliance.services.pairing import PairingFailed, pair_box
from appliance.storage import DATABASE_FILE, Database, SchemaError, StorageError
from appliance.storage.meta import appliance_id
from appliance.storage.running import find_running

__all__ = ["register"]

EXIT_UNREACHABLE = 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("pair", help="pair this box with its store, using the code from the back office")
    p.add_argument("code", metavar="CODE", help="the pairing code shown in the back office")
    add_config_arg(p)
    p.add_argument("--state-dir", metavar="DIR", help="override [storage] dir")
    p.set_defaults(func=cmd_pair)


def _box_id(state_dir: Path) -> str:
    db = Database.open_sync(state_dir / DATABASE_FILE)
    try:
        return db.write_sync(appliance_id)
    finally:
        db.close()


def cmd_pair(args: argparse.Namespace) -> int:
    config = config_or_exit(args)
    running = None if args.config or args.state_dir else find_running()
    state = args.state_dir or (running.state_dir if running is not None else None)  # beside the running box
    if state:
        config = attrs.evolve(config, storage=attrs.evolve(config.storage, dir=state))
    state_dir = Path(config.storage.dir)
    try:
        box = _box_id(state_dir)
    except (StorageError, SchemaError, sqlite3.Error, OSError) as exc:
        raise fail(f"storage: {exc} (check [storage] dir and its permissions)") from exc
    try:
        link = trio.run(partial(pair_box, config, appliance_id=box, code=args.code))
    except PairingFailed as exc:
        raise fail(exc.message, EXIT_UNREACHABLE if exc.link is not None else EXIT_USAGE) from exc
    except OSError as exc:
        raise fail(f"cannot save the pairing in {state_dir}: {exc}") from exc
    services = ", ".join(sorted(k for k, v in link.services.items() if k != "store_secret" and v)) or "none"
    print(f"paired {box} with store {link.store_id} (services: {services}); "
          f"saved in {state_dir / 'pairing.json'}")
    return EXIT_OK
