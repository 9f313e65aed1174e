"""The cloud simulator: the platform's sync API (docs/cloud-contract.md) on loopback HTTPS.

In a test, in the test's own trio loop::

    handle = await nursery.start(run_cloud_simulator, SimConfig(products=50, tls_dir=str(tmp_path)))
    async with httpx.AsyncClient(base_url=handle.url, verify=handle.ssl_context()) as client: ...
    handle.state.upsert("price", "SKU-000001", {...})     # mutate the catalog directly

From a shell: ``appliance devkit cloud --port 8443 --tls-dir /tmp/sim`` (one JSON ready line).

TLS: a local CA (trustme) kept in ``tls_dir`` (``ca.pem`` for clients, ``ca.key``, reused by
the next run so a client's trust survives a restart) signs a fresh server certificate for
``localhost``, ``127.0.0.1``, ``::1`` and the production name ``api.server.commerce-hub.io``
(so a proxy test can CONNECT to that name mapped to loopback).

Cancellation: cancelling the task stops the server at once (in-flight requests are cut);
a temporary ``tls_dir`` is removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, Final

import attrs
import trio
import trustme
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from appliance.devkit.cloud_app import build_app
from appliance.devkit.cloud_catalog import catalog_digest
from appliance.devkit.cloud_orders import OrderMessage, SendOrder, make_order, push_orders
from appliance.devkit.cloud_state import CloudState, QueueService, SimConfig
from appliance.services.http import BindError, bind_tcp

__all__ = [
    "API_HOST",
    "BindError",
    "CloudState",
    "OrderMessage",
    "QueueService",
    "SendOrder",
    "SimConfig",
    "SimHandle",
    "TlsFiles",
    "catalog_digest",
    "make_order",
    "push_orders",
    "run_cloud_simulator",
    "write_tls",
]

log = logging.getLogger(__name__)

API_HOST: Final = "api.server.commerce-hub.io"
LOGS_HOST: Final = "api.logmatic.io"
CERT_NAMES: Final = ("localhost", "127.0.0.1", "::1", API_HOST, LOGS_HOST)


@attrs.frozen(kw_only=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_tls(directory: Path) -> TlsFiles:
    """The CA (reused if ``ca.pem`` and ``ca.key`` are there) and a fresh server certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_pem, ca_key = directory / "ca.pem", directory / "ca.key"
    if ca_pem.is_file() and ca_key.is_file():
        ca = trustme.CA.from_pem(ca_pem.read_bytes(), ca_key.read_bytes())
    else:
        ca = trustme.CA(organization_name="Appliance cloud simulator")
        _write_private(ca_key, ca.private_key_pem.bytes())
        ca.cert_pem.write_to_path(str(ca_pem))
    server = ca.issue_cert(*CERT_NAMES)
    cert, key = directory / "server.pem", directory / "server.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    _write_private(key, server.private_key_pem.bytes())
    return TlsFiles(ca=ca_pem, cert=cert, key=key)


@attrs.frozen(kw_only=True)
class SimHandle:
    """What ``task_status.started()`` gives: where the simulator is and its live state."""

    url: str
    port: int
    ca_path: Path
    state: CloudState

    @property
    def store_id(self) -> str:
        return self.state.store_id

    @property
    def pair_code(self) -> str:
        return self.state.config.pair_code

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts only the simulator's CA."""
        return ssl.create_default_context(cafile=str(self.ca_path))

    def ready_line(self) -> dict[str, Any]:
        return {"url": self.url, "port": self.port, "ca": str(self.ca_path), "store_id": self.store_id,
                "pair_code": self.pair_code}


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


async def run_cloud_simulator(
    config: SimConfig,
    *,
    send_order: SendOrder | None = None,
    task_status: trio.TaskStatus[SimHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``started()`` gives a :class:`SimHandle` once the port is bound.

    Raises :class:`BindError` when the port cannot be bound. ``send_order`` receives the
    orders made by ``POST /_sim/orders`` (the seam to a Service Bus sender).
    """
    with contextlib.ExitStack() as stack:
        if config.tls_dir:
            tls_dir = Path(config.tls_dir)
        else:
            tls_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cloud-sim-")))
        # Key generation takes tens of milliseconds: keep it off the event loop.
        tls = await trio.to_thread.run_sync(write_tls, tls_dir)
        sock = bind_tcp(config.host, config.port, role="cloud simulator")
        port = sock.getsockname()[1]
        url = f"https://{_url_host(config.host)}:{port}"
        state = CloudState(config, url=url)
        hc = HypercornConfig()
        # hypercorn owns the descriptor from here and closes it when it stops.
        hc.bind = [f"fd://{sock.detach()}"]
        hc.certfile, hc.keyfile = str(tls.cert), str(tls.key)
        hc.accesslog = None
        hc.errorlog = logging.getLogger("appliance.devkit.cloud.http")
        hc.graceful_timeout = 1.0
        # HTTP/1.1 only: a cut fault is then a real connection cut, as the client would see
        # from a platform behind a load balancer (an h2 stream left open would just hang).
        hc.alpn_protocols = ["http/1.1"]
        handle = SimHandle(url=url, port=port, ca_path=tls.ca, state=state)
        app = build_app(state, send_order=send_order)
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve, app, hc, shutdown_trigger=trio.sleep_forever,  # type: ignore[arg-type]
                                        mode="asgi"))
            log.info("cloud simulator on %s (store %s, %d products)", url, config.store_id, config.products)
            task_status.started(handle)
