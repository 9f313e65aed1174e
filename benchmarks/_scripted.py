"""A connection with no socket under it, for running a listener's own code in process: its
client sends given bytes one read at a time, then its end; what the server writes is kept."""

from __future__ import annotations

import socket

import trio

__all__ = ["ScriptedConnection"]


class ScriptedConnection:
    """A stream whose client sends ``reads``, one per ``receive_some`` (as a keep-alive
    client waiting for each answer does), then its end (b"" from then on). Each write is
    counted (``answers``: a whole answer leaves in one write) and, if ``keep``, added to
    ``written``; with ``expect``, a write not starting with it raises RuntimeError."""

    class _Socket:
        family = socket.AF_INET

        def getpeername(self) -> tuple[str, int]:
            return ("127.0.0.1", 50000)

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", 8000)

    def __init__(self, reads: list[bytes], *, expect: bytes = b"", keep: bool = False) -> None:
        self.socket = self._Socket()
        self._reads = iter(reads)
        self._expect, self._keep = expect, keep
        self.answers = 0
        self.written = b""
        self.eof = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()  # a socket's read is a checkpoint too
        return next(self._reads, b"")

    async def send_all(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        if not data.startswith(self._expect):
            raise RuntimeError(f"answer {data[:300]!r}")
        self.answers += 1
        if self._keep:
            self.written += data

    async def send_eof(self) -> None:
        self.eof = True

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def aclose(self) -> None:
        pass
