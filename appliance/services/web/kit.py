"""The page kit of the admin pages, and the one JSON response type of every listener.

The homepage is plain HTML that works fully without JavaScript: a technician's phone or an
old POS browser shows it (the live-events section's small script only adds live updates).
Features build their homepage sections and form answers from these pieces, so
every page looks and words alike:

- :func:`page`: a whole page (title, subtitle, sections);
- :func:`card`: one titled section of a page (what a feature adds to the homepage);
- :func:`row`: one ``label | value`` table row, the value optionally coloured;
- :func:`ago`: "12 s ago", "3 min ago", "5 h ago", "2 days ago", "never" (a Text);
- :func:`not_done`: the answer to a homepage form that could not be acted on, in the
  reader's language (``_``, :func:`reader`);
- :func:`reader`: the translations of the language a request's browser asks for;
- :data:`GREEN`, :data:`AMBER`, :data:`RED`, :data:`GREY`: the state colours;
- :class:`JsonResponse`: JSON that is always valid UTF-8.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from appliance.protocol.text import Text, say
from appliance.services.i18n import Gettext, gettext_for, negotiate
from appliance.services.timestamps import duration

__all__ = ["AMBER", "COMMAND_STATE_WORDS", "DEVICE_STATE_WORDS", "GREEN", "GREY", "KIND_WORDS", "LINK_PHASE_WORDS",
           "RED", "SERVICE_STATE_WORDS", "TEXT", "JsonResponse", "ago", "card", "not_done", "page", "reader", "row"]

GREEN: Final = "#1a7f37"  # working
AMBER: Final = "#9a6700"  # on its way, or needs a look
RED: Final = "#cf222e"  # failing: someone must act
GREY: Final = "#6e7781"  # off, stopped, rejected
TEXT: Final = "#1f2328"

# One word per state, the same in every section and in the reader's language (``say``): a
# device's adoption (Devices), a device's link (Device links), a service (Services), a
# queue's link (Online orders, Remote support).
DEVICE_STATE_WORDS: Final = {"pending": Text("pending"), "adopted": Text("adopted"), "rejected": Text("rejected")}
LINK_PHASE_WORDS: Final = {"connecting": Text("connecting"), "connected": Text("connected"),
                           "backing_off": Text("waiting to retry"), "stopped": Text("stopped")}
# A device's kind (its protocol name, shown beside these words).
KIND_WORDS: Final = {"kds": Text("kitchen screen"), "printer": Text("receipt printer"), "pos": Text("till")}
COMMAND_STATE_WORDS: Final = {"queued": Text("queued"), "sent": Text("sent"), "acked": Text("delivered"),
                              "dead": Text("not delivered")}
SERVICE_STATE_WORDS: Final = {"starting": Text("starting"), "running": Text("running"),
                              "restarting": Text("restarting"), "failed": Text("failed"),
                              "disabled": Text("disabled"), "stopped": Text("stopped")}

# One column of full-width sections on a phone, small cards side by side on a wide screen
# and a section with a table in full width; no section is ever wider than the window
# (min(100%, ...)), long words wrap anywhere, tables keep to their card (fixed layout) and
# on a phone each row reads as a short paragraph. Printed: black on white, no forms.
_CSS: Final = f"""
*{{box-sizing:border-box}}
body{{font:16px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f8fa;color:{TEXT}}}
header{{background:#0b3d61;color:#fff;padding:12px 16px}}header h1{{margin:0;font-size:1.25rem}}
header p{{margin:4px 0 0;font-size:.875rem}}
main{{max-width:1280px;margin:0 auto;padding:12px;display:grid;gap:12px;
grid-template-columns:repeat(auto-fill,minmax(min(100%,400px),1fr))}}
main>*{{min-width:0}}.wide,section:has(table){{grid-column:1/-1}}
section{{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px 16px;overflow-wrap:anywhere}}
h2{{font-size:1rem;margin:0 0 8px}}table{{border-collapse:collapse;width:100%;font-size:.875rem;table-layout:fixed}}
td,th{{text-align:left;padding:4px 6px;border-bottom:1px solid #eaeef2;vertical-align:top;overflow-wrap:anywhere}}
.state{{font-weight:600}}.muted{{color:#59636e}}form{{display:inline}}button{{font-size:.875rem}}
input{{max-width:100%}}
.headline{{font-size:1.125rem;border-left:8px solid {GREEN}}}.headline p{{margin:0}}
.headline.warn{{border-left-color:{AMBER}}}.headline.fail{{border-left-color:{RED}}}
.headline .first{{margin-top:6px;font-size:1rem}}
.problems ul{{list-style:none;margin:0;padding:0}}.problems li{{padding:8px 0;border-bottom:1px solid #eaeef2}}
.problems .what{{font-weight:600}}.problems .fix{{display:block;margin-top:2px}}
.tag{{display:inline-block;min-width:3.2em;font-weight:700;font-size:.75rem;text-transform:uppercase}}
@media (max-width:600px){{header,main{{padding:8px}}section{{padding:10px 12px}}
table,tbody,tr,td{{display:block;width:auto}}tr:has(th){{display:none}}
tr{{padding:6px 0;border-bottom:1px solid #eaeef2}}
td{{display:inline;border:0;padding:0 .6em 0 0}}td:first-child{{display:block;font-weight:600}}}}
@media print{{body{{background:#fff;color:#000;font-size:11pt}}header{{background:none;color:#000;
border-bottom:2px solid #000;padding:0 0 6px}}main{{display:block;max-width:none;padding:0}}
section{{border:0;border-bottom:1px solid #999;border-radius:0;padding:8px 0;break-inside:avoid}}
form,button,input,select,textarea,label{{display:none}}.headline{{border-left:0}}}}
"""


def page(title: str, subtitle: str, sections: Sequence[str], *, lang: str = "en") -> str:
    """A whole page: the header, then ``sections`` in order (each a :func:`card` or any
    ``<section>``; a section with ``class=wide`` spans the full width)."""
    return (
        f"<!doctype html><html lang={html.escape(lang)}><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header>"
        f"<main>{''.join(sections)}</main></body></html>"
    )


def card(title: str, body: str, *, anchor: str = "", wide: bool = False) -> str:
    """One homepage section: a titled card; ``body`` is HTML already (escape what came
    from outside). ``anchor`` gives it an id for links (``/#anchor``)."""
    ident = f" id={html.escape(anchor)}" if anchor else ""
    cls = " class=wide" if wide else ""
    return f"<section{ident}{cls}><h2>{html.escape(title)}</h2>{body}</section>"


def row(label: str, value: str, colour: str = "") -> str:
    """A ``label | value`` row; ``value`` is HTML already (escape what came from outside)."""
    style = f" class=state style='color:{colour}'" if colour else ""
    return f"<tr><td>{html.escape(label)}</td><td{style}>{value}</td></tr>"


def ago(seconds: float | None) -> Text:
    """How long ago, in words (``say`` it in the reader's language); None is "never"."""
    return Text("never") if seconds is None else Text("{duration} ago", duration=duration(seconds))


def reader(request: Request) -> tuple[str, Gettext]:
    """(language, ``_``) for the language the request's browser asks for (Accept-Language)."""
    language = negotiate(request.headers.get("accept-language"))
    return language, gettext_for(language)


def not_done(request: Request, status: int, message: str, *, subtitle: str, anchor: str,
             heading: str = "") -> HTMLResponse:
    """The page a homepage form answers when nothing was done, with a way back to
    ``/#anchor``, in the language the request asks for. ``message``, ``subtitle`` and
    ``heading`` are English Texts (or plain words that stay as they are)."""
    language, _ = reader(request)
    title, heading_words = _("Store appliance"), say(heading, _) if heading else _("Not done")
    back = _("Back to the homepage")
    body = page(title, say(subtitle, _),
                [f"<section><h2>{html.escape(heading_words)}</h2><p>{html.escape(say(message, _))}</p>"
                 f"<p><a href='/#{html.escape(anchor)}'>{html.escape(back)}</a></p></section>"],
                lang=language)
    return HTMLResponse(body, status_code=status, headers={"Content-Language": language, "Vary": "Accept-Language"})


class JsonResponse(Response):
    """JSON that is always valid UTF-8 (a lone surrogate from the platform is escaped)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(content, separators=(",", ":"), allow_nan=False).encode("ascii")
