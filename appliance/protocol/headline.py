"""The homepage's headline: one sentence a shop manager reads in five seconds.

It says whether the shop can sell, take online orders and reach its devices, and, if
anything is wrong, the first thing to do (the fix of the worst check, failures first).
Pure: it reads health checks, nothing else. Which checks speak for which area is the
table :data:`AREAS` (a check name prefix, or a WAN check about that area's host).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import attrs

from appliance.protocol.health import Check, Status, worst

__all__ = ["AREAS", "Headline", "headline", "problems"]

# area -> check name prefixes that speak for it. WAN checks name the host; their message
# starts with the target's purpose ("online orders (Service Bus): ...").
AREAS: Final[dict[str, tuple[str, ...]]] = {
    "sell": ("lan.listener.api", "cloud.replica"),
    "orders": ("orders.",),
    "devices": ("device.", "dispatch."),
}
_WAN_PURPOSE: Final = {"orders": "online orders"}

_RANK: Final = {Status.FAIL: 0, Status.WARN: 1, Status.OK: 2}


@attrs.frozen(kw_only=True)
class Headline:
    status: Status  # the worst of every check: the colour of the headline
    sentence: str
    first_fix: str  # "" when nothing is wrong


def problems(checks: Sequence[Check]) -> list[Check]:
    """What is wrong, failures first, each group in the checks' own order."""
    return sorted((c for c in checks if c.status is not Status.OK), key=lambda c: _RANK[c.status])


def _area(checks: Sequence[Check], area: str) -> list[Check]:
    prefixes = AREAS[area]
    purpose = _WAN_PURPOSE.get(area)
    return [c for c in checks if c.name.startswith(prefixes)
            or (purpose is not None and c.name.startswith("wan.") and c.message.startswith(purpose))]


def _join(clauses: Sequence[str]) -> str:
    return clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]


def headline(checks: Sequence[Check]) -> Headline:
    can: list[str] = []
    cannot: list[str] = []
    notes: list[str] = []

    (cannot if worst(_area(checks, "sell")) is Status.FAIL else can).append("sell")

    orders = _area(checks, "orders")
    if not orders or any("online orders are off" in c.message for c in orders):
        notes.append("Online orders are off.")
    elif worst(orders) is Status.OK:
        can.append("take online orders")
    else:
        cannot.append("take online orders right now")

    channels = [c for c in checks if c.name.startswith("device.") and c.name.endswith(".channel")]
    reached = sum(c.status is Status.OK for c in channels)
    if not channels:
        notes.append("No device is adopted yet.")
    elif reached == len(channels):
        can.append(f"reach its {len(channels)} device{'s' if len(channels) > 1 else ''}")
    else:
        cannot.append(f"reach {len(channels) - reached} of its {len(channels)} devices")

    sentence = ("The shop can " + _join(can) + (", but cannot " + _join(cannot) if cannot else "") if can
                else "The shop cannot " + _join(cannot)) + "."
    wrong = problems(checks)
    if wrong and not cannot:
        many = len(wrong) > 1
        notes.append(f"{len(wrong)} thing{'s' if many else ''} need{'' if many else 's'} a look.")
    return Headline(status=worst(checks), sentence=" ".join([sentence, *notes]),
                    first_fix=next((c.fix for c in wrong if c.fix), ""))
