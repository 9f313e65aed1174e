"""French and English: every message of the code has both, with the same placeholders;
the homepage speaks the language the browser asks for."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from babel.messages.extract import extract_from_dir

from appliance.services.i18n import LANGUAGES, catalog, gettext_for, negotiate
from appliance.services.runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]


def code_messages() -> set[str]:
    found = extract_from_dir(str(ROOT / "appliance"), method_map=[("**.py", "python")], keywords={"_": None})
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
