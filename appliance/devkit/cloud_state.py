"""The simulated platform's state: pairing, tokens, the change feed, received events.

Pure and synchronous: the app (:mod:`appliance.devkit.cloud_app`) moves bytes and passes
``now``; tests in the same trio loop may call these methods directly (one thread, so no
locks). Every refusal is an :class:`~appliance.devkit.cloud_wire.CloudApiError`.

The feed is the generated base catalog (seq 1 .. base_count, generated on demand) followed
by the mutations; it keeps the last ``retention`` changes, and a cursor older than that gets
410. The live catalog is the base records with ``_overrides`` (changed or deleted records)
applied; a snapshot freezes a copy of the overrides, so it is consistent with its cursor even
while the catalog changes under a slow reader.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator
from typing import Any, Final

import attrs

from appliance.devkit.cloud_catalog import (
    ENTITIES,
    Catalog,
    Record,
    canonical_json,
    catalog_digest,
    digest_line,
    media_bytes,
)
from appliance.devkit.cloud_faults import FaultPlan
from appliance.devkit.cloud_logs import LogIntake
from appliance.devkit.cloud_wire import (
    CloudApiError,
    Event,
    FeedChange,
    PairRequest,
    is_id,
    loads_strict,
    parse_events,
)
from appliance.services.timestamps import rfc3339

__all__ = ["BlobSource", "CloudState", "QueueService", "SimConfig", "Token", "catalog_digest", "summarize"]

# Bounds on what the simulator remembers; a demo day is far below them.
MAX_IDEMPOTENCY_KEYS: Final = 100_000
MAX_STORED_EVENTS: Final = 1_000_000
MAX_HEARTBEATS: Final = 10_000
MAX_SUPPORT_REPLIES: Final = 10_000
MAX_BUNDLES: Final = 20
MAX_BLOBS: Final = 1_000
# Large media are generated in blocks of this size (each a pure function of seed, key, index).
LARGE_BLOCK: Final = 1024 * 1024
# Blob requests remembered for tests (key, Range header).
MAX_BLOB_REQUESTS: Final = 100_000
_DELETED: Final = None


def _derived(seed: int, label: str, size: int = 32) -> bytes:
    return hashlib.blake2b(f"{seed}:{label}".encode(), digest_size=size).digest()


@attrs.frozen(kw_only=True)
class QueueService:
    """A Service Bus queue the store has; ``{appliance_id}`` in ``queue`` is filled at pairing."""

    namespace: str
    queue: str
    sas_key_name: str
    sas_key: str

    def as_json(self, appliance_id: str) -> dict[str, str]:
        return {"namespace": self.namespace, "queue": self.queue.replace("{appliance_id}", appliance_id),
                "sas_key_name": self.sas_key_name, "sas_key": self.sas_key}


def _orders_default(self: SimConfig) -> QueueService:
    return QueueService(namespace="e-serversync-ns.servicebus.windows.net", queue=f"{self.store_id}-orders",
                        sas_key_name="appliance-listen",
                        sas_key=base64.b64encode(_derived(self.seed, "orders")).decode())


def _support_default(self: SimConfig) -> QueueService:
    return QueueService(namespace="koostodesapp-ns.servicebus.windows.net", queue="appliance-{appliance_id}-support",
                        sas_key_name="appliance-support",
                        sas_key=base64.b64encode(_derived(self.seed, "support")).decode())


def _positive(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attr.name} must be >= 1, got {value}")


@attrs.frozen(kw_only=True)
class SimConfig:
    """What one simulated platform serves. Services set to None are ``null`` at pairing."""

    host: str = "127.0.0.1"
    port: int = 0
    tls_dir: str = ""  # "" = a temporary directory, removed when the simulator stops
    products: int = attrs.field(default=20, validator=attrs.validators.ge(0))
    seed: int = 1
    store_id: str = "store-0001"
    store_name: str = "Demo store"
    pair_code: str = "PAIR-0001"
    retention: int = attrs.field(default=10_000, validator=_positive)
    orders: QueueService | None = attrs.field(default=attrs.Factory(_orders_default, takes_self=True))
    support: QueueService | None = attrs.field(default=attrs.Factory(_support_default, takes_self=True))
    media: bool = True
    media_base_url: str = ""  # "" = the simulator's own /blob/{store}/
    # Large media: this many generated videos (promotions/video-NNN.mp4) of video_bytes
    # each, listed after the base catalog; nothing stored, the bytes are made on demand.
    videos: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    video_bytes: int = attrs.field(default=100 * 1024 * 1024, validator=attrs.validators.ge(0))
    # The log intake pairing hands out: "" = the simulator's own /v1/input; None = no logs service.
    logs_url: str | None = ""


def _large_block(seed: int, key: str, index: int, size: int) -> bytes:
    return hashlib.shake_256(f"{seed}:large:{key}:{index}".encode()).digest(size)


@attrs.frozen(kw_only=True)
class BlobSource:
    """The bytes of one media entry, made on demand."""

    size: int
    sha256: str
    content_type: str
    data: bytes | None = None  # small files: the bytes themselves
    seed: int = 0  # large files: generated block by block from (seed, key)
    key: str = ""

    def chunks(self, start: int, end: int, chunk: int) -> Iterator[bytes]:
        """Bytes ``start..end`` (inclusive) in pieces of at most ``chunk``."""
        pos = start
        while pos <= end:
            if self.data is not None:
                piece = self.data[pos:min(end + 1, pos + chunk)]
            else:
                index, offset = divmod(pos, LARGE_BLOCK)
                block = _large_block(self.seed, self.key, index, min(LARGE_BLOCK, self.size - index * LARGE_BLOCK))
                piece = block[offset:offset + min(chunk, end + 1 - pos)]
            if not piece:
                return
            yield piece
            pos += len(piece)


@attrs.frozen(kw_only=True)
class Token:
    value: str
    store_id: str
    appliance_id: str
    revoked: bool = False


@attrs.frozen(kw_only=True)
class _Answer:
    body_hash: str
    body: dict[str, Any]


@attrs.frozen(kw_only=True)
class StoredEvent:
    event: dict[str, Any]
    canonical: str
    received_at: str
    idempotency_key: str


class CloudState:
    """One store's platform. ``url`` is the simulator's base URL (for media URLs)."""

    def __init__(self, config: SimConfig, *, url: str) -> None:
        self.config = config
        self.url = url
        media_base = config.media_base_url or f"{url}/blob/{config.store_id}/"
        self.catalog = Catalog(seed=config.seed, products=config.products, store_name=config.store_name,
                               media_base_url=media_base)
        self.store_id = config.store_id
        self.store_secret = _derived(config.seed, f"{config.store_id}:secret").hex()
        self.faults = FaultPlan()
        self._pair_bound: dict[str, str] = {}  # code -> appliance_id
        # The back office's view: each paired appliance's admin credential, shown to the
        # store's owner (GET /_sim/backoffice). A new one at every pairing.
        self.admin_tokens: dict[str, str] = {}
        self._tokens: dict[str, Token] = {}
        self._overrides: dict[tuple[str, str], dict[str, Any] | None] = {}
        self._log: deque[FeedChange] = deque(maxlen=config.retention)
        self._mutations = 0
        self._blobs: dict[str, bytes] = {}
        self._large: dict[str, str] = {}  # key -> sha256 of a generated large file
        self.blob_bytes_sent: dict[str, int] = {}  # body bytes really sent, per key
        self.blob_requests: deque[tuple[str, str]] = deque(maxlen=MAX_BLOB_REQUESTS)  # (key, Range)
        self._idempotency: OrderedDict[str, _Answer] = OrderedDict()
        self.events: dict[str, StoredEvent] = {}  # by id, in arrival order
        self.idempotency_keys_seen: list[str] = []
        # How many batches (each under its own Idempotency-Key) carried each event id: more
        # than one is a re-send the platform deduplicated (after a crash, a lost answer).
        self.deliveries: Counter[str] = Counter()
        self.heartbeats: deque[dict[str, Any]] = deque(maxlen=MAX_HEARTBEATS)
        self.support: dict[str, dict[str, Any]] = {}
        self.snapshot_streams = 0  # snapshot responses being sent now (the app counts them)
        for index in range(config.videos):
            self.put_large_media(f"promotions/video-{index + 1:03d}.mp4", config.video_bytes, "video/mp4")
        self.logs = LogIntake(_derived(config.seed, "logs", 16).hex())
        self.bundles: dict[str, dict[str, Any]] = {}  # support bundles by request id ("data": the bytes)
        # Firmware: bundles served under blob/<store>/firmware/, and the one offered to every
        # box in the heartbeat's answer (None: no update).
        self._firmware: dict[str, bytes] = {}
        self.firmware_offer: dict[str, Any] | None = None

    # -- pairing and tokens --------------------------------------------------------------------

    def pair(self, request: PairRequest) -> dict[str, Any]:
        if request.code != self.config.pair_code:
            raise CloudApiError(404, "pair_code_unknown", "no store has this pairing code (or it expired); check the "
                           "code shown in the back office")
        bound = self._pair_bound.get(request.code)
        if bound is not None and bound != request.appliance_id:
            raise CloudApiError(403, "pair_code_used", "this pairing code was already used by another appliance; "
                           "ask the back office for a new code")
        self._pair_bound[request.code] = request.appliance_id
        for value, token in list(self._tokens.items()):
            if token.appliance_id == request.appliance_id and not token.revoked:
                self._tokens[value] = attrs.evolve(token, revoked=True)
        token = Token(value=secrets.token_urlsafe(32), store_id=self.store_id, appliance_id=request.appliance_id)
        self._tokens[token.value] = token
        admin = secrets.token_urlsafe(18)
        self.admin_tokens[request.appliance_id] = admin
        return {"store_id": self.store_id, "token": token.value, "admin_token": admin,
                "services": self.services(request.appliance_id)}

    def backoffice(self) -> dict[str, Any]:
        """What the store's owner sees in the back office: the pairing code and, for each
        paired appliance, its admin credential."""
        return {"store_id": self.store_id, "pair_code": self.config.pair_code,
                "appliances": {box: {"admin_token": admin} for box, admin in self.admin_tokens.items()}}

    def services(self, appliance_id: str) -> dict[str, Any]:
        cfg = self.config
        return {
            "orders": cfg.orders.as_json(appliance_id) if cfg.orders else None,
            "support": cfg.support.as_json(appliance_id) if cfg.support else None,
            "media": {"base_url": self.catalog.media_base_url} if cfg.media else None,
            "logs": ({"url": cfg.logs_url or f"{self.url}/v1/input", "api_key": self.logs.api_key}
                     if cfg.logs_url is not None else None),
            "store_secret": self.store_secret,
        }

    def authenticate(self, authorization: str | None, *, store_id: str | None = None,
                     appliance_id: str | None = None) -> Token:
        challenge = {"WWW-Authenticate": 'Bearer realm="sync"'}
        if not authorization:
            raise CloudApiError(401, "unauthorized", "missing bearer token; pair the appliance", headers=challenge)
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise CloudApiError(401, "unauthorized", "the Authorization header must be 'Bearer <token>'",
                           headers=challenge)
        token = self._tokens.get(value.strip())
        if token is None:
            raise CloudApiError(401, "unauthorized", "unknown token; pair the appliance again", headers=challenge)
        if token.revoked:
            raise CloudApiError(401, "unauthorized", "this token was revoked; pair the appliance again",
                           headers=challenge)
        if store_id is not None and store_id != token.store_id:
            raise CloudApiError(403, "forbidden", f"this token is for store {token.store_id}, not {store_id}")
        if appliance_id is not None and appliance_id != token.appliance_id:
            raise CloudApiError(403, "forbidden",
                                f"this token is for appliance {token.appliance_id}, not {appliance_id}")
        return token

    def revoke(self, token: str | None = None) -> int:
        """Revoke one token, or every token; returns how many were revoked."""
        count = 0
        for value, info in list(self._tokens.items()):
            if (token is None or value == token) and not info.revoked:
                self._tokens[value] = attrs.evolve(info, revoked=True)
                count += 1
        return count

    # -- the catalog and its feed ----------------------------------------------------------------

    @property
    def head(self) -> int:
        return self.catalog.base_count + self._mutations

    @property
    def cursor(self) -> str:
        return str(self.head)

    @property
    def oldest_cursor(self) -> int:
        return max(0, self.head - self.config.retention)

    def _change(self, seq: int) -> FeedChange:
        if seq <= self.catalog.base_count:
            record = self.catalog.record(seq)
            return FeedChange(seq=seq, entity=record.entity, key=record.key, data=record.data)
        return self._log[seq - (self.head - len(self._log)) - 1]

    def changes(self, cursor: int, limit: int) -> dict[str, Any]:
        if cursor > self.head or cursor < self.oldest_cursor:
            why = "is from the future of this feed" if cursor > self.head else "is older than the feed's retention"
            raise CloudApiError(410, "cursor_expired", f"cursor {cursor} {why}; read the snapshot, then continue from "
                           "its cursor", extra={"oldest_cursor": str(self.oldest_cursor)})
        end = min(self.head, cursor + limit)
        changes = [self._change(seq).as_json() for seq in range(cursor + 1, end + 1)]
        return {"changes": changes, "cursor": str(end), "more": end < self.head}

    def upsert(self, entity: str, key: str, data: dict[str, Any]) -> int:
        return self._append(entity, key, dict(data))

    def delete(self, entity: str, key: str) -> int:
        return self._append(entity, key, _DELETED)

    def _append(self, entity: str, key: str, data: dict[str, Any] | None) -> int:
        if entity not in ENTITIES:
            raise CloudApiError(400, "invalid_body", f"entity: must be one of {', '.join(ENTITIES)}")
        self._mutations += 1
        self._log.append(FeedChange(seq=self.head, entity=entity, key=key, data=data))
        self._overrides[(entity, key)] = data
        return self.head

    def mutate(self, items: list[tuple[str, str, dict[str, Any] | None]]) -> list[int]:
        return [self.upsert(e, k, d) if d is not None else self.delete(e, k) for e, k, d in items]

    def put_media(self, key: str, content: bytes) -> int:
        """Upsert a media entry with these bytes (served at its URL); returns its seq."""
        if len(self._blobs) >= MAX_BLOBS and key not in self._blobs:
            raise CloudApiError(400, "invalid_body", f"at most {MAX_BLOBS} custom media files")
        self._blobs[key] = content
        return self.upsert("media", key, {
            "key": key, "url": self.catalog.media_base_url + key, "sha256": hashlib.sha256(content).hexdigest(),
            "size": len(content), "content_type": "application/octet-stream"})

    def put_large_media(self, key: str, size: int, content_type: str) -> int:
        """Upsert a generated media entry of ``size`` bytes (hashed once here, never stored)."""
        digest = hashlib.sha256()
        for piece in BlobSource(size=size, sha256="", content_type=content_type, seed=self.catalog.seed,
                                key=key).chunks(0, size - 1, LARGE_BLOCK):
            digest.update(piece)
        self._large[key] = digest.hexdigest()
        self._blobs.pop(key, None)
        return self.upsert("media", key, {"key": key, "url": self.catalog.media_base_url + key,
                                          "sha256": self._large[key], "size": size, "content_type": content_type})

    def blob_source(self, key: str) -> BlobSource | None:
        """How to make the bytes of a live media entry (or a firmware bundle), if the
        simulator has them."""
        if key.startswith("firmware/appliance-") and key.endswith(".raucb"):
            content = self._firmware.get(key.removeprefix("firmware/appliance-").removesuffix(".raucb"))
            if content is None:
                return None
            return BlobSource(size=len(content), sha256=hashlib.sha256(content).hexdigest(),
                              content_type="application/octet-stream", data=content)
        record = self.get("media", key)
        if record is None:
            return None
        ctype = str(record.get("content_type", "application/octet-stream"))
        if key in self._large and record.get("sha256") == self._large[key]:
            return BlobSource(size=int(record["size"]), sha256=self._large[key], content_type=ctype,
                              seed=self.catalog.seed, key=key)
        content = self.blob(key)
        if content is None:
            return None
        return BlobSource(size=len(content), sha256=str(record["sha256"]), content_type=ctype, data=content)

    def get(self, entity: str, key: str) -> dict[str, Any] | None:
        """The live record, or None."""
        if (entity, key) in self._overrides:
            return self._overrides[(entity, key)]
        record = self.catalog.record_for(entity, key)
        return record.data if record is not None else None

    def blob(self, key: str) -> bytes | None:
        """The bytes of a live media entry, if the simulator has them."""
        record = self.get("media", key)
        if record is None:
            return None
        if key in self._blobs:
            return self._blobs[key]
        base = self.catalog.record_for("media", key)
        if base is None or base.data != record:
            return None
        return media_bytes(self.catalog.seed, key, int(record["size"]))

    def snapshot(self) -> tuple[str, Iterator[Record]]:
        """``(cursor, records)``: the live catalog as of ``cursor``, generated lazily."""
        frozen = dict(self._overrides)
        return self.cursor, self._records(self.catalog, frozen)

    @staticmethod
    def _records(catalog: Catalog, overrides: dict[tuple[str, str], dict[str, Any] | None]) -> Iterator[Record]:
        for seq in range(1, catalog.base_count + 1):
            record = catalog.record(seq)
            ident = (record.entity, record.key)
            if ident in overrides:
                data = overrides[ident]
                if data is not None:
                    yield Record(entity=record.entity, key=record.key, data=data)
            else:
                yield record
        for (entity, key), data in overrides.items():
            if data is not None and not catalog.is_base(entity, key):
                yield Record(entity=entity, key=key, data=data)

    def summary(self) -> dict[str, Any]:
        """``{cursor, counts, count, digest}`` of the live catalog (see docs/cloud-contract.md)."""
        return summarize(*self.snapshot())

    # -- events, heartbeats, support -------------------------------------------------------------

    def post_events(self, token: Token, key: str | None, raw: bytes, now: float) -> tuple[dict[str, Any], bool]:
        """``(answer, replayed)`` for ``POST .../events``."""
        if not key:
            raise CloudApiError(400, "idempotency_key_missing", "the Idempotency-Key header is required: one key per "
                           "batch, the same key on every retry of that batch")
        if not is_id(key):
            raise CloudApiError(400, "idempotency_key_invalid", "Idempotency-Key: 1 to 128 characters of "
                           "A-Z a-z 0-9 . _ : -")
        try:
            body_hash = hashlib.sha256(canonical_json(loads_strict(raw)).encode()).hexdigest()
        except CloudApiError:
            body_hash = hashlib.sha256(raw).hexdigest()
        scoped = f"{token.store_id}\n{key}"
        previous = self._idempotency.get(scoped)
        if previous is not None:
            if previous.body_hash != body_hash:
                raise CloudApiError(422, "idempotency_key_reused", "this Idempotency-Key was used with another body; "
                               "a new batch needs a new key")
            return previous.body, True
        outcomes = parse_events(raw)
        fresh = [o for o in outcomes if isinstance(o, Event) and o.id not in self.events]
        if len(self.events) + len(fresh) > MAX_STORED_EVENTS:
            raise CloudApiError(503, "unavailable", "the simulator's event store is full",
                                headers={"Retry-After": "60"})
        accepted: list[str] = []
        rejected: list[dict[str, Any]] = []
        received_at = rfc3339(now)
        for outcome in outcomes:
            if not isinstance(outcome, Event):
                rejected.append(outcome.as_json())
                continue
            stored = self.events.get(outcome.id)
            if stored is None:
                self.events[outcome.id] = StoredEvent(event=outcome.as_json(), canonical=outcome.canonical,
                                                      received_at=received_at, idempotency_key=key)
            elif stored.canonical != outcome.canonical:
                rejected.append({"id": outcome.id, "index": outcome.index,
                                 "reason": "id already used with other content"})
                continue
            if outcome.id not in accepted:
                accepted.append(outcome.id)
                self.deliveries[outcome.id] += 1
        answer = {"accepted": accepted, "rejected": rejected}
        self._idempotency[scoped] = _Answer(body_hash=body_hash, body=answer)
        self.idempotency_keys_seen.append(key)
        while len(self._idempotency) > MAX_IDEMPOTENCY_KEYS:
            self._idempotency.popitem(last=False)
        return answer, False

    def heartbeat(self, token: Token, body: dict[str, Any], now: float) -> dict[str, Any]:
        claimed = body.get("appliance_id")
        if claimed is not None and claimed != token.appliance_id:
            raise CloudApiError(400, "invalid_body", f"appliance_id: {claimed!r} is not this token's appliance")
        self.heartbeats.append({"received_at": rfc3339(now), "appliance_id": token.appliance_id, "body": body})
        return {"server_time": rfc3339(now), "firmware": self.firmware_offer}

    def offer_firmware(self, version: str, content: bytes, *, sha256: str = "") -> dict[str, Any]:
        """Serve ``content`` as the bundle of ``version`` and offer it in every heartbeat answer.
        ``sha256``: announce another hash than the bytes' (a test of the box's check)."""
        self._firmware = {version: content}  # only the offer in force is served (bundles are large)
        self.firmware_offer = {
            "version": version, "url": f"{self.catalog.media_base_url}firmware/appliance-{version}.raucb",
            "size": len(content), "sha256": sha256 or hashlib.sha256(content).hexdigest()}
        return self.firmware_offer

    def withdraw_firmware(self) -> None:
        self.firmware_offer = None

    def support_reply(self, token: Token, request_id: str, body: dict[str, Any], now: float) -> dict[str, Any]:
        if request_id not in self.support:
            if len(self.support) >= MAX_SUPPORT_REPLIES:
                raise CloudApiError(503, "unavailable", "the simulator's support store is full",
                               headers={"Retry-After": "60"})
            self.support[request_id] = {"appliance_id": token.appliance_id, "received_at": rfc3339(now),
                                        "body": body}
        return {"received": True}

    def support_bundle(self, token: Token, request_id: str, data: bytes, now: float) -> dict[str, Any]:
        """Keep the first bundle uploaded for ``request_id`` (a retry changes nothing)."""
        if not data.startswith(b"\x1f\x8b"):
            raise CloudApiError(400, "invalid_body", "a bundle is a gzip file (.tar.gz)")
        if request_id not in self.bundles:
            if len(self.bundles) >= MAX_BUNDLES:
                raise CloudApiError(503, "unavailable", "the simulator's bundle store is full",
                               headers={"Retry-After": "60"})
            self.bundles[request_id] = {"appliance_id": token.appliance_id, "received_at": rfc3339(now),
                                        "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "data": data}
        return {"received": True, "size": self.bundles[request_id]["size"]}


def summarize(cursor: str, records: Iterator[Record]) -> dict[str, Any]:
    """The summary of a snapshot; safe in a worker thread (a snapshot shares nothing mutable)."""
    counts = dict.fromkeys(ENTITIES, 0)
    # Keep the encoded lines, not the records: about half the memory for a big catalog.
    rows = []
    for record in records:
        counts[record.entity] += 1
        rows.append((record.entity, record.key, digest_line(record.entity, record.key, record.data)))
    rows.sort()
    h = hashlib.sha256()
    for _, _, line in rows:
        h.update(line)
    return {"cursor": cursor, "counts": counts, "count": len(rows), "digest": h.hexdigest()}
