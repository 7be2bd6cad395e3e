from __future__ import annotations

import pytest

from tests.web.support import Harness


@pytest.fixture
def api(engine) -> Harness:
    """The API in memory over a migrated database (SQLite and PostgreSQL)."""
    return Harness(engine)
