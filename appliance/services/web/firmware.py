"""Firmware updates on the homepage and in /api/status: the version and slot running, an
update under way (download, window, trial), and how the last one ended (docs/updates.md)."""

from __future__ import annotations

import html
import time
from typing import Any

from appliance.protocol.firmware import OutcomeKind, Phase
from appliance.services.i18n import Gettext
from appliance.services.runtime import Runtime
from appliance.services.web.parts import WebParts

__all__ = ["admin_parts"]

OUTCOME_WORDS = {
    OutcomeKind.COMMITTED: "installed and kept: the new firmware proved healthy",
    OutcomeKind.ROLLED_BACK: "rolled back: the new firmware failed its trial and the box went back by itself",
    OutcomeKind.REFUSED: "refused before anything was written",
    OutcomeKind.FAILED: "failed; the running firmware is unchanged",
}
PHASE_WORDS = {
    Phase.DOWNLOADING: "downloading",
    Phase.WAITING: "downloaded and verified; waiting for the maintenance window",
    Phase.INSTALLING: "installing into the other slot",
    Phase.REBOOTING: "restarting into the new firmware",
    Phase.TRIAL: "on trial: kept once the box is healthy, else it goes back by itself",
    Phase.FAILED: "failed; tried again later",
}


async def firmware_status(runtime: Runtime) -> dict[str, Any]:
    return {"update": runtime.firmware.report()}


async def firmware_section(runtime: Runtime, _: Gettext) -> str:
    st = runtime.firmware
    slot = f", slot {st.slot}" if st.slot else " (no A/B slots: updated by flashing an image)"
    rows = [("running", f"{st.version or '?'}{slot}")]
    if st.phase is not Phase.IDLE:
        words = PHASE_WORDS.get(st.phase, str(st.phase))
        if st.phase is Phase.DOWNLOADING and st.offer is not None:
            words += f" {st.offer.version}: {st.done_bytes:,} of {st.offer.size:,} bytes"
        elif st.phase is Phase.WAITING and st.window_opens_in_s is not None:
            words += f" (opens in {st.window_opens_in_s / 3600:.1f} h)"
        elif st.trial is not None:
            words += f" ({st.trial.version})"
        rows.append(("update", words))
    elif st.offer is not None and st.offer.version != st.version:
        rows.append(("offered", st.offer.version))
    if st.error or st.offer_error:
        rows.append(("problem", st.error or st.offer_error))
    if st.last is not None:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(st.last.at))
        words = f"{st.last.version} {OUTCOME_WORDS[st.last.kind]} ({when})"
        if st.last.reason:
            words += f": {st.last.reason}"
        rows.append(("last update", words))
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<section><h2>Firmware</h2><table>{body}</table></section>"


def admin_parts() -> WebParts:
    return WebParts(sections=(firmware_section,), status=(firmware_status,))
