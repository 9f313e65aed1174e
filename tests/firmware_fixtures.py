"""Fixtures of the firmware update tests (a module names this one in ``pytest_plugins``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.firmware_helpers import Box, make_bundle, make_keys


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The development key pair (``dev``), bundles it signed (``good`` 0.9.0, ``next``
    0.9.2), and one signed by a stranger's key (``stranger`` 0.9.1)."""
    where = tmp_path_factory.mktemp("bundles")
    dev, stranger = make_keys(where, "appliance-dev"), make_keys(where, "stranger")
    return {"dev": dev, "good": make_bundle(where, "0.9.0", dev), "next": make_bundle(where / "n", "0.9.2", dev),
            "stranger": make_bundle(where / "s", "0.9.1", stranger)}


@pytest.fixture
def box(tmp_path: Path, signed: dict[str, Any]) -> Box:
    """A box booted on slot A, trusting the development key."""
    booted = Box(tmp_path / "box", signed["dev"])
    booted.boot("A")
    return booted
