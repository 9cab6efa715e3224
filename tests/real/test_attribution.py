"""A kubelet-shaped "pod" on this machine (tests/real/kubelet.py), and its resets attributed to it."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from typing import Any, Dict, Iterator, List

import pytest

from tests.real.kubelet import KubeletPod
from tests.real.netlab import closed_port, connect_refused, overflow_on_ack, wait_for
from tests.real.realkernel import require_real_kernel
from tests.real.test_cli import rsttrace, wait_ready
from tests.real.test_exporter import free_port, sample, scrape

# The pod's server: close every connection with its data unread (TCP_ABORT_ON_CLOSE, sent
# from a socket in the container's cgroup).
SERVER = """
import socket, time
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(8)
print(srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    time.sleep(0.2)
    conn.close()
"""


@pytest.fixture()
def pod(tmp_path: str) -> Iterator[KubeletPod]:
    require_real_kernel()
    p = KubeletPod(str(tmp_path), SERVER)
    yield p
    p.close()


def test_events_carry_the_pod(pod: KubeletPod) -> None:
    proc = subprocess.Popen(
        rsttrace("--log-format", "json", "trace", "--json", "--duration", "20", *pod.args()),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_ready(proc)
        time.sleep(0.5)
        with pod.ns.inside():
            connect_refused(socket.AF_INET, "127.0.0.1", closed_port(socket.AF_INET, "127.0.0.1"), 2)
            c = socket.create_connection(("127.0.0.1", pod.port))
            c.sendall(b"never read")
            wait_for(lambda: _reset(c), timeout=5)
            c.close()
            port, socks = overflow_on_ack("127.0.0.1", clients=4, backlog=1)
            time.sleep(0.3)
            for s in socks:
                s.close()
        # a host reset, for contrast
        connect_refused(socket.AF_INET, "127.0.0.1", closed_port(socket.AF_INET, "127.0.0.1"), 1)
        time.sleep(1.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    events: List[Dict[str, Any]] = [json.loads(ln) for ln in out.splitlines()]
    in_pod = [e for e in events if e["netns"] == pod.ns.inode]
    want = {k: v for k, v in pod.labels().items() if k in ("namespace", "pod")}
    assert in_pod and all({k: e[k] for k in want} == want for e in in_pod)
    abort = [e for e in in_pod if e["kind"] == "sent" and e["reason"] == "TCP_ABORT_ON_CLOSE"]
    assert abort, [(e["kind"], e["reason"]) for e in in_pod]
    # the server's own socket: its cgroup names the exact container
    assert {k: abort[0][k] for k in pod.labels()} == pod.labels()
    assert any(e["kind"] == "sent" and e["reason"] == "NO_SOCKET" for e in in_pod)
    assert any(e["kind"].startswith("listen_overflow") for e in in_pod)
    host = [e for e in events if e["netns"] != pod.ns.inode and e["kind"] == "sent"]
    # a host process's events carry no attribution keys (not empty strings: nothing was found)
    assert host and all("namespace" not in e and "pod" not in e for e in host)


def _reset(s: socket.socket) -> bool:
    s.settimeout(0.1)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_metrics_carry_the_pod(pod: KubeletPod) -> None:
    port = free_port()
    proc = subprocess.Popen(
        rsttrace("--log-format", "json", "export", "--listen", "127.0.0.1:%d" % port, "--metric-pod-labels",
                 *pod.args()),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_ready(proc)
        time.sleep(0.5)
        with pod.ns.inside():
            connect_refused(socket.AF_INET, "127.0.0.1", closed_port(socket.AF_INET, "127.0.0.1"), 3)
        assert wait_for(lambda: sample(scrape(port), "rsttrace_tcp_resets_sent_total", {
            "reason": "NO_SOCKET", "reason_source": "kernel", "state": "", "family": "ipv4",
            "namespace": pod.namespace, "pod": pod.name}) == 3, timeout=10)
        connect_refused(socket.AF_INET, "127.0.0.1", closed_port(socket.AF_INET, "127.0.0.1"), 1)  # host
        host = {"reason": "NO_SOCKET", "reason_source": "kernel", "state": "", "family": "ipv4",
                "namespace": "", "pod": ""}
        assert wait_for(lambda: sample(scrape(port), "rsttrace_tcp_resets_sent_total", host) >= 1, timeout=10)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
