"""``appliance run``: the appliance itself, in the foreground (systemd runs exactly this)."""

from __future__ import annotations

import argparse
import logging
import sys
from functools import partial

import attrs
import trio

from appliance import supervisor
from appliance.commands.base import EXIT_OK, EXIT_USAGE, add_config_arg, config_or_exit
from appliance.config import Config, ConfigError
from appliance.logs import setup_logging
from appliance.protocol.redact import Redactor
from appliance.services.http import BindError, raise_descriptor_limit
from appliance.services.log_ring import attach_ring, detach_ring, ring_directory
from appliance.storage import SchemaError, StorageError
from appliance.storage.known_secrets import known_secrets, secret_context
from appliance.storage.logring import LogRing, RingHandler

__all__ = ["register"]

log = logging.getLogger("appliance")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run the appliance in the foreground")
    add_config_arg(p)
    p.add_argument("--port-offset", type=int, default=0, metavar="N",
                   help="add N to every TCP listener port (for runs without CAP_NET_BIND_SERVICE)")
    p.add_argument("--state-dir", metavar="DIR", help="override [storage] dir")
    p.add_argument("--log-format", choices=["text", "json"], help="override [log] format")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    config = config_or_exit(args)
    if args.state_dir:
        config = attrs.evolve(config, storage=attrs.evolve(config.storage, dir=args.state_dir))
    setup_logging(config.log.level, args.log_format or config.log.format)
    raise_descriptor_limit()  # the listeners' connection caps are sized from it
    ring, handler = _open_ring(config)
    try:
        trio.run(partial(supervisor.run, config, port_offset=args.port_offset, log_ring=ring))
    except Exception as exc:  # noqa: BLE001  # the process boundary: one line and an exit code
        return _report(exc)
    finally:
        if ring is not None and handler is not None:
            detach_ring(handler)
            ring.close()
    return EXIT_OK


def _open_ring(config: Config) -> tuple[LogRing | None, RingHandler | None]:
    """The log ring, open before anything else logs; without it the box still runs (the
    logs.ring service tries again and its failure shows on the homepage)."""
    try:
        ring = LogRing.open(ring_directory(config.storage.dir), ring_bytes=config.logs.ring_bytes,
                            flush_interval_s=config.logs.flush_interval_s)
    except OSError as exc:
        log.warning("the log ring cannot be opened: %s", exc)
        return None, None
    ring.set_redactor(Redactor(known_secrets(secret_context(config))))
    return ring, attach_ring(ring)


def _first(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first leaf exception of ``kinds`` in ``exc`` (which may be an exception group)."""
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _first(sub, kinds)
            if found is not None:
                return found
        return None
    return exc if isinstance(exc, kinds) else None


def _report(exc: Exception) -> int:
    if (bind := _first(exc, (BindError,))) is not None:
        print(f"error: {bind}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(cfg := _first(exc, (ConfigError,)), ConfigError):
        for line in cfg.errors:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_USAGE
    if (storage := _first(exc, (StorageError, SchemaError, PermissionError))) is not None:
        print(f"error: storage: {storage} (check [storage] dir and its permissions)", file=sys.stderr)
        return EXIT_USAGE
    if (fatal := _first(exc, (supervisor.FatalServiceError,))) is not None:
        log.critical("%s", fatal)
        return supervisor.EXIT_FATAL
    raise exc
