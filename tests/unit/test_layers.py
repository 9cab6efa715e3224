"""The folders are layers a reset passes through, and each imports only from those before it:
kernel -> capture -> enrich -> pipeline -> sinks -> cli (rsttrace/log.py and the package root are
for everyone). A newcomer can read the layers off the tree; this keeps the picture true."""

from __future__ import annotations

import ast
import glob
import os
from typing import List, Tuple

from tests.testpaths import ROOT

ORDER = ["kernel", "capture", "enrich", "pipeline", "sinks", "cli"]


def upward_imports() -> List[Tuple[str, str]]:
    bad = []
    for path in glob.glob(os.path.join(ROOT, "rsttrace", "*", "*.py")):
        layer = os.path.basename(os.path.dirname(path))
        if layer not in ORDER:
            continue
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module and n.module.startswith("rsttrace."):
                target = n.module.split(".")[1]
                if target in ORDER and ORDER.index(target) > ORDER.index(layer):
                    bad.append((os.path.relpath(path, ROOT), n.module))
            elif isinstance(n, ast.ImportFrom) and n.level:
                bad.append((os.path.relpath(path, ROOT), "a relative import (absolute ones show the layer)"))
    return bad


def test_every_folder_is_a_layer() -> None:
    inits = glob.glob(os.path.join(ROOT, "rsttrace", "*", "__init__.py"))
    folders = {os.path.basename(os.path.dirname(p)) for p in inits}
    assert folders == set(ORDER)


def test_no_layer_imports_from_a_later_one() -> None:
    assert upward_imports() == []
