"""The streaming multipart/form-data reader (appliance/protocol/multipart.py): any body
parses to events or raises its error, any chunking gives the same content, a body cut
short is an error, and the bounds hold."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.protocol.multipart import (
    MAX_HEADER_BYTES,
    MAX_PARTS,
    NEED_DATA,
    Done,
    MultipartError,
    MultipartReader,
    PartData,
    PartEnd,
    PartStart,
    boundary_of,
)

BOUNDARY = b"----formdata-7f3a"


def encode(parts: list[tuple[str, str | None, bytes]], boundary: bytes = BOUNDARY) -> bytes:
    out = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        ctype = b"Content-Type: application/octet-stream\r\n" if filename is not None else b""
        out += b"--" + boundary + b"\r\nContent-Disposition: " + disposition.encode() + b"\r\n" + ctype + b"\r\n"
        out += content + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


def read(body: bytes, cuts: list[int] | None = None, boundary: bytes = BOUNDARY) \
        -> list[tuple[str, str | None, bytes]]:
    """The parts of ``body`` fed in pieces cut at ``cuts``, checking the event order."""
    reader = MultipartReader(boundary)
    pieces, last = [], 0
    for cut in sorted(set(cuts or [])):
        pieces.append(body[last:cut])
        last = cut
    pieces.append(body[last:])
    parts: list[tuple[str, str | None, bytes]] = []
    current: tuple[str, str | None, bytearray] | None = None
    done = False
    for piece in [*[p for p in pieces if p], b""]:
        reader.receive_data(piece)
        while (event := reader.next_event()) is not NEED_DATA:
            assert not done, "nothing after Done"
            if isinstance(event, PartStart):
                assert current is None
                current = (event.name, event.filename, bytearray())
            elif isinstance(event, PartData):
                assert current is not None and event.data
                current[2].extend(event.data)
            elif isinstance(event, PartEnd):
                assert current is not None
                parts.append((current[0], current[1], bytes(current[2])))
                current = None
            else:
                assert isinstance(event, Done) and current is None
                done = True
    assert done
    return parts


def test_a_browser_form_reads_as_its_fields_and_file() -> None:
    body = encode([("token", None, b"s3cret"), ("when", None, b"now"),
                   ("bundle", "appliance-0.9.0.raucb", bytes(range(256)) * 40)])
    assert read(body) == [("token", None, b"s3cret"), ("when", None, b"now"),
                          ("bundle", "appliance-0.9.0.raucb", bytes(range(256)) * 40)]


def test_the_boundary_of_a_content_type() -> None:
    assert boundary_of('multipart/form-data; boundary="----x y"') == b"----x y"
    assert boundary_of("Multipart/Form-Data;boundary=abc") == b"abc"
    for bad in ("application/x-www-form-urlencoded", "multipart/form-data", "multipart/form-data; boundary=",
                "multipart/form-data; boundary=" + "a" * 71):
        with pytest.raises(MultipartError):
            boundary_of(bad)


parts_strategy = st.lists(st.tuples(st.text(st.characters(codec="ascii", exclude_characters='"\r\n\\'), min_size=1,
                                            max_size=8),
                                    st.none() | st.text(st.characters(codec="ascii", exclude_characters='"\r\n\\'),
                                                        max_size=8),
                                    st.binary(max_size=300)), max_size=4)


@given(parts=parts_strategy, cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
def test_any_chunking_gives_the_same_parts(parts: list[tuple[str, str | None, bytes]], cuts: list[int]) -> None:
    body = encode(parts)
    if any(b"\r\n--" + BOUNDARY in b"\r\n" + content + b"\r\n" for _, _, content in parts):
        return  # a sender picks a boundary its content does not hold
    assert read(body, [c for c in cuts if c < len(body)]) == parts


@given(body=st.binary(max_size=600), cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=6))
def test_any_body_parses_or_raises_our_error(body: bytes, cuts: list[int]) -> None:
    with contextlib.suppress(MultipartError):
        read(body, cuts)


@given(cut=st.integers(min_value=0))
def test_a_body_cut_short_is_an_error(cut: int) -> None:
    body = encode([("token", None, b"t"), ("bundle", "b.raucb", b"x" * 5000)])
    with pytest.raises(MultipartError, match=r"cut short|boundary"):
        read(body[:cut % (len(body) - 3)])


def test_the_bounds() -> None:
    long_header = b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data; name=\"" + b"a" * MAX_HEADER_BYTES
    with pytest.raises(MultipartError, match="headers are longer"):
        read(long_header + b'"\r\n\r\nx\r\n--' + BOUNDARY + b"--")
    with pytest.raises(MultipartError, match=f"more than {MAX_PARTS} parts"):
        read(encode([("f", None, b"")] * (MAX_PARTS + 1)))
    with pytest.raises(MultipartError, match="no boundary"):
        read(b"x" * 5000)
    with pytest.raises(MultipartError, match="Content-Disposition"):
        read(b"--" + BOUNDARY + b"\r\nContent-Type: text/plain\r\n\r\nx\r\n--" + BOUNDARY + b"--")


def test_content_is_handed_on_as_it_comes_not_held() -> None:
    reader = MultipartReader(BOUNDARY)
    reader.receive_data(b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="f"; filename="x"\r\n\r\n')
    assert isinstance(reader.next_event(), PartStart)
    for _ in range(100):
        reader.receive_data(b"z" * 65536)
        event = reader.next_event()
        assert isinstance(event, PartData) and len(event.data) >= 65536 - len(BOUNDARY) - 4
        assert reader.next_event() is NEED_DATA
