"""Who owns the box, against the real ``appliance run`` process and the cloud simulator:
an unpaired box pairs with a valid code and no token; the pairing answer's admin credential
replaces the generated one; a paired box refuses pairing without it, also after a restart."""

from __future__ import annotations

from pathlib import Path

from appliance.storage.owner import GENERATED_FILE, OWNER_FILE
from tests.realbox import box_config, real_box
from tests.sync_helpers import StartSim, free_port

pytest_plugins = ["tests.sync_fixtures"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_day_one_ownership_in_the_real_process(start_sim: StartSim, tmp_path: Path) -> None:
    sim = await start_sim()
    port = free_port()
    config = box_config(tmp_path, sim.url, sim.ca_path, port)
    state, log = tmp_path / "state", tmp_path / "box.log"
    async with real_box(config, port, log) as box:
        generated = (state / GENERATED_FILE).read_text().strip()
        # Unpaired: the homepage offers the code alone, and a code with no token pairs the box.
        home = (await box.get("/")).text
        assert "not paired" in home and "The code comes from your back office" in home
        wrong = await box.post("/api/pairing", json={"code": "PAIR-9999"})
        assert wrong.status_code == 400 and "no store has this pairing code" in wrong.json()["error"]
        paired = await box.post("/api/pairing", json={"code": sim.pair_code})
        assert paired.status_code == 200, paired.text
        assert paired.json()["pairing"]["store_id"] == sim.store_id
        # The back office shows the box's admin credential; the box now answers to it alone.
        (box_id, owner), = sim.state.admin_tokens.items()
        assert owner != generated and (state / OWNER_FILE).stat().st_mode & 0o777 == 0o600
        assert owner not in log.read_text()  # never logged
        for token in (None, generated, "guess-guess-guess"):
            refused = await box.post("/api/pairing", json={"code": sim.pair_code},
                                     headers=bearer(token) if token else {})
            assert refused.status_code == 401, (token, refused.text)
        refused_form = await box.post("/pairing", data={"code": sim.pair_code, "token": generated})
        assert refused_form.status_code == 401 and "already paired" in refused_form.text
        again = await box.post("/api/pairing", json={"code": sim.pair_code}, headers=bearer(owner))
        assert again.status_code == 200
        renewed = sim.state.admin_tokens[box_id]
        assert renewed != owner  # pairing again hands out a new credential; the old one is gone
        assert (await box.post("/api/pairing", json={"code": sim.pair_code},
                               headers=bearer(owner))).status_code == 401
    # After a restart the box is still owned: a stranger's code-only pairing is refused.
    async with real_box(config, port, log) as box:
        stranger = await box.post("/api/pairing", json={"code": sim.pair_code})
        assert stranger.status_code == 401
        assert (await box.post("/api/pairing", json={"code": sim.pair_code},
                               headers=bearer(renewed))).status_code == 200
