"""Parse Kubernetes pod and container identity out of cgroup paths.

The kubelet and the container runtimes encode the pod UID and the container
id in cgroup directory names.  That is the only place a process carries them,
so everything here is string parsing on paths; no runtime or API is consulted.

Rules (see ``parse_cgroup_path``):

* pod component, cgroupfs driver: ``pod<uid>`` (``/kubepods/burstable/pod<uid>``,
  ``/kubepods/pod<uid>`` for Guaranteed, ``/kubepods/besteffort/pod<uid>``);
* pod component, systemd driver: ``<...kubepods...>-pod<uid>.slice`` with the
  UID's dashes written as underscores (systemd reserves ``-`` as the slice
  hierarchy separator), e.g. ``kubepods-burstable-pod1234_abcd....slice``;
* container component = the component right below the pod component:
  ``cri-containerd-<id>.scope``, ``crio-<id>.scope``, ``docker-<id>.scope``
  (systemd) or a bare ``<id>`` / ``crio-<id>`` / ``docker-<id>`` (cgroupfs).

Outside any pod, a container of podman or Docker run by hand (``libpod-<id>.scope`` or
``docker-<id>.scope`` under systemd, ``libpod-<id>`` under podman's cgroupfs manager, full
64-digit ids only) gives an identity with an empty pod UID: its container id names it.

The pod component is searched anywhere in the path, not only under
``/kubepods``: a kubelet ``--cgroup-root`` (``/kubelet.slice/kubelet-kubepods.slice``
on kind) prefixes it, and a reader inside its own cgroup namespace sees other
pods' paths relative to itself (``/../../kubepods-besteffort-pod<uid>.slice/...``).
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, NamedTuple, Optional, Set, Tuple

# Kubernetes pod UIDs are RFC 4122 UUIDs; static (mirror) pods instead get a
# 32-hex-digit hash of their manifest as UID.  The systemd form uses "_".
_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32}"

# cgroupfs driver: the component is exactly "pod<uid>".
_POD_CGROUPFS = re.compile("^pod(%s)$" % (_UID,), re.IGNORECASE)
# systemd driver: the slice name repeats its ancestors, so a pod slice always
# contains "kubepods"; requiring it keeps unrelated "*-pod<hex>.slice" out.
_POD_SYSTEMD = re.compile("^[\\w-]*kubepods[\\w-]*-pod(%s)\\.slice$" % (_UID,), re.IGNORECASE)

# Container runtimes name the container's cgroup "<prefix>-<id>.scope" under
# systemd.  CRI-O's "crio-conmon-<id>.scope" is its monitor process, not a
# container; it does not match because "conmon-<id>" is not hexadecimal.
_CTR_SYSTEMD = re.compile(
    r"^(?:cri-containerd|containerd|crio|cri-o|docker|libpod)-([0-9a-f]{12,64})\.scope$",
    re.IGNORECASE,
)
# cgroupfs driver: containerd and Docker use the bare id, CRI-O "crio-<id>".
_CTR_CGROUPFS = re.compile(
    r"^(?:(?:cri-containerd|containerd|crio|cri-o|docker|libpod)-)?([0-9a-f]{12,64})$",
    re.IGNORECASE,
)
# Outside a pod: a podman (libpod) or Docker container of its own, named by its full id.
_CTR_STANDALONE = re.compile(r"^(?:libpod|docker)-([0-9a-f]{64})(?:\.scope)?$", re.IGNORECASE)


class CgroupIdentity(NamedTuple):
    """What a cgroup path says.  A tuple, so ``uid, cid = ...`` works."""

    pod_uid: str  # "" for a container outside any pod (podman, Docker)
    # None for the pod's own cgroup or a non-container child of it.
    container_id: Optional[str]


def normalize_uid(raw: str) -> str:
    """Return the pod UID in the form the API and the kubelet pods dir use."""
    return raw.replace("_", "-").lower()


def _pod_uid_of(component: str) -> Optional[str]:
    m = _POD_CGROUPFS.match(component) or _POD_SYSTEMD.match(component)
    return normalize_uid(m.group(1)) if m else None


def _container_id_of(component: str) -> Optional[str]:
    m = _CTR_SYSTEMD.match(component) or _CTR_CGROUPFS.match(component)
    return m.group(1).lower() if m else None


def parse_cgroup_path(path: str) -> Optional[CgroupIdentity]:
    """Return ``(pod_uid, container_id)`` for a cgroup path, or None.

    None means the path is neither inside a pod nor a podman/Docker container
    (host services, user sessions, QoS-level slices).  ``container_id`` is None when the path is the pod's
    own cgroup or a non-container child of it (e.g. CRI-O's conmon scope).
    Only the component directly below the pod is taken as the container, so
    cgroups nested inside a container (systemd-in-container, DinD) still map
    to that container.
    """
    parts = [p for p in path.strip().split("/") if p]
    # Search from the leaf up: with nested pods (a kind node inside a pod)
    # the innermost pod is the one the process belongs to.
    for i in range(len(parts) - 1, -1, -1):
        uid = _pod_uid_of(parts[i])
        if uid is None:
            continue
        cid = _container_id_of(parts[i + 1]) if i + 1 < len(parts) else None
        return CgroupIdentity(uid, cid)
    for part in reversed(parts):
        m = _CTR_STANDALONE.match(part)
        if m:
            return CgroupIdentity("", m.group(1).lower())
    return None


def _controller_rank(hierarchy_id: str, controllers: str) -> int:
    """Lower is preferred among lines of ``/proc/<pid>/cgroup``.

    The unified (v2) line first: it is the hierarchy whose ids BPF reports.
    Then the v1 hierarchies every runtime places containers in; they
    normally all agree, the order only matters when they do not.
    """
    if hierarchy_id == "0" and controllers == "":
        return 0
    names = controllers.split(",")
    if "name=systemd" in names:
        return 1
    if "memory" in names:
        return 2
    if "pids" in names:
        return 3
    return 4


def parse_proc_cgroup(text: str) -> Optional[CgroupIdentity]:
    """Pick the pod identity from the contents of ``/proc/<pid>/cgroup``.

    Lines are ``hierarchy-ID:controller-list:path`` (v1) or ``0::path`` (v2);
    hybrid hosts have both.  A line naming a container beats one naming only
    the pod; ties go to the controller order of ``_controller_rank``.
    """
    best: Optional[CgroupIdentity] = None
    best_rank: Tuple[int, int] = (2, 99)
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        parsed = parse_cgroup_path(fields[2])
        if parsed is None:
            continue
        rank = (
            0 if parsed[1] is not None else 1,
            _controller_rank(fields[0], fields[1]),
        )
        if rank < best_rank:
            best, best_rank = parsed, rank
    return best


def find_cgroup2_root(cgroup_root: str) -> Optional[str]:
    """Return the directory where the cgroup v2 hierarchy is mounted, or None.

    A v2 mount has ``cgroup.controllers`` at its top.  Pure v2 hosts mount it
    at ``/sys/fs/cgroup``; hybrid (systemd "unified") hosts at
    ``/sys/fs/cgroup/unified``.  Pure v1 hosts have none, and there the BPF
    cgroup id means nothing we can map.
    """
    for candidate in (cgroup_root, os.path.join(cgroup_root, "unified")):
        if os.path.isfile(os.path.join(candidate, "cgroup.controllers")):
            return candidate
    return None


# A cgroup tree is shallow; the bound only protects against a loop through a
# bind mount or a pathological nesting inside a container.
_MAX_DEPTH = 32


def walk_cgroup2(root: str) -> Tuple[Dict[int, Tuple[str, CgroupIdentity]], Set[int]]:
    """Walk a cgroup v2 tree.

    Returns the inode of every pod cgroup directory mapped to its path
    (relative to ``root``) and identity, and the set of all directory inodes
    seen (pod or not).  On cgroup v2 the id BPF reports
    (``bpf_get_current_cgroup_id``) is the kernfs node id, which is what
    ``stat`` returns as the directory's inode.  Every directory is walked, as
    a pod can sit anywhere under a kubelet ``--cgroup-root``.
    """
    pods: Dict[int, Tuple[str, CgroupIdentity]] = {}
    seen: Set[int] = set()
    try:
        seen.add(os.stat(root).st_ino)
    except OSError:
        return pods, seen
    stack: List[Tuple[str, str, int]] = [(root, "", 0)]
    while stack:
        path, rel, depth = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError:
            # Cgroups vanish while we walk (pods being deleted); skip them.
            continue
        for entry in entries:
            child_rel = "%s/%s" % (rel, entry.name)
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                # readdir's d_ino is free and equals the kernfs id on
                # cgroupfs; it only feeds the "known non-pod" set, where a
                # mismatch would cost an extra rescan, nothing more.
                seen.add(entry.inode())
                parsed = parse_cgroup_path(child_rel)
                if parsed is not None:
                    # For the answer itself, stat: st_ino is what the kernel
                    # id equals, and d_ino is not guaranteed to be elsewhere.
                    ino = entry.stat(follow_symlinks=False).st_ino
                    pods[ino] = (child_rel, parsed)
                    seen.add(ino)
            except OSError:
                continue
            if depth + 1 < _MAX_DEPTH:
                stack.append((entry.path, child_rel, depth + 1))
    return pods, seen
