"""Device identity on the shop LAN: keys, the comparison code, signed requests, the hello.

Pure and synchronous: the caller gives every nonce and every ``now``; nothing here reads a
clock, a socket or the OS's randomness (except :func:`new_private_key`, which asks the
``cryptography`` package for a key). docs/device-api.md is the device maker's side of it.

- **Device key** (:func:`derive_device_key`): X25519 between the device's key pair and the
  box's, then HKDF-SHA256 (salt: both public keys, info: a label and the device id) to 32
  bytes. Both ends compute it; it never crosses the LAN. A third party that saw both public
  keys cannot (that is X25519's job; the hypothesis tests check the plumbing).
- **Comparison code** (:func:`comparison_code`): 6 digits from both public keys and two
  nonces. The device commits to its nonce (:func:`commitment`) before it learns the box's,
  and reveals it after, as Bluetooth's numeric comparison does: a man in the middle who
  swaps keys cannot grind a key pair whose code matches, he gets one guess in a million.
- **Signed requests** (:func:`sign_request`, :func:`parse_signature`,
  :func:`verify_request`): RFC 9421 HTTP Message Signatures with a fixed profile: the
  components ``"@method" "@path" "@query" "content-digest"`` (RFC 9530 ``sha-256``), the
  parameters ``created``, ``nonce``, ``keyid`` (the device id) and ``alg="hmac-sha256"``,
  the label ``chub``. :class:`ReplayGuard` refuses a ``created`` outside the window and a
  nonce seen before, with a bounded memory. :class:`MacKey` is a device key made ready
  for HMAC once, so that checking a request costs two hash copies, not a key set-up.
- **The hello** (:func:`box_proof`, :func:`device_proof`): on the device channel each side
  proves the key by an HMAC over both sides' fresh nonces, under distinct labels so one
  side's proof is never the other's.

Errors::

    IdentityError
    ├── BadKey             a key or nonce that is not the right size or encoding
    ├── SignatureError     a device request not signed as the profile says   (``reason``)
    │   └── Replayed       outside the window, a nonce seen before, or refused under load
    └── HelloFailed        the other side of the hello did not prove the key
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import importlib
import re
from collections.abc import Callable, Mapping
from typing import Any, Final, NamedTuple

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "COMPONENTS",
    "KEY_BYTES",
    "LABEL",
    "NONCE_BYTES",
    "BadKey",
    "HelloFailed",
    "IdentityError",
    "MacKey",
    "ReplayGuard",
    "Replayed",
    "SignatureError",
    "SignedRequest",
    "box_proof",
    "check_proof",
    "commitment",
    "comparison_code",
    "content_digest",
    "derive_device_key",
    "device_proof",
    "key_from_hex",
    "new_private_key",
    "parse_signature",
    "private_from_hex",
    "private_hex",
    "public_bytes",
    "refusal",
    "sign_request",
    "signature_base",
    "verify_request",
]

KEY_BYTES: Final = 32
# Nonces are 16 random bytes, written as 32 lowercase hex characters.
NONCE_BYTES: Final = 16
LABEL: Final = "chub"
ALG: Final = "hmac-sha256"
COMPONENTS: Final = ('"@method"', '"@path"', '"@query"', '"content-digest"')
_KEY_INFO: Final = b"chub device key v1\x00"
_COMMIT: Final = b"chub commit v1\x00"
_CODE: Final = b"chub code v1\x00"
_HELLO_BOX: Final = b"chub hello v1 box\x00"
_HELLO_DEVICE: Final = b"chub hello v1 device\x00"
_HEX = re.compile(r"[0-9a-f]*")
_KEYID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")  # the device ids discovery allows
# The signature headers are matched as received (bytes, no decoding): only the profile's
# exact form passes, so a value that matches is ASCII and is the signature base's text.
_SIG_INPUT = re.compile(
    rb'chub=(\("@method" "@path" "@query" "content-digest"\)'
    rb';created=(0|[1-9][0-9]{0,11});nonce="([0-9a-f]{32})"'
    rb';keyid="([A-Za-z0-9][A-Za-z0-9._:-]{0,63})";alg="hmac-sha256")'
)
# (``created`` without leading zeros: the value after ``chub=`` is then exactly what
# sign_request writes, and it is the signature base's last line as received.)
_SIGNATURE = re.compile(rb"chub=:([A-Za-z0-9+/]{43}=):")
_DIGEST = re.compile(rb"sha-256=:[A-Za-z0-9+/]{43}=:")
# The longest Signature-Input the profile allows, checked before any regex runs.
_MAX_HEADER: Final = 256


class IdentityError(Exception):
    """Base of the identity errors; the message is for a person (a device developer)."""


class BadKey(IdentityError, ValueError):
    pass


class SignatureError(IdentityError):
    """``reason`` is a short, bounded word for metrics; ``status`` the HTTP answer."""

    def __init__(self, message: str, *, reason: str, status: int = 401) -> None:
        super().__init__(message)
        self.reason, self.status = reason, status


class Replayed(SignatureError):
    pass


class HelloFailed(IdentityError):
    pass


# --- keys ------------------------------------------------------------------------------------


def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


def private_hex(private: X25519PrivateKey) -> str:
    return private.private_bytes_raw().hex()


def private_from_hex(text: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(key_from_hex(text, "private key"))


def key_from_hex(text: object, what: str = "key", size: int = KEY_BYTES) -> bytes:
    """``size`` bytes from ``2 * size`` lowercase hex characters, or :class:`BadKey`."""
    if not isinstance(text, str) or len(text) != 2 * size or _HEX.fullmatch(text) is None:
        raise BadKey(f"{what}: must be {2 * size} lowercase hex characters ({size} bytes)")
    return bytes.fromhex(text)


def derive_device_key(
    private: X25519PrivateKey, peer_public: bytes, *, device_id: str, device_public: bytes, box_public: bytes
) -> bytes:
    """The 32-byte device key, the same on both ends: the device passes its private key and
    the box's public key, the box its private key and the device's public key."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # a wrong size, or a low-order point giving an all-zero secret
        raise BadKey(f"public key refused: {exc}") from None
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=device_public + box_public,
                info=_KEY_INFO + device_id.encode("utf-8"))
    return hkdf.derive(shared)


