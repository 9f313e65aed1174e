"""``appliance update status|install FILE|URL``: firmware updates by hand (docs/updates.md).

For a technician with a bundle on a USB stick, or a URL, when the platform cannot offer
it: the same checks and the same trial as an update the platform offers (the signature
checked before anything is written, the inactive slot written by RAUC, the reboot into it
on trial, kept only once healthy). ``install`` runs as root, as RAUC's client does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from appliance import __version__
from appliance.commands.base import EXIT_OK, add_config_arg, config_or_exit, fail
from appliance.config import Config
from appliance.services.firmware import (
    BundleRefused,
    UpdateFiles,
    files_of,
    install_bundle,
    read_boot_id,
    read_booted,
)
from appliance.services.installer import InstallerError
from appliance.services.wan import WanConfigError, client_for, close_client, locate_failure, route

__all__ = ["register"]

# A bundle fetched by hand is streamed to disk in pieces of this size.
CHUNK_BYTES = 1024 * 1024
# The download's overall deadline: a few hundred MiB on a slow shop line.
DOWNLOAD_DEADLINE_S = 3600.0
EXIT_REFUSED = 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("update", help="firmware updates: the slot running, the last outcome, install a bundle")
    usub = p.add_subparsers(dest="update_cmd", required=True, metavar="{status,install}")
    s = usub.add_parser("status", help="the booted slot, a trial under way, the last update's outcome")
    add_config_arg(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)
    i = usub.add_parser("install", help="install a signed bundle (a file, or an https:// URL) into the other slot "
                                        "and reboot into it on trial (as root)")
    add_config_arg(i)
    i.add_argument("bundle", metavar="FILE|URL")
    i.add_argument("--sha256", default="", help="refuse the bundle unless its bytes have this sha256")
    i.set_defaults(func=cmd_install)


def status_of(config: Config) -> dict[str, Any]:
    files = files_of(config)
    trial, last = files.read_trial(), files.read_last()
    bundles = sorted(p.name for p in files.root.glob("*.raucb*")) if files.root.is_dir() else []
    return {"version": __version__, "slot": read_booted(config) or None,
            "trial": trial.as_dict() if trial else None, "last": last.as_dict() if last else None,
            "bundles": bundles, "reboot_requested": files.reboot.exists()}


def cmd_status(args: argparse.Namespace) -> int:
    status = status_of(config_or_exit(args))
    if args.json:
        print(json.dumps(status, indent=2))
        return EXIT_OK
    slot = status["slot"] or "none (no A/B system slots: this machine is updated by flashing an image)"
    print(f"firmware {status['version']}, booted slot {slot}")
    trial = status["trial"]
    if trial:
        print(f"trial: {trial['version']} in slot {trial['to_slot']} (from {trial['from_version']} in "
              f"{trial['from_slot']}){', judged ' + trial['verdict'] if trial['verdict'] else ''}")
    last = status["last"]
    if last:
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(last["at"]))
        print(f"last update: {last['version']} {last['outcome'].replace('_', ' ')} at {when}"
              f"{': ' + last['reason'] if last['reason'] else ''}")
    else:
        print("last update: none recorded")
    if status["reboot_requested"]:
        print("a reboot is requested")
    return EXIT_OK


def _fetch(config: Config, url: str, dest: Path) -> None:
    """Stream ``url`` to ``dest`` through the box's WAN path (its proxy and CA)."""

    async def fetch() -> None:
        target = route(url, config.wan, ca_file=config.cloud.ca_file)
        client = client_for(target, connect_timeout_s=config.cloud.connect_timeout_s,
                            read_timeout_s=config.cloud.read_timeout_s)
        try:
            with trio.fail_after(DOWNLOAD_DEADLINE_S), dest.open("wb") as f:
                async with client.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise fail(f"{url}: HTTP {response.status_code}")
                    async for chunk in response.aiter_raw(CHUNK_BYTES):
                        await trio.to_thread.run_sync(f.write, chunk)
        except httpx.HTTPError as exc:
            raise fail(locate_failure(exc, url=url, proxy=target.proxy).message) from exc
        finally:
            await close_client(client)

    try:
        trio.run(fetch)
    except (WanConfigError, trio.TooSlowError, OSError) as exc:
        dest.unlink(missing_ok=True)
        raise fail(f"cannot download {url}: {exc}") from exc


def _own_like_state_dir(files: UpdateFiles) -> None:
    """Run as root: leave the update's files to the appliance's user, as the state dir is."""
    if os.geteuid() != 0:
        return
    owner = files.root.parent.stat()
    for path in [files.root, *files.root.iterdir()]:
        os.chown(path, owner.st_uid, owner.st_gid)


def cmd_install(args: argparse.Namespace) -> int:
    config = config_or_exit(args)
    files = files_of(config)
    files.prepare()
    booted = read_booted(config)
    if not booted:
        raise fail("this machine has no A/B system slots (no rauc.slot= on its kernel command line): "
                   "it is updated by flashing a new image")
    if files.read_trial() is not None:
        raise fail("a trial is under way (see `appliance update status`); install again once it ended")
    source = args.bundle
    if source.startswith("https://"):
        bundle = files.root / "manual.raucb"
        print(f"downloading {source} ...", file=sys.stderr)
        _fetch(config, source, bundle)
    elif "://" in source:
        raise fail("a bundle URL must be https://")
    else:
        bundle = Path(source)
        if not bundle.is_file():
            raise fail(f"no bundle at {bundle}")
    if args.sha256:
        digest = hashlib.sha256()
        with bundle.open("rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
        if digest.hexdigest() != args.sha256.lower():
            raise fail(f"{bundle}: its sha256 is {digest.hexdigest()}, not {args.sha256}", EXIT_REFUSED)
    print(f"checking the signature and installing {bundle} into the other slot ...", file=sys.stderr)

    async def install() -> None:
        trial = await install_bundle(config, files, bundle, booted=booted, boot_id=read_boot_id(config),
                                     now=time.time())
        files.request_reboot(f"installed {trial.version} into {trial.to_slot} by hand")
        print(f"installed {trial.version} into slot {trial.to_slot}; the box reboots into it on trial and keeps "
              "it only if it proves healthy")

    try:
        trio.run(install)
    except BundleRefused as exc:
        raise fail(str(exc), EXIT_REFUSED) from exc
    except (InstallerError, trio.TooSlowError) as exc:
        raise fail(f"the install failed; the running slot is unchanged: {exc}", EXIT_REFUSED) from exc
    finally:
        if source.startswith("https://"):
            bundle.unlink(missing_ok=True)
        _own_like_state_dir(files)
    return EXIT_OK
