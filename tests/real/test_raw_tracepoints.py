"""The saved raw tracepoint prototypes match the kernel's own BTF, where this kernel is one of them."""

from __future__ import annotations

import os
import platform

import pytest

from rsttrace.kernel import read as kernel_read
from rsttrace.kernel.btf import Btf
from tests import saved
from tests.testpaths import KERNEL_FORMATS


def _saved_root(release: str) -> str:
    """The saved kernel of this release, or of the same version in another build (6.18.44-fc-v657
    was saved; CI machines boot other builds of 6.18.44), else ""."""
    exact = os.path.join(KERNEL_FORMATS, release)
    if os.path.isdir(exact):
        return exact
    version = release.split("-")[0]
    same = sorted(d for d in os.listdir(KERNEL_FORMATS) if d.split("-")[0] == version)
    return os.path.join(KERNEL_FORMATS, same[0]) if same else ""


def test_saved_prototypes_match_this_kernel() -> None:
    root = _saved_root(platform.release())
    if not root:
        pytest.skip("no saved facts for kernel %s (the rig boots the saved ones)" % platform.release())
    recorded = saved.tp_args_fixture(os.path.join(root, "tracepoint-args.txt"))
    btf = Btf.load()
    assert {tp: btf.tracepoint_args(tp) for tp in recorded} == recorded


def test_reset_programs_run_on_the_hooks_asked_for(tracing: object) -> None:
    """Raw tracepoints by default wherever BTF types their arguments; perf tracepoints when
    turned off. Both sessions pass every scenario in test_resets.py."""
    tracer = tracing.tracer  # type: ignore[attr-defined]
    hooks = {a.program: a.hook for a in tracer.attachments if a.attached}
    raw = tracer.options.raw_tracepoints and bool(tracing.facts.tp_args)  # type: ignore[attr-defined]
    for program in ("rsttrace_send_reset", "rsttrace_receive_reset"):
        assert hooks[program].split()[0] == ("raw_tracepoint" if raw else "tracepoint")


def test_a_failed_raw_attach_falls_back_to_perf_tracepoints(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that refuses BPF_RAW_TRACEPOINT_OPEN (say, a security module) still gets traced."""
    from tests.real.realkernel import require_real_kernel

    require_real_kernel()
    from rsttrace.capture.bccload import import_bcc
    from rsttrace.capture.tracer import TraceOptions, Tracer
    from rsttrace.kernel import tracefs

    facts = kernel_read.gather(tracefs.ensure_tracefs()[0])
    if not facts.raw_args("tcp_send_reset"):
        pytest.skip("this kernel has no raw tracepoint plan to fall back from")
    bcc = import_bcc()

    def refuse(self: object, tp: bytes = b"", fn_name: bytes = b"") -> None:
        raise Exception("Failed to attach BPF to raw tracepoint: Operation not permitted")

    monkeypatch.setattr(bcc.BPF, "attach_raw_tracepoint", refuse)
    tracer = Tracer(facts, TraceOptions(events=False))
    tracer.start()
    try:
        hooks = {a.program: a.hook for a in tracer.attachments if a.attached}
        assert hooks["rsttrace_send_reset"] == "tracepoint tcp:tcp_send_reset"
        assert len(tracer.notes) == 1 and "Operation not permitted" in tracer.notes[0]
        assert "perf tracepoints" in tracer.notes[0]
    finally:
        tracer.close()
