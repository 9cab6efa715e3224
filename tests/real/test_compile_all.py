"""Every kernel layout's program compiles with bcc and passes this kernel's verifier.

The hook plans of Debian's 5.10, 6.1 and 6.12 (and of 5.4/5.15/6.8-like descriptions) are built
from their saved format files, with this kernel's BTF offsets, compiled by the installed bcc and
loaded -- tracepoint and kprobe programs alike -- without attaching. The kprobe paths cannot
attach on this node type (no kprobes); the rig boots the real kernels to run them.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from rsttrace.capture.bccload import import_bcc
from rsttrace.capture.headers import kernel_headers
from rsttrace.capture.tracer import TraceOptions, Tracer
from rsttrace.kernel import read as kernel_read
from tests import saved
from tests.real.realkernel import require_real_kernel
from tests.testpaths import KERNEL_ROOTS

ROOTS = list(KERNEL_ROOTS.values())
# the programs as trace/summary/export build them, and as `rsttrace top` does (its map, a --netns filter)
OPTIONS = {"default": TraceOptions(), "top": TraceOptions(events=False, top_entries=64, top_netns=[1, 4026531840])}


@pytest.mark.parametrize("mode", sorted(OPTIONS))
@pytest.mark.parametrize("root", ROOTS, ids=[os.path.basename(r) for r in ROOTS])
def test_program_loads(root: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    require_real_kernel()
    bcc = import_bcc()
    src, _why = kernel_headers()
    if src:
        monkeypatch.setenv("BCC_KERNEL_SOURCE", src)  # for this compile only
    functions = saved.functions_fixture(os.path.join(root, "functions.txt"))
    # as if this kernel offered kprobes for every function the saved kernel had
    # and with that kernel's raw tracepoint prototypes rather than this kernel's
    tp_args = saved.tp_args_fixture(os.path.join(root, "tracepoint-args.txt"))
    facts = kernel_read.gather(root, release=os.path.basename(root), functions=(True, functions[1]), tp_args=tp_args)
    tracer = Tracer(facts, dataclasses.replace(OPTIONS[mode]))
    tracer.ringbuf = facts.ringbuf
    b = bcc.BPF(text=tracer.source().encode(), cflags=["-Wno-unused-function"])
    try:
        macros = facts.macros()
        loaded = []
        for fn, hook, macro in tracer.plan():
            if macro not in macros:
                continue
            kind = {"kprobe": bcc.BPF.KPROBE, "raw_tracepoint": bcc.BPF.RAW_TRACEPOINT}.get(
                hook.split()[0], bcc.BPF.TRACEPOINT)
            b.load_func(fn.encode(), kind)  # the verifier's pass, no attach
            loaded.append(fn)
        assert "rsttrace_send_reset" in loaded and "rsttrace_receive_reset" in loaded
        # each layout's raw programs are the ones loaded (the perf variants: test_perf_variants)
        assert "RAW_SEND_RESET" in macros and "RAW_RECEIVE_RESET" in macros
        if facts.kp_send_reset:
            assert "rsttrace_kp_send_reset" in loaded
    finally:
        b.cleanup()


@pytest.mark.parametrize("mode", sorted(OPTIONS))
@pytest.mark.parametrize("root", ROOTS, ids=[os.path.basename(r) for r in ROOTS])
def test_perf_variants_load(root: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The perf tracepoint programs, used where raw tracepoints are not (no BTF prototypes,
    --no-raw-tracepoints), pass the verifier for every layout too."""
    require_real_kernel()
    bcc = import_bcc()
    src, _why = kernel_headers()
    if src:
        monkeypatch.setenv("BCC_KERNEL_SOURCE", src)
    facts = kernel_read.gather(root, release=os.path.basename(root), functions=(False, {}), tp_args={})
    tracer = Tracer(facts, dataclasses.replace(OPTIONS[mode]))
    tracer.ringbuf = facts.ringbuf
    b = bcc.BPF(text=tracer.source().encode(), cflags=["-Wno-unused-function"])
    try:
        loaded = []
        for fn, hook, macro in tracer.plan():
            if macro in tracer.macros() and hook.startswith("tracepoint"):
                b.load_func(fn.encode(), bcc.BPF.TRACEPOINT)
                loaded.append(fn)
        assert "rsttrace_send_reset" in loaded and "rsttrace_receive_reset" in loaded
    finally:
        b.cleanup()
