"""tracefs: where it is, mounting it when absent, and parsing tracepoint ``format`` files.

The format files are the running kernel's own description of each tracepoint record: field
names, offsets, sizes, and (in ``print fmt``) the ``__print_symbolic`` tables that name enum values
such as ``sk_rst_reason`` and ``skb_drop_reason``. rsttrace reads both from here at start, so a
kernel that renumbers a reason (6.12 did, for sk_rst_reason) is labelled correctly without a
release of ours. See kernel/trace/trace_events.c (f_show / print_event_fields) for the syntax.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
DEBUGFS = "/sys/kernel/debug"


class TracefsError(Exception):
    pass


@dataclass(frozen=True)
class Field:
    name: str
    ctype: str  # as the kernel wrote it, e.g. "enum sk_rst_reason", "__u8", "const void *"
    offset: int
    size: int
    signed: bool
    array_len: Optional[int] = None  # "__u8 saddr[28]" -> 28

    @property
    def is_pointer(self) -> bool:
        return "*" in self.ctype


@dataclass(frozen=True)
class EventFormat:
    system: str
    name: str
    id: int
    fields: Tuple[Field, ...]
    print_fmt: str
    _symbols: Dict[str, List[Tuple[str, str]]] = field(default_factory=dict, compare=False, repr=False)

    def field(self, name: str) -> Optional[Field]:
        for f in self.fields:
            if f.name == name:
                return f
        return None

    def has(self, name: str) -> bool:
        return self.field(name) is not None

    def symbolic(self, field_name: str) -> List[Tuple[str, str]]:
        """The ``__print_symbolic(REC->field, {value, "NAME"}, ...)`` table, as (value, name) strings.

        Values are as written: numbers ("1") or enumerator names ("TCP_ESTABLISHED") that the
        kernel did not resolve; the caller maps the latter through BTF.
        """
        if field_name not in self._symbols:
            self._symbols[field_name] = parse_print_symbolic(self.print_fmt, field_name)
        return self._symbols[field_name]


_FIELD_RE = re.compile(
    r"^\s*field:(?P<decl>[^;]+);\s*offset:(?P<off>\d+);\s*size:(?P<size>\d+);\s*signed:(?P<signed>-?\d+);"
)
_ARRAY_RE = re.compile(r"^(?P<type>.*?)\s*(?P<name>\w+)\s*\[(?P<len>[^\]]*)\]$")
_PLAIN_RE = re.compile(r"^(?P<type>.*?[\s*])(?P<name>\w+)$")


def parse_format(text: str, system: str = "", name: str = "") -> EventFormat:
    event_id = -1
    fields: List[Field] = []
    print_fmt = ""
    for line in text.splitlines():
        if line.startswith("name:") and not name:
            name = line.split(":", 1)[1].strip()
        elif line.startswith("ID:"):
            event_id = int(line.split(":", 1)[1].strip())
        elif line.startswith("print fmt:"):
            print_fmt = line.split(":", 1)[1].strip()
        else:
            m = _FIELD_RE.match(line)
            if not m:
                continue
            decl = m.group("decl").strip()
            array_len: Optional[int] = None
            am = _ARRAY_RE.match(decl)
            if am:
                ctype, fname = am.group("type").strip(), am.group("name")
                try:
                    array_len = int(am.group("len"), 0)
                except ValueError:
                    # "__data_loc char[] name" style or a symbolic length: the size says enough.
                    array_len = None
            else:
                pm = _PLAIN_RE.match(decl)
                if not pm:
                    raise TracefsError("cannot parse field declaration %r" % decl)
                ctype, fname = pm.group("type").strip(), pm.group("name")
            fields.append(
                Field(
                    name=fname,
                    ctype=ctype,
                    offset=int(m.group("off")),
                    size=int(m.group("size")),
                    signed=m.group("signed") == "1",
                    array_len=array_len,
                )
            )
    if not fields:
        raise TracefsError("no fields in format of %s:%s" % (system, name))
    return EventFormat(system=system, name=name, id=event_id, fields=tuple(fields), print_fmt=print_fmt)


_SYMBOL_RE = re.compile(r'\{\s*([^{},]+?)\s*,\s*"((?:[^"\\]|\\.)*)"\s*\}')


def parse_print_symbolic(print_fmt: str, field_name: str) -> List[Tuple[str, str]]:
    """Entries of the first ``__print_symbolic(REC->field_name, ...)`` in ``print_fmt``."""
    key = "__print_symbolic(REC->%s," % field_name
    start = print_fmt.find(key)
    if start < 0:
        return []
    i = start + len("__print_symbolic(")
    depth = 1
    end = i
    in_str = False
    while end < len(print_fmt) and depth:
        c = print_fmt[end]
        if in_str:
            if c == "\\":
                end += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        end += 1
    return [(m.group(1), m.group(2)) for m in _SYMBOL_RE.finditer(print_fmt, i, end)]


def find_tracefs() -> Optional[str]:
    for path in TRACEFS_CANDIDATES:
        if os.path.isdir(os.path.join(path, "events")):
            return path
    return None


def _mount_points(mountinfo: str = "/proc/self/mountinfo") -> Dict[str, str]:
    """mount point -> filesystem type (the last mount on a point wins, as the kernel shows it)."""
    out: Dict[str, str] = {}
    try:
        with open(mountinfo) as f:
            for line in f:
                pre, _, post = line.partition(" - ")
                fields = pre.split()
                if len(fields) > 4 and post:
                    point = fields[4].replace("\\040", " ")
                    out[point] = post.split()[0]
    except OSError:
        pass
    return out


def unreadable_tracefs(mountinfo: str = "/proc/self/mountinfo") -> Optional[str]:
    """Where tracefs is mounted but this process may not read it (None: not mounted, or readable).

    Tells "not mounted" from "not readable": tracefs' root is 0700 root, so without root
    ``os.path.isdir(<tracefs>/events)`` is False either way.
    """
    points = _mount_points(mountinfo)
    for path in TRACEFS_CANDIDATES:
        # any mount on /sys/kernel/tracing counts (a bind mount too); elsewhere only tracefs
        if not (points.get(path) == "tracefs" or (path == TRACEFS_CANDIDATES[0] and path in points)):
            continue
        try:
            os.stat(os.path.join(path, "events"))
        except PermissionError:
            return path
        except OSError:
            continue
    return None


def not_readable_message(path: str) -> str:
    return ("tracefs is mounted on %s but uid %d may not read it: run as root (sudo), or let readers in with "
            "`mount -o remount,mode=0755 %s` as root" % (path, os.geteuid(), path))


def _mount(source: str, target: str, fstype: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        err = ctypes.get_errno()
        raise TracefsError("%s is not mounted and mounting it on %s failed (%s): as root, mount -t %s nodev %s"
                           % (fstype, target, os.strerror(err), fstype, target))


def ensure_tracefs(mount_debugfs: bool = False) -> Tuple[str, List[str]]:
    """Return the tracefs path, mounting tracefs (and debugfs if asked) when absent.

    Returns (path, what was mounted) so the caller can say so once. bcc before 0.19 looks up
    tracepoint ids under /sys/kernel/debug/tracing only, so ``mount_debugfs`` is set for it.
    Every TracefsError names its fix.
    """
    mounted: List[str] = []
    if (
        mount_debugfs
        and not os.path.isdir(os.path.join(DEBUGFS, "tracing", "events"))
        and os.path.isdir(DEBUGFS)
        and not os.listdir(DEBUGFS)
    ):
        _mount("debugfs", DEBUGFS, "debugfs")
        mounted.append("debugfs on %s" % DEBUGFS)
    path = find_tracefs()
    if path is None:
        denied = unreadable_tracefs()
        if denied is not None:
            raise TracefsError(not_readable_message(denied))
        target = TRACEFS_CANDIDATES[0]
        if not os.path.isdir(target):
            raise TracefsError("%s does not exist: is this a Linux kernel with tracefs (CONFIG_TRACING)?" % target)
        _mount("tracefs", target, "tracefs")
        mounted.append("tracefs on %s" % target)
        path = find_tracefs()
        if path is None:
            raise TracefsError("mounted tracefs on %s but it has no events/ directory: a kernel with tracepoints "
                               "(CONFIG_TRACEPOINTS) is needed" % target)
    return path, mounted


class Tracefs:
    """Reads format files under a tracefs root (or a fixture directory with the same layout)."""

    def __init__(self, root: str) -> None:
        self.root = root

    def event_dir(self, system: str, name: str) -> str:
        return os.path.join(self.root, "events", system, name)

    def format(self, system: str, name: str) -> Optional[EventFormat]:
        path = os.path.join(self.event_dir(system, name), "format")
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise TracefsError("cannot read %s: %s" % (path, e.strerror)) from e
        return parse_format(text, system, name)
