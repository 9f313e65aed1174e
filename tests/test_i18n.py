"""French and English: every message of the code has both, with the same placeholders;
the homepage speaks the language the browser asks for. The health checks' messages and
fixes are words of the catalogs (no check is written in plain English), shown in French
on the homepage, by ``/health`` to a person's tool and by ``appliance health``."""

from __future__ import annotations

import ast
import html
import re
import time
from collections.abc import Collection
from html.parser import HTMLParser
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
from tests.conftest import ConfigFactory, running_box
from tests.homepage import busy_config, fill
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
    assert french["system.powerfail"].message == ("sous-tension en ce moment ; bridé en ce moment ; "
                                                  "sous-tension survenue depuis le démarrage ; "
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


# --- the whole homepage, every section, in French ---------------------------------------


def test_no_message_is_hidden_inside_an_f_string() -> None:
    # Babel (on Python 3.11) reads an f-string as one token: a _("...") or Text("...") inside
    # its braces would never reach the catalogs, and the page would stay English there.
    found = []
    for path in sorted((ROOT / "appliance").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.JoinedStr):
                found += [f"{path.relative_to(ROOT)}:{call.lineno} {call.args[0].value!r}"
                          for call in ast.walk(node) if isinstance(call, ast.Call)
                          and getattr(call.func, "id", None) in ("_", "Text")
                          and call.args and isinstance(call.args[0], ast.Constant)]
    assert found == []


class _Words(HTMLParser):
    """The words a person reads on a page: text outside scripts and styles, and the
    placeholders, labels and data words the page's script shows."""

    def __init__(self) -> None:
        super().__init__()
        self.words: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._skip += tag in ("script", "style")
        self.words += [v.strip() for k, v in attrs if v and (k in ("placeholder", "aria-label", "title")
                                                           or (k.startswith("data-") and not v.isdigit()))]

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("script", "style")

    def handle_data(self, data: str) -> None:
        if not self._skip and data.strip():
            self.words.append(data.strip())


def page_words(page: str) -> list[str]:
    parser = _Words()
    parser.feed(page)
    return parser.words


def english_left(page: str, names: Collection[str] = ()) -> list[str]:
    """Every English message of the catalogs (one whose French differs) that a French page
    still shows: a whole text, or a long literal stretch of a message with values.
    ``names``: identifiers the page shows as they are (a service's name, "update")."""
    words = [w for w in page_words(page) if w not in names]
    text = "\n".join(words)
    left = []
    for message in catalog("fr"):
        english, french = message.id, message.string
        if not english or not isinstance(english, str) or english == french:
            continue
        if "{" not in english:
            if english in words:
                left.append(english)
            continue
        for stretch in re.split(r"\{\w+\}", english):
            if len(stretch.strip()) >= 14 and stretch.strip() not in str(french) and stretch.strip() in text:
                left.append(english)
    return left


async def test_the_whole_homepage_in_french_has_no_english_left(make_config: ConfigFactory) -> None:
    async with running_box(busy_config(make_config)) as runtime, httpx.AsyncClient(timeout=30) as client:
        await fill(runtime)
        url = f"http://127.0.0.1:{runtime.ports['admin']}/"
        fr = (await client.get(url, headers={"Accept-Language": "fr-FR,fr;q=0.9,en;q=0.5"})).text
        en = (await client.get(url, headers={"Accept-Language": "en"})).text
    # Every section is there, with what makes it say the most.
    sections = {"Devices": "Appareils", "Device links (tcp/": "Liaisons avec les appareils (tcp/",
                "Cloud": "Plateforme", "Online orders": "Commandes en ligne",
                "Remote support": "Assistance à distance", "Media": "Médias", "Firmware": "Micrologiciel",
                "Settings": "Réglages", "Status ticket": "Ticket d'état", "Support": "Support technique",
                "Live events": "Événements en direct", "Services": "Services"}
    for english, french in sections.items():
        assert f"<h2>{english}" in en and f"<h2>{html.escape(french)}" in fr, english
    known = {  # what each section says, in English, and the French the page must show instead
        "Adopt": "Adopter", "Reject": "Refuser", "Dismiss": "Ignorer",
        "pending": "en attente", "waiting to retry": "nouvel essai bientôt",
        "last seen": "dernier contact",
        "pre-shared key (config)": "clé prépartagée (configuration)",
        "Send test command": "Envoyer une commande de test",
        "(adopt only if the device shows the same code)": "(n'adoptez que si l'appareil affiche le même code)",
        "not paired: enter the code from the back office": "non appairé : saisissez le code du back-office",
        "Pairing code": "Code d'appairage", "Switch off": "Couper",
        "downloaded and verified; waiting for the maintenance window":
            "téléchargé et vérifié ; en attente du créneau de maintenance",
        "disk budget": "espace disque alloué", "Print a status ticket": "Imprimer un ticket d'état",
        "Download the diagnostics bundle": "Télécharger le dossier de diagnostic", "Name and language": "Nom et langue",
        "Follow live": "Suivre en direct", "running": "en marche",
    }
    fr_words, en_words = page_words(fr), page_words(en)

    def shows(words: list[str], text: str) -> bool:  # a text of the page, or what a text starts with
        return any(w == text or w.startswith(text + " ") for w in words)

    for english, french in known.items():
        assert shows(en_words, english), f"the English page lacks {english!r}: the section changed; update this list"
        assert not shows(fr_words, english) and shows(fr_words, french), (english, french)
    # Numbers with French digits, durations and sizes in French units, times in words.
    assert "1\u202f200 fichiers sur 1\u202f234, 2,45 Go" in fr and "1,200 of 1,234 files, 2.45 GB" in en
    assert "(ouverture dans 1,5 h)" in fr and "il y a " in fr and "jamais" in fr
    # What the shop cannot do, as a list that says "or" ("ni"), not "and".
    assert "but cannot take online orders right now or reach 3 of its 3 devices." in en
    assert "ne peut pas prendre les commandes en ligne pour le moment ni joindre 3 de ses 3 appareils." in fr
    # The failures the box meets here (nothing listens on the devices' ports nor the
    # platform's) in French too, not in the C library's English.
    assert "Connection refused" not in fr and "all attempts to connect" not in fr
    assert "impossible de joindre 127.0.0.1:" in fr and ": connexion refusée" in fr
    services = [s.name for s in runtime.board.all()]
    assert english_left(fr, services) == []
    assert english_left(en, services) != []  # the check finds English where there is some


async def test_a_homepage_forms_answer_speaks_the_readers_language(make_config: ConfigFactory) -> None:
    async with running_box(make_config()) as runtime, httpx.AsyncClient(timeout=30) as client:
        base = f"http://127.0.0.1:{runtime.ports['admin']}"
        answers = {lang: await client.post(f"{base}/ticket", data={"token": "wrong"},
                                           headers={"Accept-Language": lang}) for lang in ("fr", "en")}
        settings = await client.post(f"{base}/settings/box", data={"token": runtime.admin_token, "name": "x" * 80,
                                                                   "language": "fr"},
                                     headers={"Accept-Language": "fr"})
        refused = await client.post(f"{base}/devices/action", data={"token": runtime.admin_token,
                                                                    "action": "fly:nobody"},
                                    headers={"Accept-Language": "fr"})
        upload = await client.post(f"{base}/firmware/upload", data={"token": "wrong", "when": "window"},
                                   files={"bundle": ("appliance.raucb", b"x" * 100)},
                                   headers={"Accept-Language": "fr"})
    fr, en = answers["fr"], answers["en"]
    assert fr.status_code == en.status_code == 401
    assert "<html lang=fr>" in fr.text and fr.headers["content-language"] == "fr"
    assert "Le jeton d&#x27;administration est absent ou erroné ; rien n&#x27;a été imprimé." in fr.text
    assert "Non imprimé" in fr.text and "Retour à la page d&#x27;accueil" in fr.text
    assert "The admin token is missing or wrong; nothing was printed." in en.text
    assert settings.status_code == 400 and "Rien n&#x27;a été modifié" in settings.text
    assert refused.status_code == 400 and "Action inconnue &#x27;fly&#x27; ; rien n&#x27;a été modifié." in \
        refused.text.replace("fly:nobody", "fly")
    assert upload.status_code == 401 and "Rien n&#x27;a été installé" in upload.text
    assert "Le jeton d&#x27;administration est absent ou erroné ; rien n&#x27;a été téléversé." in upload.text
    for answer in (fr, settings, refused, upload):
        assert english_left(answer.text) == [], answer.text


def test_numbers_durations_and_sizes_are_said_in_the_readers_language() -> None:
    from appliance.protocol.text import Number, say
    from appliance.services.media_health import human_bytes
    from appliance.services.timestamps import duration
    from appliance.services.web.kit import ago

    fr, en = gettext_for("fr"), gettext_for("en")
    assert (Number(1234567), say(Number(1234567), fr)) == ("1,234,567", "1\u202f234\u202f567")
    assert (Number(1.25, 1), say(Number(1.25, 1), fr)) == ("1.2", "1,2")  # half to even, as round()
    assert [say(human_bytes(n), fr) for n in (512, 1500, 2_450_000_000)] == ["512 octets", "1,5 ko", "2,45 Go"]
    assert [human_bytes(n) for n in (512, 1500, 2_450_000_000)] == ["512 bytes", "1.5 kB", "2.45 GB"]
    assert [say(duration(s), fr) for s in (5, 600, 7200 * 2, 86400 * 3)] == ["5 s", "10 min", "4 h", "3 jours"]
    assert say(ago(180), fr) == "il y a 3 min" and say(ago(None), fr) == "jamais"
    assert say(ago(180), en) == ago(180) == "3 min ago"
    assert say(Number(3), lambda s: s) == "3"  # a gettext that is not a catalog's: English digits
    from appliance.services.web.admin import uptime_text

    assert (uptime_text(3 * 86400 + 3600), say(uptime_text(3 * 86400 + 3600), fr)) == ("3 d 01:00:00", "3 j 01:00:00")
    assert say(uptime_text(59), fr) == uptime_text(59) == "00:00:59"


@pytest.mark.parametrize("language", LANGUAGES)
def test_appliance_ports_speaks_admin_language(tmp_path: Path, language: str) -> None:
    import subprocess
    import sys

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\ndir = "{tmp_path}"\n[admin]\nlanguage = "{language}"\n')
    result = subprocess.run([sys.executable, "-m", "appliance", "ports", "--config", str(cfg)],
                            capture_output=True, text=True, timeout=60, check=True)
    lines = result.stdout.splitlines()
    if language == "fr":
        assert lines[0] == "ports de la configuration :" and lines[1].split() == ["port", "sens", "rôle", "service"]
        assert "entrant" in result.stdout and "sortant" in result.stdout and "entrant et sortant" in result.stdout
        assert "canal des appareils : le boîtier envoie les commandes à chaque appareil" in result.stdout
    else:
        assert lines[0] == "ports of the configuration:" and lines[1].split() == ["port", "dir", "role", "service"]
        assert "device channel: the box pushes commands to each device" in result.stdout
    json_rows = subprocess.run([sys.executable, "-m", "appliance", "ports", "--json", "--config", str(cfg)],
                               capture_output=True, text=True, timeout=60, check=True).stdout
    assert '"description": "device channel: the box pushes commands to each device"' in json_rows  # machines