def commitment(device_public: bytes, device_nonce: bytes) -> bytes:
    """What the device sends before it knows the box's nonce: SHA-256 over a label, its
    public key and its nonce."""
    return hashlib.sha256(_COMMIT + device_public + device_nonce).digest()


def comparison_code(device_public: bytes, box_public: bytes, device_nonce: bytes, box_nonce: bytes) -> str:
    """Six digits both screens show; a person checks they are the same before adopting."""
    digest = hashlib.sha256(_CODE + device_public + box_public + device_nonce + box_nonce).digest()
    return f"{int.from_bytes(digest[:8], 'big') % 1_000_000:06d}"


# --- signed requests ---------------------------------------------------------------------------


def content_digest(body: bytes) -> str:
    """The RFC 9530 ``Content-Digest`` value of ``body``: ``sha-256=:<base64>:``."""
    return f"sha-256=:{base64.b64encode(hashlib.sha256(body).digest()).decode('ascii')}:"


# A GET's (and any empty body's) Content-Digest, made once (as sent: bytes).
_EMPTY_DIGEST: Final = content_digest(b"").encode("ascii")


def _params(created: int, nonce: str, keyid: str) -> str:
    return f'({" ".join(COMPONENTS)});created={created};nonce="{nonce}";keyid="{keyid}";alg="{ALG}"'


