"""A WAN request cut in its TLS handshake (a round's end, a stop, a slow or blackholed link)
gives its socket back at once, not to the garbage collector (docs/architecture.md).

The peer is a real TCP listener on loopback that accepts and never answers the handshake;
the client is the one every WAN path builds (:func:`appliance.services.wan.client_for`).
"""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import AsyncIterator
from functools import partial

import pytest
import trio
import trio.testing

from appliance.services.wan import Route, client_for, close_client, proxy_for


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


class SilentPeer:
    """A port whose listener accepts connections and says nothing (a TLS handshake hangs);
    ``held``: the connections it accepted (their descriptors are in this process too)."""

    def __init__(self) -> None:
        self.port = 0
        self.held: list[trio.SocketStream] = []


@pytest.fixture
async def silent_peer() -> AsyncIterator[SilentPeer]:
    peer = SilentPeer()
    held = peer.held

    async def hold(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, hold, 0, host="127.0.0.1"))
        peer.port = listeners[0].socket.getsockname()[1]
        yield peer
        nursery.cancel_scope.cancel()
    for stream in held:
        await stream.aclose()


@pytest.mark.parametrize("proxied", [False, True], ids=["direct", "through-a-proxy-url"])
async def test_a_handshake_cut_short_closes_its_socket(silent_peer: SilentPeer, proxied: bool) -> None:
    # Through a proxy: the silent peer plays the proxy, which never answers the CONNECT;
    # direct: it plays the server, which never answers the ClientHello.
    proxy = proxy_for("platform.example", proxy=f"http://127.0.0.1:{silent_peer.port}") if proxied else None
    url = "https://platform.example" if proxied else f"https://127.0.0.1:{silent_peer.port}"
    client = client_for(Route(url=url, proxy=proxy), connect_timeout_s=30.0, read_timeout_s=30.0)
    gc.disable()  # what the collector would close later must not hide a socket left open
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            before = _open_descriptors()
            for _ in range(5):
                with trio.move_on_after(0.2) as cut:
                    await client.get("/v1/ping")
                assert cut.cancelled_caught
            await trio.testing.wait_all_tasks_blocked()
            # Five connections made and cut: the peer still holds its five ends, the box none.
            assert len(silent_peer.held) == 5
            assert _open_descriptors() == before + 5
            await close_client(client)
            gc.collect()
        leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
        assert not leaked
    finally:
        gc.enable()
