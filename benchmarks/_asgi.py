"""A bare hypercorn answering every request with one fixed answer: the HTTP floor the
benchmarks measure the box against (no routing, no storage, no JSON: HTTP and nothing else).

Use: ``serve_fixed(port, status=200, body=b"...", headers=[...])`` in the baseline's own
process (it blocks until the process is stopped).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import trio

__all__ = ["fixed_app", "serve_fixed"]

_App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def fixed_app(*, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = (),
              read_body: bool = False) -> _App:
    """An ASGI app answering ``status``, ``body`` (JSON) and ``headers`` to every request;
    with ``read_body`` it first reads the request's body to its end (a POST's floor)."""
    # The messages are made per request, as any app makes them (the floor's cost per request).
    extra = list(headers)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if read_body:
            while (await receive()).get("more_body"):
                pass
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *extra]})
        await send({"type": "http.response.body", "body": body})

    return app


def serve_fixed(port: int, *, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = (),
                read_body: bool = False, keep_alive_timeout: float | None = None) -> None:
    """Serve :func:`fixed_app` on 127.0.0.1:``port`` with hypercorn (no access log) until
    the process is stopped."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    cfg = Config()
    cfg.bind = [f"127.0.0.1:{port}"]
    cfg.accesslog = None
    if keep_alive_timeout is not None:
        cfg.keep_alive_timeout = keep_alive_timeout
    app = fixed_app(status=status, body=body, headers=headers, read_body=read_body)
    trio.run(partial(serve, app, cfg))  # type: ignore[arg-type]
