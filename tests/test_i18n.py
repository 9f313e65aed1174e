"""French and English: every message of the code has both, with the same placeholders;
the homepage speaks the language the browser asks for. The health checks' messages and
fixes are words of the catalogs (no check is written in plain English), shown in French
on the homepage, by ``/health`` to a person's tool and by ``appliance health``."""

from __future__ import annotations

import ast
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from babel.messages.extract import extract_from_dir

from appliance.health.system import _collect
from appliance.protocol.health import Check, Status
from appliance.protocol.text import Text
from appliance.services.i18n import LANGUAGES, catalog, gettext_for, negotiate
from appliance.services.runtime import Runtime
from tests.test_health import fake_tree

ROOT = Path(__file__).resolve().parents[1]


def code_messages() -> set[str]:
    # ``_("...")`` for the pages' own words, ``Text("...", ...)`` for the health checks' words.
    found = extract_from_dir(str(ROOT / "appliance"), method_map=[("**.py", "python")],
                             keywords={"_": None, "Text": None})
    return {message for _file, _line, message, _comments, _context in found}


def placeholders(text: str) -> set[str]:
    return set(re.findall(r"\{(\w+)\}", text))


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_message_has_both_languages(language: str) -> None:
    messages = code_messages()
    assert len(messages) > 20  # the extraction found the homepage's messages
    translated = {m.id: m.string for m in catalog(language) if m.id}
    assert sorted(messages - translated.keys()) == [], f"missing from the {language} catalog"
    assert sorted(translated.keys() - messages) == [], f"in the {language} catalog, no longer in the code"
    for message in messages:
        assert translated[message], f"{language}: {message!r} has no translation"
        assert placeholders(str(translated[message])) == placeholders(message), message


def test_the_language_is_the_browsers_first_choice_we_speak() -> None:
    assert negotiate("fr-FR,fr;q=0.9,en;q=0.8") == "fr"
    assert negotiate("en-GB,fr;q=0.5") == "en"
    assert negotiate("de-DE,de;q=0.9,fr;q=0.7,en;q=0.5") == "fr"
    assert negotiate("de") == "en" and negotiate(None) == "en" and negotiate("") == "en"
    assert negotiate("fr;q=0, en;q=0.1") == "en"  # q=0: not acceptable
    assert negotiate("fr;q=abc,,;;=,en") == "en"  # nonsense is ignored, never raised
    assert gettext_for("fr")("Ports") == "Ports" and gettext_for("fr")("sell") == "vendre"


async def test_homepage_in_french_and_in_english(appliance: Runtime) -> None:
    url = f"http://127.0.0.1:{appliance.ports['admin']}/"
    async with httpx.AsyncClient(timeout=30) as client:
        fr = await client.get(url, headers={"Accept-Language": "fr-FR,fr;q=0.9,en;q=0.8"})
        en = await client.get(url, headers={"Accept-Language": "en-US,en;q=0.9"})
    assert "<html lang=fr>" in fr.text and fr.headers["content-language"] == "fr"
    assert "La boutique peut vendre" in fr.text and "Ce qui ne va pas, et comment y remédier" in fr.text
    assert "<html lang=en>" in en.text and "The shop can sell" in en.text
    assert "vary" in fr.headers and "accept-language" in fr.headers["vary"].lower()


