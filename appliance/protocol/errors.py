"""Path-named errors for data structured by cattrs (the config file, the store API's bodies).

A person fixing a config file or a device developer fixing a request wants every problem
at once, each with the path of the value (``lan.ports.api: expected int, got str``,
``lines[0].qty: must not be 0``). cattrs raises a tree of exception groups; :func:`flatten`
turns it into those lines. Validators raise :class:`FieldError` so the message names the
field, not just the class that holds it.
"""

from __future__ import annotations

from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

__all__ = ["FieldError", "NestedErrors", "flatten"]


class FieldError(ValueError):
    """A validator's complaint about one field, so the message can name its full path."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


class NestedErrors(ValueError):
    """Lines already flattened by a nested structure hook (each relative to its path)."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        super().__init__("; ".join(lines))


def flatten(exc: BaseException, path: str = "", *, noun: str = "key", top: str = "(top level)") -> list[str]:
    """cattrs' error tree as ``path: message`` lines. ``noun`` names a mapping's entries
    ("key" in a file, "field" in a request); ``top`` names the whole document."""
    if isinstance(exc, ClassValidationError | IterableValidationError):
        out: list[str] = []
        noted, bare = exc.group_exceptions()
        for sub, note in noted:
            # An attribute note has .name (attrs classes); an iterable note has .index.
            name = getattr(note, "name", None)
            sub_path = f"{path}.{name}" if name is not None else f"{path}[{getattr(note, 'index', '?')}]"
            out.extend(flatten(sub, sub_path, noun=noun, top=top))
        for sub in bare:
            out.extend(flatten(sub, path, noun=noun, top=top))
        return out
    where = path.lstrip(".")
    if isinstance(exc, NestedErrors):
        return [f"{where}{line}" for line in exc.lines]
    if isinstance(exc, FieldError):
        where = f"{where}.{exc.field}" if where else exc.field
    if isinstance(exc, ForbiddenExtraKeysError):
        message = f"unknown {noun}(s) {', '.join(sorted(exc.extra_fields))}"
    elif isinstance(exc, KeyError):
        message = f"required {noun} is missing"
    elif isinstance(exc, TypeError | ValueError):
        message = str(exc)
    else:
        message = f"{type(exc).__name__}: {exc}"
    return [f"{where or top}: {message}"]
