"""The box's one way out to the internet: HTTP clients for WAN hosts, and what went wrong.

Every WAN user (cloud sync, media, Service Bus, logs) takes its proxy from here, so the
box's config, not its environment, decides the path: ``[wan] proxy`` (with
``[wan] no_proxy``) and an extra CA bundle that is *added* to the system's roots (a
TLS-inspecting proxy's CA). TLS verification cannot be switched off: no argument here
does it.

The API for a WAN path (sync, Service Bus and media blobs use it; log shipping is to):

- :func:`route` says how one WAN URL is reached (:class:`Route`: the proxy or None, the
  extra CA); :func:`cloud_route` is the sync API's.
- :func:`client_for` builds the ``httpx.AsyncClient`` for a route (:func:`open_client`
  does both steps from loose settings).
- :func:`ssl_context` is the one TLS policy (system roots plus the extra CA, host names
  verified, TLS 1.2 at least); the Service Bus SDK gets it as ``ssl_context=``.
- :func:`bypasses_proxy` is the one NO_PROXY rule (``*``, hosts and ``*.domain``,
  ``host:port``, IP addresses and CIDR networks); :func:`proxy_for` applies it.
- :func:`parse_proxy` turns ``[wan] proxy`` into :class:`ProxySettings` (also the shape the
  Service Bus SDK wants: host, port, username, password).
- :func:`locate_failure` names the hop that broke (DNS, TCP, proxy, TLS, HTTP) in words.

``tests/test_wan_paths.py`` runs one test over every WAN path: a new path adds its line there.

Exceptions: :class:`WanConfigError` (ValueError) for a proxy URL or CA file that cannot be
used; the message is one line for a person.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
from collections.abc import Iterable, Sequence
from typing import Final
from urllib.parse import quote, unquote, urlsplit

import attrs
import httpcore
import httpx
import trio

from appliance.config import Config, WanConfig
from appliance.protocol.redact import redact_url
from appliance.protocol.text import Text
from appliance.protocol.wan import Hop, HopFailure, bypasses_proxy

__all__ = ["ProxySettings", "Route", "WanConfigError", "bypasses_proxy", "client_for", "close_client", "cloud_route",
           "locate_failure", "open_client", "parse_proxy", "proxy_for", "route", "ssl_context"]

# Connections one WAN client keeps: the sync loops run three calls at most at once.
MAX_CONNECTIONS: Final = 4
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
# Closing a client sends TLS close_notify on each connection; past this, give up politely.
CLOSE_TIMEOUT_S: Final = 2.0


class WanConfigError(ValueError):
    """A WAN setting ([wan] proxy, a CA file) cannot be used."""


@attrs.frozen(kw_only=True)
class ProxySettings:
    scheme: str  # http or https (TLS to the proxy itself)
    host: str
    port: int
    username: str = attrs.field(default="", repr=False)
    password: str = attrs.field(default="", repr=False)

    @property
    def address(self) -> str:
        """host:port, as shown to a person (never the credentials)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The URL for httpx, with the credentials."""
        auth = ""
        if self.username:
            auth = quote(self.username, safe="") + (":" + quote(self.password, safe="") if self.password else "") + "@"
        return f"{self.scheme}://{auth}{self.address}"


def parse_proxy(value: str) -> ProxySettings | None:
    """``[wan] proxy`` as settings; None for "" (direct). :class:`WanConfigError` if unusable."""
    value = value.strip()
    if not value:
        return None
    shown = redact_url(value)  # error messages reach the log and the homepage
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise WanConfigError(f"[wan] proxy {shown!r} is not a valid URL: {exc}") from exc
    if parts.scheme not in _DEFAULT_PORTS:
        raise WanConfigError(f"[wan] proxy must start with http:// or https://, got {shown!r}")
    host = parts.hostname or ""
    if not host:
        raise WanConfigError(f"[wan] proxy {shown!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise WanConfigError(f"[wan] proxy {shown!r}: a proxy URL has no path or query (http://host:port)")
    if any(c.isspace() for c in host) or not host.isascii():
        raise WanConfigError(f"[wan] proxy {shown!r}: the host is not a valid host name")
    return ProxySettings(scheme=parts.scheme, host=host, port=port or _DEFAULT_PORTS[parts.scheme],
                         username=unquote(parts.username or ""), password=unquote(parts.password or ""))


def proxy_for(host: str, *, proxy: str, no_proxy: Sequence[str] = ()) -> ProxySettings | None:
    """The proxy that connections to ``host`` go through, or None (direct).

    ``no_proxy`` entries: ``*``, a host (also matching its subdomains, with or without a
    leading dot or ``*.``), an IP address or a CIDR network.
    """
    settings = parse_proxy(proxy)
    if settings is None or bypasses_proxy(host, no_proxy):
        return None
    return settings


def ssl_context(ca_file: str = "") -> ssl.SSLContext:
    """The TLS policy of every WAN path: the system's CA roots plus ``ca_file`` if given,
    host names always verified, TLS 1.2 at least."""
    ctx = ssl.create_default_context()
    if ca_file:
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise WanConfigError(f"cannot use CA file {ca_file}: {exc}; check [cloud] ca_file") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


@attrs.frozen(kw_only=True)
class Route:
    """How the box reaches one WAN base URL: through ``proxy`` (None: direct), trusting
    the system's roots plus ``ca_file``."""

    url: str
    proxy: ProxySettings | None
    ca_file: str = ""

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    def ssl_context(self) -> ssl.SSLContext:
        return ssl_context(self.ca_file)


