"""The simulator's generated catalog: every record is a pure function of (seed, index).

Nothing is stored for the generated ("base") records, so a catalog of 100,000 products
costs no memory until a record is changed; the change feed and the snapshot generate them
on demand. The base layout of the feed (``seq`` = position):

    1               store_config "store"
    2 .. 5          the four devices
    6 + 4i .. 9 + 4i  product, price, stock and media of product i (0-based)

so the base feed has ``5 + 4 * products`` changes, all upserts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any, Final

import attrs

__all__ = [
    "COMPACT",
    "DEVICES",
    "ENTITIES",
    "Catalog",
    "Record",
    "canonical_json",
    "catalog_digest",
    "digest_line",
    "media_bytes",
]

ENTITIES: Final = ("product", "price", "stock", "device", "store_config", "media")

# (device_id, kind, name): the devices the platform declares for every simulated store.
DEVICES: Final = (
    ("dev-pos-1", "pos", "Till 1"),
    ("dev-kitchen-1", "kitchen_screen", "Kitchen screen"),
    ("dev-printer-1", "printer", "Receipt printer"),
    ("dev-kiosk-1", "kiosk", "Self-order kiosk"),
)

ROUTING: Final = {
    "pos": ["order.created", "order.updated"],
    "kitchen_screen": ["order.created", "order.updated"],
    "printer": ["order.created", "print"],
    "kiosk": ["display"],
}

_HEAD: Final = 1 + len(DEVICES)  # store_config + devices, before the first product
_PER_PRODUCT: Final = 4

_ADJECTIVES: Final = ("Fresh", "Crusty", "Organic", "Golden", "Spicy", "Smoked", "Sweet", "Roasted",
                      "Classic", "Rustic", "Wild", "Creamy")
_NOUNS: Final = ("Baguette", "Croissant", "Espresso", "Salad", "Tart", "Cheese", "Juice", "Soup",
                 "Sandwich", "Cookie", "Quiche", "Olives")
_CATEGORIES: Final = ("bakery", "drinks", "deli", "grocery", "dairy", "snacks")
_TAX_RATES_BP: Final = (550, 1000, 2000)
# Media sizes: small, so a demo catalog's media cache fills in seconds.
_MEDIA_MIN_BYTES: Final = 256
_MEDIA_SPAN_BYTES: Final = 1792


@attrs.frozen(kw_only=True)
class Record:
    """One live catalog record (a snapshot line)."""

    entity: str
    key: str
    data: dict[str, Any]


# One encoder each: json.dumps with options builds a new encoder on every call.
_CANONICAL: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
COMPACT: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def canonical_json(value: Any) -> str:
    """The one JSON spelling used for digests and content comparison."""
    return _CANONICAL.encode(value)


def catalog_digest(records: Iterable[tuple[str, str, Any]]) -> str:
    """sha256 (hex) over live ``(entity, key, data)`` records, order-independent (sorted here)."""
    h = hashlib.sha256()
    for entity, key, data in sorted(records, key=lambda r: (r[0], r[1])):
        h.update(digest_line(entity, key, data))
    return h.hexdigest()


def digest_line(entity: str, key: str, data: Any) -> bytes:
    return f"{entity}\t{key}\t{canonical_json(data)}\n".encode()


def media_bytes(seed: int, key: str, size: int) -> bytes:
    """The deterministic content of a generated media file."""
    return hashlib.shake_256(f"{seed}:media:{key}".encode()).digest(size)


def _ean13(number: int) -> str:
    body = f"200{number % 10**9:09d}"
    total = sum(map(int, body[0::2])) + 3 * sum(map(int, body[1::2]))
    return body + str((10 - total % 10) % 10)


@attrs.frozen(kw_only=True)
class Catalog:
    """The generated base catalog of one store."""

    seed: int
    products: int
    store_name: str = "Demo store"
    currency: str = "EUR"
    timezone: str = "Europe/Paris"
    media_base_url: str = ""

    @property
    def base_count(self) -> int:
        return _HEAD + _PER_PRODUCT * self.products

    def sku(self, index: int) -> str:
        return f"SKU-{index + 1:06d}"

    def product_index(self, sku: str) -> int | None:
        """The 0-based index of a generated sku, or None for any other key."""
        if len(sku) != 10 or not sku.startswith("SKU-") or not sku[4:].isdigit():
            return None
        index = int(sku[4:]) - 1
        return index if 0 <= index < self.products else None

    def media_key(self, index: int) -> str:
        return f"products/{self.sku(index)}.jpg"

    def is_base(self, entity: str, key: str) -> bool:
        if entity == "store_config":
            return key == "store"
        if entity == "device":
            return any(d[0] == key for d in DEVICES)
        if entity == "media":
            return (key.startswith("products/") and key.endswith(".jpg")
                    and self.product_index(key[len("products/"):-len(".jpg")]) is not None)
        if entity in ("product", "price", "stock"):
            return self.product_index(key) is not None
        return False

    def _draw(self, index: int) -> bytes:
        return hashlib.blake2b(f"{self.seed}:{index}".encode(), digest_size=16).digest()

    def media_size(self, index: int) -> int:
        return _MEDIA_MIN_BYTES + int.from_bytes(self._draw(index)[8:10], "big") % _MEDIA_SPAN_BYTES

    def record(self, seq: int) -> Record:
        """The base record at feed position ``seq`` (1 .. base_count)."""
        if not 1 <= seq <= self.base_count:
            raise IndexError(seq)
        if seq == 1:
            return Record(entity="store_config", key="store", data={
                "name": self.store_name, "currency": self.currency, "timezone": self.timezone,
                "routing": {kind: list(cmds) for kind, cmds in ROUTING.items()}})
        if seq <= _HEAD:
            device_id, kind, name = DEVICES[seq - 2]
            return Record(entity="device", key=device_id, data={"device_id": device_id, "kind": kind, "name": name})
        index, part = divmod(seq - _HEAD - 1, _PER_PRODUCT)
        return self._product_part(index, part)

    def record_for(self, entity: str, key: str) -> Record | None:
        """The base record of ``(entity, key)``, or None when it is not generated."""
        if not self.is_base(entity, key):
            return None
        if entity == "store_config":
            return self.record(1)
        if entity == "device":
            return self.record(2 + [d[0] for d in DEVICES].index(key))
        sku = key[len("products/"):-len(".jpg")] if entity == "media" else key
        index = self.product_index(sku)
        assert index is not None  # is_base checked it
        part = ("product", "price", "stock", "media").index(entity)
        return self._product_part(index, part)

    def _product_part(self, index: int, part: int) -> Record:
        sku = self.sku(index)
        draw = self._draw(index)
        if part == 0:
            name = f"{_ADJECTIVES[draw[0] % len(_ADJECTIVES)]} {_NOUNS[draw[1] % len(_NOUNS)]} {index + 1}"
            return Record(entity="product", key=sku, data={
                "sku": sku, "name": name, "category": _CATEGORIES[draw[2] % len(_CATEGORIES)],
                "tax_rate_bp": _TAX_RATES_BP[draw[3] % len(_TAX_RATES_BP)], "barcode": _ean13(index + 1),
                "image": self.media_key(index), "active": True})
        if part == 1:
            amount = 50 + int.from_bytes(draw[4:6], "big") % 4950
            return Record(entity="price", key=sku, data={"sku": sku, "amount_cents": amount,
                                                         "currency": self.currency})
        if part == 2:
            return Record(entity="stock", key=sku, data={"sku": sku, "qty": draw[6] % 200})
        key = self.media_key(index)
        size = self.media_size(index)
        digest = hashlib.sha256(media_bytes(self.seed, key, size)).hexdigest()
        return Record(entity="media", key=key, data={
            "key": key, "url": self.media_base_url + key, "sha256": digest, "size": size,
            "content_type": "image/jpeg"})
