"""The media cache on the homepage and in /api/status: cached count and bytes, what is
missing and why, the fill's progress and the last error with the hop that failed."""

from __future__ import annotations

import html
from typing import Any

from appliance.services.i18n import Gettext
from appliance.services.media_health import human_bytes, missing_words
from appliance.services.runtime import Runtime
from appliance.services.web.parts import WebParts

__all__ = ["admin_parts"]


async def media_status(runtime: Runtime) -> dict[str, Any]:
    shelf = runtime.media
    return {"media": shelf.status.as_dict() if shelf is not None else None}


async def media_section(runtime: Runtime, _: Gettext) -> str:
    shelf = runtime.media
    if shelf is None:
        return "<section><h2>Media</h2><p class=muted>The media service has not started.</p></section>"
    st = shelf.status
    rows = [("cached", f"{st.files_cached:,} of {st.files_wanted:,} files, {human_bytes(st.bytes_cached)}"),
            ("disk budget", human_bytes(st.budget_bytes))]
    if st.files_missing:
        rows.append(("missing", missing_words(st).removeprefix("media: ")))
    if st.fill_total_bytes:
        percent = min(100, 100 * st.fill_done_bytes // max(1, st.fill_total_bytes))
        rows.append(("downloading", f"{human_bytes(st.fill_done_bytes)} of {human_bytes(st.fill_total_bytes)}"
                                    f" received ({percent}%), {len(st.downloading)} file(s) now"))
    if st.last_error is not None:
        rows.append(("last error", f"{st.last_error.hop} hop, {st.last_error_key}: {st.last_error.message}"
                                   f" (fix: {st.last_error.fix})"))
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<section><h2>Media</h2><table>{body}</table></section>"


def admin_parts() -> WebParts:
    return WebParts(sections=(media_section,), status=(media_status,))
