"""The image's bootloader backend for RAUC (image/files/usr/local/lib/appliance/bootchooser,
docs/updates.md): a committed slot and a one-time trial, on GRUB's environment (amd64) and
the Raspberry Pi's autoboot.txt.

The real script, run the way RAUC runs it, on files in a temporary directory (its paths
moved by environment variables); GRUB's environment through the real ``grub-editenv``.
What GRUB and the Pi's firmware then do with these files needs a boot: ``scripts/test-image``
boots GRUB under qemu; the Pi's tryboot needs a board.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "image/files/usr/local/lib/appliance/bootchooser"
GRUB_EDITENV = shutil.which("grub-editenv")


class Board:
    def __init__(self, tmp: Path) -> None:
        self.fat = tmp / "fat"
        self.fat.mkdir()
        self.cmdline = tmp / "cmdline"
        self.flag = tmp / "tryboot"
        self.boot("A")

    def boot(self, slot: str) -> None:
        self.cmdline.write_text(f"console=ttyS0 root=PARTUUID=7a6b0001-02 rauc.slot={slot} panic=10\n")

    def run(self, *args: str, ok: bool = True) -> str:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "APPLIANCE_BOOT_DIR": str(self.fat),
               "APPLIANCE_CMDLINE": str(self.cmdline), "APPLIANCE_TRYBOOT_FLAG": str(self.flag)}
        proc = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env, check=False, timeout=30)
        assert (proc.returncode == 0) == ok, proc.stderr
        return proc.stdout.strip() if ok else proc.stderr.strip()

    def grubenv(self) -> dict[str, str]:
        assert GRUB_EDITENV is not None
        out = subprocess.run([GRUB_EDITENV, str(self.fat / "grubenv"), "list"], capture_output=True, text=True,
                             check=True).stdout
        return dict(line.split("=", 1) for line in out.splitlines())

    def grub_boots(self) -> str:
        """What image/grub.cfg does at a boot: the trial once (cleared first), else the committed."""
        assert GRUB_EDITENV is not None
        env = self.grubenv()
        slot = env.get("TRY") or env.get("PRIMARY") or "A"
        if env.get("TRY"):
            subprocess.run([GRUB_EDITENV, str(self.fat / "grubenv"), "set", "TRY="], check=True)
        self.boot(slot)
        return slot

    def pi_boots(self, *, tryboot: bool) -> str:
        """What the Pi's firmware does: [tryboot]'s partition on a tryboot reboot, else [all]'s."""
        text = (self.fat / "autoboot.txt").read_text()
        section = "[tryboot]" if tryboot else "[all]"
        part = text.split(section, 1)[1].split("boot_partition=", 1)[1].split()[0]
        self.flag.unlink(missing_ok=True)  # /run is empty after any reboot
        slot = {"2": "A", "3": "B"}[part]
        self.boot(slot)
        return slot


@pytest.fixture
def grub(tmp_path: Path) -> Board:
    if GRUB_EDITENV is None:
        pytest.skip("grub-editenv is not installed (grub-common; scripts/setup --test as root)")
    board = Board(tmp_path)
    subprocess.run([GRUB_EDITENV, str(board.fat / "grubenv"), "create"], check=True)
    subprocess.run([GRUB_EDITENV, str(board.fat / "grubenv"), "set", "PRIMARY=A", "TRY="], check=True)
    return board


@pytest.fixture
def pi(tmp_path: Path) -> Board:
    board = Board(tmp_path)
    (board.fat / "autoboot.txt").write_text("[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n")
    return board


def test_grub_a_trial_is_one_boot_and_kept_only_once_marked_good(grub: Board) -> None:
    assert grub.run("get-current") == "A" and grub.run("get-primary") == "A"
    assert grub.run("get-state", "A") == "good" and grub.run("get-state", "B") == "bad"
    grub.run("set-primary", "B")  # what RAUC does after writing B
    assert grub.run("get-primary") == "B" and grub.grubenv() == {"PRIMARY": "A", "TRY": "B"}
    assert grub.grub_boots() == "B"
    assert grub.run("get-current") == "B" and grub.run("get-state", "B") == "bad", "on trial, not yet good"
    assert grub.grub_boots() == "A", "any second boot without mark-good goes back"
    grub.run("set-primary", "B")
    assert grub.grub_boots() == "B"
    grub.run("set-state", "B", "good")  # rauc status mark-good, from the health gate
    assert grub.grubenv() == {"PRIMARY": "B", "TRY": ""}
    assert grub.grub_boots() == "B" and grub.grub_boots() == "B", "kept"


def test_grub_a_slot_marked_bad_is_not_tried_again_and_the_committed_one_cannot_be(grub: Board) -> None:
    grub.run("set-primary", "B")
    grub.run("set-state", "B", "bad")
    assert grub.grubenv()["TRY"] == "" and grub.grub_boots() == "A"
    assert "committed" in grub.run("set-state", "A", "bad", ok=False)
    assert "no such slot" in grub.run("set-primary", "C", ok=False)


def test_pi_a_trial_is_one_tryboot_and_kept_only_once_marked_good(pi: Board) -> None:
    assert pi.run("get-primary") == "A" and pi.run("get-state", "A") == "good"
    pi.run("set-primary", "B")
    assert pi.flag.exists(), "the next reboot is a tryboot"
    assert pi.run("get-primary") == "B"
    assert pi.pi_boots(tryboot=True) == "B"
    assert pi.run("get-current") == "B" and pi.run("get-state", "B") == "bad"
    assert pi.pi_boots(tryboot=False) == "A", "a plain reboot goes back"
    pi.run("set-primary", "B")
    assert pi.pi_boots(tryboot=True) == "B"
    pi.run("set-state", "B", "good")
    assert (pi.fat / "autoboot.txt").read_text() == ("[all]\ntryboot_a_b=1\nboot_partition=3\n"
                                                      "[tryboot]\nboot_partition=2\n")
    assert pi.pi_boots(tryboot=False) == "B" and pi.run("get-state", "B") == "good"


def test_without_a_slot_on_the_command_line_it_says_so(pi: Board) -> None:
    pi.cmdline.write_text("console=ttyS0 root=/dev/sda1\n")
    assert "no rauc.slot" in pi.run("get-current", ok=False)