def signature_base(method: bytes, path: bytes, query: bytes, digest: bytes, params: bytes) -> bytes:
    """The RFC 9421 signature base: one line per component, then ``@signature-params``.

    Every part as it travels (bytes): ``path`` is the request target's path as sent
    (percent-encoding kept); ``query`` the query string without its ``?`` (empty for none:
    the component is then ``?``); ``digest`` and ``params`` the Content-Digest value and
    the Signature-Input's value after ``chub=``."""
    return b'"@method": %b\n"@path": %b\n"@query": ?%b\n"content-digest": %b\n"@signature-params": %b' % (
        method.upper(), path, query, digest, params)


def sign_request(
    key: bytes, *, device_id: str, method: str, path: str, query: str, body: bytes, created: int, nonce: str
) -> dict[str, str]:
    """The three headers that sign a request: Content-Digest, Signature-Input, Signature."""
    digest = content_digest(body)
    params = _params(created, nonce, device_id)
    base = signature_base(method.encode(), path.encode(), query.encode(), digest.encode(), params.encode())
    mac = hmac.new(key, base, hashlib.sha256).digest()
    return {"Content-Digest": digest, "Signature-Input": f"{LABEL}={params}",
            "Signature": f"{LABEL}=:{base64.b64encode(mac).decode('ascii')}:"}


class SignedRequest(NamedTuple):
    """The signature headers of a request, read but not yet checked, as received (bytes:
    only ASCII passes the profile's patterns). ``params`` is the Signature-Input's value
    after ``chub=``: the exact form :func:`parse_signature` accepts is the one
    :func:`sign_request` writes, so it is the signature base's last line as is.
    (A named tuple: made once per signed request, in half an attrs class's time.)"""

    keyid: str
    created: int
    nonce: bytes
    digest: bytes
    mac: bytes
    params: bytes


# HMAC's pads (RFC 2104 §2), as translation tables (so does the standard library's hmac).
_IPAD: Final = bytes(x ^ 0x36 for x in range(256))
_OPAD: Final = bytes(x ^ 0x5C for x in range(256))
_SHA256_BLOCK: Final = 64


def _plain_sha256() -> Callable[[bytes], Any]:
    """CPython's own SHA-256 (``_sha2`` from 3.12, ``_sha256`` before), else hashlib's.

    A MAC over a request's signature base is a few blocks: what costs is the state copies
    and the final digests, not the compression. OpenSSL 3's (hashlib's) allocate and copy a
    digest context through its provider layer at each copy and each digest; CPython's own
    object copies a small struct. In the running box (its other work between two checks,
    so nothing stays in the CPU's caches) an HMAC cost 3.8-5.1 us with hashlib's and
    2.6-2.8 with CPython's, in the same runs; in a hot loop 1.0 against 1.5."""
    for name in ("_sha2", "_sha256"):
        try:
            return importlib.import_module(name).sha256  # type: ignore[no-any-return]
        except (ImportError, AttributeError):
            continue
    return hashlib.sha256


_SHA256: Final = _plain_sha256()


