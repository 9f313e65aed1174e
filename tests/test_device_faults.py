"""Fault containment on the device channel, against real sockets and the real supervisor.

A fuzzer of device behaviours, each a "device" on its own loopback port that the box
connects to: malformed handshakes (a ``101`` without ``Upgrade``, a wrong accept key, HTTP
garbage, endless headers, TLS bytes on the plain port, truncated answers, wrong status and
protocol...) and malformed frames after a good handshake (reserved opcodes, masked server
frames, oversized lengths, a close mid-frame, bad UTF-8, wrong hellos, ack floods for ids
never sent...). Alongside them, good simulated devices take commands all the while.

The box must contain every one of them to its link: the dispatcher never crashes (the
supervisor's crash count stays 0), every bad link records a failure in plain words, and
every good device gets every command.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import random
import re
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import trio

from appliance.devkit.device import DeviceSimulator, read_log, run_device_simulator
from appliance.services.dispatcher import enqueue
from tests.conftest import ConfigFactory, device_key, running_box

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B65"

Behaviour = Callable[[trio.SocketStream, bytes], Awaitable[None]]


def accept_key(request: bytes) -> bytes:
    match = re.search(rb"(?im)^sec-websocket-key:\s*(\S+)", request)
    assert match is not None
    return base64.b64encode(hashlib.sha1(match.group(1) + _GUID).digest())


def handshake(request: bytes, *, protocol: bytes | None = b"chub.device.v1", key: bytes | None = None) -> bytes:
    lines = [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket", b"Connection: Upgrade",
             b"Sec-WebSocket-Accept: " + (key if key is not None else accept_key(request))]
    if protocol is not None:
        lines.append(b"Sec-WebSocket-Protocol: " + protocol)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def frame(payload: bytes, *, opcode: int = 1, fin: bool = True, mask: bool = False, rsv: int = 0) -> bytes:
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    n = len(payload)
    mask_bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([mask_bit | 127]) + n.to_bytes(8, "big")
    if mask:
        key = b"\x01\x02\x03\x04"
        head += key
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + payload


def hello(device_id: str) -> bytes:
    return frame(json.dumps({"t": "hello", "device_id": device_id, "kind": "printer", "firmware": "x"}).encode())


def answer(data: bytes) -> Behaviour:
    async def behave(stream: trio.SocketStream, request: bytes) -> None:
        await stream.send_all(data)
        await trio.sleep(0.5)

    return behave


def after_handshake(*frames: bytes, protocol: bytes | None = b"chub.device.v1", key: bytes | None = None,
                    linger_s: float = 0.5) -> Behaviour:
    async def behave(stream: trio.SocketStream, request: bytes) -> None:
        await stream.send_all(handshake(request, protocol=protocol, key=key) + b"".join(frames))
        await trio.sleep(linger_s)

    return behave


async def silent(stream: trio.SocketStream, request: bytes) -> None:
    await trio.sleep_forever()


async def drip(stream: trio.SocketStream, request: bytes) -> None:
    for byte in b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n":
        await stream.send_all(bytes([byte]))
        await trio.sleep(0.05)


async def close_at_once(stream: trio.SocketStream, request: bytes) -> None:
    await stream.aclose()


async def holds_commands(device_id: str, stream: trio.SocketStream, request: bytes) -> None:
    # Says hello, then answers about ids it was never sent, for ever: no progress.
    await stream.send_all(handshake(request) + hello(device_id))
    while True:
        await stream.send_all(frame(json.dumps({"t": "ack", "id": f"nothing-{random.random()}"}).encode()))
        await trio.sleep(0.05)


def behaviours() -> dict[str, Callable[[str], Behaviour]]:
    """Name -> a behaviour for the device of that id."""
    rng = random.Random(11)
    junk = bytes(rng.randrange(256) for _ in range(4000))
    tls = bytes.fromhex("160303007a020000760303") + junk[:120]

    def fixed(behaviour: Behaviour) -> Callable[[str], Behaviour]:
        return lambda _device_id: behaviour

    return {
        # The handshake.
        "101-no-upgrade": fixed(answer(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")),
        "101-wrong-accept": lambda d: after_handshake(key=b"d3Jvbmcgd3Jvbmcgd3Jvbmc="),
        "101-http-1.0": fixed(answer(b"HTTP/1.0 101 Switching Protocols\r\n\r\n")),
        "http-garbage": fixed(answer(b"HELLO THERE\r\n\x00\x01\x02\r\n\r\n")),
        "endless-headers": fixed(answer(b"HTTP/1.1 101 Switching Protocols\r\n" + b"X-Pad: aaaaaaaa\r\n" * 8000)),
        "truncated-status": fixed(answer(b"HTTP/1.1 10")),
        "status-200": fixed(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")),
        "status-404-chunked": fixed(answer(b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")),
        "status-999": fixed(answer(b"HTTP/1.1 999 What\r\n\r\n")),
        "tls-on-plain-port": fixed(answer(tls)),
        "random-bytes": fixed(answer(junk)),
        "empty-lines": fixed(answer(b"\r\n\r\n")),
        "close-at-once": fixed(close_at_once),
        "silent": fixed(silent),
        "drip": fixed(drip),
        "wrong-protocol": lambda d: after_handshake(protocol=b"mqtt"),
        "no-protocol": lambda d: after_handshake(protocol=None),
        "trailing-junk-after-101": lambda d: after_handshake(b"GET / HTTP/1.1\r\n\r\n"),
        # Frames after a good handshake.
        "reserved-opcode": lambda d: after_handshake(hello(d), frame(b"x", opcode=3)),
        "masked-server-frame": lambda d: after_handshake(frame(b"{}", mask=True)),
        "rsv-bits": lambda d: after_handshake(frame(b"{}", rsv=7)),
        "huge-length": lambda d: after_handshake(bytes([0x81, 127]) + (2**63 - 1).to_bytes(8, "big") + b"xx"),
        "close-mid-frame": lambda d: after_handshake(bytes([0x81, 100]) + b"0123456789", linger_s=0),
        "fragmented-ping": lambda d: after_handshake(frame(b"p", opcode=9, fin=False)),
        "bad-utf8": lambda d: after_handshake(frame(b"\xff\xfe\xfd")),
        "binary-message": lambda d: after_handshake(frame(b"\x00\x01", opcode=2)),
        "not-json": lambda d: after_handshake(frame(b"{not json")),
        "wrong-hello": lambda d: after_handshake(hello("somebody-else")),
        "ack-before-hello": lambda d: after_handshake(frame(b'{"t":"ack","id":"x"}')),
        "second-hello": lambda d: after_handshake(hello(d), hello(d)),
        "oversized-message": lambda d: after_handshake(hello(d), frame(b'"' + b"x" * 200_000 + b'"')),
        "close-code-garbage": lambda d: after_handshake(frame(b"\x03\xe8\xff\xff", opcode=8)),
        "holds-commands": lambda d: partial(holds_commands, d),
    }


async def serve_behaviour(behaviour: Behaviour, *, task_status: trio.TaskStatus[int]) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(1):
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    request += chunk
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await behaviour(stream, request)

    async with trio.open_nursery() as nursery:
        found = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        task_status.started(found[0].socket.getsockname()[1])


GOOD = 3
PER_GOOD = 40


async def test_every_device_fault_stays_on_its_link_and_good_devices_get_every_command(
        make_config: ConfigFactory, tmp_path: Path) -> None:
    kinds = behaviours()
    async with trio.open_nursery() as devices:
        declared = []
        for name, make in kinds.items():
            port = await devices.start(serve_behaviour, make(f"bad-{name}"))
            declared.append({"id": f"bad-{name}", "kind": "printer", "address": "127.0.0.1", "port": port,
                             "key": device_key(f"bad-{name}").hex()})
        logs = {f"good-{i}": tmp_path / f"good-{i}.jsonl" for i in range(GOOD)}
        sims = []
        for device_id, log_path in logs.items():
            sim = DeviceSimulator(device_id=device_id, log_path=log_path, key=device_key(device_id))
            sims.append(sim)
            port = await devices.start(partial(run_device_simulator, sim, port=0, bind="127.0.0.1"))
            declared.append({"id": device_id, "kind": "printer", "address": "127.0.0.1", "port": port,
                             "key": device_key(device_id).hex()})
        config = make_config(devices=declared, dispatch={
            "connect_timeout_s": 1.0, "hello_timeout_s": 1.0, "ack_timeout_s": 1.0,
            "backoff_initial_s": 0.05, "backoff_max_s": 0.3})
        async with running_box(config) as runtime:
            board = runtime.device_links
            for n in range(PER_GOOD):
                for d in declared:
                    await enqueue(runtime, d["id"], "print", {"n": n})
            with trio.fail_after(60):
                while (any(len(read_log(p)) < PER_GOOD for p in logs.values())  # noqa: ASYNC110
                       or any(board.links[f"bad-{n}"].failures < 2 for n in kinds)):
                    await trio.sleep(0.1)
            dispatcher = runtime.board.get("dispatcher")
            assert dispatcher is not None and dispatcher.crashes == 0, dispatcher
            for name in kinds:
                status = board.links[f"bad-{name}"]
                assert status.acked == 0, name
                assert status.last_error, name
                assert "Error" not in status.last_error or "broke" in status.last_error, (name, status.last_error)
            for device_id, log_path in logs.items():
                assert [a.as_dict()["body"]["n"] for a in read_log(log_path)] == list(range(PER_GOOD)), device_id
        devices.cancel_scope.cancel()
    for sim in sims:
        sim.close()
