"""Paths the tests share (a plain module: `conftest` names two files, so it is not importable)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
KERNEL_FORMATS = os.path.join(FIXTURES, "kernel-formats")
