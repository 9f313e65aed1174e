"""What a feature contributes to one listener's app: routes, homepage sections, status keys."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
from starlette.routing import BaseRoute
from starlette.types import Receive, Scope, Send

from appliance.services.i18n import Gettext
from appliance.services.runtime import Runtime

__all__ = ["Front", "WebParts"]

RouteSet = Callable[[Runtime], Sequence[BaseRoute]]
# A homepage section: the runtime and the request's translations (``_``, the reader's
# language from Accept-Language, as the admin page's own sections take it).
Section = Callable[[Runtime, Gettext], Awaitable[str]]
StatusPart = Callable[[Runtime], Awaitable[dict[str, Any]]]
Front = Callable[[Scope, Receive, Send], Awaitable[bool]]


@attrs.frozen(kw_only=True)
class WebParts:
    routes: tuple[RouteSet, ...] = ()
    sections: tuple[Section, ...] = ()  # homepage only
    status: tuple[StatusPart, ...] = ()  # /api/status only
    # Handlers asked before the app's framework (its error and CORS middleware, the router),
    # in order: each made with ``(runtime)``, then called with ``(scope, receive, send)`` and
    # returning whether it answered (the hot paths: docs/store-api.md, "Speed").
    front: tuple[Callable[[Runtime], Front], ...] = ()

    def routes_for(self, runtime: Runtime) -> list[BaseRoute]:
        return [route for make in self.routes for route in make(runtime)]

    def __add__(self, other: WebParts) -> WebParts:
        return WebParts(routes=self.routes + other.routes, sections=self.sections + other.sections,
                        status=self.status + other.status, front=self.front + other.front)
