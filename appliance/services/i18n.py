"""The shop's language: gettext catalogs (Babel's PO files) for English and French.

The platform's retailers and technicians read French; the homepage speaks the language the
browser asks for (``Accept-Language``), English when it asks for neither. Messages are
written in English in the code, marked with ``_()``, and translated in
``appliance/locale/<lang>/LC_MESSAGES/appliance.po``. Both files list every message: a
test extracts the messages from the code with Babel and checks that each has both.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Final

from babel.messages.catalog import Catalog
from babel.messages.pofile import read_po

__all__ = ["DEFAULT_LANGUAGE", "LANGUAGES", "Gettext", "catalog", "gettext_for", "negotiate"]

LANGUAGES: Final = ("en", "fr")
DEFAULT_LANGUAGE: Final = "en"
LOCALE_DIR: Final = Path(__file__).resolve().parents[1] / "locale"
DOMAIN: Final = "appliance"
# An Accept-Language header longer than this is not a browser's: only its start is read.
MAX_ACCEPT_LANGUAGE: Final = 512

Gettext = Callable[[str], str]


@functools.cache
def catalog(language: str) -> Catalog:
    """The PO catalog of ``language`` (read once)."""
    with (LOCALE_DIR / language / "LC_MESSAGES" / f"{DOMAIN}.po").open("rb") as file:
        return read_po(file, locale=language, domain=DOMAIN)


@functools.cache
def gettext_for(language: str) -> Gettext:
    """``_(message)`` in ``language``; a message the catalog lacks stays in English."""
    table = {m.id: m.string for m in catalog(language) if m.id and isinstance(m.id, str) and m.string}

    def _(message: str) -> str:
        return table.get(message, message)  # type: ignore[return-value]

    _.language = language  # type: ignore[attr-defined]  # numbers in its digits (protocol.text.Number)
    return _


def negotiate(accept_language: str | None) -> str:
    """The best of :data:`LANGUAGES` for an ``Accept-Language`` header (RFC 9110 §12.5.4:
    ``fr-CH, fr;q=0.9, en;q=0.8``); :data:`DEFAULT_LANGUAGE` when none fits. Never raises."""
    best, best_q = DEFAULT_LANGUAGE, 0.0
    for item in (accept_language or "")[:MAX_ACCEPT_LANGUAGE].split(","):
        tag, _, params = item.strip().partition(";")
        language = tag.strip().lower().split("-")[0]
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        # Equal weights: the first listed wins (a browser lists its preference first).
        if language in LANGUAGES and q > best_q and 0 < q <= 1:
            best, best_q = language, q
    return best
