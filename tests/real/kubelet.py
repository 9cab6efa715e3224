"""A kubelet-shaped pod on this machine, for attribution tests without Kubernetes.

What a kubelet leaves on a node: a network namespace; a cgroup v2 directory whose path carries
the pod UID and a containerd container id (systemd driver naming); a process in both; and the
kubelet's log directories naming namespace, pod and container.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from typing import Dict, List

import pytest

from rsttrace.enrich import find_cgroup2_root
from tests.real.netlab import Netns

# The pod's process: join the container's cgroup, then its namespace (setns, as a runtime does:
# `ip netns exec` would remount /sys and hide the cgroup2 tree), then run the pod's code given
# as the third argument. It prints its listening port first.
ENTER = r"""
import ctypes, os, sys
with open(sys.argv[1], "w") as f:
    f.write(str(os.getpid()))
fd = os.open(sys.argv[2], os.O_RDONLY)
if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
    sys.exit("setns failed")
exec(sys.argv[3])
"""


class KubeletPod:
    def __init__(self, tmp: str, code: str, namespace: str = "shop", name: str = "checkout-7d9f",
                 container: str = "api") -> None:
        cg2 = find_cgroup2_root("/sys/fs/cgroup")
        if cg2 is None:
            pytest.fail("no cgroup v2 hierarchy on this machine (needed to attribute by cgroup)")
        self.uid = str(uuid.uuid4())
        self.cid = uuid.uuid4().hex + uuid.uuid4().hex  # 64 hex, like containerd's ids
        self.namespace, self.name, self.container = namespace, name, container
        slice_ = "kubepods-besteffort-pod%s.slice" % self.uid.replace("-", "_")
        self.cgroup = os.path.join(cg2, "kubepods.slice", "kubepods-besteffort.slice", slice_,
                                   "cri-containerd-%s.scope" % self.cid)
        os.makedirs(self.cgroup)
        self.pods_dir = os.path.join(tmp, "pods")
        self.containers_dir = os.path.join(tmp, "containers")
        logdir = os.path.join(self.pods_dir, "%s_%s_%s" % (namespace, name, self.uid), container)
        os.makedirs(logdir)
        os.makedirs(self.containers_dir)
        open(os.path.join(logdir, "0.log"), "w").close()
        os.symlink(os.path.join(logdir, "0.log"), os.path.join(
            self.containers_dir, "%s_%s_%s-%s.log" % (name, namespace, container, self.cid)))
        self.ns = Netns()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ENTER, os.path.join(self.cgroup, "cgroup.procs"), self.ns.path, code],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def args(self) -> List[str]:
        return ["--pods-dir", self.pods_dir, "--containers-dir", self.containers_dir]

    def labels(self) -> Dict[str, str]:
        return {"namespace": self.namespace, "pod": self.name, "container": self.container, "container_id": self.cid}

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.ns.delete()
        d = self.cgroup
        for _ in range(50):  # the cgroup can only go once its process has left it
            try:
                os.rmdir(d)
                break
            except OSError:
                time.sleep(0.1)
        for _ in range(3):
            d = os.path.dirname(d)
            try:
                os.rmdir(d)
            except OSError:
                break
