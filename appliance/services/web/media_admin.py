"""The media cache on the homepage and in /api/status: cached count and bytes, what is
missing and why, the fill's progress and the last error with the hop that failed."""

from __future__ import annotations

import html
from typing import Any

from appliance.protocol.text import Number, Text, say
from appliance.services.i18n import Gettext
from appliance.services.media_health import human_bytes, missing_words
from appliance.services.runtime import Runtime
from appliance.services.web.parts import WebParts

__all__ = ["admin_parts"]


async def media_status(runtime: Runtime) -> dict[str, Any]:
    shelf = runtime.media
    return {"media": shelf.status.as_dict() if shelf is not None else None}


async def media_section(runtime: Runtime, _: Gettext) -> str:
    t_the_media_service_has = _("The media service has not started.")
    esc = html.escape
    shelf = runtime.media
    title = esc(_("Media"))
    if shelf is None:
        return f"<section><h2>{title}</h2><p class=muted>{esc(t_the_media_service_has)}</p></section>"
    st = shelf.status
    rows = [(_("cached"), _("{cached} of {wanted} files, {size}").format(
                cached=say(Number(st.files_cached), _), wanted=say(Number(st.files_wanted), _),
                size=say(human_bytes(st.bytes_cached), _))),
            (_("disk budget"), say(human_bytes(st.budget_bytes), _))]
    if st.files_missing:
        words = missing_words(st)  # "media: <what>": the section's title says "media" already
        rows.append((_("missing"), say(words.args["what"] if isinstance(words, Text) else words, _)))
    if st.fill_total_bytes:
        percent = min(100, 100 * st.fill_done_bytes // max(1, st.fill_total_bytes))
        rows.append((_("downloading"), _("{done} of {total} received ({percent}%), {count} file(s) now").format(
            done=say(human_bytes(st.fill_done_bytes), _), total=say(human_bytes(st.fill_total_bytes), _),
            percent=percent, count=len(st.downloading))))
    if st.last_error is not None:
        rows.append((_("last error"), _("{hop} hop, {key}: {message} (fix: {fix})").format(
            hop=st.last_error.hop, key=st.last_error_key, message=say(st.last_error.message, _),
            fix=say(st.last_error.fix, _))))
    body = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in rows)
    return f"<section><h2>{title}</h2><table>{body}</table></section>"


def admin_parts() -> WebParts:
    return WebParts(sections=(media_section,), status=(media_status,))
