"""Shared fixtures: the tiny model zoo (built once, reused across runs) and loaded pipelines."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from swiftd import zoo

REPO = Path(__file__).resolve().parent.parent
ZOO = Path(os.environ.get("SWIFTD_ZOO", REPO / ".zoo"))
TINY_FAMILIES = ["tiny-sd15", "tiny-sdxl"]


@pytest.fixture(scope="session")
def zoo_root() -> Path:
    """The repository's zoo with the tiny families; building is skipped when already complete."""
    zoo.build(ZOO, only=TINY_FAMILIES)
    return ZOO


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    # Two cores: keep test processes from oversubscribing them when services run beside.
    torch.set_num_threads(1)


# The tiny families' pipelines, loaded once per test module that uses them.
@pytest.fixture(scope="module")
def sd15(zoo_root):
    from tests.reference import Family

    return Family(zoo_root, "tiny-sd15")


@pytest.fixture(scope="module")
def sdxl(zoo_root):
    from tests.reference import Family

    return Family(zoo_root, "tiny-sdxl")
