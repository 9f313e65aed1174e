"""The homepage's headline: one sentence a shop manager reads in five seconds.

It says whether the shop can sell, take online orders and reach its devices, and, if
anything is wrong, the first thing to do (the fix of the worst check, failures first).
Pure: it reads health checks, nothing else. Which checks speak for which area is the
table :data:`AREAS` (a check name prefix, or a WAN check about that area's host).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

import attrs

from appliance.protocol.health import Check, Status, worst
from appliance.protocol.text import say

__all__ = ["AREAS", "Headline", "headline", "problems"]

# area -> check name prefixes that speak for it. WAN checks name the host; their message
# starts with the target's purpose ("online orders (Service Bus): ...").
AREAS: Final[dict[str, tuple[str, ...]]] = {
    "sell": ("appliance.process", "lan.listener.api", "cloud.replica"),
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


Gettext = Callable[[str], str]


def _english(message: str) -> str:
    return message


def _join(clauses: Sequence[str], _: Gettext) -> str:
    if len(clauses) == 1:
        return clauses[0]
    return _("{first} and {last}").format(first=", ".join(clauses[:-1]), last=clauses[-1])


def _join_not(clauses: Sequence[str], _: Gettext) -> str:
    """What the shop cannot do: "X or Y" ("X ni Y" in French, not "X et Y")."""
    if len(clauses) == 1:
        return clauses[0]
    return _("{first} or {last}").format(first=", ".join(clauses[:-1]), last=clauses[-1])


def headline(checks: Sequence[Check], _: Gettext = _english) -> Headline:
    """The sentence in the language of ``_`` (a gettext: the messages are its keys)."""
    can: list[str] = []
    cannot: list[str] = []
    notes: list[str] = []

    (cannot if worst(_area(checks, "sell")) is Status.FAIL else can).append(_("sell"))

    orders = _area(checks, "orders")
    if not orders or any("online orders are off" in c.message for c in orders):
        notes.append(_("Online orders are off."))
    elif worst(orders) is Status.OK:
        can.append(_("take online orders"))
    else:
        cannot.append(_("take online orders right now"))

    channels = [c for c in checks if c.name.startswith("device.") and c.name.endswith(".channel")]
    reached = sum(c.status is Status.OK for c in channels)
    if not channels:
        notes.append(_("No device is adopted yet."))
    elif len(channels) == 1 and reached == 1:
        can.append(_("reach its device"))
    elif reached == len(channels):
        can.append(_("reach its {count} devices").format(count=len(channels)))
    else:
        cannot.append(_("reach {missing} of its {count} devices").format(missing=len(channels) - reached,
                                                                         count=len(channels)))

    if can and cannot:
        sentence = _("The shop can {can}, but cannot {cannot}.").format(can=_join(can, _),
                                                                        cannot=_join_not(cannot, _))
    elif can:
        sentence = _("The shop can {can}.").format(can=_join(can, _))
    else:
        sentence = _("The shop cannot {cannot}.").format(cannot=_join_not(cannot, _))
    wrong = problems(checks)
    if wrong and not cannot:
        notes.append(_("Things that need a look: {count}.").format(count=len(wrong)))
    return Headline(status=worst(checks), sentence=" ".join([sentence, *notes]),
                    first_fix=next((say(c.fix, _) for c in wrong if c.fix), ""))
