"""The saved raw tracepoint prototypes match the kernel's own BTF, where this kernel is one of them."""

from __future__ import annotations

import os
import platform

import pytest
from testpaths import KERNEL_FORMATS

from rsttrace import kernel
from rsttrace.btf import Btf


def test_saved_prototypes_match_this_kernel() -> None:
    root = os.path.join(KERNEL_FORMATS, platform.release())
    if not os.path.isdir(root):
        pytest.skip("no saved facts for kernel %s (the rig boots the saved ones)" % platform.release())
    saved = kernel.tp_args_fixture(os.path.join(root, "tracepoint-args.txt"))
    btf = Btf.load()
    assert {tp: btf.tracepoint_args(tp) for tp in saved} == saved


def test_reset_programs_run_on_the_hooks_asked_for(tracing: object) -> None:
    """Raw tracepoints by default wherever BTF types their arguments; perf tracepoints when
    turned off. Both sessions pass every scenario in test_resets.py."""
    tracer = tracing.tracer  # type: ignore[attr-defined]
    hooks = {a.program: a.hook for a in tracer.attachments if a.attached}
    raw = tracer.options.raw_tracepoints and bool(tracing.facts.tp_args)  # type: ignore[attr-defined]
    for program in ("rsttrace_send_reset", "rsttrace_receive_reset"):
        assert hooks[program].split()[0] == ("raw_tracepoint" if raw else "tracepoint")
