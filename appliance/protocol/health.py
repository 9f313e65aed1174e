"""The health model: named checks with a status, words for a person, and data.

Every check has a stable ``name`` (dotted, e.g. ``wan.api.tls``), a ``status``, a
``message`` saying what is true, a ``fix`` saying what a person should do (empty when
ok), and ``data`` for machines. The same checks feed the homepage, /readyz, the
``appliance health`` command, the support channel and the heartbeat. Messages and fixes
are :class:`~appliance.protocol.text.Text` where they are words: each reader shows them in
its reader's language (:meth:`Check.in_language`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from appliance.protocol.text import say

__all__ = ["Check", "Status", "exit_code", "summary", "worst"]


class Status(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


_RANK = {Status.OK: 0, Status.WARN: 1, Status.FAIL: 2}


@attrs.frozen(kw_only=True)
class Check:
    name: str
    status: Status
    message: str
    fix: str = ""
    data: Mapping[str, Any] = attrs.field(factory=dict)

    def in_language(self, gettext: Callable[[str], str]) -> Check:
        """The same check with its message and fix in the language of ``gettext``."""
        return attrs.evolve(self, message=say(self.message, gettext), fix=say(self.fix, gettext))

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": str(self.status), "message": self.message,
                "fix": self.fix, "data": dict(self.data)}


def worst(checks: Iterable[Check]) -> Status:
    return max((c.status for c in checks), key=_RANK.__getitem__, default=Status.OK)


def exit_code(checks: Iterable[Check]) -> int:
    """0 all ok, 1 some warning, 2 some failure (the ``appliance health`` contract)."""
    return _RANK[worst(checks)]


def summary(checks: Iterable[Check]) -> dict[str, int]:
    counts = {s.value: 0 for s in Status}
    for c in checks:
        counts[c.status.value] += 1
    return counts
