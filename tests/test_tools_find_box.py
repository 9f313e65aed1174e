"""The tools find the running box by themselves: `appliance health` and `appliance ports`,
run as a normal user with no options, talk to a box that `scripts/run --no-demo` started
as that user, wherever its listeners are bound (here: ports chosen by the kernel)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534
DEBIAN_PYTHON = Path("/usr/bin/python3")

CONFIG = """\
[lan]
bind = "127.0.0.1"
[lan.ports]
admin = 0
api = 0
events = 0
media = 0
provisioning = 0
ops = 0
support = 0
discovery = 0
[discovery]
enabled = false
[orders]
enabled = false
[cloud]
api_url = "https://127.0.0.1:9"
"""


def _checkout_for_nobody(base: Path) -> Path:
    """A checkout a normal user can run: this one's scripts and code, with a virtualenv on
    Debian's python3 (this checkout's may sit on a root-only interpreter) that sees this
    checkout's installed packages."""
    checkout = base / "checkout"
    checkout.mkdir()
    for name in ("scripts", "pyproject.toml", "appliance", "tests"):
        (checkout / name).symlink_to(ROOT / name)
    venv = checkout / ".venv"
    subprocess.run([str(DEBIAN_PYTHON), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    [site_dir] = list((venv / "lib").glob("python3*/site-packages"))
    (site_dir / "checkout.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n{ROOT}\n")
    appliance = venv / "bin" / "appliance"
    appliance.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom appliance.cli import main\nsys.exit(main())\n")
    appliance.chmod(0o755)
    (venv / ".installed-demo").touch()  # scripts/setup: nothing to install
    return checkout


@pytest.fixture
def normal_user(tmp_path: Path) -> Iterator[tuple[list[str], Path, dict[str, str]]]:
    """(command prefix, checkout, environment) to run things as a normal user with a fresh home."""
    if os.geteuid() != 0:
        home = tmp_path / "home"
        home.mkdir()
        yield [], ROOT, _env(home)
        return
    if shutil.which("setpriv") is None or not DEBIAN_PYTHON.exists():
        pytest.skip("running as root, and setpriv or Debian's python3 is missing to play a normal user")
    base = Path(tempfile.mkdtemp(prefix="appliance-user-"))  # outside root's 0700 pytest folder
    try:
        base.chmod(0o755)
        checkout = _checkout_for_nobody(base)
        home = base / "home"
        home.mkdir()
        os.chown(home, NOBODY, NOBODY)
        prefix = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
        yield prefix, checkout, _env(home)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "APPLIANCE_", "RUNTIME_DIRECTORY"))}
    return {**env, "HOME": str(home), "PYTHONUNBUFFERED": "1", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}


def test_health_and_ports_find_a_box_started_by_scripts_run_as_that_user(
        normal_user: tuple[list[str], Path, dict[str, str]]) -> None:
    prefix, checkout, env = normal_user
    home = Path(env["HOME"])
    config = home / "appliance.toml"
    config.write_text(CONFIG)
    config.chmod(0o644)
    published = home / ".local" / "state" / "appliance-run" / "box.json"
    out = home.parent / "run.out"
    with out.open("w") as stdout:
        proc = subprocess.Popen([*prefix, str(checkout / "scripts" / "run"), "--no-demo", "--config", str(config)],
                                cwd=home, env=env, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not published.exists():  # another process's file: nothing to wait on but the file
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, f"the box did not publish its ports in 60 s:\n{out.read_text()}"
            time.sleep(0.2)
        box = json.loads(published.read_text())
        assert box["ports"]["admin"] not in (0, 80, 10080)  # the kernel chose it: only the file can tell

        def tool(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*prefix, str(checkout / ".venv" / "bin" / "appliance"), *args], cwd=home,
                                  env=env, capture_output=True, text=True, timeout=60, check=False)

        ports = tool("ports", "--json")
        assert ports.returncode == 0, ports.stderr
        by_role = {row["role"]: row["port"] for row in json.loads(ports.stdout)}
        assert by_role == box["ports"]
        assert httpx.get(f"http://127.0.0.1:{by_role['admin']}/healthz", timeout=10).status_code == 200
        health = tool("health", "--json")
        report = json.loads(health.stdout)
        names = {c["name"] for c in report["checks"]}
        assert "appliance.process" not in names, report  # it reached the box
        assert health.returncode == {"ok": 0, "warn": 1, "fail": 2}[report["status"]]
        assert "lan.listener.admin" in names, names
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 0, out.read_text()
    assert not published.exists()  # withdrawn at a clean stop
