"""Read pod and container names from the kubelet's log directories.

Every kubelet writes ``/var/log/pods/<namespace>_<pod>_<uid>/<container>/N.log``
and the ``/var/log/containers/<pod>_<namespace>_<container>-<id>.log``
symlinks into it.  Together they name a pod UID and a container id without
any API access.  Namespace, pod and container names are DNS labels or
subdomains and pod UIDs are hex and dashes, so ``_`` never occurs inside a
field and is a safe separator.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Tuple

_CONTAINER_ID = re.compile(r"^[0-9a-f]{12,64}$")


@dataclass(frozen=True)
class PodDir:
    """One ``<pods_dir>/<namespace>_<pod>_<uid>`` directory."""

    namespace: str
    pod: str
    uid: str
    # Names of containers that have (or had) a log directory.  The sandbox
    # (pause) container never gets one; init containers that already ran do.
    containers: FrozenSet[str]


@dataclass(frozen=True)
class ContainerLog:
    """One ``<containers_dir>/<pod>_<namespace>_<container>-<id>.log`` entry."""

    namespace: str
    pod: str
    container: str
    container_id: str
    # From the symlink target (``.../<ns>_<pod>_<uid>/<container>/N.log``);
    # None when the link cannot be read or does not point into a pods dir.
    pod_uid: Optional[str]


def split_pod_dir_name(name: str) -> Optional[Tuple[str, str, str]]:
    """``<namespace>_<pod>_<uid>`` -> ``(namespace, pod, uid)``, or None."""
    fields = name.split("_")
    if len(fields) != 3 or not all(fields):
        return None
    return fields[0], fields[1], fields[2].lower()


def scan_pods_dir(pods_dir: str) -> Dict[str, PodDir]:
    """Index the kubelet pods log directory by pod UID.

    A missing directory yields an empty index: the node may not mount it
    into the tracer, and attribution then still reports UIDs and ids.
    """
    out: Dict[str, PodDir] = {}
    try:
        with os.scandir(pods_dir) as it:
            pod_entries = [e for e in it if e.is_dir(follow_symlinks=False)]
    except OSError:
        return out
    for entry in pod_entries:
        fields = split_pod_dir_name(entry.name)
        if fields is None:
            continue
        try:
            with os.scandir(entry.path) as it:
                names = frozenset(c.name for c in it if c.is_dir(follow_symlinks=False))
        except OSError:
            # Removed between the two listings: the pod is gone.
            continue
        ns, pod, uid = fields
        out[uid] = PodDir(namespace=ns, pod=pod, uid=uid, containers=names)
    return out


def parse_container_log_name(name: str) -> Optional[Tuple[str, str, str, str]]:
    """``<pod>_<ns>_<container>-<id>.log`` -> ``(ns, pod, container, id)``."""
    if not name.endswith(".log"):
        return None
    fields = name[: -len(".log")].split("_")
    if len(fields) != 3:
        return None
    pod, ns, rest = fields
    container, sep, cid = rest.rpartition("-")
    if not (pod and ns and container and sep) or not _CONTAINER_ID.match(cid):
        return None
    return ns, pod, container, cid


def _uid_from_link_target(target: str) -> Optional[str]:
    # .../<ns>_<pod>_<uid>/<container>/<N>.log: the pod dir is two up.
    parts = [p for p in target.split("/") if p]
    if len(parts) < 3:
        return None
    fields = split_pod_dir_name(parts[-3])
    return fields[2] if fields else None


def scan_containers_dir(containers_dir: str) -> Dict[str, ContainerLog]:
    """Index ``/var/log/containers`` by container id.

    The link target is read, never followed: only its text is needed and
    the pods dir it points into may not be mounted at the same path here.
    """
    out: Dict[str, ContainerLog] = {}
    try:
        with os.scandir(containers_dir) as it:
            names: List[Tuple[str, str]] = [(e.name, e.path) for e in it]
    except OSError:
        return out
    for name, path in names:
        fields = parse_container_log_name(name)
        if fields is None:
            continue
        ns, pod, container, cid = fields
        try:
            uid = _uid_from_link_target(os.readlink(path))
        except OSError:
            uid = None
        out[cid] = ContainerLog(namespace=ns, pod=pod, container=container, container_id=cid, pod_uid=uid)
    return out
