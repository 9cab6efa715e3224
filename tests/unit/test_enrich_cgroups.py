"""cgroup path -> (pod UID, container id), for every driver and runtime naming."""

from __future__ import annotations

import os
from pathlib import Path

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
    ("cgroupfs burstable", f"/kubepods/burstable/pod{UID}/{CID}", (UID, CID)),
    ("cgroupfs besteffort", f"/kubepods/besteffort/pod{UID}/{CID}", (UID, CID)),
    ("cgroupfs guaranteed", f"/kubepods/pod{UID}/{CID}", (UID, CID)),
    ("cgroupfs crio", f"/kubepods/burstable/pod{UID}/crio-{CID}", (UID, CID)),
    ("cgroupfs docker prefix", f"/kubepods/pod{UID}/docker-{CID}", (UID, CID)),
    ("cgroupfs pod level", f"/kubepods/burstable/pod{UID}", (UID, None)),
    (
        "cgroupfs static pod uid",
        f"/kubepods/burstable/pod{STATIC_UID}/{CID}",
        (STATIC_UID, CID),
    ),
    ("cgroupfs kubelet cgroup-root", f"/kubelet/kubepods/pod{UID}/{CID}", (UID, CID)),
    # --- systemd driver
    (
        "systemd containerd burstable",
        (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"),
        (UID, CID),
    ),
    (
        "systemd crio besteffort",
        (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope"),
        (UID, CID),
    ),
    (
        "systemd docker guaranteed",
        f"/kubepods.slice/kubepods-pod{UID_}.slice/docker-{CID}.scope",
        (UID, CID),
    ),
    (
        "systemd crio conmon is pod-level, not a container",
        f"/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{CID}.scope",
        (UID, None),
    ),
    (
        "systemd pod slice only",
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice",
        (UID, None),
    ),
    (
        "systemd nested cgroup inside the container",
        f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope/init.scope",
        (UID, CID),
    ),
    (
        "kind node: kubelet.slice prefix",
        (
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
            f"kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
        ),
        (UID, CID),
    ),
    (
        "seen from inside another cgroup namespace",
        f"/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope",
        (UID, CID),
    ),
    (
        "uppercase hex is normalized",
        f"/kubepods/pod{UID.upper()}/{CID.upper()}",
        (UID, CID),
    ),
    # --- not a pod
    ("user session", "/user.slice/user-1000.slice/session-3.scope", None),
    ("docker daemon", "/system.slice/docker.service", None),
    ("containerd daemon", "/system.slice/containerd.service", None),
    # --- a container outside any pod: empty pod UID, its id (full ids only)
    ("plain docker container", f"/system.slice/docker-{CID}.scope", ("", CID)),
    ("podman, systemd manager", f"/machine.slice/libpod-{CID}.scope", ("", CID)),
    ("podman, cgroupfs manager", f"/libpod_parent/libpod-{CID}", ("", CID)),
    ("podman, nested cgroup inside", f"/machine.slice/libpod-{CID}.scope/container", ("", CID)),
    ("podman's conmon is not the container", f"/machine.slice/libpod-conmon-{CID}.scope", None),
    ("podman short id is not taken", f"/libpod_parent/libpod-{CID[:12]}", None),
    ("pod wins over a standalone-looking parent", f"/libpod_parent/libpod-{CID2}/kubepods/pod{UID}/{CID}",
     (UID, CID)),
    # --- not a pod
    ("root", "/", None),
    ("qos slice", "/kubepods.slice/kubepods-burstable.slice", None),
    ("qos dir", "/kubepods/besteffort", None),
    ("pod word without uid", "/kubepods/podfoo/bar", None),
    ("non-kubepods pod slice", f"/system.slice/foo-pod{UID_}.slice", None),
    ("empty", "", None),
]


@pytest.mark.parametrize(
    ("path", "expected"),
    [pytest.param(p, e, id=name) for name, p, e in PARSE_CASES],
)
def test_parse_cgroup_path(path: str, expected: tuple[str, str | None] | None) -> None:
    assert parse_cgroup_path(path) == expected


def test_parsed_identity_unpacks_as_uid_and_container_id() -> None:
    parsed = parse_cgroup_path(f"/kubepods/pod{UID}/{CID}")
    assert parsed is not None
    uid, cid = parsed
    assert (uid, cid) == (parsed.pod_uid, parsed.container_id) == (UID, CID)


V1_SYSTEMD_DRIVER = f"""\
12:pids:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope
11:cpuset:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope
10:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope
1:name=systemd:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope
0::/
"""

V1_CGROUPFS_DRIVER = f"""\
11:perf_event:/kubepods/besteffort/pod{UID}/{CID}
7:cpu,cpuacct:/kubepods/besteffort/pod{UID}/{CID}
4:memory:/kubepods/besteffort/pod{UID}/{CID}
1:name=systemd:/kubepods/besteffort/pod{UID}/{CID}
"""

V2_ONLY = f"0::/kubepods.slice/kubepods-pod{UID_}.slice/crio-{CID}.scope\n"

HOST_PROCESS = """\
12:pids:/system.slice/sshd.service
4:memory:/system.slice/sshd.service
1:name=systemd:/system.slice/sshd.service
0::/system.slice/sshd.service
"""

# Hierarchies can disagree (a runtime that moved a process in one controller
# only); the unified line wins because its ids are the ones BPF reports.
DISAGREEING = f"""\
4:memory:/kubepods/pod{UID}/{CID2}
0::/kubepods/pod{UID}/{CID}
"""

# A line that names the container beats one that names only the pod.
POD_LEVEL_FIRST = f"""\
0::/kubepods/pod{UID}
4:memory:/kubepods/pod{UID}/{CID}
"""


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
def test_parse_proc_cgroup(text: str, expected: tuple[str, str] | None) -> None:
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
    pod = tmp_path / "kubepods.slice" / "kubepods-besteffort.slice" / f"kubepods-besteffort-pod{UID_}.slice"
    ctr = pod / f"cri-containerd-{CID}.scope"
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
