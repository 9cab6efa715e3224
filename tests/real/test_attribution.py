"""A kubelet-shaped "pod" on this machine, and its resets attributed to it by name.

The pod is what a kubelet would leave on a node: a network namespace, a cgroup v2 directory whose
path carries a pod UID and a containerd container id (systemd driver naming), a process in both,
and the kubelet's log directories naming namespace, pod and container. No Kubernetes is needed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Any, Dict, Iterator, List

import pytest
from netlab import Netns, closed_port, connect_refused, overflow_on_ack, wait_for
from realkernel import require_real_kernel
from test_cli import rsttrace, wait_ready
from test_exporter import free_port, sample, scrape

from rsttrace.enrich import find_cgroup2_root

SERVER = r"""
import ctypes, os, socket, sys, time
with open(sys.argv[1], "w") as f:   # join the container's cgroup before making any socket
    f.write(str(os.getpid()))
fd = os.open(sys.argv[2], os.O_RDONLY)  # then its network namespace (setns, as a runtime does;
if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:  # `ip netns exec` would hide
    sys.exit("setns failed")                                   # the cgroup2 mount)
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(8)
print(srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    time.sleep(0.2)                  # let the client's data arrive, never read it
    conn.close()                     # close with unread data: TCP_ABORT_ON_CLOSE, in this cgroup
"""


class Pod:
    def __init__(self, tmp: str) -> None:
        cg2 = find_cgroup2_root("/sys/fs/cgroup")
        if cg2 is None:
            pytest.fail("no cgroup v2 hierarchy on this machine (needed to attribute by cgroup)")
        self.uid = str(uuid.uuid4())
        self.cid = uuid.uuid4().hex + uuid.uuid4().hex  # 64 hex, like containerd's ids
        self.namespace, self.name, self.container = "shop", "checkout-7d9f", "api"
        slice_ = "kubepods-besteffort-pod%s.slice" % self.uid.replace("-", "_")
        self.cgroup = os.path.join(cg2, "kubepods.slice", "kubepods-besteffort.slice", slice_,
                                   "cri-containerd-%s.scope" % self.cid)
        os.makedirs(self.cgroup)
        self.pods_dir = os.path.join(tmp, "pods")
        self.containers_dir = os.path.join(tmp, "containers")
        logdir = os.path.join(self.pods_dir, "%s_%s_%s" % (self.namespace, self.name, self.uid), self.container)
        os.makedirs(logdir)
        os.makedirs(self.containers_dir)
        open(os.path.join(logdir, "0.log"), "w").close()
        os.symlink(os.path.join(logdir, "0.log"), os.path.join(
            self.containers_dir, "%s_%s_%s-%s.log" % (self.name, self.namespace, self.container, self.cid)))
        self.ns = Netns()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, os.path.join(self.cgroup, "cgroup.procs"), self.ns.path],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def args(self) -> List[str]:
        return ["--pods-dir", self.pods_dir, "--containers-dir", self.containers_dir]

    def labels(self) -> Dict[str, str]:
        return {"namespace": self.namespace, "pod": self.name, "container": self.container, "container_id": self.cid}

    def close(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.ns.delete()
        for _ in range(50):  # the cgroup can only go once its process has left it
            try:
                os.rmdir(self.cgroup)
                break
            except OSError:
                time.sleep(0.1)
        d = os.path.dirname(self.cgroup)
        for _ in range(3):
            try:
                os.rmdir(d)
            except OSError:
                break
            d = os.path.dirname(d)


@pytest.fixture()
def pod(tmp_path: str) -> Iterator[Pod]:
    require_real_kernel()
    p = Pod(str(tmp_path))
    yield p
    p.close()


def test_events_carry_the_pod(pod: Pod) -> None:
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
    assert host and all(e["namespace"] == "" and e["pod"] == "" for e in host)


def _reset(s: socket.socket) -> bool:
    s.settimeout(0.1)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_metrics_carry_the_pod(pod: Pod) -> None:
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
