"""The per-test clinic client; each module provides the ``server`` it runs against."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.server import ServerProcess
from tests.workflow.helpers import Clinic


@pytest.fixture
async def clinic(server: ServerProcess) -> AsyncIterator[Clinic]:
    clinic = Clinic.open(server)
    yield clinic
    await clinic.close()
