"""``rsttrace doctor``: what this node has and lacks for tracing, each miss with its fix."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from rsttrace.capture.bccload import BccMissing, bcc_version, import_bcc
from rsttrace.capture.headers import CacheError, kernel_headers
from rsttrace.kernel import hooks
from rsttrace.kernel.facts import RAW_ROLES, KernelFacts
from rsttrace.kernel.read import gather
from rsttrace.kernel.tracefs import TracefsError, ensure_tracefs, find_tracefs, unreadable_tracefs

CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24
CAP_PERFMON = 38
CAP_BPF = 39


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True  # tracing cannot work without it

    def as_dict(self) -> Dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "required": self.required, "detail": self.detail, "fix": self.fix}


def effective_caps(status_path: str = "/proc/self/status") -> int:
    try:
        with open(status_path) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def privilege_problem(caps: Optional[int] = None) -> Optional[str]:
    """None when BPF tracing is permitted, else a one-line explanation with the fix."""
    caps = effective_caps() if caps is None else caps
    if caps & (1 << CAP_SYS_ADMIN):
        return None
    if caps & (1 << CAP_BPF) and caps & (1 << CAP_PERFMON):
        return None
    return "rsttrace needs root (or CAP_BPF and CAP_PERFMON, CAP_SYS_ADMIN on kernels before 5.8): run it with sudo"


def run(load: bool = True) -> List[Check]:
    checks: List[Check] = []
    caps = effective_caps()
    prob = privilege_problem(caps)
    checks.append(Check("privileges", prob is None, "uid %d, CapEff %#x" % (os.geteuid(), caps), prob or ""))

    tracefs: Optional[str] = find_tracefs()
    denied = unreadable_tracefs() if tracefs is None else None
    if tracefs is None and prob is None:
        try:
            tracefs, mounted = ensure_tracefs()
            checks.append(Check("tracefs", True, "mounted it: %s" % ", ".join(mounted) if mounted else tracefs))
        except TracefsError as e:
            checks.append(Check("tracefs", False, str(e), "mount -t tracefs nodev /sys/kernel/tracing"))
    elif tracefs is None and denied is not None:  # mounted, but tracefs' root is 0700
        checks.append(Check("tracefs", False, "mounted on %s but not readable by uid %d" % (denied, os.geteuid()),
                            "run as root (sudo), or mount -o remount,mode=0755 %s (as root)" % denied))
    elif tracefs is None:
        checks.append(Check("tracefs", False, "not mounted", "mount -t tracefs nodev /sys/kernel/tracing (as root)"))
    else:
        checks.append(Check("tracefs", True, tracefs))

    btf = "/sys/kernel/btf/vmlinux"
    has_btf = os.path.exists(btf)
    checks.append(
        Check(
            "BTF",
            has_btf,
            btf if has_btf else "missing",
            "" if has_btf else "a kernel built with CONFIG_DEBUG_INFO_BTF=y (netns, states and owner pid need it)",
            required=False,
        )
    )

    bcc_ok = False
    try:
        bcc = import_bcc()
        bcc_ok = True
        bcc_dir = os.path.dirname(bcc.__file__ or "?")
        checks.append(Check("bcc", True, "version %s from %s" % (bcc_version(bcc), bcc_dir)))
    except BccMissing as e:
        checks.append(Check("bcc", False, str(e), "apt-get install python3-bpfcc"))

    try:
        _dir, why = kernel_headers()
        checks.append(Check("kernel headers", True, why))
    except CacheError as e:
        checks.append(Check("kernel headers", False, str(e), e.fix))
    except (BccMissing, OSError) as e:
        checks.append(Check("kernel headers", False, str(e), "apt-get install linux-headers-amd64"))

    facts: Optional[KernelFacts] = None
    if tracefs:
        try:
            facts = gather(tracefs, btf if has_btf else None)
        except (OSError, TracefsError) as e:
            checks.append(Check("tracepoint formats", False, str(e), "run as root: tracefs is root-only"))
    if facts is not None:
        for fmt, name in ((facts.send_reset, "tcp:tcp_send_reset"), (facts.receive_reset, "tcp:tcp_receive_reset"),
                          (facts.kfree_skb, "skb:kfree_skb")):
            if fmt is None:
                checks.append(Check("tracepoint " + name, False, "absent", "a kernel 4.15 or newer", required=False))
            else:
                fields = ", ".join(f.name for f in fmt.fields if not f.name.startswith("common_"))
                checks.append(Check("tracepoint " + name, True, fields, required=False))
        checks.append(Check("reason names", bool(facts.rst_reasons),
                            "%d sk_rst_reason names from the format file" % len(facts.rst_reasons)
                            if facts.rst_reasons else "tcp_send_reset has no reason field (kernel < 6.10): inferred",
                            required=False))
        checks.append(Check("ring buffer", facts.ringbuf, "BPF_MAP_TYPE_RINGBUF" if facts.ringbuf
                            else "perf buffer will be used (kernel < 5.8 or no BTF)", required=False))
        raw = [tp for tp in RAW_ROLES if facts.raw_args(tp)]
        checks.append(Check("raw tracepoints", bool(raw), "arguments typed by BTF for: %s" % ", ".join(raw) if raw
                            else "no BTF prototypes (btf_trace_*, 5.5+): perf tracepoints, which cost more per "
                            "reset", required=False))
        kprobes = os.path.exists(os.path.join(tracefs or "", "kprobe_events"))
        checks.append(Check("kprobes", kprobes, "available" if kprobes else "not built into this kernel "
                            "(CONFIG_KPROBES off): only tracepoints are used", required=False))
        macros = facts.macros()
        chosen = ["%s on %s" % (fn, hook) for fn, hook, macro in hooks.plan(facts, macros) if macro in macros]
        checks.append(Check("programs", bool(chosen), ", ".join(chosen) or "none: no hook of the table fits "
                            "this kernel", required=False))
        for hook in facts.hooks():
            checks.append(Check("hook " + hook.kind, hook.available, "%s%s" % (hook.source,
                                ": " + hook.detail if hook.detail else ""), required=False))
        for w in facts.warnings:
            checks.append(Check("degraded", False, w, required=False))

    if load and facts is not None and bcc_ok and prob is None:
        from rsttrace.capture.tracer import TraceOptions, Tracer, TracerError

        t0 = time.monotonic()
        tr = Tracer(facts, TraceOptions(events=False))
        try:
            tr.start()
            took = time.monotonic() - t0
            attached = [a.hook for a in tr.attachments if a.attached]
            missing = ["%s (%s)" % (a.hook, a.detail) for a in tr.attachments if not a.attached]
            detail = "compiled and attached %s in %.2fs" % (", ".join(attached), took)
            if missing:
                detail += "; not attached: " + ", ".join(missing)
            for note in tr.notes:
                detail += "; " + note
            checks.append(Check("load test", True, detail))
        except TracerError as e:
            checks.append(Check("load test", False, str(e), "see the failed checks above"))
        finally:
            tr.close()
    elif load:
        checks.append(Check("load test", False, "skipped: an earlier required check failed", "fix those first"))
    return checks


def ok(checks: List[Check]) -> bool:
    return all(c.ok for c in checks if c.required)


def render(checks: List[Check]) -> str:
    lines = ["rsttrace doctor on %s (%s)" % (platform.node(), platform.release())]
    for c in checks:
        mark = "ok" if c.ok else ("FAIL" if c.required else "warn")
        lines.append("[%-4s] %-28s %s" % (mark, c.name, c.detail))
        if not c.ok and c.fix:
            lines.append("       %-28s fix: %s" % ("", c.fix))
    lines.append("tracing can work" if ok(checks) else "tracing cannot work until the FAIL lines are fixed")
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    d = sub.add_parser("doctor", help="what this node has and lacks for tracing, with fixes")
    d.add_argument("--no-load", action="store_true", help="skip compiling and attaching the programs")
    d.add_argument("--json", action="store_true", help="as a JSON array")


def cmd_doctor(args: Any) -> int:
    checks = run(load=not args.no_load)
    if args.json:
        sys.stdout.write(json.dumps([c.as_dict() for c in checks], indent=1) + "\n")
    else:
        sys.stdout.write(render(checks) + "\n")
    return 0 if ok(checks) else 1
