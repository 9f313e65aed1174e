"""``appliance events``: tail the box's live event stream (port 8001) for a technician.

One line per event (time, id, topic, type and the event's small values), or the stream's
own JSON messages with ``--json``. The stream is followed across restarts of the box:
after a disconnection the command reconnects with the last id it printed, so nothing is
missed and nothing printed twice (a ``resync`` says when the box no longer has them).
Uses the admin token from the configuration, else the box's state directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from pathlib import Path
from typing import Any, Final

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from appliance.commands.base import EXIT_OK, add_config_arg, config_or_exit, fail

__all__ = ["register"]

# Waits between reconnections after the box went away (it restarts in seconds).
_RECONNECT_S: Final = 1.0
_MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("events", help="tail the live event stream (orders, devices, sync, catalog)")
    add_config_arg(p)
    p.add_argument("--port-offset", type=int, default=0, metavar="N", help="as given to `appliance run`")
    p.add_argument("--host", default="", help="the box (default: this machine)")
    p.add_argument("--port", type=int, default=0, help="the events port (default: from the configuration)")
    p.add_argument("--topics", default="", help="comma-separated: catalog, orders, commands, devices, sync, media")
    p.add_argument("--device", default="", help="only this device's events (and store-wide ones)")
    p.add_argument("--sku-prefix", default="", help="catalog events only for SKUs starting with this")
    p.add_argument("--after", type=int, default=None, metavar="ID",
                   help="start after this event id (default: live events only)")
    p.add_argument("--count", type=int, default=0, metavar="N", help="stop after N events (default: never)")
    p.add_argument("--json", action="store_true", help="print the stream's JSON messages, one per line")
    p.set_defaults(func=cmd_events)


def _token(config_token: str, state_dir: Path) -> str:
    if config_token:
        return config_token
    try:
        return (state_dir / "admin.token").read_text("utf-8").strip()
    except OSError as exc:
        raise fail(f"no admin token: none in the configuration and {state_dir / 'admin.token'} cannot be read "
                   f"({exc.strerror or exc}); run as the appliance's user or root") from exc


def human(message: dict[str, Any]) -> str:
    """One line for a person: time, id, topic, type, then the body's plain values."""
    if "id" not in message:
        kind = message.get("type", "?")
        detail = message.get("message") or message.get("error") or ""
        return f"-- {kind}" + (f": {detail}" if detail else "")
    at = str(message.get("at", ""))
    clock = at[11:23] if len(at) >= 23 else at
    data = message.get("data")
    data = data if isinstance(data, dict) else {}
    plain = " ".join(f"{k}={v}" for k, v in sorted(data.items()) if isinstance(v, str | int | float | bool))
    return f"{clock}  #{message['id']:<7} {message.get('topic', ''):<8} {message.get('type', ''):<22} {plain}"


async def tail(url: str, query: dict[str, str], *, as_json: bool, count: int) -> None:
    printed = 0
    connected = False
    while True:
        target = f"{url}?{urllib.parse.urlencode(query)}"
        try:
            async with open_websocket_url(target, max_message_size=_MAX_MESSAGE_BYTES) as ws:
                connected = True
                while True:
                    decoded = json.loads(await ws.get_message())
                    for message in decoded if isinstance(decoded, list) else [decoded]:
                        if message.get("type") == "ping":
                            await ws.send_message('{"op":"pong"}')
                            continue
                        if message.get("type") in ("subscribed", "resync") and "after" not in query:
                            query["after"] = str(message["head"])  # a reconnection goes on from here
                        print(json.dumps(message, separators=(",", ":")) if as_json else human(message), flush=True)
                        if message.get("type") == "error":
                            raise fail(f"the box refused the subscription: {message.get('error')}")
                        if "id" in message:
                            query["after"] = str(message["id"])
                            printed += 1
                            if count and printed >= count:
                                return
        except (OSError, HandshakeError) as exc:
            if not connected:
                raise fail(f"cannot reach the event stream at {url}: {exc}; is the box running "
                           "(`appliance health`)?") from exc
        except ConnectionClosed as exc:
            reason = exc.reason.name if exc.reason is not None else "no reason"
            print(f"-- disconnected ({reason}); reconnecting after id {query.get('after', 'now')}",
                  file=sys.stderr, flush=True)
        await trio.sleep(_RECONNECT_S)


def cmd_events(args: argparse.Namespace) -> int:
    config = config_or_exit(args)
    host = args.host or (config.lan.bind if config.lan.bind not in ("0.0.0.0", "::", "") else "127.0.0.1")
    port = args.port or config.lan.ports.with_offset(args.port_offset).events
    query = {"token": _token(config.admin.token, Path(config.storage.dir)), "coalesce": "1"}
    for key, value in (("topics", args.topics), ("device", args.device), ("sku_prefix", args.sku_prefix)):
        if value:
            query[key] = value
    if args.after is not None:
        query["after"] = str(args.after)
    trio.run(lambda: tail(f"ws://{host}:{port}/v1/events", query, as_json=args.json, count=args.count))
    return EXIT_OK
