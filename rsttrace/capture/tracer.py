"""Compile, attach, read and detach rsttrace's BPF programs with bcc."""

from __future__ import annotations

import ctypes
import os
import threading
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Dict, List, Optional, Set, Tuple

from rsttrace.capture import codegen
from rsttrace.capture import contract as c
from rsttrace.capture.bccload import BccMissing, bcc_version, captured_output, import_bcc
from rsttrace.capture.counters import CounterMaps, CounterTuple, stats
from rsttrace.capture.headers import kernel_headers
from rsttrace.capture.ringread import Records, RingReader, RingUnavailable, fd_of
from rsttrace.capture.topmap import TopTuple, read_top, top_macros
from rsttrace.kernel import hooks
from rsttrace.kernel.facts import KernelFacts
from rsttrace.kernel.tracefs import ensure_tracefs


class TracerError(Exception):
    """Tracing cannot start; the message says what to do."""


@dataclass
class TraceOptions:
    events: bool = True  # False: counters only, nothing crosses to user space
    kinds: Optional[List[str]] = None  # only these kinds become events (counters count all)
    netns: Optional[int] = None  # only this netns becomes events
    ring_pages: int = 64  # ring/perf buffer pages (per CPU for perf)
    counter_entries: int = 16384
    force_perf: bool = False  # use the perf buffer even where a ring buffer exists (tests, old bcc)
    max_event_rate: Optional[int] = None  # events/s to user space (split over CPUs); None: all
    raw_tracepoints: bool = True  # raw tracepoints where the kernel's BTF types their arguments
    # read the ring buffer's pages in batches (capture/ringread.py); False: bcc's per-record callback
    direct_ring: bool = True
    # rsttrace top: every event counted by its tuple in the kernel's "top_counts" map of this many
    # keys, and none crossing to user space (RSTTRACE_TOP); None: no such map
    top_entries: Optional[int] = None
    top_netns: Optional[List[int]] = None  # only these namespaces take top keys (at most TOP_NETNS_MAX)


@dataclass
class Attachment:
    program: str
    hook: str
    attached: bool
    detail: str = ""


