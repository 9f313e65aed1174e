"""The homepage's headline sentence, from health checks alone."""

from __future__ import annotations

from appliance.protocol.headline import headline, problems
from appliance.protocol.health import Check, Status


def check(name: str, status: Status = Status.OK, message: str = "", fix: str = "") -> Check:
    return Check(name=name, status=status, message=message or name, fix=fix)


ALL_WELL = [check("lan.listener.api"), check("cloud.replica"), check("orders.link", message="online orders: connected"),
            check("device.k1.channel"), check("device.p1.channel"), check("device.pos.channel")]


def test_all_well_in_one_sentence() -> None:
    top = headline(ALL_WELL)
    assert top.sentence == "The shop can sell, take online orders and reach its 3 devices."
    assert top.status is Status.OK and top.first_fix == ""


def test_what_cannot_be_done_and_the_first_fix_failures_first() -> None:
    checks = [*ALL_WELL[:3], check("system.clock", Status.WARN, fix="check NTP"),
              check("device.k1.channel", Status.FAIL, fix="check the kitchen screen"), *ALL_WELL[4:]]
    top = headline(checks)
    assert top.sentence == "The shop can sell and take online orders, but cannot reach 1 of its 3 devices."
    assert top.status is Status.FAIL and top.first_fix == "check the kitchen screen"
    assert [c.name for c in problems(checks)] == ["device.k1.channel", "system.clock"]


def test_online_orders_off_and_no_devices_are_said_not_blamed() -> None:
    top = headline([check("lan.listener.api"), check("orders.link", message="online orders: connecting"),
                    check("wan.sb", Status.FAIL, message="online orders (Service Bus): tls failed", fix="add the CA")])
    assert top.sentence == "The shop can sell, but cannot take online orders right now. No device is adopted yet."
    assert top.first_fix == "add the CA"
    top = headline([check("lan.listener.api"), check("orders.link", message="online orders are off (...)")])
    assert top.sentence == "The shop can sell. Online orders are off. No device is adopted yet."
    top = headline([check("lan.listener.api", Status.FAIL, fix="restart"), check("system.disk", Status.WARN)])
    assert top.sentence == ("The shop cannot sell. Online orders are off. No device is adopted yet.")
    assert top.first_fix == "restart"
    top = headline([check("lan.listener.api"), check("system.disk", Status.WARN, fix="free space")])
    assert top.sentence == ("The shop can sell. Online orders are off. No device is adopted yet. "
                            "Things that need a look: 1.")
