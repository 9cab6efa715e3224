"""A saved kernel's extra facts (tests/fixtures/kernel-formats/*): what the live kernel answers
from tracefs and BTF, written down by rig/capture-kernel-facts."""

from __future__ import annotations

from typing import Dict, List, Tuple


def functions_fixture(path: str) -> Tuple[bool, Dict[str, bool]]:
    """(kprobes, hookable) from a saved functions.txt (tests/fixtures/kernel-formats/*)."""
    kprobes = False
    hookable: Dict[str, bool] = {}
    with open(path) as f:
        for line in f:
            parts = dict(p.split("=", 1) for p in line.split()[1:] if "=" in p)
            if line.startswith("kprobe_events="):
                kprobes = line.split()[0].split("=", 1)[1] == "yes"
            elif parts:
                name = line.split()[0]
                hookable[name] = parts.get("filter_functions") == "1" or parts.get("kallsyms") == "1"
    return kprobes, hookable


def tp_args_fixture(path: str) -> Dict[str, List[str]]:
    """Raw tracepoint argument types from a saved tracepoint-args.txt: ``name: type, type``."""
    out: Dict[str, List[str]] = {}
    with open(path) as f:
        for line in f:
            name, sep, rest = line.partition(":")
            if sep and not line.startswith("#"):
                out[name.strip()] = [t.strip() for t in rest.split(",") if t.strip()]
    return out
