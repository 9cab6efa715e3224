"""One dialect across the project's Python: typing's names and %-formatting.

Chosen because it is what most of the code already spoke and because it reads the same in an
annotation and in a runtime expression on Python 3.9 (the rig's Debian 11), where ``X | None``
outside an annotation is a TypeError. So: no f-strings, no ``X | Y`` and no ``list[...]``-style
builtin generics in annotations. (``str.format`` stays for the kubelet fixture templates, whose
placeholders are file text.)
"""

from __future__ import annotations

import ast
import os
from typing import Iterator, List

from tests.testpaths import ROOT

BUILTIN_GENERICS = {"list", "dict", "tuple", "set", "frozenset", "type"}
SCRIPTS = ["rig/run", "rig/capture-kernel-facts", "bench/run"]


def python_files() -> Iterator[str]:
    for top in ("rsttrace", "tests", "rig", "bench", "scripts", "deploy"):
        for d, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [x for x in dirs if x not in ("cache", "out", "__pycache__")]  # rig images, results
            for f in files:
                if f.endswith(".py"):
                    yield os.path.join(d, f)
    for s in SCRIPTS:
        path = os.path.join(ROOT, s)
        if os.path.exists(path):
            with open(path, "rb") as fh:
                if b"python" in fh.readline():
                    yield path


def annotations(tree: ast.AST) -> Iterator[ast.expr]:
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = n.args
            for arg in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg]:
                if arg is not None and arg.annotation is not None:
                    yield arg.annotation
            if n.returns is not None:
                yield n.returns
        elif isinstance(n, ast.AnnAssign):
            yield n.annotation


def offences(path: str) -> List[str]:
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    rel = os.path.relpath(path, ROOT)
    out = ["%s:%d: f-string" % (rel, n.lineno) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr)]
    for ann in annotations(tree):
        for n in ast.walk(ann):
            if isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr):
                out.append("%s:%d: X | Y in an annotation (Optional/Union)" % (rel, n.lineno))
            elif isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name) and n.value.id in BUILTIN_GENERICS:
                out.append("%s:%d: %s[...] in an annotation (typing.%s)" % (rel, n.lineno, n.value.id,
                                                                            n.value.id.capitalize()))
    return out


def test_the_checker_sees_each_offence(tmp_path: str) -> None:
    p = os.path.join(str(tmp_path), "x.py")
    with open(p, "w") as f:
        f.write('def f(a: int | None, b: list[int]) -> dict[str, int]:\n    return {f"{a}": 1}\n')
    assert len(offences(p)) == 4


def test_one_dialect() -> None:
    found = [o for p in python_files() for o in offences(p)]
    assert not found, "\n".join(found[:40])
