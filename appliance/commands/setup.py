"""``appliance setup``: the boot partition's setup file (``appliance-setup.toml``).

- ``appliance setup apply [--boot-dir DIR] [--network-dir DIR] [--config FILE]``: at every
  boot, as root, before the network and the firewall (``appliance-setup.service``). Applies
  the setup file when it is new or edited (``appliance/setupfile.py`` says how), records
  what it did for the homepage and health, and writes the systemd-networkd unit from the
  settings in effect. Exit 0 applied, unchanged or no file; 2 the file has errors (nothing
  was changed; the errors are recorded); 1 a write failed (the previous settings stay).
- ``appliance setup check FILE``: check a setup file on any computer. Exit 0 or 2.

Nothing here needs a shell on the box: the retailer edits the file on the card.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import time
from pathlib import Path
from typing import Final

import attrs

from appliance.commands.base import EXIT_OK, EXIT_USAGE, add_config_arg, fail, run_group
from appliance.config import SETTINGS_FILE, Config, ConfigError, find_config_path, parse_config, read_toml
from appliance.protocol.tomlwrite import dumps
from appliance.setupfile import (
    CA_FILE,
    HANDOFF_FILE,
    MAX_BYTES,
    NETWORK_UNIT,
    SETUP_FILE,
    STATUS_FILE,
    Handoff,
    SetupFile,
    SetupStatus,
    effective,
    file_digest,
    merge,
    network_unit,
    parse_setup,
    read_status,
    scrub,
    summary,
    without_secrets,
)
from appliance.storage.secrets import write_atomic

__all__ = ["apply_setup", "main", "register"]

EXIT_WRITE_FAILED: Final = 1
DEFAULT_BOOT_DIR: Final = "/boot/firmware"
_SETTINGS_HEADER: Final = ("# The shop's settings, from the boot partition's appliance-setup.toml and the homepage;\n"
                           "# merged over /etc/appliance/appliance.toml (docs/setup.md). Written by the box.\n")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("setup", help="the boot partition's setup file (appliance-setup.toml)")
    actions = p.add_subparsers(dest="setup_action", required=True, metavar="ACTION")
    a = actions.add_parser("apply", help="apply the setup file if new or edited (at boot, as root)")
    add_config_arg(a)
    a.add_argument("--boot-dir", default=DEFAULT_BOOT_DIR, metavar="DIR",
                   help=f"where {SETUP_FILE} is (default {DEFAULT_BOOT_DIR})")
    a.add_argument("--network-dir", default="", metavar="DIR",
                   help="write the systemd-networkd unit here (the image: /etc/systemd/network)")
    a.set_defaults(func=cmd_apply)
    c = actions.add_parser("check", help="check a setup file (on any computer)")
    c.add_argument("file", metavar="FILE")
    c.set_defaults(func=cmd_check)


class _Invalid(Exception):
    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors))


def _read_setup(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _Invalid([f"cannot read {path.name}: {exc.strerror or exc}"]) from exc
    if len(raw) > MAX_BYTES:
        raise _Invalid([f"{path.name} is {len(raw)} bytes; a setup file is at most {MAX_BYTES}"])
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")  # Notepad writes a byte-order mark
    except UnicodeDecodeError as exc:
        raise _Invalid([f"{path.name} is not UTF-8 text (save it as UTF-8): {exc}"]) from exc


def _proxy_ca(setup: SetupFile, boot_dir: Path) -> str:
    proxy = setup.proxy
    if proxy is None or not (proxy.ca or proxy.ca_file):
        return ""
    pem = proxy.ca
    if proxy.ca_file:
        try:
            pem = (boot_dir / proxy.ca_file).read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise _Invalid([f"proxy.ca_file: cannot read {proxy.ca_file} beside the setup file: {exc}"]) from exc
    try:
        ssl.create_default_context().load_verify_locations(cadata=pem)
    except (ssl.SSLError, ValueError) as exc:
        where = "proxy.ca_file" if proxy.ca_file else "proxy.ca"
        raise _Invalid([f"{where}: not a certificate the box can use: {exc}"]) from exc
    return pem


def apply_setup(config_path: Path | None, boot_dir: Path, network_dir: Path | None, *,
                now: float | None = None) -> SetupStatus:
    """Apply the setup file in ``boot_dir`` if new or edited; see the module docstring.
    Raises :class:`ConfigError` when the configuration file itself is unusable."""
    now = time.time() if now is None else now
    base = read_toml(config_path) if config_path is not None else {}
    base_config = parse_config(base, source=str(config_path or "config"))
    state_dir = Path(base_config.storage.dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    st = os.stat(state_dir)
    owner = (st.st_uid, st.st_gid) if os.geteuid() == 0 else None
    settings_path = state_dir / SETTINGS_FILE
    settings = read_toml(settings_path) if settings_path.is_file() else {}
    setup_path = boot_dir / SETUP_FILE
    # What the last application did stays known (applied_*), whatever this boot finds.
    previous = attrs.evolve(read_status(state_dir) or SetupStatus(state="absent"), file=str(setup_path),
                            checked_at=now, errors=(), scrubbed=())
    status: SetupStatus
    config: Config | None = None
    if not setup_path.is_file():
        status = attrs.evolve(previous, state="absent")
    else:
        try:
            text = _read_setup(setup_path)
            if previous.applied_digest and file_digest(text) == previous.applied_digest:
                status = attrs.evolve(previous, state="unchanged")
            else:
                status, config = _apply(text, setup_path, base=base, settings=settings, state_dir=state_dir,
                                        owner=owner, now=now)
        except (ConfigError, _Invalid) as exc:
            status = attrs.evolve(previous, state="invalid", errors=tuple(exc.errors))
        except OSError as exc:
            status = attrs.evolve(previous, state="failed",
                                  errors=(f"cannot write the settings: {exc}; the previous settings stay",))
    write_atomic(state_dir / STATUS_FILE, status.to_json(), mode=0o644, owner=owner)
    if network_dir is not None:
        if config is None:
            now_settings = read_toml(settings_path) if settings_path.is_file() else {}
            config = effective(base, now_settings)
        unit = network_unit(config)
        target = network_dir / NETWORK_UNIT
        if not target.is_file() or target.read_text("utf-8") != unit:
            network_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(target, unit, mode=0o644, owner=None)
    return status


def _apply(text: str, setup_path: Path, *, base: dict[str, object], settings: dict[str, object], state_dir: Path,
           owner: tuple[int, int] | None, now: float) -> tuple[SetupStatus, Config]:
    """Validate everything, then write: the CA, the settings, the hand-off, the scrubbed file."""
    setup = parse_setup(text)
    ca = _proxy_ca(setup, setup_path.parent)
    current = effective(base, settings).wan.proxy
    new_settings = merge(settings, setup, current_proxy=current, ca_path=str(state_dir / CA_FILE))
    config = effective(base, new_settings)
    # Everything is checked: from here on only writes, each atomic.
    if ca:
        write_atomic(state_dir / CA_FILE, ca, mode=0o644, owner=owner)
    write_atomic(state_dir / SETTINGS_FILE, _SETTINGS_HEADER + dumps(new_settings), mode=0o600, owner=owner)
    if setup.pairing.release or setup.pairing.code:
        handoff = Handoff(release=setup.pairing.release, code=setup.pairing.code.strip())
        write_atomic(state_dir / HANDOFF_FILE, handoff.to_json(), mode=0o600, owner=owner)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(now))
    scrubbed_text, removed = scrub(text, when=when)
    has_secrets = bool(setup.pairing.code or setup.pairing.release or (setup.proxy and setup.proxy.password))
    if has_secrets and not removed:
        # The lines could not be taken out one by one: write the file again without them.
        scrubbed_text = (f"# Applied {when}; the pairing code, the proxy password and release were then removed.\n"
                         + dumps(without_secrets(text)))
        removed = ["pairing.code", "pairing.release", "proxy.password"]
    if scrubbed_text != text:
        write_atomic(setup_path, scrubbed_text, mode=None, owner=None)
    status = SetupStatus(state="applied", file=str(setup_path), checked_at=now, applied=tuple(summary(setup)),
                         scrubbed=tuple(removed), applied_at=now, applied_digest=file_digest(scrubbed_text))
    return status, config


def cmd_apply(args: argparse.Namespace) -> int:
    path = find_config_path(args.config)
    try:
        status = apply_setup(path, Path(args.boot_dir), Path(args.network_dir) if args.network_dir else None)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"config error: {line}", file=sys.stderr)
        raise fail("the configuration is invalid; the setup file was not applied") from exc
    except OSError as exc:
        raise fail(f"cannot apply the setup file: {exc}", EXIT_WRITE_FAILED) from exc
    name = f"{Path(args.boot_dir) / SETUP_FILE}"
    if status.state == "applied":
        print(f"appliance-setup: applied {name}: {'; '.join(status.applied) or 'nothing to change'}"
              + (f"; removed from it: {', '.join(status.scrubbed)}" if status.scrubbed else ""))
    elif status.state == "unchanged":
        print(f"appliance-setup: {name} unchanged since it was applied")
    elif status.state == "absent":
        print(f"appliance-setup: no {name}")
    else:
        for line in status.errors:
            print(f"appliance-setup: {name}: {line}", file=sys.stderr)
        print(f"appliance-setup: {name} was not applied; the previous settings stay", file=sys.stderr)
        return EXIT_WRITE_FAILED if status.state == "failed" else EXIT_USAGE
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        setup = parse_setup(_read_setup(path))
        _proxy_ca(setup, path.parent)
        effective({}, merge({}, setup, current_proxy="", ca_path=CA_FILE))
    except (ConfigError, _Invalid) as exc:
        for line in exc.errors:
            print(f"{path.name}: {line}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{path.name}: ok: {'; '.join(summary(setup)) or 'sets nothing (every line is a comment)'}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """``python3 -m appliance.commands.setup apply|check``: the same commands without
    importing the whole appliance (the boot-time service runs before anything else)."""
    return run_group("setup", register, argv)


if __name__ == "__main__":
    sys.exit(main())
