"""cgroup path -> (pod UID, container id), for every driver and runtime naming."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple

import pytest

from rsttrace.enrich.cgroups import (
    find_cgroup2_root,
    parse_cgroup_path,
    parse_proc_cgroup,
    walk_cgroup2,
)

UID = "0a1b2c3d-4e5f-6789-abcd-ef0123456789"
UID_ = UID.replace("-", "_")  # as the systemd driver writes it
STATIC_UID = "6a4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b"  # mirror pods: a 32-hex hash
CID = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00112233445566778899"
CID2 = "aa" * 32

PARSE_CASES = [
    # --- cgroupfs driver (containerd / Docker: bare id; CRI-O: crio-<id>)
    ("cgroupfs burstable", "/kubepods/burstable/pod%s/%s" % (UID, CID), (UID, CID)),
    ("cgroupfs besteffort", "/kubepods/besteffort/pod%s/%s" % (UID, CID), (UID, CID)),
    ("cgroupfs guaranteed", "/kubepods/pod%s/%s" % (UID, CID), (UID, CID)),
    ("cgroupfs crio", "/kubepods/burstable/pod%s/crio-%s" % (UID, CID), (UID, CID)),
    ("cgroupfs docker prefix", "/kubepods/pod%s/docker-%s" % (UID, CID), (UID, CID)),
    ("cgroupfs pod level", "/kubepods/burstable/pod%s" % (UID,), (UID, None)),
    (
        "cgroupfs static pod uid",
        "/kubepods/burstable/pod%s/%s" % (STATIC_UID, CID),
        (STATIC_UID, CID),
    ),
    ("cgroupfs kubelet cgroup-root", "/kubelet/kubepods/pod%s/%s" % (UID, CID), (UID, CID)),
    # --- systemd driver
    (
        "systemd containerd burstable",
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod%s.slice/cri-containerd-%s.scope"
        % (UID_, CID),
        (UID, CID),
    ),
    (
        "systemd crio besteffort",
        ("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod%s.slice/crio-%s.scope" % (UID_, CID)),
        (UID, CID),
    ),
    (
        "systemd docker guaranteed",
        "/kubepods.slice/kubepods-pod%s.slice/docker-%s.scope" % (UID_, CID),
        (UID, CID),
    ),
    (
        "systemd crio conmon is pod-level, not a container",
        "/kubepods.slice/kubepods-pod%s.slice/crio-conmon-%s.scope" % (UID_, CID),
        (UID, None),
    ),
    (
        "systemd pod slice only",
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod%s.slice" % (UID_,),
        (UID, None),
    ),
    (
        "systemd nested cgroup inside the container",
        "/kubepods.slice/kubepods-pod%s.slice/cri-containerd-%s.scope/init.scope" % (UID_, CID),
        (UID, CID),
    ),
    (
        "kind node: kubelet.slice prefix",
        (
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
            "kubelet-kubepods-besteffort-pod%s.slice/cri-containerd-%s.scope" % (UID_, CID)
        ),
        (UID, CID),
    ),
    (
        "seen from inside another cgroup namespace",
        "/../../kubepods-besteffort-pod%s.slice/cri-containerd-%s.scope" % (UID_, CID),
        (UID, CID),
    ),
    (
        "uppercase hex is normalized",
        "/kubepods/pod%s/%s" % (UID.upper(), CID.upper()),
        (UID, CID),
    ),
    # --- not a pod
    ("user session", "/user.slice/user-1000.slice/session-3.scope", None),
    ("docker daemon", "/system.slice/docker.service", None),
    ("containerd daemon", "/system.slice/containerd.service", None),
    # --- a container outside any pod: empty pod UID, its id (full ids only)
    ("plain docker container", "/system.slice/docker-%s.scope" % (CID,), ("", CID)),
    ("podman, systemd manager", "/machine.slice/libpod-%s.scope" % (CID,), ("", CID)),
    ("podman, cgroupfs manager", "/libpod_parent/libpod-%s" % (CID,), ("", CID)),
    ("podman, nested cgroup inside", "/machine.slice/libpod-%s.scope/container" % (CID,), ("", CID)),
    ("podman's conmon is not the container", "/machine.slice/libpod-conmon-%s.scope" % (CID,), None),
    ("podman short id is not taken", "/libpod_parent/libpod-%s" % (CID[:12],), None),
    ("pod wins over a standalone-looking parent", "/libpod_parent/libpod-%s/kubepods/pod%s/%s" % (CID2, UID, CID),
     (UID, CID)),
    # --- not a pod
    ("root", "/", None),
    ("qos slice", "/kubepods.slice/kubepods-burstable.slice", None),
    ("qos dir", "/kubepods/besteffort", None),
    ("pod word without uid", "/kubepods/podfoo/bar", None),
    ("non-kubepods pod slice", "/system.slice/foo-pod%s.slice" % (UID_,), None),
    ("empty", "", None),
]


@pytest.mark.parametrize(
    ("path", "expected"),
    [pytest.param(p, e, id=name) for name, p, e in PARSE_CASES],
)
def test_parse_cgroup_path(path: str, expected: Optional[Tuple[str, Optional[str]]]) -> None:
    assert parse_cgroup_path(path) == expected


def test_parsed_identity_unpacks_as_uid_and_container_id() -> None:
    parsed = parse_cgroup_path("/kubepods/pod%s/%s" % (UID, CID))
    assert parsed is not None
    uid, cid = parsed
    assert (uid, cid) == (parsed.pod_uid, parsed.container_id) == (UID, CID)


V1_SYSTEMD_DRIVER = """\
12:pids:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod%s.slice/cri-containerd-%s.scope
11:cpuset:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod%s.slice/cri-containerd-%s.scope
10:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod%s.slice/cri-containerd-%s.scope
1:name=systemd:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod%s.slice/cri-containerd-%s.scope
0::/
""" % (UID_, CID, UID_, CID, UID_, CID, UID_, CID)

V1_CGROUPFS_DRIVER = """\
11:perf_event:/kubepods/besteffort/pod%s/%s
7:cpu,cpuacct:/kubepods/besteffort/pod%s/%s
4:memory:/kubepods/besteffort/pod%s/%s
1:name=systemd:/kubepods/besteffort/pod%s/%s
""" % (UID, CID, UID, CID, UID, CID, UID, CID)

V2_ONLY = "0::/kubepods.slice/kubepods-pod%s.slice/crio-%s.scope\n" % (UID_, CID)

HOST_PROCESS = """\
12:pids:/system.slice/sshd.service
4:memory:/system.slice/sshd.service
1:name=systemd:/system.slice/sshd.service
0::/system.slice/sshd.service
"""

# Hierarchies can disagree (a runtime that moved a process in one controller
# only); the unified line wins because its ids are the ones BPF reports.
DISAGREEING = """\
4:memory:/kubepods/pod%s/%s
0::/kubepods/pod%s/%s
""" % (UID, CID2, UID, CID)

# A line that names the container beats one that names only the pod.
POD_LEVEL_FIRST = """\
0::/kubepods/pod%s
4:memory:/kubepods/pod%s/%s
""" % (UID, UID, CID)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(V1_SYSTEMD_DRIVER, (UID, CID), id="v1 hybrid systemd driver"),
        pytest.param(V1_CGROUPFS_DRIVER, (UID, CID), id="v1 cgroupfs driver"),
        pytest.param(V2_ONLY, (UID, CID), id="v2 only"),
        pytest.param(HOST_PROCESS, None, id="host process"),
        pytest.param(DISAGREEING, (UID, CID), id="unified line preferred"),
        pytest.param(POD_LEVEL_FIRST, (UID, CID), id="container line beats pod line"),
        pytest.param("garbage\n\n", None, id="malformed"),
    ],
)
def test_parse_proc_cgroup(text: str, expected: Optional[Tuple[str, str]]) -> None:
    assert parse_proc_cgroup(text) == expected


def test_find_cgroup2_root_pure_v2(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    assert find_cgroup2_root(str(tmp_path)) == str(tmp_path)


def test_find_cgroup2_root_hybrid_uses_unified(tmp_path: Path) -> None:
    (tmp_path / "memory").mkdir()
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("")
    assert find_cgroup2_root(str(tmp_path)) == str(tmp_path / "unified")


def test_find_cgroup2_root_pure_v1_has_none(tmp_path: Path) -> None:
    (tmp_path / "memory").mkdir()
    assert find_cgroup2_root(str(tmp_path)) is None


def test_walk_cgroup2_maps_directory_inodes_to_pods(tmp_path: Path) -> None:
    pod = tmp_path / "kubepods.slice" / "kubepods-besteffort.slice" / ("kubepods-besteffort-pod%s.slice" % (UID_,))
    ctr = pod / ("cri-containerd-%s.scope" % (CID,))
    ctr.mkdir(parents=True)
    (ctr / "cgroup.procs").write_text("")
    host = tmp_path / "system.slice" / "sshd.service"
    host.mkdir(parents=True)

    pods, seen = walk_cgroup2(str(tmp_path))

    ctr_ino = os.stat(ctr).st_ino
    assert pods[ctr_ino] == ("/" + ctr.relative_to(tmp_path).as_posix(), (UID, CID))
    assert pods[os.stat(pod).st_ino][1] == (UID, None)
    assert os.stat(host).st_ino not in pods
    # Non-pod directories are remembered so lookups of them do not rescan.
    assert os.stat(host).st_ino in seen
    assert os.stat(tmp_path).st_ino in seen
    # Only directories count: the cgroup.procs file is not a cgroup.
    assert os.stat(ctr / "cgroup.procs").st_ino not in seen


def test_walk_cgroup2_missing_root_is_empty(tmp_path: Path) -> None:
    assert walk_cgroup2(str(tmp_path / "absent")) == ({}, set())
