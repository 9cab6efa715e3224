"""Helpers for real-kernel tests: private network namespaces and the resets made inside them.

Every scenario runs in a namespace of its own (`ip netns add`), so the kernel's counters read
inside it (/proc/net/snmp, /proc/net/netstat) count exactly what the scenario did, whatever
else the machine is doing. Traffic stays on that namespace's loopback.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from rsttrace.kernel import netns as nsmod
from rsttrace.kernel import procnet


class Netns:
    def __init__(self) -> None:
        self.name = "rsttrace-t-" + uuid.uuid4().hex[:8]
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.path = os.path.join(nsmod.RUN_NETNS, self.name)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True)
        self.inode = os.stat(self.path).st_ino

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)

    @contextmanager
    def inside(self) -> Iterator[None]:
        """Sockets created in the body belong to this namespace (this thread switches)."""
        with nsmod.entered(self.path):
            yield

    def counters(self) -> procnet.Counters:
        with self.inside():
            return procnet.read("/proc/thread-self/net")

    def sysctl(self, name: str, value: str) -> None:
        with self.inside(), open("/proc/sys/" + name.replace(".", "/"), "w") as f:
            f.write(value)


def now_ns() -> int:
    return time.monotonic_ns()  # the clock bpf_ktime_get_ns() reads: compare with ktime_ns


def delta(before: procnet.Counters, after: procnet.Counters, section: str, name: str) -> int:
    return procnet.get(after, section, name) - procnet.get(before, section, name)


def closed_port(family: int, addr: str) -> int:
    """A port nothing listens on in this namespace (bound then closed, so it is free)."""
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((addr, 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


SO_COOKIE = 57  # include/uapi/asm-generic/socket.h; Python's socket module does not name it


def connect_refused(family: int, addr: str, port: int, n: int,
                    cookies: Optional[Dict[int, int]] = None) -> List[int]:
    """n connects to a closed port; returns the client ports used. With ``cookies``, each
    client's socket cookie is asked for first (SO_COOKIE, which makes the kernel assign one)
    and recorded by client port."""
    ports: List[int] = []
    while len(ports) < n:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.bind((addr, 0))
        if s.getsockname()[1] == port:
            s.close()  # an ephemeral port equal to the target would connect to itself
            continue
        ports.append(s.getsockname()[1])
        if cookies is not None:
            cookies[ports[-1]] = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), sys.byteorder)
        try:
            s.connect((addr, port))
        except ConnectionRefusedError:
            pass
        else:
            raise AssertionError("port %d unexpectedly open" % port)
        finally:
            s.close()
    return ports


def pair(family: int = socket.AF_INET, addr: str = "127.0.0.1") -> Tuple[socket.socket, socket.socket, socket.socket]:
    """(listener, client, accepted) connected over loopback."""
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.bind((addr, 0))
    srv.listen(8)
    cl = socket.socket(family, socket.SOCK_STREAM)
    cl.connect(srv.getsockname()[:2])
    acc, _ = srv.accept()
    return srv, cl, acc


def linger0(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def overflow_accept_queue(addr: str, clients: int, backlog: int = 1) -> Tuple[int, List[socket.socket]]:
    """A listener that never accepts, and more clients than its queue holds.

    Returns (listening port, client sockets). Clients connect non-blocking: a SYN or final ACK
    that meets a full accept queue is dropped, and ListenOverflows counts it.
    """
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind((addr, 0))
    srv.listen(backlog)
    port = srv.getsockname()[1]
    socks = [srv]
    for _ in range(clients):
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect((addr, port))
        except (BlockingIOError, ConnectionRefusedError):
            pass
        socks.append(c)
    return port, socks


def events_in(events: List[Dict[str, object]], netns: int, kind: Optional[str] = None) -> List[Dict[str, object]]:
    return [e for e in list(events) if e.get("netns") == netns and (kind is None or e.get("kind") == kind)]


def overflow_on_ack(addr: str, clients: int, backlog: int = 1) -> Tuple[int, List[socket.socket]]:
    """Final ACKs that meet a full accept queue (tcp_v4_syn_recv_sock's overflow path).

    TCP_DEFER_ACCEPT keeps completed handshakes as request sockets until data arrives, so
    every client's SYN is admitted while the accept queue is still empty; listen() again
    with a small backlog; then each client's data is the ACK that creates the child, and all
    beyond the queue's room are dropped (or reset with tcp_abort_on_overflow=1).
    """
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 30)
    srv.bind((addr, 0))
    srv.listen(64)
    port = srv.getsockname()[1]
    socks = [srv]
    for _ in range(clients):
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        c.connect((addr, port))
        socks.append(c)
    srv.listen(backlog)
    for c in socks[1:]:
        c.send(b"hello")
    return port, socks
