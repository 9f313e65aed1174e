"""Shared by the tests that build hosts in network namespaces (as root, with iproute2)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess

IP = shutil.which("ip") or "/usr/sbin/ip"


def why_no_namespaces(*tools: str) -> str | None:
    """Why this machine cannot run namespace tests, or None when it can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    missing = [t for t in (IP, *tools) if not os.path.exists(t)]
    if missing:
        return f"needs {', '.join(missing)} (scripts/setup --test installs them)"
    probe = f"ns-probe-{secrets.token_hex(3)}"
    made = subprocess.run([IP, "netns", "add", probe], capture_output=True, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.decode().strip()}"
    subprocess.run([IP, "netns", "del", probe], check=False)
    return None