def test_appliance_health_speaks_admin_language(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: the box is "down"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[lan]\nbind = "127.0.0.1"\n[lan.ports]\nops = {port}\n[storage]\ndir = "{tmp_path}"\n'
                   '[admin]\nlanguage = "fr"\n')
    result = subprocess.run([sys.executable, "-m", "appliance", "health", "--config", str(cfg)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    first_line, second_line = result.stdout.splitlines()[:2]
    assert first_line.startswith("La boutique ne peut pas vendre."), result.stdout
    assert second_line.startswith("D'abord :"), result.stdout
    # The checks made on the spot (the box does not answer; the machine's own), in French too.
    assert f"appliance.process: le boîtier ne répond pas sur http://127.0.0.1:{port}/health" in result.stdout
    assert "solution : démarrez-le (scripts/run --no-demo" in result.stdout or \
        "solution : `systemctl status appliance`" in result.stdout, result.stdout
    assert "santé : échec (" in result.stdout


# --- the health checks' words: French everywhere a person reads them ----------------------


def is_words(value: object) -> bool:
    """A Text (or the WAN preflight's own, which has to stand alone: same two fields)."""
    return isinstance(value, Text) or (isinstance(value, str) and isinstance(getattr(value, "template", None), str))


def untranslated(value: Any, language: str = "fr") -> list[str]:
    """The templates in ``value`` (a Text and the Texts inside it) that ``language`` lacks;
    a plain str (a path, an address, an exception's words) is not a message."""
    if not is_words(value):
        return []
    missing = [] if not re.sub(r"\{\w+\}|[\s;:,.()]", "", value.template) else [value.template]
    missing = [t for t in missing if not {m.id: m.string for m in catalog(language)}.get(t)]
    return missing + [t for arg in value.args.values() for t in untranslated(arg, language)]


def check_words(checks: list[Check]) -> list[tuple[str, str]]:
    """(check, problem) for every message or fix that is not translatable words."""
    out = []
    for c in checks:
        for field, value in (("message", c.message), ("fix", c.fix)):
            if value and not is_words(value):
                out.append((c.name, f"{field} is plain English: {value!r}"))
            out += [(c.name, f"{field} template not in the fr catalog: {t!r}") for t in untranslated(value)]
    return out


def _english_literals(node: ast.expr) -> list[ast.expr]:
    """Literal English given as a check's message or fix (a Text call or a variable is fine)."""
    if isinstance(node, ast.IfExp):
        return _english_literals(node.body) + _english_literals(node.orelse)
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value:
        return [node]
    if isinstance(node, ast.JoinedStr | ast.BinOp):
        return [node]
    return []


def test_no_check_is_written_in_plain_english() -> None:
    # Every Check(...) in the code: its message and fix go through Text (extracted into the
    # catalogs above), never an English literal, an f-string or a concatenation.
    found = []
    for path in sorted((ROOT / "appliance").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Check":
                for keyword in node.keywords:
                    if keyword.arg in ("message", "fix"):
                        found += [f"{path.relative_to(ROOT)}:{bad.lineno} {keyword.arg}"
                                  for bad in _english_literals(keyword.value)]
    assert found == []


def test_the_machine_checks_are_french_in_every_state(tmp_path: Path) -> None:
    states = [fake_tree(tmp_path / "hot", temp_milli=90_000, throttled="0x50005", ext4_errors=3, synced=False),
              fake_tree(tmp_path / "warm", temp_milli=78_000, throttled="0x50000"),
              fake_tree(tmp_path / "fine", temp_milli=45_000, throttled="0x0", ext4_errors=0)]
    checks = [c for paths in states for c in _collect(tmp_path, paths, time.time())]
    checks += _collect(tmp_path, states[0], 0.0)  # a clock in 1970
    assert {c.status for c in checks} == {Status.OK, Status.WARN, Status.FAIL}
    assert check_words(checks) == []
    french = {c.name + c.status: c.in_language(gettext_for("fr")) for c in checks}
    assert french["system.temperaturefail"].message == "90 °C : le processeur se bride"
    assert french["system.powerfail"].message == ("sous-tension en ce moment; bridé en ce moment; "
                                                  "sous-tension survenue depuis le démarrage; "
                                                  "bridage survenu depuis le démarrage")
    assert french["system.clockfail"].fix.startswith("laissez passer NTP (UDP 123) dans le pare-feu")


async def test_every_check_of_a_running_box_is_french_on_the_homepage_and_in_health(appliance: Runtime) -> None:
    checks = await appliance.health.run_all()
    assert len(checks) > 10 and check_words(checks) == []
    async with httpx.AsyncClient(timeout=30) as client:
        page = await client.get(f"http://127.0.0.1:{appliance.ports['admin']}/",
                                headers={"Accept-Language": "fr-FR,fr;q=0.9"})
        fr = await client.get(f"http://127.0.0.1:{appliance.ports['ops']}/health", headers={"Accept-Language": "fr"})
        en = await client.get(f"http://127.0.0.1:{appliance.ports['ops']}/health")
    # The test box is not paired: its problem and fix, in French, in full on the homepage.
    assert "le boîtier n&#x27;est appairé à aucun magasin" in page.text
    assert "saisissez le code d&#x27;appairage du back-office sur cette page d&#x27;accueil" in page.text
    problems = re.search(r"<section id=problems.*?</section>", page.text, re.S)
    assert problems is not None and "the box is not paired" not in problems.group()
    by_name_fr = {c["name"]: c for c in fr.json()["checks"]}
    by_name_en = {c["name"]: c for c in en.json()["checks"]}
    assert by_name_fr["cloud.pairing"]["message"] == "le boîtier n'est appairé à aucun magasin"
    assert by_name_en["cloud.pairing"]["message"] == "the box is not paired with a store"  # machines: English
    for name, check in by_name_fr.items():
        if check["message"] != by_name_en[name]["message"]:
            continue
        # Same words in both: only values that are no language (numbers, units, addresses).
        assert not re.search(r"\b(the|is|not|and|of|with|to)\b", check["message"]), check