@dataclass
class Tracer:
    facts: KernelFacts
    options: TraceOptions = field(default_factory=TraceOptions)
    bpf: Any = None
    attachments: List[Attachment] = field(default_factory=list)
    headers: str = ""
    bcc_version: str = ""
    ringbuf: bool = False  # decided at start: kernel support, bcc support, options
    mounted: List[str] = field(default_factory=list)  # what start() had to mount
    notes: List[str] = field(default_factory=list)  # degradations found while starting
    _bcc: Optional[ModuleType] = None
    _callback: Optional[Records] = None
    ring_reader: Optional[RingReader] = None  # the batch reader, when the ring buffer is read directly
    # Scrapes read the maps from HTTP threads while the main thread may be closing them.
    _lock: threading.Lock = field(default_factory=threading.Lock)
    counter_maps: CounterMaps = field(default_factory=CounterMaps)

    def __post_init__(self) -> None:
        self.ringbuf = self.facts.ringbuf and not self.options.force_perf

    def extra_macros(self) -> Dict[str, Optional[str]]:
        m: Dict[str, Optional[str]] = {"RSTTRACE_RINGBUF_PAGES": str(self.options.ring_pages),
                             "RSTTRACE_COUNTER_ENTRIES": str(self.options.counter_entries)}
        if not self.options.events:
            m["RSTTRACE_NO_EVENTS"] = "1"
        if self.options.kinds:
            mask = 0
            for k in self.options.kinds:
                mask |= 1 << c.KIND_BY_NAME[k]
            m["RSTTRACE_KIND_MASK"] = "0x%x" % mask
        if self.options.netns is not None:
            m["RSTTRACE_NETNS_FILTER"] = "%uU" % self.options.netns
        if self.options.max_event_rate is not None:
            cpus = os.cpu_count() or 1
            m["RSTTRACE_RATE_PER_CPU"] = "%dULL" % max(1, -(-self.options.max_event_rate // cpus))
        if not self.ringbuf:
            m["RSTTRACE_RINGBUF"] = None  # codegen drops None macros
        if self.options.top_entries is not None:
            m.update(top_macros(self.facts, self.options.top_entries, self.options.top_netns))
        return m

    def macros(self) -> Dict[str, str]:
        """The #defines the program is built with: the kernel's facts and our options."""
        m = codegen.macros(self.facts, self.extra_macros())
        if not self.options.raw_tracepoints:  # every RAW_* says "raw" (bpf/rsttrace.bpf.c)
            m = {k: v for k, v in m.items() if not k.startswith("RAW_")}
        return m

    def source(self) -> str:
        return codegen.program(self.facts, self.macros())

    def start(self, callback: Optional[Records] = None) -> None:
        """Compile and attach. Raises TracerError with a one-line fix on failure.

        ``callback(buffer, offsets)`` gets records in batches: each record is ``RawEvent``'s bytes
        at one of the offsets (events.Decoder.decode takes both)."""
        try:
            bcc = import_bcc()
        except BccMissing as e:
            raise TracerError(str(e)) from e
        self._bcc = bcc
        self.bcc_version = bcc_version(bcc)
        try:
            src_dir, self.headers = kernel_headers(self.facts.release)
        except (BccMissing, OSError) as e:
            raise TracerError(str(e)) from e
        # bcc before 0.16 has no BPF_RINGBUF_OUTPUT/ring_buffer_poll: the perf buffer then
        self.ringbuf = self.facts.ringbuf and hasattr(bcc.BPF, "ring_buffer_poll") and not self.options.force_perf
        try:
            self._start(bcc, src_dir, callback)
        except TracerError as e:
            if not self.options.raw_tracepoints or not any(n.startswith("RAW_") for n in self.macros()):
                raise
            # Raw tracepoints are the fast path, never a requirement: the same programs exist
            # for perf tracepoints (every kernel since 4.15 has those).
            self.options.raw_tracepoints = False
            self.attachments = []
            self.notes.append("raw tracepoints unusable (%s): using perf tracepoints, which cost the traced "
                              "workload more" % e)
            self._start(bcc, src_dir, callback)

    def _start(self, bcc: ModuleType, src_dir: Optional[str], callback: Optional[Records]) -> None:
        text = self.source()
        # libbcc reads BCC_KERNEL_SOURCE with getenv() while compiling: set it for the compile
        # only, so that nothing this process starts later inherits our private header tree.
        saved = os.environ.get("BCC_KERNEL_SOURCE")
        if src_dir:
            os.environ["BCC_KERNEL_SOURCE"] = src_dir
        try:
            with captured_output("bcc compile"):  # bcc's and clang's chatter: a log line, never stdout
                self.bpf = bcc.BPF(text=text.encode(), cflags=["-Wno-unused-function", "-Wno-unused-variable"])
        except Exception as e:
            raise TracerError(
                "compiling the BPF program failed: %s (headers: %s)" % (_first_line(e), self.headers)
            ) from e
        finally:
            if saved is None:
                os.environ.pop("BCC_KERNEL_SOURCE", None)
            else:
                os.environ["BCC_KERNEL_SOURCE"] = saved
        _release_compiler_memory()
        macros = self.macros()
        try:
            for fn, hook, macro in self.plan():
                if macro not in macros:
                    if not hook.startswith("kprobe"):
                        self.attachments.append(Attachment(fn, hook, False, "not available on this kernel"))
                    continue
                try:
                    self._attach(hook, fn)
                    self.attachments.append(Attachment(fn, hook, True))
                except Exception as e:
                    if hook.startswith("raw_tracepoint"):
                        raise TracerError("%s: %s" % (hook, _first_line(e))) from e
                    self.attachments.append(Attachment(fn, hook, False, _first_line(e)))
            if not any(a.attached for a in self.attachments):
                raise TracerError(
                    "no tracepoint could be attached: %s"
                    % "; ".join("%s: %s" % (a.hook, a.detail) for a in self.attachments)
                )
            if self.options.events:
                self._callback = callback
                self._open_buffer()
        except BaseException:
            self.close()
            raise

    def plan(self) -> List[Tuple[str, str, str]]:
        """(program, hook, the macro that says this kernel gets it): the hook table's rows."""
        return hooks.plan(self.facts, self.macros())

    def _attach(self, hook: str, fn: str) -> None:
        kind, _, target = hook.partition(" ")
        if kind == "kprobe":
            self.bpf.attach_kprobe(event=target.encode(), fn_name=fn.encode())
            return
        if kind == "raw_tracepoint":
            # bpf(BPF_RAW_TRACEPOINT_OPEN) takes the bare event name: no tracefs lookup
            self.bpf.attach_raw_tracepoint(tp=target.partition(":")[2].encode(), fn_name=fn.encode())
            return
        tp = target
        try:
            self.bpf.attach_tracepoint(tp=tp.encode(), fn_name=fn.encode())
        except Exception:
            # bcc before ~0.19 finds tracepoint ids only under /sys/kernel/debug/tracing (seen
            # with Debian 11's 0.18): mount debugfs once, as that bcc expects, and retry.
            _path, mounted = ensure_tracefs(mount_debugfs=True)
            if not mounted:
                raise
            self.mounted.extend(mounted)
            self.bpf.attach_tracepoint(tp=tp.encode(), fn_name=fn.encode())

    def _open_buffer(self) -> None:
        cb = self._callback
        rec_size = ctypes.sizeof(c.RawEvent)
        string_at = ctypes.string_at
        at_zero = [0]

        if self.ringbuf and self.options.direct_ring and cb is not None:
            try:
                self.ring_reader = RingReader(fd_of(self.bpf[b"events"]), rec_size)
                return
            except (RingUnavailable, OSError) as e:
                self.notes.append("reading the ring buffer record by record through bcc (%s): slower "
                                  "under a storm" % e)

        def on_event(_ctx: Any, data: Any, _size: int) -> int:
            if cb is not None:
                cb(string_at(data, rec_size), at_zero)  # the record's bytes: decoded at offset 0
            return 0

        def on_perf(_cpu: int, data: Any, size: int) -> None:
            on_event(None, data, size)

        def on_lost(_count: int) -> None:
            # The kernel side already counted these drops (emit() in bpf/rsttrace.bpf.c); a
            # callback is still given so that bcc does not print its own warning per loss.
            pass

        if self.ringbuf:
            self.bpf[b"events"].open_ring_buffer(on_event)
        else:
            self.bpf[b"events"].open_perf_buffer(on_perf, page_cnt=self.options.ring_pages, lost_cb=on_lost)

    def poll(self, timeout_ms: int = 100) -> None:
        if self.bpf is None or not self.options.events:
            time.sleep(timeout_ms / 1000.0)
            return
        if self.ring_reader is not None and self._callback is not None:
            self.ring_reader.poll(timeout_ms, self._callback)
        elif self.ringbuf:
            self.bpf.ring_buffer_poll(timeout_ms)
        else:
            self.bpf.perf_buffer_poll(timeout_ms)

    def counters(self) -> Dict[CounterTuple, int]:
        """Exact in-kernel counts, summed over CPUs. Spilled counts (map full) appear with
        netns 0 and reason None."""
        with self._lock:
            return self.counter_maps.read(self.bpf)

    def retire(self, dead: Set[int], live_ids: Dict[int, int], unknown: Set[int], seen_by: int
               ) -> Dict[CounterTuple, int]:
        """Delete the counters of namespaces that are gone; what they held (CounterMaps.retire)."""
        with self._lock:
            return self.counter_maps.retire(self.bpf, dead, live_ids, unknown, seen_by)

    @property
    def reads(self) -> int:
        """How many times the counters were read: generations are ordered by it."""
        return self.counter_maps.reads

    def top_counts(self) -> Tuple[Dict[TopTuple, int], Dict[int, int]]:
        """`rsttrace top`'s map, summed over CPUs: (rows by key, counts by kind that found it full).
        Empty without ``TraceOptions.top_entries``."""
        with self._lock:
            if self.options.top_entries is None:
                return {}, {}
            return read_top(self.bpf)

    def stats(self) -> Dict[str, int]:
        with self._lock:
            return stats(self.bpf)

    def close(self) -> None:
        """Detach and unload everything (bcc's cleanup closes every program and map fd)."""
        with self._lock:
            if self.ring_reader is not None:
                self.ring_reader.close()  # its mappings first: cleanup() closes the map's fd
                self.ring_reader = None
            if self.bpf is not None:
                try:
                    self.bpf.cleanup()
                finally:
                    self.bpf = None


MADV_PAGEOUT = 21  # include/uapi/asm-generic/mman-common.h (5.4+); older kernels answer EINVAL


def _release_compiler_memory() -> None:
    """Give back what bcc's in-process clang/LLVM compile left behind (measured: 152 -> ~40 MiB RSS).

    The compile is over; LLVM's code pages are file-backed and clean, so paging them out only
    drops them (they fault back in if ever used again), and malloc_trim returns the compile's
    freed heap. Best effort: any failure leaves memory as it was.
    """
    try:
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.malloc_trim(0)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 6 or not ("libLLVM" in parts[5] or "libclang" in parts[5]):
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                libc.madvise(lo, hi - lo, MADV_PAGEOUT)
    except (OSError, AttributeError, ValueError):
        pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or e.__class__.__name__
    return text.splitlines()[0] if text else text
