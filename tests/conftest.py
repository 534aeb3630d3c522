from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One token cache for the whole session: the first run builds it, the rest reuse it."""
    return tmp_path_factory.mktemp("ramp-cache")
