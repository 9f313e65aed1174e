"""What a sniffer on the shop LAN learns from a device: no admin token, no device key.

``appliance simulate-device`` runs as its own process and does everything a device does:
it enrolls on the provisioning port, is adopted, answers the box's hello on its device
channel, takes a command and posts a signed sale. Every byte of that, both ways, goes
through recording relays on loopback; the capture must hold neither the admin token nor
the device key, in any encoding.
"""

from __future__ import annotations

import base64
import re
import secrets
import subprocess
import sys
from functools import partial
from pathlib import Path

import httpx
import trio

from appliance.storage.devices import get_device

from .conftest import ConfigFactory, running_box

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 20.0


class Relay:
    """A TCP relay that records every byte it forwards."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.streams: list[bytearray] = []  # one per connection and direction

    @property
    def captured(self) -> bytes:
        """Everything, with WebSocket frames unmasked (a sniffer unmasks them as easily)."""
        return b"".join(unmasked(bytes(s)) for s in self.streams)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._one, listeners)

    async def _one(self, client: trio.SocketStream) -> None:
        try:  # a stray connection (the target not known yet, or gone) is closed, not a test failure
            server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await client.aclose()
            return
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
            nursery.start_soon(self._pump, server, client, nursery.cancel_scope)

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope) -> None:
        record = bytearray()
        self.streams.append(record)
        try:
            async for chunk in source:
                record += chunk
                await sink.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


def unmasked(stream: bytes) -> bytes:
    """An HTTP upgrade followed by WebSocket frames (RFC 6455 section 5.2), payloads
    unmasked; anything else as it is."""
    head, sep, frames = stream.partition(b"\r\n\r\n")
    if not sep or b"websocket" not in head.lower():
        return stream
    out, i = bytearray(head + sep), 0
    while i + 2 <= len(frames):
        length, masked, i = frames[i + 1] & 0x7F, frames[i + 1] & 0x80, i + 2
        if length >= 126:
            size = 2 if length == 126 else 8
            length, i = int.from_bytes(frames[i:i + size], "big"), i + size
        mask = frames[i:i + 4] if masked else bytes(4)
        i += 4 if masked else 0
        out += bytes(b ^ mask[n % 4] for n, b in enumerate(frames[i:i + length]))
        i += length
    return bytes(out)


async def test_a_sniffer_learns_no_admin_token_and_no_device_key(make_config: ConfigFactory) -> None:
    token = secrets.token_urlsafe(32)
    async with running_box(make_config(admin={"token": token})) as rt, trio.open_nursery() as nursery:
        provisioning, api = Relay(rt.ports["provisioning"]), Relay(rt.ports["api"])
        prov_port = await nursery.start(provisioning.run)
        api_port = await nursery.start(api.run)
        channel = Relay(0)  # the device's port is known once it listens
        channel_port = await nursery.start(channel.run)
        lines: list[str] = []
        found = {"listening": trio.Event(), "code": trio.Event(), "adopted": trio.Event(), "took": trio.Event(),
                 "sale": trio.Event()}

        async def simulator() -> None:
            argv = [sys.executable, "-m", "appliance", "simulate-device", "--bind", "127.0.0.1", "--port", "0",
                    "--id", "kds-9", "--kind", "kds", "--enroll", f"http://127.0.0.1:{prov_port}",
                    "--advertise-port", str(channel_port), "--api", f"http://127.0.0.1:{api_port}"]
            proc = await trio.lowlevel.open_process(argv, cwd=ROOT, stdout=subprocess.PIPE)
            assert proc.stdout is not None
            buffer = b""
            try:
                async for chunk in proc.stdout:
                    buffer += chunk
                    *done, buffer = buffer.split(b"\n")
                    for raw in done:
                        line = raw.decode()
                        lines.append(line)
                        if m := re.search(r"listening on ws://127.0.0.1:(\d+)/", line):
                            channel.target_port = int(m[1])
                            found["listening"].set()
                        for key, word in (("code", "comparison code"), ("adopted", "adopted:"),
                                          ("took", "took seq"), ("sale", "-> HTTP 201")):
                            if word in line:
                                found[key].set()
            finally:
                proc.terminate()
                with trio.move_on_after(5, shield=True):
                    await proc.wait()

        nursery.start_soon(simulator)
        with trio.fail_after(DEADLINE_S):
            await found["code"].wait()
            code = re.search(r"comparison code (\d{3}) (\d{3})", "\n".join(lines))
            assert code is not None and found["listening"].is_set()
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{rt.ports['admin']}") as admin:
                shown = (await admin.get("/api/devices/kds-9")).json()["device"]["enrollment"]["code"]
                assert shown == code[1] + code[2]
                answer = await admin.post("/api/devices/kds-9/adopt", headers={"Authorization": f"Bearer {token}"},
                                          json={"code": shown})
                assert answer.status_code == 200
            await found["adopted"].wait()
            await found["sale"].wait()
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{rt.ports['api']}") as client:
                answer = await client.post("/v1/devices/kds-9/commands", headers={"Authorization": f"Bearer {token}"},
                                           json={"kind": "order.created", "body": {"customer": "Ada"}})
                assert answer.status_code == 201
            await found["took"].wait()
        device = await rt.db.read(partial(get_device, device_id="kds-9"))
        assert device is not None
        key = rt.keys.key_of(device)
        assert key is not None
        nursery.cancel_scope.cancel()

    captured = provisioning.captured + api.captured + channel.captured
    assert b"/v1/enroll" in provisioning.captured and b"POST /v1/sales" in api.captured
    assert b'"t":"auth"' in channel.captured and b"order.created" in channel.captured  # the hello and a command
    for secret in (token.encode(), key, key.hex().encode(), base64.b64encode(key), base64.urlsafe_b64encode(key)):
        assert secret not in captured
    assert b"Bearer" not in captured and b"authorization" not in captured.lower()
