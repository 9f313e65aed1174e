"""The ``storage.checkpoints`` service: SQLite's WAL copied into the database file beside the
writer, not inside the commit that crosses the threshold (:meth:`Database.run_checkpoints
<appliance.storage.db.Database.run_checkpoints>`; docs/architecture.md, "Bytes written").

Not core: while it is not running (before it starts, after a crash until its restart) the
writer's own checkpoint is on, as in a command-line tool, so the WAL is bounded either way.
Its figures are on /metrics: ``storage_checkpoints`` (background copies) and
``storage_checkpoints_holding_writer`` (those that waited for the writer: steady writes).
"""

from __future__ import annotations

import trio

from appliance.services.runtime import Runtime

__all__ = ["run_checkpoints"]


async def run_checkpoints(runtime: Runtime, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    await runtime.db.run_checkpoints(task_status=task_status)
