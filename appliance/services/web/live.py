"""The homepage's live part: the latest events, and a small script that follows the stream.

Without JavaScript the section lists the newest events as of the page load and the page
is complete (every other section is rendered by the server too). With JavaScript, once
the admin token is given (the field in the section, kept for the browser tab, or
``#token=...`` in the address for a wall display), the script opens the event stream on
the events port (Server-Sent Events, which resume by themselves after a drop), adds each
event to the list, and re-reads the homepage's other sections (device links, orders,
sync, health) a moment after events that change them: the server stays the one place
that renders them.
"""

from __future__ import annotations

import html
import json
from functools import partial
from typing import Final

from appliance.services.event_hub import rfc3339
from appliance.services.i18n import Gettext
from appliance.services.runtime import Runtime
from appliance.services.web.parts import WebParts
from appliance.storage.event_log import LogRow, recent

__all__ = ["admin_parts"]

# Events listed by the server-rendered section (the script keeps at most LIST_MAX).
SHOWN: Final = 15
LIST_MAX: Final = 50
# What the homepage follows: device links, orders and their acks, sync.
TOPICS: Final = ("orders", "devices", "commands", "sync")
# While live, the other sections are also re-read this often (health has no events).
REREAD_MS: Final = 30_000

_SCRIPT = """
(function () {
  var box = document.getElementById('live');
  if (!box || !window.EventSource) return;
  var list = document.getElementById('live-events'), state = document.getElementById('live-state');
  var form = document.getElementById('live-form'), field = document.getElementById('live-token');
  var refreshing = null, source = null;
  form.hidden = false;
  function summary(e) {
    var d = e.data || {}, keys = ['id', 'order_id', 'device_id', 'kind', 'source', 'changes', 'reason'];
    return keys.filter(function (k) { return d[k] !== undefined && typeof d[k] !== 'object'; })
               .map(function (k) { return k + '=' + d[k]; }).join(' ');
  }
  function add(e) {
    var row = document.createElement('tr'), cells = [e.at.substring(11, 19), '#' + e.id, e.type, summary(e)];
    cells.forEach(function (text) {
      var td = document.createElement('td'); td.textContent = text; row.appendChild(td);
    });
    var head = list.rows[0];  // the heading row; the newest event goes right under it
    head.parentNode.insertBefore(row, head.nextSibling);
    while (list.rows.length > %(max)d + 1) list.deleteRow(list.rows.length - 1);
  }
  function refresh() {
    refreshing = null;
    fetch('/', {cache: 'no-store'}).then(function (r) { return r.text(); }).then(function (text) {
      var doc = new DOMParser().parseFromString(text, 'text/html'), fresh = {};
      doc.querySelectorAll('main > section').forEach(function (s) {
        var h = s.querySelector('h2'); if (h && s.id !== 'live') fresh[h.textContent] = s;
      });
      document.querySelectorAll('main > section').forEach(function (s) {
        var h = s.querySelector('h2'), twin = h && s.id !== 'live' && fresh[h.textContent];
        if (twin) s.replaceWith(document.importNode(twin, true));
      });
      var sub = doc.querySelector('header p'), mine = document.querySelector('header p');
      if (sub && mine) mine.textContent = sub.textContent;
    }).catch(function () {});
  }
  function start(token) {
    if (source) source.close();
    var url = location.protocol + '//' + location.hostname + ':' + box.dataset.port + '/v1/events?topics=' +
              box.dataset.topics + '&after=' + box.dataset.head + '&token=' + encodeURIComponent(token);
    source = new EventSource(url);
    state.textContent = box.dataset.connecting;
    source.addEventListener('subscribed', function () { state.textContent = box.dataset.live; form.hidden = true; });
    // Health and sync state change without events of their own: re-read them now and then.
    if (!window.liveTimer) window.liveTimer = setInterval(refresh, %(every)d);
    source.addEventListener('resync', function () { refresh(); });
    source.onmessage = function (m) {
      var e = JSON.parse(m.data); add(e); box.dataset.head = e.id;
      if (!refreshing) refreshing = setTimeout(refresh, 1500);
    };
    source.onerror = function () {
      if (source.readyState === EventSource.CLOSED) {
        state.textContent = box.dataset.closed;
        form.hidden = false;
      } else { state.textContent = box.dataset.reconnecting; }
    };
  }
  form.addEventListener('submit', function (ev) {
    ev.preventDefault(); sessionStorage.setItem('applianceToken', field.value); start(field.value);
  });
  var fromHash = (location.hash.match(/token=([^&]+)/) || [])[1];
  var token = fromHash ? decodeURIComponent(fromHash) : sessionStorage.getItem('applianceToken');
  if (token) { sessionStorage.setItem('applianceToken', token); start(token); }
})();
"""


def _summary(row: LogRow) -> str:
    data = json.loads(row.body)
    keys = ("id", "order_id", "device_id", "kind", "source", "changes", "reason")
    return " ".join(f"{k}={data[k]}" for k in keys if k in data and not isinstance(data[k], dict | list))


def _row(row: LogRow) -> str:
    cells = (rfc3339(row.at)[11:19], f"#{row.id}", row.type, _summary(row))
    return "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"


async def section(runtime: Runtime, _: Gettext) -> str:
    t_live_events = _("Live events")
    t_stream = _("Stream:")
    t_as_of_this_page = _("as of this page")
    t_live_updates_need_javascript = _("(live updates need JavaScript; reload to refresh)")
    t_follow_live = _("Follow live")
    t_no_events_yet = _("No events yet.")
    esc = html.escape
    rows = await runtime.db.read(partial(recent, limit=SHOWN, topics=TOPICS))
    head = runtime.event_hub.head
    body = "".join(_row(r) for r in rows) or ""
    empty = "" if rows else f"<p class=muted id=live-empty>{esc(t_no_events_yet)}</p>"
    script = _SCRIPT % {"max": LIST_MAX, "every": REREAD_MS}
    # The script's words, in the page's language (it sets them as the stream's state).
    words = {"connecting": _("connecting"), "live": _("live"), "reconnecting": _("reconnecting"),
             "closed": _("not live: the token was refused or the events port cannot be reached")}
    data = " ".join(f"data-{k}='{esc(v, quote=True)}'" for k, v in words.items())
    heads = "".join(f"<th>{esc(h)}</th>" for h in (_("time (UTC)"), _("id"), _("event"), _("what")))
    token = esc(_("admin token"), quote=True)
    return (
        f"<section id=live data-port={runtime.ports.of('events')} data-head={head} data-topics={','.join(TOPICS)} "
        f"{data}><h2>{esc(t_live_events)}</h2>"
        f"<p>{esc(t_stream)} <span id=live-state class=state>{esc(t_as_of_this_page)}"
        f"<noscript> {esc(t_live_updates_need_javascript)}</noscript></span></p>"
        "<form id=live-form hidden><input id=live-token type=password autocomplete=current-password "
        f"placeholder='{token}' aria-label='{token}'> <button>{esc(t_follow_live)}</button></form>"
        f"{empty}<table id=live-events><tr>{heads}</tr>{body}"
        f"</table><script>{script}</script></section>"
    )


def admin_parts() -> WebParts:
    return WebParts(sections=(section,))
