"""``appliance bundle``: the diagnostics bundle, written to a file, from the box's shell.

For a field technician when the box is half-broken: it needs no running service. It
reads the state directory (the log ring, the database read-only, the pairing for the
secrets to mask) and asks the running box for its health if it answers (else the
machine's own checks). The archive is the one ``GET /v1/bundle`` on port 8005 gives,
minus the live state of a process that is not there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from appliance.commands.base import EXIT_OK, add_config_arg, config_or_exit, fail
from appliance.commands.health import collect
from appliance.protocol.redact import Redactor
from appliance.services.bundle import DEFAULT_LOG_RECORDS, MAX_LOG_RECORDS, BundleInput, build_bundle
from appliance.storage.known_secrets import known_secrets, secret_context

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bundle", help="write the diagnostics bundle (.tar.gz) to a file; works with the "
                                      "service stopped")
    add_config_arg(p)
    p.add_argument("--out", metavar="FILE", help="where to write it (default: appliance-bundle-<time>.tar.gz "
                                                 "in the current directory)")
    p.add_argument("--logs", type=int, default=DEFAULT_LOG_RECORDS, metavar="N",
                   help=f"the last N log records (default {DEFAULT_LOG_RECORDS}, at most {MAX_LOG_RECORDS})")
    p.add_argument("--port-offset", type=int, default=0, metavar="N", help="as given to `appliance run`")
    p.set_defaults(func=cmd_bundle)


def cmd_bundle(args: argparse.Namespace) -> int:
    config = config_or_exit(args)
    if not 0 <= args.logs <= MAX_LOG_RECORDS:
        raise fail(f"--logs must be from 0 to {MAX_LOG_RECORDS}")
    host = config.lan.bind if config.lan.bind not in ("0.0.0.0", "::", "") else "127.0.0.1"
    checks = collect(host, config.lan.ports.with_offset(args.port_offset).ops, Path(config.storage.dir))
    inp = BundleInput(config=config, redactor=Redactor(known_secrets(secret_context(config))),
                      log_records=args.logs, health=[c.as_dict() for c in checks])
    data, manifest = build_bundle(inp)
    out = Path(args.out or f"appliance-bundle-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.tar.gz")
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise fail(f"cannot write {out}: {exc.strerror or exc}") from exc
    failed = {name: part["error"] for name, part in manifest["parts"].items() if part["status"] != "ok"}
    print(f"wrote {out} ({len(data)} bytes, {len(manifest['parts']) - len(failed)} of "
          f"{len(manifest['parts'])} parts readable)")
    for name, error in failed.items():
        print(f"  not readable: {name}: {error}", file=sys.stderr)
    return EXIT_OK
