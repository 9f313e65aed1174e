"""The page kit of the admin pages, and the one JSON response type of every listener.

The homepage is plain HTML that works fully without JavaScript: a technician's phone or an
old POS browser shows it (the live-events section's small script only adds live updates).
Features build their homepage sections and form answers from these pieces, so
every page looks and words alike:

- :func:`page`: a whole page (title, subtitle, sections);
- :func:`row`: one ``label | value`` table row, the value optionally coloured;
- :func:`ago`: "12 s ago", "3 min ago", "5 h ago", "2 days ago", "never";
- :func:`not_done`: the answer to a homepage form that could not be acted on;
- :data:`GREEN`, :data:`AMBER`, :data:`RED`, :data:`GREY`: the state colours;
- :class:`JsonResponse`: JSON that is always valid UTF-8.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any, Final

from starlette.responses import HTMLResponse, Response

from appliance.services.timestamps import duration

__all__ = ["AMBER", "GREEN", "GREY", "RED", "TEXT", "JsonResponse", "ago", "not_done", "page", "row"]

GREEN: Final = "#1a7f37"  # working
AMBER: Final = "#9a6700"  # on its way, or needs a look
RED: Final = "#cf222e"  # failing: someone must act
GREY: Final = "#6e7781"  # off, stopped, rejected
TEXT: Final = "#1f2328"

_CSS: Final = f"""
body{{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f8fa;color:{TEXT}}}
header{{background:#0b3d61;color:#fff;padding:14px 24px}}header h1{{margin:0;font-size:20px}}
header p{{margin:4px 0 0;opacity:.85;font-size:14px}}
main{{padding:16px 24px;display:grid;gap:16px;grid-template-columns:repeat(auto-fit,minmax(380px,1fr))}}
section{{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px 16px;overflow-x:auto;min-width:0}}
h2{{font-size:16px;margin:4px 0 10px}}table{{border-collapse:collapse;width:100%;font-size:14px}}
td,th{{text-align:left;padding:4px 6px;border-bottom:1px solid #eaeef2;vertical-align:top;overflow-wrap:break-word}}
.state{{font-weight:600}}.muted{{color:{GREY}}}form{{display:inline}}button{{font-size:13px}}
"""


def page(title: str, subtitle: str, sections: Sequence[str]) -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header>"
        f"<main>{''.join(sections)}</main></body></html>"
    )


def row(label: str, value: str, colour: str = "") -> str:
    """A ``label | value`` row; ``value`` is HTML already (escape what came from outside)."""
    style = f" class=state style='color:{colour}'" if colour else ""
    return f"<tr><td>{html.escape(label)}</td><td{style}>{value}</td></tr>"


def ago(seconds: float | None) -> str:
    """How long ago, in words; None is "never"."""
    return "never" if seconds is None else f"{duration(seconds)} ago"


def not_done(status: int, message: str, *, subtitle: str, anchor: str, heading: str = "Not done") -> HTMLResponse:
    """The page a homepage form answers when nothing was done, with a way back to
    ``/#anchor``."""
    body = page("Store appliance", subtitle,
                [f"<section><h2>{html.escape(heading)}</h2><p>{html.escape(message)}</p>"
                 f"<p><a href='/#{html.escape(anchor)}'>Back to the homepage</a></p></section>"])
    return HTMLResponse(body, status_code=status)


class JsonResponse(Response):
    """JSON that is always valid UTF-8 (a lone surrogate from the platform is escaped)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(content, separators=(",", ":"), allow_nan=False).encode("ascii")
