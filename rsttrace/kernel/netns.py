"""Network namespaces: finding them, entering one from a thread, and listing its listeners.

Entering uses setns(2) on the calling thread only (a netns switch is per thread and allowed in a
multi-threaded process), so the tracer's other threads keep the host's view.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple, TypeVar

CLONE_NEWNET = 0x40000000
RUN_NETNS = "/run/netns"

T = TypeVar("T")

_libc: Optional[ctypes.CDLL] = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "setns: %s" % os.strerror(err))


def inode(path: str = "/proc/self/ns/net") -> int:
    return os.stat(path).st_ino


@contextmanager
def entered(ns_path: str) -> Iterator[None]:
    """Run the body in the netns at ``ns_path`` (this thread only), then come back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(ns_path, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def run_in(ns_path: str, fn: Callable[[], T]) -> T:
    """``fn()`` in another netns, on a short-lived thread so no caller thread ever moves."""
    result: List[T] = []
    error: List[BaseException] = []

    def body() -> None:
        try:
            with entered(ns_path):
                result.append(fn())
        except BaseException as e:  # handed to the caller below
            error.append(e)

    t = threading.Thread(target=body, name="rsttrace-netns")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


@dataclass(frozen=True)
class NetnsRef:
    inode: int
    ns_path: str  # a file that setns accepts
    net_dir: Optional[str]  # /proc/<pid>/net when a process lives there (no setns needed)


def discover(proc_root: str = "/proc", run_netns: str = RUN_NETNS) -> Dict[int, NetnsRef]:
    """Every netns with a process in it or a name under /run/netns (``ip netns add``)."""
    found: Dict[int, NetnsRef] = {}
    # A /proc that cannot be listed (EMFILE: out of descriptors) raises: an empty answer would
    # read as every namespace gone, and their counts would be retired.
    pids = [p for p in os.listdir(proc_root) if p.isdigit()]
    for pid in pids:
        ns_path = os.path.join(proc_root, pid, "ns", "net")
        try:
            ino = os.stat(ns_path).st_ino
        except OSError:
            continue  # exited, or not ours to see
        if ino not in found:
            found[ino] = NetnsRef(ino, ns_path, os.path.join(proc_root, pid, "net"))
    try:
        names = os.listdir(run_netns)
    except OSError:
        names = []
    for name in names:
        ns_path = os.path.join(run_netns, name)
        try:
            ino = os.stat(ns_path).st_ino
        except OSError:
            continue
        if ino not in found:
            found[ino] = NetnsRef(ino, ns_path, None)
    return found


def read_each(refs: Dict[int, NetnsRef], read: Callable[[str], T]) -> Dict[int, T]:
    """``read(net_dir)`` for each namespace; a namespace that vanished is left out.

    Each namespace is pinned by an fd opened on its ns file and entered with setns(2) from one
    worker thread, reading ``/proc/thread-self/net``. Reading ``/proc/<pid>/net`` instead would
    follow whatever namespace that process's main thread is in *now*: a process that setns()
    between our discovery and our read (a test harness, `ip netns exec`, a CNI plugin) would
    hand us another namespace's counters under this one's inode. Without CAP_SYS_ADMIN (no
    setns), ``/proc/<pid>/net`` is read and kept only if the pid's namespace was the same
    before and after the read.
    """
    pinned: List[Tuple[int, int, NetnsRef]] = []
    for ino, ref in refs.items():
        try:
            fd = os.open(ref.ns_path, os.O_RDONLY)
        except OSError:
            continue
        if os.fstat(fd).st_ino != ino:  # moved on since discovery
            os.close(fd)
            continue
        pinned.append((ino, fd, ref))
    out: Dict[int, T] = {}
    fallback: List[Tuple[int, NetnsRef]] = []

    def worker() -> None:
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        except OSError:  # out of descriptors: this reading is skipped, the next poll tries again
            return
        try:
            for ino, fd, ref in pinned:
                try:
                    _setns(fd)
                except OSError:
                    fallback.append((ino, ref))  # EPERM (no CAP_SYS_ADMIN), or not an ns file
                    continue
                try:
                    out[ino] = read("/proc/thread-self/net")
                except OSError:
                    pass
            _setns(own)
        except OSError:
            pass
        finally:
            os.close(own)

    try:
        t = threading.Thread(target=worker, name="rsttrace-netns-read")
        t.start()
        t.join()
    finally:
        for _ino, fd, _ref in pinned:
            os.close(fd)
    for ino, ref in fallback:
        if ref.net_dir is None:
            continue
        ns_file = os.path.join(os.path.dirname(ref.net_dir), "ns", "net")
        try:
            if os.stat(ns_file).st_ino != ino:
                continue
            value = read(ref.net_dir)
            if os.stat(ns_file).st_ino != ino:
                continue
        except OSError:
            continue
        out[ino] = value
    return out


# --- sock_diag: listening sockets and their accept queues (what `ss -lt` shows) ----------
# uapi: include/uapi/linux/sock_diag.h, inet_diag.h, netlink.h
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
_NLMSG = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBxI48s")  # inet_diag_req_v2 with an all-zero inet_diag_sockid
_MSG = struct.Struct("=BBBBHH16s16sI8sIIIII")  # inet_diag_msg


@dataclass(frozen=True)
class Listener:
    family: int
    addr: str
    port: int
    backlog: int  # accept queue length now (ss Recv-Q)
    max_backlog: int  # accept queue limit (ss Send-Q)
    inode: int

    @property
    def full(self) -> bool:
        # sk_acceptq_is_full(): ack_backlog > max_ack_backlog (include/net/sock.h)
        return self.backlog > self.max_backlog


def listeners(tcp_listen_state: int) -> List[Listener]:
    """TCP listeners of the calling thread's netns, IPv4 and IPv6."""
    out: List[Listener] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        out.extend(_dump(family, 1 << tcp_listen_state))
    return out


def flooded(tcp_listen_state: int, tcp_syn_recv_state: int) -> List[Tuple[Listener, int]]:
    """Listeners of the calling thread's netns with request sockets, most requests first.

    Request sockets (SYN_RECV) are dumped by sock_diag when the SYN_RECV bit is asked for
    (net/ipv4/inet_diag.c adds TCPF_NEW_SYN_RECV); each has its listener's local port. The
    listener holding most of them is where a SYN flood lands. Empty where none are queued
    (syncookies=2 answers every SYN with a cookie and keeps no request).
    """
    lst = listeners(tcp_listen_state)
    if not lst:
        return []
    counts: Dict[Tuple[int, int, str], int] = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        for req in _dump(family, 1 << tcp_syn_recv_state):
            key = (req.family, req.port, req.addr)
            counts[key] = counts.get(key, 0) + 1
    wild: Dict[int, str] = {int(socket.AF_INET): "0.0.0.0", int(socket.AF_INET6): "::"}
    out: List[Tuple[Listener, int]] = []
    for one in lst:
        n = sum(c for (fam, port, addr), c in counts.items()
                if fam == one.family and port == one.port and one.addr in (addr, wild.get(one.family)))
        if n:
            out.append((one, n))
    out.sort(key=lambda x: -x[1])
    return out


def _dump(family: int, states: int) -> List[Listener]:
    out: List[Listener] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as s:
        req = _REQ.pack(family, socket.IPPROTO_TCP, 0, states, b"\0" * 48)
        s.sendall(_NLMSG.pack(_NLMSG.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + req)
        while True:
            data = s.recv(65536)
            off = 0
            while off + _NLMSG.size <= len(data):
                length, mtype, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
                if length < _NLMSG.size:
                    return out
                if mtype == NLMSG_DONE:
                    return out
                if mtype == NLMSG_ERROR:
                    (errno,) = struct.unpack_from("=i", data, off + _NLMSG.size)
                    raise OSError(-errno, "sock_diag: %s" % os.strerror(-errno))
                if mtype == SOCK_DIAG_BY_FAMILY and length >= _NLMSG.size + _MSG.size:
                    fam, _state, _timer, _retrans, sport, _dport, src, _dst, _if, _cookie, _exp, rq, wq, _uid, ino = (
                        _MSG.unpack_from(data, off + _NLMSG.size)
                    )
                    addr = socket.inet_ntop(fam, src[:4] if fam == socket.AF_INET else src)
                    out.append(Listener(fam, addr, socket.ntohs(sport), rq, wq, ino))
                off += (length + 3) & ~3
