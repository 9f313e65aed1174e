"""Who leaves a socket to the garbage collector? An opt-in pytest plugin to find out.

    .venv/bin/python -m pytest -p tests.socket_origins tests/...

Each socket remembers where it was made (a short stack, kept until it is closed or
detached); one that is finalized still open is written, with that stack and the test that
was running, to ``test-artefacts/socket-origins.log`` (or ``$SOCKET_ORIGINS_LOG``), and
closed there, so the ``ResourceWarning`` it would have raised at some later, unrelated test
(docs/architecture.md, "Known gaps") is replaced by its origin. Costs a stack capture per
socket: not for the default run.
"""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path
from typing import Any

_LOG = Path(os.environ.get("SOCKET_ORIGINS_LOG", "test-artefacts/socket-origins.log"))
_made: dict[int, list[str]] = {}
_init, _close, _detach = socket.socket.__init__, socket.socket.close, socket.socket.detach


def _remembering_init(self: socket.socket, *args: Any, **kwargs: Any) -> None:
    _init(self, *args, **kwargs)
    _made[id(self)] = traceback.format_stack(limit=16)[:-1]


def _forgetting_close(self: socket.socket) -> None:
    _made.pop(id(self), None)
    _close(self)


def _forgetting_detach(self: socket.socket) -> int:
    _made.pop(id(self), None)
    return _detach(self)


def _finalize(self: socket.socket) -> None:
    stack = _made.pop(id(self), None)
    if stack is None or self.fileno() == -1:
        return
    _LOG.parent.mkdir(parents=True, exist_ok=True)
    with _LOG.open("a") as log:
        log.write(f"=== {os.environ.get('PYTEST_CURRENT_TEST', '(between tests)')}: {self!r}\n{''.join(stack)}\n")
    _close(self)


socket.socket.__init__ = _remembering_init  # type: ignore[method-assign]
socket.socket.close = _forgetting_close  # type: ignore[method-assign]
socket.socket.detach = _forgetting_detach  # type: ignore[method-assign]
socket.socket.__del__ = _finalize  # type: ignore[attr-defined]
