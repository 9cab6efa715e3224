"""Shared pytest set-up: fixture paths, and the `root` marker on every real-kernel test.

Whether those can run (and that they fail rather than skip under CI) is tests/real/realkernel.py.
"""

from __future__ import annotations

import os
import sys
from typing import List

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tests.testpaths import ROOT  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "tests", "real"))


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    for item in items:
        if "tests/real/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.root)
