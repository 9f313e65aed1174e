"""How the media cache looks from outside: health checks and the words for the homepage.

Checks (names are stable):

- ``media.cache``: how many of the manifest's files are cached, and why the others are
  not ("media: 312 of 2,400 files not cached: disk budget 2 GB reached").
- ``media.link``: the last failed download, located on its hop (DNS, TCP, proxy, TLS,
  HTTP), with the fix.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Final

from appliance.protocol.health import Check, Status
from appliance.protocol.media_cache import MediaStatus
from appliance.protocol.text import Number, Text, join
from appliance.services.runtime import Runtime

__all__ = ["human_bytes", "media_checks", "missing_words", "register"]

# A download failing for longer than this is a failure, not a blip.
LINK_FAIL_AFTER_S: Final = 600.0


def human_bytes(count: int) -> Text:
    """A size in words, three digits: "512 bytes", "1.5 MB" (a Text: "1,5 Mo" in French)."""
    if count < 1000:
        return Text("{n} bytes", n=Number(count))
    value, unit = count / 1000, "kB"
    for bigger in ("MB", "GB"):
        if value < 1000:
            break
        value, unit = value / 1000, bigger
    n = Number(value, max(0, 3 - len(str(int(value)))))
    if unit == "kB":
        return Text("{n} kB", n=n)
    return Text("{n} MB", n=n) if unit == "MB" else Text("{n} GB", n=n)


def missing_words(st: MediaStatus) -> str:
    """Why files are missing, in plain words ("" when none is)."""
    if not st.files_missing:
        return ""
    reasons = []
    if st.over_budget:
        reasons.append(Text("{count} over the disk budget ({size} reached)", count=Number(st.over_budget),
                            size=human_bytes(st.budget_bytes)))
    if st.failing:
        reasons.append(Text("{count} failing to download", count=Number(st.failing)))
    rest = st.files_missing - st.over_budget - st.failing
    if rest > 0:
        reasons.append(Text("{count} waiting or downloading", count=Number(rest)))
    if st.blocked:
        reasons = [Text("downloads cannot run: {reason}", reason=st.blocked)]
    return Text("media: {what}", what=Text("{missing} of {wanted} files not cached: {reasons}",
                                           missing=Number(st.files_missing), wanted=Number(st.files_wanted),
                                           reasons=join("; ", reasons)))


async def media_checks(runtime: Runtime) -> list[Check]:
    shelf = runtime.media
    if shelf is None:
        return [Check(name="media.cache", status=Status.WARN, message=Text("the media service has not started"),
                      fix=Text("see the services table; it restarts by itself"))]
    st = shelf.status
    data = st.as_dict()
    checks = []
    if st.blocked:
        checks.append(Check(name="media.cache", status=Status.FAIL, message=missing_words(st) or st.blocked,
                            fix=Text("correct the setting named above, then restart the appliance"), data=data))
    elif st.files_missing:
        status = Status.WARN
        fix = (Text("raise [media] max_bytes or free disk space") if st.over_budget
               else Text("nothing to do while downloads run; see media.link if they fail"))
        checks.append(Check(name="media.cache", status=status, message=missing_words(st), fix=fix, data=data))
    else:
        checks.append(Check(name="media.cache", status=Status.OK,
                            message=Text("{count} media files cached ({size})", count=Number(st.files_cached),
                                         size=human_bytes(st.bytes_cached)),
                            data=data))
    if st.last_error is not None:
        since = st.last_error_at or time.time()
        failing_long = time.time() - since > LINK_FAIL_AFTER_S
        checks.append(Check(name="media.link", status=Status.FAIL if failing_long else Status.WARN,
                            message=Text("last media download failed at the {hop} hop ({key}): {error}",
                                         hop=st.last_error.hop, key=st.last_error_key, error=st.last_error.message),
                            fix=st.last_error.fix, data=st.last_error.as_dict()))
    return checks


def register(runtime: Runtime) -> None:
    runtime.health.add("media", partial(media_checks, runtime))
