"""What a feature contributes to one listener's app: routes, homepage sections, status keys."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
from starlette.routing import BaseRoute

from appliance.services.i18n import Gettext
from appliance.services.runtime import Runtime

__all__ = ["WebParts"]

RouteSet = Callable[[Runtime], Sequence[BaseRoute]]
# A homepage section: the runtime and the request's translations (``_``, the reader's
# language from Accept-Language, as the admin page's own sections take it).
Section = Callable[[Runtime, Gettext], Awaitable[str]]
StatusPart = Callable[[Runtime], Awaitable[dict[str, Any]]]


@attrs.frozen(kw_only=True)
class WebParts:
    routes: tuple[RouteSet, ...] = ()
    sections: tuple[Section, ...] = ()  # homepage only
    status: tuple[StatusPart, ...] = ()  # /api/status only
    # ASGI middleware classes, each made with ``(app, runtime=runtime)``, innermost first.
    middleware: tuple[Any, ...] = ()

    def routes_for(self, runtime: Runtime) -> list[BaseRoute]:
        return [route for make in self.routes for route in make(runtime)]

    def __add__(self, other: WebParts) -> WebParts:
        return WebParts(routes=self.routes + other.routes, sections=self.sections + other.sections,
                        status=self.status + other.status, middleware=self.middleware + other.middleware)
