"""The image's systemd units: `systemd-analyze verify` accepts them, and the service's
exposure (`systemd-analyze security --offline=true`) stays at 2.0 or lower.

The units are verified in a root directory laid out like the image: the units and
first-boot scripts from image/files, the host's own systemd units (for the targets they
name) and, at /usr/local/bin/appliance, the real console script of this checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FILES = REPO / "image" / "files"
UNITS = sorted([*(FILES / "etc/systemd/system").glob("*.service"), *(FILES / "etc/systemd/system").glob("*.path")])
TIMERS = sorted((FILES / "etc/systemd/system").glob("*.timer"))
ANALYZE = shutil.which("systemd-analyze")
HOST_UNITS = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                   if (p / "sysinit.target").exists()), None)

pytestmark = pytest.mark.skipif(ANALYZE is None or HOST_UNITS is None,
                                reason="systemd-analyze is missing (scripts/setup --test installs systemd)")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A root directory holding the units as the image does."""
    assert HOST_UNITS is not None
    (tmp_path / "usr/lib/systemd").mkdir(parents=True)
    (tmp_path / "usr/lib/systemd/system").symlink_to(HOST_UNITS)
    shutil.copytree(FILES / "etc/systemd", tmp_path / "etc/systemd")
    shutil.copytree(FILES / "usr/local/lib/appliance", tmp_path / "usr/local/lib/appliance")
    script = Path(sys.executable).parent / "appliance"
    assert script.is_file(), "the appliance console script is not installed in this environment"
    (tmp_path / "usr/local/bin").mkdir(parents=True)
    shutil.copy2(script, tmp_path / "usr/local/bin/appliance")
    systemctl = shutil.which("systemctl")
    if systemctl is not None:  # the firewall's DHCP watcher restarts a unit with it
        (tmp_path / "usr/bin").mkdir(parents=True)
        shutil.copy2(systemctl, tmp_path / "usr/bin/systemctl")  # a symlink would point outside --root
    return tmp_path


def verify(root: Path, *units: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, "verify", f"--root={root}", *map(str, units)], capture_output=True,
                          text=True, check=False, timeout=60, env={**os.environ, "SYSTEMD_PAGER": "cat"})


def test_units_exist() -> None:
    assert {u.name for u in UNITS} == {"appliance.service", "appliance-firstboot.service",
                                       "appliance-firewall.service", "appliance-firewall-dhcp.path",
                                       "appliance-firewall-dhcp.service", "appliance-setup.service",
                                       "appliance-settings.path", "appliance-settings.service",
                                       # firmware updates (docs/updates.md): root reboots when the
                                       # appliance asks; a trial that never proved healthy is ended
                                       "appliance-reboot.path", "appliance-reboot.service",
                                       "appliance-trial-watch.service",
                                       # a technician's bundle without a shell: the boot
                                       # partition's at boot, a USB stick's (udev starts it)
                                       "appliance-boot-bundle.service", "appliance-usb-bundle@.service"}


def test_systemd_analyze_verify_accepts_the_units(root: Path) -> None:
    units = [root / "etc/systemd/system" / u.name for u in [*UNITS, *TIMERS]]
    assert TIMERS, "the trial watch's timer is verified too"
    proc = verify(root, *units)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Only our units count: the host's own may carry absolute symlinks that --root cannot follow.
    ours = [line for line in proc.stderr.splitlines()
            if "appliance" in line and "Failed to resolve symlink" not in line]
    assert ours == [], proc.stderr


def test_verify_can_fail(root: Path) -> None:
    # The same check refuses a unit whose program is missing and a misspelt option.
    (root / "usr/local/bin/appliance").unlink()
    proc = verify(root, root / "etc/systemd/system/appliance.service")
    assert proc.returncode != 0
    assert "/usr/local/bin/appliance is not executable" in proc.stderr
    bad = root / "etc/systemd/system/appliance-firewall.service"
    bad.write_text(bad.read_text().replace("[Service]", "[Service]\nProtectSystm=strict"))
    proc = verify(root, bad)
    assert "Unknown key 'ProtectSystm' in section [Service]" in proc.stderr


def test_the_service_is_hardened(root: Path) -> None:
    unit = (FILES / "etc/systemd/system/appliance.service").read_text()
    for line in ("Type=notify", "ExecStart=/usr/local/bin/appliance run", "User=appliance", "Restart=on-failure",
                 "AmbientCapabilities=CAP_NET_BIND_SERVICE", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
                 "ProtectSystem=strict", "ReadWritePaths=/var/lib/appliance", "StateDirectory=appliance",
                 "NoNewPrivileges=yes", "PrivateTmp=yes", "PrivateDevices=yes", "ProtectHome=yes",
                 "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK", "SystemCallFilter=@system-service",
                 "MemoryDenyWriteExecute=yes", "LockPersonality=yes", "RestrictRealtime=yes",
                 "RestrictNamespaces=yes"):
        assert line in unit.splitlines(), line
    assert re.search(r"^WatchdogSec=\d+s$", unit, re.M)


def test_security_exposure_is_2_or_lower(root: Path) -> None:
    assert ANALYZE is not None
    proc = subprocess.run([ANALYZE, "security", "--offline=true", f"--root={root}", "--no-pager",
                           "appliance.service"], capture_output=True, text=True, check=False, timeout=60)
    m = re.search(r"Overall exposure level for appliance\.service: (\d+\.\d)", proc.stdout)
    assert m, proc.stdout[-2000:] + proc.stderr
    print(f"systemd-analyze security: exposure {m.group(1)}")
    assert float(m.group(1)) <= 2.0, proc.stdout
