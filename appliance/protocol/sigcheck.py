"""Which check a signed device request gets: the native one or the Python reference.

The check itself is :mod:`appliance.protocol.identity`'s (:func:`~.identity.parse_signature`,
:func:`~.identity.verify_request`, :class:`~.identity.MacKey`): the reference. The same work
is done in C by ``appliance.protocol._sigcheck`` (built from ``_sigcheck.c`` when the package
is installed): the signature headers matched, the Content-Digest compared, the signature
base hashed with the device's precomputed HMAC states, the MAC compared, in two calls and
no Python-level step between (docs/architecture.md, "Signed device requests", says why).
It accepts and refuses exactly what the reference does, with the same
:class:`~.identity.SignatureError` (tests/test_sigcheck.py compares them).

:func:`choose` picks one: the native check when the extension imports, else the Python one;
``APPLIANCE_SIGCHECK=python`` (or ``native``) forces one. The key ring holds the choice
(``runtime.keys.check``), made once at start and logged.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

import attrs

from appliance.protocol import identity as idp

__all__ = ["ENVIRONMENT", "NATIVE", "NATIVE_MISSING", "PYTHON", "Check", "Signed", "choose"]

# The environment variable that forces a check: "python", "native", or "auto" (the default).
ENVIRONMENT: Final = "APPLIANCE_SIGCHECK"


class Signed(Protocol):
    """A request's signature, read but not yet verified (either check's)."""

    @property
    def keyid(self) -> str: ...
    @property
    def created(self) -> int: ...
    @property
    def nonce(self) -> bytes: ...


@attrs.frozen
class Check:
    """One implementation of the signed-request check: ``key`` makes a device's key ready
    (once per device), ``parse`` reads the signature headers (by lower-case name, the values
    as received), ``verify(key, signed, method, path, query, body)`` checks the request."""

    name: str
    key: Callable[[bytes], object]
    parse: Callable[[dict[str, bytes]], Signed]
    verify: Callable[[Any, Any, bytes, bytes, bytes, bytes], None]


def _verify_python(key: idp.MacKey, signed: idp.SignedRequest, method: bytes, path: bytes, query: bytes,  # noqa: PLR0917 (the native call's form)
                   body: bytes) -> None:
    idp.verify_request(key, signed, method=method, path=path, query=query, body=body)


PYTHON: Final = Check(name="python", key=idp.MacKey, parse=idp.parse_signature, verify=_verify_python)


def _native() -> tuple[Check | None, str]:
    try:
        module = importlib.import_module("appliance.protocol._sigcheck")
    except ImportError as exc:  # not built here (no compiler, no libcrypto headers)
        return None, f"the native check is not built ({exc})"
    return Check(name="native", key=module.Key, parse=module.parse, verify=module.verify), ""


NATIVE, NATIVE_MISSING = _native()


def choose(env: Mapping[str, str]) -> tuple[Check, str]:
    """The check to use under the environment ``env``, and why in a few words (for the log
    line at start)."""
    wanted = env.get(ENVIRONMENT, "auto").strip().lower() or "auto"
    if wanted == "python":
        return PYTHON, f"{ENVIRONMENT}=python"
    if wanted not in ("native", "auto"):
        raise ValueError(f"{ENVIRONMENT} must be python, native or auto, not {wanted!r}")
    if NATIVE is not None:
        return NATIVE, "the native extension"
    if wanted == "native":
        raise ValueError(f"{ENVIRONMENT}=native, but {NATIVE_MISSING}")
    return PYTHON, NATIVE_MISSING
