"""A small MQTT 3.1.1 client on trio (QoS 0 and 1 only), and Debian's mosquitto started
on a loopback port: the broker a user might pick instead of the device channel, for
``scripts/bench dispatch`` (not a benchmark itself).

Only what the benchmark needs: CONNECT (clean session), SUBSCRIBE, PUBLISH with QoS 1 and
its PUBACK, both ways (OASIS MQTT 3.1.1, sections 3.1-3.9).
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import attrs
import trio

__all__ = ["MOSQUITTO", "Mqtt", "Publish", "mosquitto"]

MOSQUITTO = "/usr/sbin/mosquitto"

_CONNECT, _CONNACK, _PUBLISH, _PUBACK, _SUBSCRIBE, _SUBACK = 1, 2, 3, 4, 8, 9


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">H", len(raw)) + raw


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    n, length = len(body), bytearray()
    while True:
        byte, n = n % 128, n // 128
        length.append(byte | (0x80 if n else 0))
        if not n:
            break
    return bytes([kind << 4 | flags]) + bytes(length) + body


@attrs.frozen
class Publish:
    topic: str
    payload: bytes


class Mqtt:
    """One connection. ``publish`` (QoS 1) returns once the broker has the message (its
    PUBACK); received PUBLISH packets are acknowledged and queued for :meth:`receive`."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._next_id = 0
        self._acks: dict[int, trio.Event] = {}
        self._send_lock = trio.Lock()
        self._incoming_send, self._incoming = trio.open_memory_channel[Publish](1 << 16)

    @classmethod
    async def connect(cls, port: int, client_id: str, nursery: trio.Nursery) -> Mqtt:
        client = cls(await trio.open_tcp_stream("127.0.0.1", port))
        body = _string("MQTT") + bytes([4, 0x02]) + struct.pack(">H", 600) + _string(client_id)
        await client._stream.send_all(_packet(_CONNECT, 0, body))
        kind, _flags, answer = await client._read()
        if kind != _CONNACK or answer[1] != 0:
            raise RuntimeError(f"mqtt: connection refused ({answer!r})")
        nursery.start_soon(client._read_loop)
        return client

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    async def subscribe(self, topic: str) -> None:
        pid = self._packet_id()
        done = self._acks[pid] = trio.Event()
        await self._send(_packet(_SUBSCRIBE, 0x02, struct.pack(">H", pid) + _string(topic) + b"\x01"))
        await done.wait()

    async def publish(self, topic: str, payload: bytes, *, wait: bool = True) -> None:
        """Send with QoS 1; with ``wait``, return once the broker acknowledged it."""
        pid = self._packet_id()
        done = self._acks[pid] = trio.Event()
        await self._send(_packet(_PUBLISH, 0x02, _string(topic) + struct.pack(">H", pid) + payload))
        if wait:
            await done.wait()

    async def receive(self) -> Publish:
        return await self._incoming.receive()

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            await self._stream.send_all(data)

    async def _read(self) -> tuple[int, int, bytes]:
        while True:
            if len(self._buffer) >= 2:
                length, shift, at = 0, 0, 1
                while at < len(self._buffer):
                    byte = self._buffer[at]
                    length |= (byte & 0x7F) << shift
                    shift, at = shift + 7, at + 1
                    if not byte & 0x80:
                        if len(self._buffer) >= at + length:
                            header = self._buffer[0]
                            body = bytes(self._buffer[at:at + length])
                            del self._buffer[:at + length]
                            return header >> 4, header & 0x0F, body
                        break
            data = await self._stream.receive_some(65536)
            if not data:
                raise EOFError("mqtt: the broker closed the connection")
            self._buffer += data

    async def _read_loop(self) -> None:
        with suppress(EOFError, trio.ClosedResourceError, trio.BrokenResourceError):
            while True:
                kind, flags, body = await self._read()
                if kind in (_PUBACK, _SUBACK):
                    event = self._acks.pop(struct.unpack_from(">H", body)[0], None)
                    if event is not None:
                        event.set()
                elif kind == _PUBLISH:
                    size = struct.unpack_from(">H", body)[0]
                    topic, at = body[2:2 + size].decode(), 2 + size
                    if (flags >> 1) & 0x03:  # QoS 1: acknowledge it
                        pid = struct.unpack_from(">H", body, at)[0]
                        at += 2
                        await self._send(_packet(_PUBACK, 0, struct.pack(">H", pid)))
                    self._incoming_send.send_nowait(Publish(topic, body[at:]))


@contextmanager
def mosquitto(port: int, *, save_every_change: bool = False) -> Iterator[Path]:
    """Debian's mosquitto 2.0 on 127.0.0.1:``port`` with its default persistence
    (``persistence true``: the in-memory state saved every ``autosave_interval``, 1800 s,
    and at exit), or saved after every change (``autosave_on_changes``, interval 1).
    Yields its state directory; stops it on exit."""
    if not Path(MOSQUITTO).exists():
        raise SystemExit("bench: the dispatch benchmark needs mosquitto: apt-get install mosquitto (as root)")
    state = Path(tempfile.mkdtemp(prefix="bench-mosquitto-"))
    conf = state / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence true",
             f"persistence_location {state}/", "log_dest none", "set_tcp_nodelay true"]
    if save_every_change:
        lines += ["autosave_on_changes true", "autosave_interval 1"]
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("bench: mosquitto did not start") from None
                time.sleep(0.05)
        yield state
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(state, ignore_errors=True)