def route(url: str, wan: WanConfig, *, ca_file: str = "") -> Route:
    """The route to ``url`` under ``[wan]``. :class:`WanConfigError` if the proxy is unusable."""
    host = urlsplit(url).hostname or ""
    return Route(url=url, proxy=proxy_for(host, proxy=wan.proxy, no_proxy=wan.no_proxy), ca_file=ca_file)


def cloud_route(config: Config) -> Route:
    """The route to the sync API (pairing, the sync loops, the support channel's replies)."""
    return route(config.cloud.api_url, config.wan, ca_file=config.cloud.ca_file)


def client_for(target: Route, *, connect_timeout_s: float, read_timeout_s: float) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` for one WAN route: its proxy, CAs and the timeouts given.

    ``trust_env=False``: ``HTTPS_PROXY``, ``SSL_CERT_FILE`` and ``.netrc`` of whoever
    started the process are ignored. The caller closes the client (``async with``, or
    :func:`close_client`). :class:`WanConfigError` if the CA file cannot be used.
    """
    timeout = httpx.Timeout(connect=connect_timeout_s, read=read_timeout_s, write=read_timeout_s,
                            pool=connect_timeout_s)
    transport = httpx.AsyncHTTPTransport(
        verify=target.ssl_context(),
        proxy=target.proxy.url if target.proxy else None,
        trust_env=False,
        limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS),
    )
    # httpx builds the pool (a proxy's too); its network backend is the one seam httpcore has.
    pool = transport._pool
    pool._network_backend = _CancelSafeBackend(pool._network_backend)
    return httpx.AsyncClient(base_url=target.url, transport=transport, timeout=timeout, trust_env=False,
                             follow_redirects=False)


class _CancelSafeStream(httpcore.AsyncNetworkStream):
    """httpcore's trio stream, whose ``start_tls`` closes the TCP connection when the
    handshake is cancelled too. httpcore closes it on an ``Exception`` only, and
    ``trio.Cancelled`` is not one: a round's end or a stop that cut a connection in its TLS
    handshake (a slow or blackholed WAN) left the socket to the garbage collector, its
    descriptor held until the collector ran (docs/architecture.md, "Known gaps")."""

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109 - httpcore's
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:  # noqa: ASYNC109
        try:
            return _CancelSafeStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._inner.aclose()
            raise

    def get_extra_info(self, info: str) -> object:
        return self._inner.get_extra_info(info)


class _CancelSafeBackend(httpcore.AsyncNetworkBackend):
    """httpcore's own backend (trio's, chosen at first use), its streams wrapped in
    :class:`_CancelSafeStream`."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109
                          local_address: str | None = None,
                          socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        return _CancelSafeStream(await self._inner.connect_tcp(host, port, timeout, local_address, socket_options))

    async def connect_unix_socket(self, path: str, timeout: float | None = None,  # noqa: ASYNC109
                                  socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
                                  ) -> httpcore.AsyncNetworkStream:
        return _CancelSafeStream(await self._inner.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def open_client(
    base_url: str,
    *,
    proxy: str = "",
    no_proxy: Sequence[str] = (),
    ca_file: str = "",
    connect_timeout_s: float,
    read_timeout_s: float,
) -> httpx.AsyncClient:
    """:func:`client_for` the route to ``base_url`` with these loose settings."""
    host = urlsplit(base_url).hostname or ""
    target = Route(url=base_url, proxy=proxy_for(host, proxy=proxy, no_proxy=no_proxy), ca_file=ca_file)
    return client_for(target, connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s)


async def close_client(client: httpx.AsyncClient) -> None:
    """Close ``client`` even when the caller is being cancelled: shielded, bounded by
    :data:`CLOSE_TIMEOUT_S`. (An unshielded close under cancellation stops at the first
    connection and leaves the others' sockets to the garbage collector.)"""
    with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
        await client.aclose()


# --- where it broke ----------------------------------------------------------------------


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc``, its causes and contexts, and the members of exception groups, in order."""
    out: list[BaseException] = []
    todo = [exc]
    while todo and len(out) < 32:
        cur = todo.pop(0)
        if any(cur is seen for seen in out):
            continue
        out.append(cur)
        if isinstance(cur, BaseExceptionGroup):
            todo.extend(cur.exceptions)
        for nxt in (cur.__cause__, cur.__context__):
            if nxt is not None:
                todo.append(nxt)
    return out


_ERRNO_WORDS: Final = {
    errno.ECONNREFUSED: Text("connection refused"),
    errno.ECONNRESET: Text("connection reset"),
    errno.EHOSTUNREACH: Text("no route to host"),
    errno.ENETUNREACH: Text("network unreachable"),
    errno.ETIMEDOUT: Text("timed out"),
}


# The same words found by their C library text, where only the text survived (an httpx
# error that kept the message, not the errno): "Connection refused".
_STRERROR_WORDS: Final = {os.strerror(number): words for number, words in _ERRNO_WORDS.items()}
_GAI_WORDS: Final = {socket.EAI_NONAME: Text("name or service not known"),
                     socket.EAI_AGAIN: Text("temporary failure in name resolution")}


def _os_words(err: OSError) -> str:
    if err.errno in _ERRNO_WORDS:
        return _ERRNO_WORDS[err.errno]
    text = err.strerror or str(err)
    return _STRERROR_WORDS.get(text, text.lower())


def locate_failure(exc: BaseException, *, url: str, proxy: ProxySettings | None) -> HopFailure:
    """Which hop of the path to ``url`` failed, and how to say it, from an httpx error."""
    parts = urlsplit(url)
    target = f"{parts.hostname}:{parts.port or 443}"
    chain = _chain(exc)
    if any(isinstance(e, httpx.ProxyError) for e in chain):
        answer = next(str(e) for e in chain if isinstance(e, httpx.ProxyError))
        where = proxy.address if proxy else "?"
        return HopFailure.at(Hop.PROXY, where, Text("the proxy {proxy} could not open a tunnel to {target}: {answer}",
                                                    proxy=where, target=target, answer=answer))
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            return HopFailure.at(Hop.TLS, target, Text("TLS with {target} failed: the certificate is not trusted "
                                                       "({error})", target=target, error=str(e.verify_message)))
        if isinstance(e, ssl.SSLError):
            return HopFailure.at(Hop.TLS, target, Text("TLS with {target} failed: {error}", target=target,
                                                       error=str(e.reason or e)))
    connecting = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
    if connecting:
        gai = next((e for e in chain if isinstance(e, socket.gaierror)), None)
        os_err = next((e for e in chain if isinstance(e, OSError) and e.errno is not None
                       and not isinstance(e, socket.gaierror)), None)
        if isinstance(exc, httpx.ConnectTimeout):
            words: str = Text("timed out")
        elif gai is not None:
            words = _GAI_WORDS.get(gai.errno or 0, "") or (gai.strerror or str(gai)).lower()
        elif os_err is not None:
            words = _os_words(os_err)
        else:
            words = _STRERROR_WORDS.get(str(exc), str(exc) or type(exc).__name__)
        if proxy is not None:
            message = (Text("cannot resolve the proxy {proxy}: {error}", proxy=proxy.address, error=words)
                       if gai is not None else
                       Text("cannot reach the proxy {proxy}: {error}", proxy=proxy.address, error=words))
            return HopFailure.at(Hop.PROXY, proxy.address, message)
        if gai is not None:
            return HopFailure.at(Hop.DNS, parts.hostname or target, Text("cannot resolve {host}: {error}",
                                                                          host=str(parts.hostname), error=words))
        if any(isinstance(e, ssl.SSLError) for e in chain):
            return HopFailure.at(Hop.TLS, target, Text("TLS with {target} failed: {error}", target=target, error=words))
        return HopFailure.at(Hop.TCP, target, Text("cannot connect to {target}: {error}", target=target, error=words))
    if isinstance(exc, httpx.TimeoutException):
        return HopFailure.at(Hop.HTTP, target, Text("{target} did not answer in time ({error})", target=target,
                                                    error=type(exc).__name__))
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        return HopFailure.at(Hop.HTTP, target, Text("the connection to {target} was cut before the answer ({error})",
                                                    target=target, error=str(exc) or type(exc).__name__))
    return HopFailure.at(Hop.HTTP, target, Text("the call to {target} failed: {error}", target=target,
                                                error=f"{type(exc).__name__}: {exc}"))

