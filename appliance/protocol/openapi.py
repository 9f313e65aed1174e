"""An OpenAPI 3.1 document from the operations of one listener and their bodies, sans-I/O.

Each route declares an :class:`Operation` (what it is for, its parameters, its request
body, its answers, who may call it) beside its handler; :func:`document` puts them
together with the JSON Schema of every body they name
(:func:`appliance.protocol.bodies.schema_components`), so the document is made from the
same definitions that validate and encode the bodies. The store API serves its document
at ``GET /v1/openapi.json`` (docs/store-api.md); the admin listener's JSON routes at
``GET /api/openapi.json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal

import attrs

from appliance.protocol.bodies import REF_PREFIX, schema_components

__all__ = ["OPENAPI_VERSION", "Operation", "Param", "Reply", "document", "markdown", "openapi_path"]

OPENAPI_VERSION: Final = "3.1.0"
_CONVERTER: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[a-z]+)?\}")


@attrs.frozen(kw_only=True)
class Param:
    """A path, query or header parameter; ``schema`` is JSON Schema."""

    name: str
    where: Literal["path", "query", "header"]
    description: str
    schema: Mapping[str, Any] = attrs.field(factory=lambda: {"type": "string"})
    required: bool = False


@attrs.frozen(kw_only=True)
class Reply:
    """One answer: its status, what it means, and its body (a Body class, a tuple of them
    for one of several, or None)."""

    status: int
    description: str
    body: Any = None
    media_type: str = "application/json"


@attrs.frozen(kw_only=True)
class Operation:
    """One route and method, as a client sees it. ``security``: the schemes any one of
    which is enough (none: open)."""

    summary: str
    replies: tuple[Reply, ...]
    description: str = ""
    params: tuple[Param, ...] = ()
    body: Any = None
    body_required: bool = True
    # A body of bytes (a file) instead of JSON: its media type ("application/octet-stream").
    raw_body: str = ""
    security: tuple[str, ...] = ()
    security_optional: bool = False  # also open (a box never paired takes a pairing code from anyone)
    tag: str = ""


def openapi_path(route_path: str) -> str:
    """A Starlette path (``/v1/products/{sku:path}``) as OpenAPI writes it (``{sku}``)."""
    return _CONVERTER.sub(r"{\1}", route_path)


def _ref(kind: Any) -> dict[str, Any]:
    if isinstance(kind, tuple):  # one of several bodies
        return {"anyOf": [_ref(k) for k in kind]}
    return {"$ref": f"{REF_PREFIX}{kind.__name__}"}


def _kinds(kind: Any) -> tuple[Any, ...]:
    return () if kind is None else kind if isinstance(kind, tuple) else (kind,)


def _operation(op: Operation, method: str, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {"summary": op.summary, "operationId": f"{method}_{path}".replace("/", "_")
                           .replace("{", "").replace("}", "").replace("-", "_").strip("_")}
    if op.description:
        out["description"] = op.description
    if op.tag:
        out["tags"] = [op.tag]
    if op.params:
        out["parameters"] = [
            {"name": p.name, "in": p.where, "description": p.description,
             "required": p.required or p.where == "path", "schema": dict(p.schema)}
            for p in op.params]
    if op.body is not None:
        out["requestBody"] = {"required": op.body_required, "content": {"application/json": {"schema": _ref(op.body)}}}
    elif op.raw_body:
        out["requestBody"] = {"required": op.body_required,
                              "content": {op.raw_body: {"schema": {"type": "string", "format": "binary"}}}}
    responses: dict[str, Any] = {}
    for reply in op.replies:
        answer: dict[str, Any] = {"description": reply.description}
        if reply.body is not None:
            answer["content"] = {reply.media_type: {"schema": _ref(reply.body)}}
        responses[str(reply.status)] = answer
    out["responses"] = responses
    out["security"] = [{scheme: []} for scheme in op.security] + ([{}] if op.security_optional or not op.security
                                                                  else [])
    return out


def document(
    *, title: str, version: str, description: str, operations: Iterable[tuple[str, str, Operation]],
    security_schemes: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``operations`` (``(method, starlette path, operation)``)."""
    paths: dict[str, dict[str, Any]] = {}
    kinds: list[Any] = []
    for method, route_path, op in operations:
        path = openapi_path(route_path)
        paths.setdefault(path, {})[method.lower()] = _operation(op, method.lower(), path)
        for body in (op.body, *(r.body for r in op.replies)):
            kinds.extend(k for k in _kinds(body) if k not in kinds)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version, "description": description},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": dict(sorted(schema_components(kinds).items())),
                       "securitySchemes": {name: dict(s) for name, s in security_schemes.items()}},
    }


