"""Read a ``table inet appliance`` listing back and compare two rulesets in words (sans-I/O).

:func:`parse` reads the layout ``nft list table inet appliance`` prints (and that
:func:`appliance.protocol.firewall.render` writes) into a
:class:`~appliance.protocol.firewall.Ruleset`. :func:`compare` lists, one sentence each,
how a loaded ruleset differs from the rendered one; an empty list means they match.

Rules are matched by their comment (every rendered rule has a unique one), their text is
compared after normalising what nft rewrites when it lists a table: whitespace, counter
values, the order of elements in anonymous sets, handles.

Errors: :class:`RulesetParseError` (a subclass of ``FirewallError``).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

from appliance.protocol.firewall import TABLE, Chain, FirewallError, Rule, Ruleset

__all__ = ["MAX_LINE_CHARS", "MAX_RULESET_CHARS", "RulesetParseError", "compare", "counter_values", "normalise",
           "parse"]

# A listing of this table is a few kilobytes; anything far larger is not one.
MAX_RULESET_CHARS: Final = 1_000_000
MAX_LINE_CHARS: Final = 10_000

_COMMENT = re.compile(r'\s+comment\s+"((?:[^"\\]|\\.)*)"\s*$')
_COUNTS = re.compile(r"\s+packets \d+ bytes \d+")
# nft 1.1 (trixie) lists a limit's default burst, nft 1.0 (bookworm) leaves it out.
_DEFAULT_BURST = re.compile(r"(limit rate \S+)\s+burst 5 packets")
_HANDLE = re.compile(r"\s+#\s*handle\s+\d+\s*$")
_ANON_SET = re.compile(r"\{([^{}]*)\}")
_HEADER = re.compile(r"type\s+(\w+)\s+hook\s+(\w+)\s+priority\s+([\w+-]+)\s*;\s*(?:policy\s+(\w+)\s*;)?")


class RulesetParseError(FirewallError):
    """The text is not a ``table inet appliance`` in the layout ``nft list`` prints."""


def normalise(text: str) -> str:
    """A rule's text with nft's listing variations removed, so equal rules compare equal."""
    text = _DEFAULT_BURST.sub(r"\1", _COUNTS.sub("", " ".join(text.split())))

    def sort_set(m: re.Match[str]) -> str:
        items = sorted(i.strip() for i in m.group(1).split(",") if i.strip())
        return "{ " + ", ".join(items) + " }"

    return _ANON_SET.sub(sort_set, text)


def _element(item: str) -> str:
    try:
        net = ipaddress.ip_network(item, strict=False)
    except ValueError:
        return item
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def _lines(text: str) -> list[str]:
    if len(text) > MAX_RULESET_CHARS:
        raise RulesetParseError(f"the ruleset is {len(text)} characters, more than {MAX_RULESET_CHARS}")
    out = []
    for number, raw in enumerate(text.splitlines(), 1):
        if len(raw) > MAX_LINE_CHARS:
            raise RulesetParseError(f"line {number} is longer than {MAX_LINE_CHARS} characters")
        out.append(_HANDLE.sub("", raw).strip())
    return out


def parse(text: str) -> Ruleset:
    """The ``table inet appliance`` found in ``text``; raises :class:`RulesetParseError`."""
    lines = _lines(text)
    start = next((i for i, line in enumerate(lines) if line == f"table inet {TABLE} {{"), None)
    if start is None:
        raise RulesetParseError(f"no 'table inet {TABLE} {{' in the text")
    counters: list[str] = []
    sets: dict[str, tuple[str, tuple[str, ...]]] = {}
    dynamic_sets: dict[str, str] = {}
    chains: list[Chain] = []
    extras: list[str] = []
    i = start + 1
    while True:
        if i >= len(lines):
            raise RulesetParseError(f"table inet {TABLE} is not closed by '}}'")
        line = lines[i]
        if line == "}":
            break
        if not line or line.startswith("#"):
            i += 1
            continue
        m = re.fullmatch(r"(\w+)\s+([\w.-]+)\s*\{", line)
        if m is None:
            extras.append(line)  # a table property, e.g. 'flags dormant'
            i += 1
            continue
        kind, name = m.groups()
        body, i = _block(lines, i + 1, f"{kind} {name}")
        if kind == "counter":
            counters.append(name)
        elif kind == "set" and "flags dynamic" in body:
            dynamic_sets[name] = _set(body, name)[0]  # its elements are the connections of the moment
        elif kind == "set":
            sets[name] = _set(body, name)
        elif kind == "chain":
            chains.append(_chain(body, name))
        else:
            extras.append(f"{kind} {name}")
    return Ruleset(counters=tuple(counters), sets=sets, chains=tuple(chains), extras=tuple(extras),
                   dynamic_sets=dynamic_sets)


def _block(lines: list[str], i: int, what: str) -> tuple[list[str], int]:
    """The lines of a block up to its closing brace (joining wrapped set elements)."""
    body: list[str] = []
    while i < len(lines):
        line = lines[i]
        i += 1
        if line == "}":
            return body, i
        if body and body[-1].count("{") > body[-1].count("}"):
            body[-1] = f"{body[-1]} {line}"  # a wrapped 'elements = { ... }'
        elif line and not line.startswith("#"):
            body.append(line)
    raise RulesetParseError(f"{what} is not closed by '}}'")


def _set(body: list[str], name: str) -> tuple[str, tuple[str, ...]]:
    type_ = ""
    elements: tuple[str, ...] = ()
    for line in body:
        if line.startswith("type "):
            type_ = line.split(None, 1)[1].strip()
        elif line.startswith("elements"):
            m = re.fullmatch(r"elements\s*=\s*\{(.*)\}", line)
            if m is None:
                raise RulesetParseError(f"set {name}: cannot read its elements: {line!r}")
            elements = tuple(sorted(_element(e.strip()) for e in m.group(1).split(",") if e.strip()))
    return type_, elements


def _chain(body: list[str], name: str) -> Chain:
    hook, policy = "", ""
    rules: list[Rule] = []
    for line in body:
        m = _HEADER.fullmatch(line)
        if m is not None and not rules and not hook:
            hook = f"type {m.group(1)} hook {m.group(2)} priority {m.group(3)}"
            policy = m.group(4) or "accept"  # nft's default policy
            continue
        c = _COMMENT.search(line)
        comment = c.group(1) if c else ""
        rules.append(Rule(text=line[: c.start()] if c else line, comment=comment))
    return Chain(name=name, hook=hook, policy=policy, rules=tuple(rules))


_COUNTER_BLOCK = re.compile(r"counter\s+([\w.-]+)\s*\{[^{}]*?packets\s+(\d+)\s+bytes\s+(\d+)[^{}]*\}")


def counter_values(text: str) -> dict[str, tuple[int, int]]:
    """Named counters of a listing: name -> (packets, bytes). Missing values are left out."""
    if len(text) > MAX_RULESET_CHARS:
        raise RulesetParseError(f"the ruleset is {len(text)} characters, more than {MAX_RULESET_CHARS}")
    return {m.group(1): (int(m.group(2)), int(m.group(3))) for m in _COUNTER_BLOCK.finditer(text)}


def compare(expected: Ruleset, loaded: Ruleset) -> list[str]:
    """How ``loaded`` differs from ``expected``, one sentence per difference."""
    out: list[str] = []
    for name in expected.counters:
        if name not in loaded.counters:
            out.append(f"counter {name} is missing")
    out.extend(f"unexpected counter {n}" for n in loaded.counters if n not in expected.counters)
    for name, (type_, elements) in expected.sets.items():
        if name not in loaded.sets:
            out.append(f"set {name} is missing (it should hold {', '.join(elements)})")
            continue
        l_type, l_elements = loaded.sets[name]
        if l_type != type_:
            out.append(f"set {name} holds {l_type or 'nothing typed'}, expected {type_}")
        want, have = set(elements), set(l_elements)
        if want - have:
            out.append(f"set {name} lacks {', '.join(sorted(want - have))}")
        if have - want:
            out.append(f"set {name} also holds {', '.join(sorted(have - want))}")
    out.extend(f"unexpected set {n}" for n in loaded.sets if n not in expected.sets)
    for name, type_ in expected.dynamic_sets.items():
        if name not in loaded.dynamic_sets:
            out.append(f"set {name} is missing (it counts connections per address)")
        elif loaded.dynamic_sets[name] != type_:
            out.append(f"set {name} holds {loaded.dynamic_sets[name] or 'nothing typed'}, expected {type_}")
    out.extend(f"unexpected set {n}" for n in loaded.dynamic_sets if n not in expected.dynamic_sets)
    for chain in expected.chains:
        other = loaded.chain(chain.name)
        if other is None:
            out.append(f"chain {chain.name} is missing: nothing filters {chain.name} traffic")
            continue
        out.extend(_compare_chain(chain, other))
    known = {c.name for c in expected.chains}
    out.extend(f"unexpected chain {c.name}" for c in loaded.chains if c.name not in known)
    out.extend(f"unexpected in the table: {e}" for e in loaded.extras)
    return out


def _compare_chain(want: Chain, have: Chain) -> list[str]:
    where = f"chain {want.name}"
    out: list[str] = []
    if have.hook != want.hook:
        out.append(f"{where} is attached as '{have.hook or 'no hook'}', expected '{want.hook}'")
    if have.policy != want.policy:
        out.append(f"{where} has policy {have.policy}, expected {want.policy}")
    loaded_by_name = {r.comment: r for r in have.rules if r.comment}
    for rule in want.rules:
        got = loaded_by_name.get(rule.comment)
        if got is None:
            out.append(f"{where}: rule '{rule.comment}' is missing ({rule.text})")
        elif normalise(got.text) != normalise(rule.text):
            out.append(f"{where}: rule '{rule.comment}' is '{got.text}', expected '{rule.text}'")
    wanted = {r.comment for r in want.rules}
    for rule in have.rules:
        if rule.comment not in wanted:
            label = f" (comment '{rule.comment}')" if rule.comment else ""
            out.append(f"{where}: unexpected rule '{rule.text}'{label}")
    order_want = [r.comment for r in want.rules if r.comment in loaded_by_name]
    order_have = [r.comment for r in have.rules if r.comment in wanted]
    if order_have != order_want:
        first = next((w for w, h in zip(order_want, order_have, strict=False) if w != h), order_have[-1])
        out.append(f"{where}: rules are in another order (rule '{first}' is out of place)")
    return out
