"""A simulated shop device on the device channel: a printer, a kitchen screen or a POS.

It is the WebSocket server end of ``chub.device.v1`` (docs/device-channel.md), the way a
device's app is: it accepts the box's connection, says hello, and answers every command
with an ack, deduplicating by id. It appends each command it takes (the first time only)
to a log file as one JSON line, flushed (and fsync'd with ``fsync=True``) before the ack
goes out, so the log is exactly what the device acknowledged. At start it reads the log
back, so a restarted simulator still deduplicates what it took before.

With a device ``key`` (pre-shared, or derived at enrollment: ``appliance.devkit.enroll``)
it takes part in the hello (docs/device-api.md): a nonce in its hello, the box's proof
checked before anything else (a box that cannot prove the key gets no proof back and no
command is taken: ``refused_boxes`` counts them), then its own proof. ``impostor=True``
plays an attacker at a device's address: it claims the id but does not hold the key.

It can misbehave on purpose: ``nack_rate`` (a nack with ``retry: true``, "busy"),
``delay_s`` (time to process each command before answering), ``drop_rate`` (the TCP
connection cut with no close frame, like a Wi-Fi drop, before taking a command).

Order: a device that nacks a command with ``retry: true`` nacks every later command too
until the box goes back to a seq it nacked (the box resends from the nacked one, in
order), so what it takes is always in seq order. Real devices that care about order do
the same (see the protocol doc).

Used by technicians (``appliance simulate-device``), by the tests and by the demo
(:func:`run_device_simulator`, in-process, started with ``nursery.start``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import IO, Any, Final

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from appliance import __version__
from appliance.protocol import identity as idp
from appliance.protocol.channel_codec import (
    MAX_COMMAND_BYTES,
    SUBPROTOCOL,
    Ack,
    AskTicket,
    Auth,
    ChannelProtocolError,
    Command,
    Hello,
    Nack,
    encode_device_message,
    parse_box_auth,
    parse_command,
)

__all__ = ["DEVICE_KINDS", "Accepted", "DeviceSimulator", "read_log", "run_device_simulator"]

DEVICE_KINDS: Final = ("printer", "kds", "pos")
# Ids remembered for deduplication (and commands kept in memory); a real device keeps
# what covers the box's resend horizon. Far more than any test or shift needs.
MAX_REMEMBERED: Final = 100_000
# The box's WebSocket handshake must arrive within this long of the TCP connection.
HANDSHAKE_TIMEOUT_S: Final = 10.0


class _Dropped(Exception):
    """The simulator decided to cut the connection (drop_rate)."""


@attrs.frozen(kw_only=True)
class Accepted:
    """One command the device took, as written to its log."""

    id: str
    seq: int
    kind: str
    expires_at: float | None
    body: dict[str, Any]
    received_at: float

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "seq": self.seq, "kind": self.kind, "expires_at": self.expires_at,
                "body": self.body, "received_at": self.received_at}


def read_log(path: Path) -> list[Accepted]:
    """The commands in a simulator's log, in the order they were taken. A torn last line
    (the process died mid-write, so the command was never acked) is ignored."""
    out: list[Accepted] = []
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return out
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            out.append(Accepted(id=d["id"], seq=d["seq"], kind=d["kind"], expires_at=d["expires_at"], body=d["body"],
                                received_at=d["received_at"]))
        except (ValueError, KeyError, TypeError):
            continue
    return out


class DeviceSimulator:
    """One simulated device. Serve it with :meth:`serve_stream` per connection (a TCP
    stream, or a memory stream in tests), or with :func:`run_device_simulator`."""

    def __init__(
        self,
        *,
        device_id: str,
        kind: str = "printer",
        firmware: str = f"sim-{__version__}",
        log_path: Path | None = None,
        fsync: bool = False,
        nack_rate: float = 0.0,
        delay_s: float = 0.0,
        drop_rate: float = 0.0,
        seed: int | None = None,
        echo: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        key: bytes | None = None,
        impostor: bool = False,
    ) -> None:
        for name, rate in (("nack_rate", nack_rate), ("drop_rate", drop_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {rate}")
        if delay_s < 0:
            raise ValueError(f"delay must be 0 or more, got {delay_s}")
        self.hello = Hello(device_id=device_id, kind=kind, firmware=firmware)
        # An impostor has a key, just not the device's: its proofs are wrong.
        self.key = secrets.token_bytes(32) if impostor and key is None else key
        self.impostor = impostor
        self.refused_boxes = 0
        self.nack_rate, self.delay_s, self.drop_rate = nack_rate, delay_s, drop_rate
        self.fsync = fsync
        self.echo = echo
        self.clock = clock
        self._rng = random.Random(seed)
        self.accepted: deque[Accepted] = deque(maxlen=MAX_REMEMBERED)
        self._seen: set[str] = set()
        self._seen_order: deque[str] = deque()
        self.connections = 0
        self.duplicates = 0
        self.nacks = 0
        self.drops = 0
        self.protocol_errors = 0
        self.connected = trio.Event()  # set at each new connection (tests wait on it)
        # Presses of the device's own status button, sent once the box is greeted.
        self._presses, self._pressed = trio.open_memory_channel[None](8)
        self._log: IO[str] | None = None
        self.log_path = log_path
        if log_path is not None:
            for item in read_log(log_path):
                self._remember(item)
            self._log = _open_log(log_path)

    @property
    def device_id(self) -> str:
        return self.hello.device_id

    def press_button(self) -> None:
        """Press the device's own status button: it asks the box for its status ticket, at
        once if connected, else as soon as it is (a few presses are remembered)."""
        with contextlib.suppress(trio.WouldBlock):
            self._presses.send_nowait(None)

    async def _buttons(self, ws: WebSocketConnection) -> None:
        async for _press in self._pressed:
            await ws.send_message(encode_device_message(AskTicket()))

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _remember(self, item: Accepted) -> None:
        self.accepted.append(item)
        self._seen.add(item.id)
        self._seen_order.append(item.id)
        if len(self._seen_order) > MAX_REMEMBERED:
            self._seen.discard(self._seen_order.popleft())

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Be the device on one connection, until the box goes away (or a drop). Closes
        ``stream`` on the way out."""
        try:
            async with trio.open_nursery() as nursery:
                # The box went away, the handshake never came, or a drop on purpose: all ends.
                with contextlib.suppress(_Dropped, ConnectionClosed, trio.TooSlowError, trio.BrokenResourceError,
                                         trio.ClosedResourceError):
                    await self._serve(nursery, stream)
                nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(1, shield=True):
                await stream.aclose()

    async def _serve(self, nursery: trio.Nursery, stream: trio.abc.Stream) -> None:
        with trio.fail_after(HANDSHAKE_TIMEOUT_S):
            request = await wrap_server_stream(nursery, stream, max_message_size=MAX_COMMAND_BYTES)
        if SUBPROTOCOL not in request.proposed_subprotocols:
            await request.reject(400, body=f"this device speaks the subprotocol {SUBPROTOCOL} only\n".encode())
            return
        ws = await request.accept(subprotocol=SUBPROTOCOL)
        self.connections += 1
        self.connected.set()
        self.connected = trio.Event()
        await self._converse(ws, nursery)

    async def _hello(self, ws: WebSocketConnection) -> bool:
        """Say hello; with a key, check the box's proof and give ours. False: the box did
        not prove the key (the connection is closed, nothing taken)."""
        if self.key is None:
            await ws.send_message(encode_device_message(self.hello))
            return True
        device_nonce = secrets.token_bytes(idp.NONCE_BYTES)
        await ws.send_message(encode_device_message(attrs.evolve(self.hello, nonce=device_nonce.hex())))
        try:
            auth = parse_box_auth(await ws.get_message())
            assert auth.nonce is not None  # parse_box_auth checks it
            box_nonce = bytes.fromhex(auth.nonce)
            if self.impostor:  # an attacker wants the commands: it never refuses a box
                await ws.send_message(encode_device_message(Auth(proof=secrets.token_hex(32))))
                return True
            idp.check_proof(idp.box_proof(self.key, self.device_id, device_nonce, box_nonce), auth.proof, "the box")
        except (ChannelProtocolError, idp.HelloFailed) as exc:
            self.refused_boxes += 1
            if self.echo is not None:
                self.echo(f"refused the box: {exc}")
            await ws.aclose(1008, "the box did not prove the device key")
            return False
        proof = idp.device_proof(self.key, self.device_id, device_nonce, box_nonce)
        await ws.send_message(encode_device_message(Auth(proof=proof)))
        return True

    async def _converse(self, ws: WebSocketConnection, nursery: trio.Nursery) -> None:
        if not await self._hello(ws):
            return
        nursery.start_soon(self._buttons, ws)
        barrier: int | None = None  # while set: refusing every seq above it (after a retry nack)
        while True:
            data = await ws.get_message()
            try:
                command = parse_command(data)
            except ChannelProtocolError as exc:
                self.protocol_errors += 1
                await ws.aclose(1002, str(exc)[:120])
                return
            if self.drop_rate and self._rng.random() < self.drop_rate:
                self.drops += 1
                raise _Dropped()
            if self.delay_s:
                await trio.sleep(self.delay_s)
            if command.id in self._seen:
                self.duplicates += 1
                await ws.send_message(encode_device_message(Ack(id=command.id)))
                continue
            if barrier is not None:
                if command.seq > barrier:
                    barrier = command.seq
                    self.nacks += 1
                    await ws.send_message(encode_device_message(
                        Nack(id=command.id, reason="waiting for an earlier command", retry=True)))
                    continue
                barrier = None  # the box went back: take commands again, in order
            if self.nack_rate and self._rng.random() < self.nack_rate:
                barrier = command.seq
                self.nacks += 1
                await ws.send_message(encode_device_message(Nack(id=command.id, reason="busy (simulated)",
                                                                 retry=True)))
                continue
            await self._take(command)
            await ws.send_message(encode_device_message(Ack(id=command.id)))

    async def _take(self, command: Command) -> None:
        item = Accepted(id=command.id, seq=command.seq, kind=command.kind, expires_at=command.expires_at,
                        body=json.loads(command.body), received_at=self.clock())
        if self._log is not None:
            self._log.write(json.dumps(item.as_dict(), ensure_ascii=False, separators=(",", ":")) + "\n")
            self._log.flush()
            if self.fsync:
                await trio.to_thread.run_sync(os.fsync, self._log.fileno())
        self._remember(item)
        if self.echo is not None:
            self.echo(f"took seq {command.seq} {command.kind} {command.id} {command.body[:200]}")


def _open_log(path: Path) -> IO[str]:
    """Open the log for appending, cutting a torn last line first (never acked)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with path.open("r+b") as f:
                f.truncate(end)
    return path.open("a", encoding="utf-8")


async def run_device_simulator(
    simulator: DeviceSimulator,
    *,
    port: int = 8081,
    bind: str = "0.0.0.0",
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``simulator`` on TCP until cancelled; ``started()`` gives the bound port."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, simulator.serve_stream, port, host=bind))
        bound: int = listeners[0].socket.getsockname()[1]
        task_status.started(bound)
