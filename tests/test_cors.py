"""CORS on the store API, events and media listeners: a configured origin's preflight,
Private Network Access included, is answered; any other origin's is refused."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from appliance.config import Config, ConfigError, parse_config
from appliance.services.assembly import CORS_ROLES
from tests.conftest import running_box, test_config_data

POS = "https://pos.example.com"


def preflight(origin: str, **extra: str) -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, last-event-id", **extra}


async def test_preflights_from_the_configured_origin_only(make_config: Callable[..., Config]) -> None:
    async with running_box(make_config(cors={"allowed_origins": [POS]})) as runtime, \
            httpx.AsyncClient(timeout=10) as client:
        for role in CORS_ROLES:
            url = f"http://127.0.0.1:{runtime.ports[role]}/v1/anything"
            answer = await client.options(url, headers=preflight(POS, **{
                "Access-Control-Request-Private-Network": "true"}))
            assert answer.status_code == 204, (role, answer.text)
            assert answer.headers["access-control-allow-origin"] == POS
            assert answer.headers["access-control-allow-private-network"] == "true"
            assert "GET" in answer.headers["access-control-allow-methods"]
            assert answer.headers["access-control-allow-headers"] == "authorization, last-event-id"
            assert "access-control-allow-credentials" not in answer.headers
            # Without the Private Network Access request header, no such answer either.
            plain = await client.options(url, headers=preflight(POS))
            assert plain.status_code == 204 and "access-control-allow-private-network" not in plain.headers
            for other in ("https://evil.example", "http://pos.example.com", "null"):
                refused = await client.options(url, headers=preflight(other, **{
                    "Access-Control-Request-Private-Network": "true"}))
                assert refused.status_code == 403, (role, other)
                assert not any(h.startswith("access-control-") for h in refused.headers), refused.headers
                assert "[cors] allowed_origins" in refused.json()["error"]
            # The real request then carries the origin back; another origin's does not.
            health = f"http://127.0.0.1:{runtime.ports[role]}/healthz"
            ok = await client.get(health, headers={"Origin": POS})
            assert ok.headers["access-control-allow-origin"] == POS and "Origin" in ok.headers["vary"]
            other = await client.get(health, headers={"Origin": "https://evil.example"})
            assert "access-control-allow-origin" not in other.headers


async def test_a_preflight_asking_for_an_unknown_header_is_refused(make_config: Callable[..., Config]) -> None:
    async with running_box(make_config(cors={"allowed_origins": [POS]})) as runtime, \
            httpx.AsyncClient(timeout=10) as client:
        answer = await client.options(f"http://127.0.0.1:{runtime.ports['api']}/v1/sales", headers={
            "Origin": POS, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-secret"})
        assert answer.status_code == 403 and "x-secret" in answer.json()["error"]


async def test_the_admin_port_answers_no_preflight(make_config: Callable[..., Config]) -> None:
    async with running_box(make_config(cors={"allowed_origins": [POS]})) as runtime, \
            httpx.AsyncClient(timeout=10) as client:
        answer = await client.options(f"http://127.0.0.1:{runtime.ports['admin']}/", headers=preflight(POS))
        assert "access-control-allow-origin" not in answer.headers


@pytest.mark.parametrize("origin", ["https://pos.example.com/", "pos.example.com", "https://a.example/app", "*"])
def test_an_origin_that_is_not_one_is_refused_with_its_path(tmp_path: object, origin: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({**test_config_data(tmp_path), "cors": {"allowed_origins": [origin]}})  # type: ignore[arg-type]
    assert "cors.allowed_origins" in str(caught.value)


async def test_a_catalog_read_or_a_command_from_a_browser_carries_the_cors_headers(
        make_config: Callable[..., Config]) -> None:
    # The front handlers' short way around the framework leaves a browser's requests to it.
    config = make_config(cors={"allowed_origins": [POS]})
    async with running_box(config) as runtime, httpx.AsyncClient(timeout=10) as client:
        url = f"http://127.0.0.1:{runtime.ports['api']}/v1/products/SKU-1"
        auth = {"Authorization": f"Bearer {config.admin.token}"}
        browser = await client.get(url, headers={**auth, "Origin": POS})
        till = await client.get(url, headers=auth)
        assert browser.status_code == till.status_code != 401
        assert browser.headers["access-control-allow-origin"] == POS and "Origin" in browser.headers["vary"]
        assert "access-control-allow-origin" not in till.headers
        assert browser.json() == till.json()
        url = f"http://127.0.0.1:{runtime.ports['api']}/v1/devices/nobody/commands"
        command = {"kind": "print", "body": {}}
        browser = await client.post(url, headers={**auth, "Origin": POS}, json=command)
        till = await client.post(url, headers=auth, json=command)
        assert browser.status_code == till.status_code == 404
        assert browser.headers["access-control-allow-origin"] == POS
        assert "access-control-allow-origin" not in till.headers and browser.json() == till.json()