class MacKey:
    """HMAC-SHA256 (RFC 2104) under one key, with the inner and outer hash states keyed once.

    Each :meth:`digest` then copies two SHA-256 states rather than setting up a MAC: 0.8 us
    for a request's signature base in a hot loop against 2.1 us for ``hmac.new(key, ...)``,
    which with OpenSSL 3 sets up a new MAC context every call (see :func:`_plain_sha256`
    for why the states are CPython's own). The key ring keeps one per trusted device."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > _SHA256_BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_SHA256_BLOCK, b"\0")
        self._inner = _SHA256(key.translate(_IPAD))
        self._outer = _SHA256(key.translate(_OPAD))

    def __repr__(self) -> str:
        return "MacKey(...)"  # never the key

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()  # type: ignore[no-any-return]


_REFUSALS: Final = {
    "input": ('Signature-Input must be chub=("@method" "@path" "@query" "content-digest");'
              'created=<unix seconds>;nonce="<32 hex>";keyid="<device id>";alg="hmac-sha256"', "malformed"),
    "signature": ("Signature must be chub=:<base64 of the 32-byte HMAC-SHA256>:", "malformed"),
    "digest_form": ("Content-Digest must be sha-256=:<base64 of the body's SHA-256>:", "malformed"),
    "digest": ("Content-Digest does not match the body", "digest"),
}


def refusal(code: str, keyid: str = "") -> SignatureError:
    """The error for one way a signed request is refused, by ``code``: ``missing:<header>``,
    ``long:<header>``, ``input``, ``signature``, ``digest_form``, ``digest`` or
    ``bad_signature`` (with the ``keyid``). The one place the texts are written: the native
    check (:mod:`appliance.protocol.sigcheck`) raises these too, so a client or a metric
    cannot tell which check refused it."""
    kind, _, name = code.partition(":")
    if kind == "missing":
        return SignatureError(f"the {name} header is missing (see docs/device-api.md)", reason="unsigned")
    if kind == "long":
        return SignatureError(f"the {name} header is longer than {_MAX_HEADER} characters", reason="malformed")
    if code == "bad_signature":
        return SignatureError(f"the signature is not device {keyid}'s signature of this request",
                              reason="bad_signature")
    message, reason = _REFUSALS[code]
    return SignatureError(message, reason=reason)


def _header(headers: Mapping[str, bytes], name: str) -> bytes:
    value = headers.get(name)
    if value is None:
        raise refusal(f"missing:{name}")
    if len(value) > _MAX_HEADER:
        raise refusal(f"long:{name}")
    return value


def parse_signature(headers: Mapping[str, bytes]) -> SignedRequest:
    """The device signature of a request (``headers``: the values as received, looked up by
    lower-case name), or :class:`SignatureError`. Only the profile's exact form is accepted
    (blanks around a value aside: an HTTP parser drops them anyway)."""
    raw_input = _header(headers, "signature-input")
    match = _SIG_INPUT.fullmatch(raw_input) or _SIG_INPUT.fullmatch(raw_input.strip())
    if match is None:
        raise refusal("input")
    raw_signature = _header(headers, "signature")
    sig = _SIGNATURE.fullmatch(raw_signature) or _SIGNATURE.fullmatch(raw_signature.strip())
    if sig is None:
        raise refusal("signature")
    digest = _header(headers, "content-digest")
    if digest != _EMPTY_DIGEST:  # (a GET's: well formed, no pattern to run)
        digest = digest.strip()
        if _DIGEST.fullmatch(digest) is None:
            raise refusal("digest_form")
    params, created, nonce, keyid = match.groups()
    # (tuple.__new__ as the named tuple's own _make does, without its Python-level __new__:
    # 1.1 us of a signed request's check in the running box.)
    return tuple.__new__(SignedRequest, (keyid.decode("ascii"), int(created), nonce, digest,
                                         binascii.a2b_base64(sig[1]), params))


def verify_request(key: bytes | MacKey, signed: SignedRequest, *, method: bytes, path: bytes, query: bytes,
                   body: bytes) -> None:
    """Raise :class:`SignatureError` unless ``signed`` is the device's HMAC of this request
    (``method``, ``path`` and ``query`` as the request line carried them)."""
    if body:
        if not hmac.compare_digest(signed.digest, content_digest(body).encode("ascii")):
            raise refusal("digest")
    elif signed.digest != _EMPTY_DIGEST:  # (not secret: the body's digest is public)
        raise refusal("digest")
    base = signature_base(method, path, query, signed.digest, signed.params)
    expected = key.digest(base) if isinstance(key, MacKey) else hmac.new(key, base, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, signed.mac):
        raise refusal("bad_signature", signed.keyid)


class ReplayGuard:
    """Refuses a signed request outside ``window_s`` of now or with a nonce already seen.

    One guard per key. A replay is the same signed request again, so the same ``created``
    with the same nonce: nonces are kept in one set per ``created``, and a whole second's
    set is forgotten at once when it leaves the window (no per-nonce bookkeeping: at 4,000
    signed requests/s a heap of (created, nonce) pairs over the window cost 3 us a check,
    these sets 0.6). It remembers at most ``max_nonces`` nonces; when full it forgets the
    oldest ``created`` and refuses anything created at or before it (``floor``), so
    forgetting never lets a replay through: under a flood, old requests are refused, never
    accepted twice. A nonce is remembered only after its signature verified, so strangers
    fill nothing.
    """

    __slots__ = ("_by_created", "_count", "_oldest", "floor", "max_nonces", "window_s")

    def __init__(self, *, window_s: float, max_nonces: int) -> None:
        if window_s <= 0 or max_nonces < 1:
            raise ValueError("window_s must be > 0 and max_nonces >= 1")
        self.window_s, self.max_nonces = window_s, max_nonces
        self.floor: float = float("-inf")
        self._by_created: dict[float, set[str | bytes]] = {}
        self._count = 0
        self._oldest: float = float("inf")  # the smallest key of _by_created (inf: none)

    def __len__(self) -> int:
        return self._count

    def check(self, nonce: str | bytes, created: float, now: float) -> None:
        """Accept (and remember) ``nonce`` or raise :class:`Replayed`. (A request's nonce is
        bytes, a discovery probe's a ``probe:`` string: never equal to each other.)"""
        window = self.window_s
        if self._oldest < now - window:
            self._forget_before(now - window)
        if abs(now - created) > window:
            raise Replayed(f"created={created:.0f} is {now - created:+.0f} s from the box's clock ({now:.0f}); "
                           f"a request must be signed within {window:g} s (set the clock from the Date "
                           "header or the discovery announce)", reason="stale")
        if created <= self.floor:
            raise Replayed("too many requests in the window: this one is older than the oldest nonce the box "
                           "still remembers; sign it again", reason="flood", status=429)
        by_created = self._by_created
        seen = by_created.get(created)
        if seen is not None and nonce in seen:
            raise Replayed("this nonce was used already: a replayed request", reason="replayed")
        if self._count >= self.max_nonces:
            oldest = self._oldest
            self._count -= len(by_created.pop(oldest))
            self._oldest = min(by_created, default=float("inf"))
            self.floor = max(self.floor, oldest)
            if created <= self.floor:
                raise Replayed("too many requests in the window; sign it again", reason="flood", status=429)
            seen = by_created.get(created)
        if seen is None:
            seen = by_created[created] = set()
            self._oldest = min(self._oldest, created)
        seen.add(nonce)
        self._count += 1

    def _forget_before(self, limit: float) -> None:
        # Anything created before now - window is refused by the window check: forget it.
        for created in [c for c in self._by_created if c < limit]:
            self._count -= len(self._by_created.pop(created))
        self._oldest = min(self._by_created, default=float("inf"))


# --- the hello on the device channel -----------------------------------------------------------


def _proof(label: bytes, key: bytes, device_id: str, first: bytes, second: bytes) -> str:
    return hmac.new(key, label + device_id.encode("utf-8") + b"\x00" + first + second, hashlib.sha256).hexdigest()


def box_proof(key: bytes, device_id: str, device_nonce: bytes, box_nonce: bytes) -> str:
    """What the box sends after the device's hello: it holds the key (over the device's
    fresh nonce, so it cannot be replayed to another device connection)."""
    return _proof(_HELLO_BOX, key, device_id, device_nonce, box_nonce)


def device_proof(key: bytes, device_id: str, device_nonce: bytes, box_nonce: bytes) -> str:
    """What the device answers once the box proved itself (over the box's fresh nonce)."""
    return _proof(_HELLO_DEVICE, key, device_id, device_nonce, box_nonce)


def check_proof(expected: str, got: object, who: str) -> None:
    """Raise :class:`HelloFailed` unless ``got`` is ``expected`` (compared in constant time)."""
    if not isinstance(got, str) or not hmac.compare_digest(expected.encode("ascii"), got.encode("utf-8")):
        raise HelloFailed(f"{who} did not prove it holds the device key")
