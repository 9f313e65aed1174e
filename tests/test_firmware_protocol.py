"""Firmware updates' pure rules: the offer, the maintenance window, the trial's verdict, the records."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.config import ConfigError, parse_config
from appliance.protocol.firmware import (
    FirmwareError,
    FirmwareOffer,
    FirmwareStatus,
    MaintenanceWindow,
    Outcome,
    OutcomeKind,
    TrialRecord,
    Verdict,
    judge_trial,
    parse_offer,
)
from appliance.protocol.health import Check, Status

SHA = "ab" * 32
OFFER = {"version": "0.2.0", "url": "https://x.blob.core.windows.net/fw/a.raucb", "size": 1000, "sha256": SHA}


def test_an_offer_parses_and_null_is_no_offer() -> None:
    assert parse_offer(OFFER) == FirmwareOffer(version="0.2.0", url=OFFER["url"], size=1000, sha256=SHA)
    assert parse_offer(None) is None


@pytest.mark.parametrize(("change", "words"), [
    ({"url": "http://x/a.raucb"}, "firmware.url"),
    ({"size": 0}, "firmware.size"),
    ({"size": True}, "firmware.size"),
    ({"size": 3 * 1024**3}, "firmware.size"),
    ({"sha256": "AB" * 32}, "firmware.sha256"),
    ({"version": "../etc"}, "firmware.version"),
    ({"version": None}, "firmware.version"),
])
def test_a_bad_offer_says_which_field(change: dict[str, Any], words: str) -> None:
    with pytest.raises(FirmwareError, match=words.replace(".", r"\.")):
        parse_offer({**OFFER, **change})


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                           max_leaves=12)


@given(st.one_of(json_values, st.fixed_dictionaries({k: json_values for k in OFFER})))
def test_any_json_is_an_offer_none_or_our_error(value: object) -> None:
    try:
        offer = parse_offer(value)
    except FirmwareError:
        return
    assert offer is None or parse_offer(offer.as_dict()) == offer


def test_the_status_keeps_a_bad_offer_as_an_error_and_changes_nothing() -> None:
    status = FirmwareStatus()
    assert status.offered(OFFER) is True
    assert status.offered(OFFER) is False  # the same offer again is no change
    assert status.offered({**OFFER, "sha256": "nope"}) is False
    assert status.offer is not None and "firmware.sha256" in status.offer_error
    assert status.offered(None) is True and status.offer is None and status.offer_error == ""


@pytest.mark.parametrize(("window", "at", "wait_s"), [
    ("02:00-05:00", "01:00:00", 3600.0),
    ("02:00-05:00", "02:00:00", 0.0),
    ("02:00-05:00", "04:59:59", 0.0),
    ("02:00-05:00", "05:00:00", 21 * 3600.0),  # closed at its end: tomorrow's opening
    ("22:30-01:15", "23:59:00", 0.0),  # across midnight
    ("22:30-01:15", "00:30:00", 0.0),
    ("22:30-01:15", "12:00:00", 10.5 * 3600),
    ("00:00-00:00", "14:00:00", 0.0),  # any time
])
def test_the_maintenance_window(window: str, at: str, wait_s: float) -> None:
    hour, minute, second = (int(x) for x in at.split(":"))
    assert MaintenanceWindow.parse(window).wait_s(hour * 3600 + minute * 60 + second) == wait_s


@pytest.mark.parametrize("bad", ["2-5", "02:00", "24:00-01:00", "02:60-03:00", "02:00-05:00-06:00"])
def test_a_bad_window_is_refused_by_the_configuration_with_its_path(bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"update": {"window": bad}})
    assert any("update.window" in line for line in caught.value.errors), caught.value.errors


def test_the_default_window_is_outside_trading_hours() -> None:
    window = MaintenanceWindow.parse(parse_config({}).update.window)
    for hour in range(7, 23):  # a shop's day, and its evening
        assert window.wait_s(hour * 3600 + 30 * 60) > 0, hour


def check(name: str, status: Status) -> Check:
    return Check(name=name, status=status, message=f"{name} is {status}")


GOOD_CHECKS = [check("lan.listener.api", Status.OK), check("system.disk", Status.WARN),
               check("wan.api.tls", Status.FAIL)]  # the WAN does not decide a trial


def test_a_trial_is_good_once_ready_and_the_core_checks_pass() -> None:
    judged = judge_trial(ready=True, checks=GOOD_CHECKS, failed_services=[], elapsed_s=12, deadline_s=600)
    assert judged.verdict is Verdict.GOOD and "2 core health checks" in judged.reason


@pytest.mark.parametrize(("ready", "checks", "down", "words"), [
    (False, GOOD_CHECKS, [], "did not reach READY"),
    (True, GOOD_CHECKS, ["http.api"], "core service(s) down: http.api"),
    (True, [check("wan.api.tls", Status.OK)], [], "no core health check"),
    (True, [*GOOD_CHECKS, check("lan.listener.admin", Status.FAIL)], [], "lan.listener.admin"),
])
def test_a_trial_waits_then_is_bad_at_its_deadline_with_the_reason(ready: bool, checks: list[Check],
                                                                    down: list[str], words: str) -> None:
    before = judge_trial(ready=ready, checks=checks, failed_services=down, elapsed_s=599, deadline_s=600)
    assert before.verdict is Verdict.PENDING and words in before.reason
    after = judge_trial(ready=ready, checks=checks, failed_services=down, elapsed_s=600, deadline_s=600)
    assert after.verdict is Verdict.BAD and words in after.reason and "within 600 s" in after.reason


def test_records_round_trip_through_json_and_refuse_damage() -> None:
    trial = TrialRecord(version="0.2.0", from_version="0.1.0", from_slot="A", to_slot="B", started_at=1.5,
                        boot_id="x", snapshot=True, verdict="bad", reason="why")
    assert TrialRecord.from_dict(json.loads(json.dumps(trial.as_dict()))) == trial
    outcome = Outcome(version="0.2.0", kind=OutcomeKind.ROLLED_BACK, at=2.0, reason="r", slot="A", carried=3)
    assert Outcome.from_dict(json.loads(json.dumps(outcome.as_dict()))) == outcome
    with pytest.raises(FirmwareError, match="to_slot"):
        TrialRecord.from_dict({**trial.as_dict(), "to_slot": "../B"})
    with pytest.raises(FirmwareError, match="outcome"):
        Outcome.from_dict({**outcome.as_dict(), "outcome": "maybe"})
