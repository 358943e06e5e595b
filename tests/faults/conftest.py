"""Fixtures of the fault scenarios: a ``Lab`` (scratch directory + the suite's Redis, flushed)
whose figures are printed at the end of each test (``pytest -m faults -rP`` shows them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.faults.kit import Lab


@pytest.fixture
def lab(redis_url: str, r: redis.Redis, tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path, redis_url)
    yield lab
    for fig in lab.figures:
        print("FIGURES", fig.line())