# --- the document as Markdown (docs/store-api.md) --------------------------------------------

_KEYWORDS: Final = (("minLength", "at least {} characters"), ("maxLength", "at most {} characters"),
                    ("minimum", "≥ {}"), ("maximum", "≤ {}"), ("minItems", "at least {} items"),
                    ("maxItems", "at most {} items"), ("pattern", "matches `{}`"), ("default", "default `{}`"))


def _type_of(schema: Mapping[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].removeprefix(REF_PREFIX)
        return f"[{name}](#{name.lower()})"
    if "anyOf" in schema:
        return " or ".join(_type_of(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " \\| ".join(f"`{json_text(v)}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{json_text(schema['const'])}`"
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list of {_type_of(schema.get('items', {}))}"
    return str(kind)


def json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _rules(schema: Mapping[str, Any]) -> str:
    words = [template.format(json_text(schema[key]) if key == "default" else schema[key])
             for key, template in _KEYWORDS if key in schema]
    if schema.get("not") == {"const": 0}:
        words.append("not 0")
    if "description" in schema:
        words.append(str(schema["description"]))
    return "; ".join(words).replace("|", "\\|")


def markdown(doc: Mapping[str, Any]) -> str:
    """The reference part of the API's page: every operation, then every body."""
    out = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            schemes = [f"`{k}`" for s in op["security"] for k in s]
            anyone = {} in op["security"]
            who = " or ".join(schemes + (["anyone, in the cases described"] if anyone and schemes else [])) \
                or "anyone"
            out.append(f"### `{method.upper()} {path}`\n\n{op['summary']}. Who: {who}.\n")
            if "description" in op:
                out.append(f"{op['description']}\n")
            for p in op.get("parameters", ()):
                rules = _rules(p["schema"])
                out.append(f"- {p['in']} `{p['name']}` ({_type_of(p['schema'])}{', required' if p['required'] else ''})"
                           f": {p['description']}{'; ' + rules if rules else ''}")
            if "requestBody" in op:
                media, content = next(iter(op["requestBody"]["content"].items()))
                kind = _type_of(content["schema"]) if media == "application/json" else f"the file's bytes (`{media}`)"
                out.append(f"- body: {kind}")
            for status, reply in op["responses"].items():
                content = reply.get("content", {}).get("application/json")
                named = content is not None and content["schema"].get("type") != "object"
                body = f" {_type_of(content['schema'])}" if content is not None and named else ""
                out.append(f"- **{status}**{body}: {reply['description']}")
            out.append("")
    out.append("## Bodies\n")
    for name, schema in doc["components"]["schemas"].items():
        out.append(f"### {name}\n")
        if "description" in schema:
            out.append(f"{schema['description']}\n")
        if "properties" not in schema:
            continue
        out.append("| field | type | required | rules |\n|---|---|---|---|")
        required = set(schema.get("required", ()))
        for field, prop in schema["properties"].items():
            out.append(f"| `{field}` | {_type_of(prop)} | {'yes' if field in required else 'no'} | {_rules(prop)} |")
        if schema.get("additionalProperties") is False:
            out.append("\nNo other field is accepted.")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
