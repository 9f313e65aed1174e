"""Run the Service Bus test double: ``python -m tests.amqp.server --tls-dir DIR [--port 0]``.

Starts the proton peer (:mod:`tests.amqp.peer`) on an ephemeral loopback port in a thread
(proton's ``Container.run()`` blocks) and the TLS WebSocket front (:mod:`tests.amqp.wsfront`)
on ``--host``/``--port`` under trio in the main thread. A fresh trustme CA signs the front's
certificate for ``localhost``, ``127.0.0.1`` and any ``--name``; the CA's PEM is written to
``DIR/ca.pem``. When both listen, one JSON line goes to stdout::

    {"port": 43121, "ca": "/tmp/x/ca.pem", "amqp_port": 40211}

SIGTERM (or SIGINT) closes the front, stops the peer and exits 0. Everything binds to
loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import trio
import trustme
from proton.reactor import ApplicationEvent, Container, EventInjector

from tests.amqp.peer import Broker
from tests.amqp.wsfront import serve_front

_STOP_JOIN_S = 5.0


class _ServedBroker(Broker):
    """The broker, plus the "stop_peer" event the main thread injects on shutdown."""

    container: Container | None = None

    def on_stop_peer(self, _event: Any) -> None:
        assert self.container is not None
        self.container.stop()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.amqp.server", description=__doc__.split("\n")[0])
    parser.add_argument("--tls-dir", required=True, type=Path, help="where ca.pem is written")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address for the front")
    parser.add_argument("--port", default=0, type=int, help="front port (0: any free port)")
    parser.add_argument("--name", action="append", default=[], help="extra certificate name")
    parser.add_argument("--sas-key-name", default="", help="check tokens against this key name")
    parser.add_argument("--sas-key", default="", help="... and this key (empty: accept any token)")
    parser.add_argument("--lock-duration-s", default=30.0, type=float)
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace, ctx: ssl.SSLContext, amqp_port: int, ca_path: Path) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_front, args.host, args.port, ctx, amqp_port)
            ready = {"port": server.port, "ca": str(ca_path), "amqp_port": amqp_port}
            print(json.dumps(ready), flush=True)
            async for _signum in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"--host must be a loopback address, got {args.host!r}")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", *args.name)
    args.tls_dir.mkdir(parents=True, exist_ok=True)
    ca_path = args.tls_dir / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)

    broker = _ServedBroker(
        sas_key_name=args.sas_key_name, sas_key=args.sas_key, lock_duration_s=args.lock_duration_s
    )
    container = broker.container = Container(broker)
    acceptor = container.acceptor("127.0.0.1", 0)  # type: ignore[arg-type]  # an int port works
    # proton has no public accessor for the bound port of an acceptor.
    amqp_port: int = acceptor._selectable._delegate.getsockname()[1]  # type: ignore[union-attr]
    injector = EventInjector()
    container.selectable(injector)
    crashed: list[BaseException] = []
    serving = threading.Event()

    def run_peer() -> None:
        try:
            container.run()
        except BaseException as exc:  # the double crashed: say why, and stop the whole server
            crashed.append(exc)
            traceback.print_exc()
            if serving.is_set():
                os.kill(os.getpid(), signal.SIGTERM)

    peer = threading.Thread(target=run_peer, name="proton-peer", daemon=True)
    serving.set()
    peer.start()
    try:
        trio.run(_serve, args, ctx, amqp_port, ca_path)
    finally:
        serving.clear()
        injector.trigger(ApplicationEvent("stop_peer"))
        peer.join(_STOP_JOIN_S)
    return 1 if crashed or peer.is_alive() else 0


if __name__ == "__main__":
    sys.exit(main())
