"""Shared pytest set-up: the `root` marker on every real-kernel test.

tests/ is a package (helpers import as tests.real.netlab, tests.testpaths, ...): pytest puts the
project directory on sys.path, nothing here edits it.

Whether those can run (and that they fail rather than skip under CI) is tests/real/realkernel.py.
"""

from __future__ import annotations

import os
from typing import List

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    for item in items:
        if "tests/real/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.root)
