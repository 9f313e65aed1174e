"""scripts/native-check: the one line scripts/setup prints about the native signed-request
check (built, or not built with why and the fallback), and what stops it from being compiled,
found before pip runs so the line can name the fix.

Real compilers and interpreters only: "no compiler" is a CC that does not exist, "no libc
headers" is this machine's gcc told to search none (-nostdinc), and "not built" is this
Python run isolated (-I -S), which cannot see the checkout's package.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "native-check"
GCC = shutil.which("gcc")
BUILT = importlib.util.find_spec("appliance.protocol._sigcheck") is not None
REQUIRED = os.environ.get("APPLIANCE_NATIVE_REQUIRED") == "1"
FALLBACK = "the appliance uses the Python check (same answers, slower)"


def native_check(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def test_a_missing_compiler_is_named_with_its_fix(tmp_path: Path) -> None:
    done = native_check("--blocker", CC=str(tmp_path / "no-such-cc"))
    assert (done.returncode, done.stdout) == (0, "no C compiler; apt install gcc\n")


@pytest.mark.skipif(GCC is None, reason="gcc is not installed (scripts/setup --test installs it)")
def test_missing_libc_headers_are_named_with_their_fix() -> None:
    done = native_check("--blocker", CC=f"{GCC} -nostdinc")
    assert done.stdout == "no C library headers; apt install libc6-dev\n"


@pytest.mark.skipif(GCC is None and not REQUIRED, reason="gcc is not installed (scripts/setup --test installs it)")
def test_nothing_is_named_where_everything_is_there() -> None:
    done = native_check("--blocker", CC=str(GCC))
    assert (done.returncode, done.stdout) == (0, "")


def test_not_built_says_why_and_that_the_python_check_runs(tmp_path: Path) -> None:
    isolated = tmp_path / "python"
    isolated.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "$@"\n')
    isolated.chmod(0o755)
    done = native_check(PYTHON=str(isolated), CC=str(tmp_path / "no-such-cc"))
    expected = f"native check: NOT built (no C compiler; apt install gcc): {FALLBACK}\n"
    assert (done.returncode, done.stdout) == (1, expected)


@pytest.mark.skipif(not BUILT and not REQUIRED, reason="the native check is not built here (scripts/setup says why)")
def test_built_names_the_module_this_checkout_loads() -> None:
    done = native_check()
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("native check: built (appliance/protocol/_sigcheck.cpython-"), done.stdout
    assert done.stdout.rstrip().endswith(".so)")
