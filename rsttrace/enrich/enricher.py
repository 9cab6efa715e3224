"""Attribute a network namespace or cgroup id to a Kubernetes pod/container.

Lookups are served from an immutable snapshot that a refresher replaces
wholesale, so a lookup is a dict read: it never waits for a scan, never does
I/O, and never sees a half-built map.

Which container of a netns?  All containers of a pod share its netns, so the
netns alone names the pod, not the container.  The rule, in order:

1. Each process in the netns gives a container id (from its cgroup).
2. A container id is the *sandbox* (pause / infra container, which holds the
   netns and never logs) when it has no ``/var/log/containers`` entry and
   either all its processes are named ``pause`` or the containers dir does
   list other containers of the same pod.
3. If exactly one non-sandbox container is running there, it is reported.
   If several are, ``container`` and ``container_id`` are left empty: any
   pick would be a guess (the cgroup-id lookup is exact; prefer it).
4. Its name comes from the containers dir entry of that id; failing that,
   if the pod's log dir has exactly one container directory, that name.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Set, Tuple

from rsttrace import log as rlog
from rsttrace.enrich.cgroups import CgroupIdentity, find_cgroup2_root, walk_cgroup2
from rsttrace.enrich.kubelet import ContainerLog, PodDir, scan_containers_dir, scan_pods_dir
from rsttrace.enrich.procscan import ProcInNetns, scan_proc

# Lower bound between two scans, so lookups of unknown ids (each of which
# nudges the refresher) cannot make it scan back to back.
_MIN_RESCAN_GAP = 0.5


@dataclass(frozen=True)
class PodInfo:
    """Who a reset belongs to.  Unknown fields are empty strings."""

    namespace: str
    pod: str
    container: str
    container_id: str
    pod_uid: str


@dataclass(frozen=True)
class _Snapshot:
    host_netns: Optional[int] = None
    netns: Dict[int, PodInfo] = field(default_factory=dict)
    cgroups: Dict[int, PodInfo] = field(default_factory=dict)
    # Ids present at the last scan but not in a pod: misses on them are
    # final until something changes, so they do not nudge the refresher.
    other_netns: FrozenSet[int] = frozenset()
    other_cgroups: FrozenSet[int] = frozenset()


@dataclass(frozen=True)
class _Names:
    """The kubelet log-dir indexes of one scan, with derived lookups."""

    pods: Dict[str, PodDir]
    containers: Dict[str, ContainerLog]
    # Pod UID -> its containers-dir entries (to name pods whose pods dir is
    # missing, and to know which pods have their containers listed).
    logs_by_uid: Dict[str, List[ContainerLog]]

    @classmethod
    def scan(cls, pods_dir: str, containers_dir: str) -> _Names:
        containers = scan_containers_dir(containers_dir)
        by_uid: Dict[str, List[ContainerLog]] = {}
        for entry in containers.values():
            if entry.pod_uid is not None:
                by_uid.setdefault(entry.pod_uid, []).append(entry)
        return cls(pods=scan_pods_dir(pods_dir), containers=containers, logs_by_uid=by_uid)

    def pod_names(self, uid: str, cid: str) -> Tuple[str, str]:
        pod_dir = self.pods.get(uid)
        if pod_dir is not None:
            return pod_dir.namespace, pod_dir.pod
        for entry in self.logs_by_uid.get(uid, ()):
            return entry.namespace, entry.pod
        entry_by_id = self.containers.get(cid)
        if entry_by_id is not None:
            return entry_by_id.namespace, entry_by_id.pod
        return "", ""

    def is_sandbox(self, uid: str, cid: str, comms: Set[str]) -> bool:
        if cid in self.containers:
            return False
        # The kubelet gives every container a log except the sandbox, so an
        # unlisted id in a pod whose other containers are listed is it.
        return comms == {"pause"} or uid in self.logs_by_uid

    def sole_container(self, uid: str) -> str:
        pod_dir = self.pods.get(uid)
        if pod_dir is not None and len(pod_dir.containers) == 1:
            return next(iter(pod_dir.containers))
        return ""

    def info(self, uid: str, cid: str, name: str) -> PodInfo:
        ns, pod = self.pod_names(uid, cid)
        return PodInfo(namespace=ns, pod=pod, container=name, container_id=cid, pod_uid=uid)


def _attribute_netns(procs: List[ProcInNetns], names: _Names, sandboxes: Set[str]) -> Optional[PodInfo]:
    uids = {p.identity.pod_uid for p in procs}
    if len(uids) != 1:
        # The kubelet never puts two pods in one netns (hostNetwork pods
        # share the host's, which is excluded earlier); refuse to guess.
        return None
    uid = uids.pop()
    comms: Dict[str, Set[str]] = {}
    for p in procs:
        if p.identity.container_id is not None:
            comms.setdefault(p.identity.container_id, set()).add(p.comm)
    real = []
    for cid, cid_comms in comms.items():
        if names.is_sandbox(uid, cid, cid_comms):
            sandboxes.add(cid)
        else:
            real.append(cid)
    if len(real) > 1:
        return names.info(uid, "", "")
    cid = real[0] if real else ""
    entry = names.containers.get(cid)
    return names.info(uid, cid, entry.container if entry else names.sole_container(uid))


def _attribute_cgroup(identity: CgroupIdentity, names: _Names, sandboxes: Set[str]) -> PodInfo:
    uid, cid = identity
    if cid is None:
        return names.info(uid, "", "")
    entry = names.containers.get(cid)
    if entry is not None:
        return names.info(uid, cid, entry.container)
    if cid in sandboxes or uid in names.logs_by_uid:
        return names.info(uid, cid, "")
    return names.info(uid, cid, names.sole_container(uid))


class Enricher:
    """Netns inode / cgroup id -> ``PodInfo``, from node files only.

    ``refresh()`` scans synchronously; ``start()`` runs it every
    ``refresh_interval`` seconds in a daemon thread.  An entry whose pod is
    no longer seen is kept for ``expire_after`` seconds of ``clock`` time,
    because the resets of a dying pod (its sockets are torn down with its
    netns) arrive right after it vanishes and are worth attributing.
    """

    def __init__(
        self,
        proc_root: str = "/proc",
        cgroup_root: str = "/sys/fs/cgroup",
        pods_dir: str = "/var/log/pods",
        containers_dir: str = "/var/log/containers",
        refresh_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        expire_after: float = 10.0,
    ) -> None:
        self.proc_root = proc_root
        self.cgroup_root = cgroup_root
        self.pods_dir = pods_dir
        self.containers_dir = containers_dir
        self.refresh_interval = refresh_interval
        self.expire_after = expire_after
        self._clock = clock
        # Read without a lock by lookups: replacing the reference is atomic,
        # and a published snapshot is never mutated.
        self._snap = _Snapshot()
        # Serializes refreshes (sync calls vs. the thread); lookups never take it.
        self._refresh_lock = threading.Lock()
        self._netns_seen: Dict[int, Tuple[PodInfo, float]] = {}
        self._cgroup_seen: Dict[int, Tuple[PodInfo, float]] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- lookups ---------------------------------------------------------

    def lookup_netns(self, netns_inode: int) -> Optional[PodInfo]:
        """The pod owning this netns, or None (host, unknown, not a pod)."""
        snap = self._snap
        if netns_inode == snap.host_netns:
            return None
        info = snap.netns.get(netns_inode)
        if info is None and netns_inode not in snap.other_netns:
            self._wake.set()
        return info

    def lookup_cgroup(self, cgroup_id: int) -> Optional[PodInfo]:
        """The pod/container owning this cgroup v2 id, or None."""
        snap = self._snap
        info = snap.cgroups.get(cgroup_id)
        if info is None and cgroup_id not in snap.other_cgroups:
            self._wake.set()
        return info

    def netns_entries(self) -> Dict[int, PodInfo]:
        """A copy of the current netns map (for diagnostics)."""
        return dict(self._snap.netns)

    def cgroup_entries(self) -> Dict[int, PodInfo]:
        """A copy of the current cgroup-id map (for diagnostics)."""
        return dict(self._snap.cgroups)

    # -- refreshing ------------------------------------------------------

    def refresh(self) -> None:
        """Scan proc, cgroup and kubelet dirs once and publish the result."""
        with self._refresh_lock:
            now = self._clock()
            names = _Names.scan(self.pods_dir, self.containers_dir)
            scan = scan_proc(self.proc_root)
            sandboxes: Set[str] = set()
            fresh_netns: Dict[int, PodInfo] = {}
            for inode, procs in scan.pods_by_netns.items():
                info = _attribute_netns(procs, names, sandboxes)
                if info is not None:
                    fresh_netns[inode] = info
            cg_root = find_cgroup2_root(self.cgroup_root)
            pod_cgroups, all_cgroups = walk_cgroup2(cg_root) if cg_root else ({}, set())
            fresh_cgroups = {
                ino: _attribute_cgroup(identity, names, sandboxes) for ino, (_path, identity) in pod_cgroups.items()
            }
            # A netns inode now seen outside any pod was freed and reused:
            # its old entry is wrong, not merely stale.
            reused = scan.all_netns - fresh_netns.keys()
            self._netns_seen = self._merge(self._netns_seen, fresh_netns, reused, now)
            self._cgroup_seen = self._merge(self._cgroup_seen, fresh_cgroups, set(), now)
            self._snap = _Snapshot(
                host_netns=scan.host_netns,
                netns={k: v for k, (v, _) in self._netns_seen.items()},
                cgroups={k: v for k, (v, _) in self._cgroup_seen.items()},
                other_netns=frozenset(reused),
                other_cgroups=frozenset(all_cgroups - self._cgroup_seen.keys()),
            )

    def _merge(
        self,
        old: Dict[int, Tuple[PodInfo, float]],
        fresh: Dict[int, PodInfo],
        drop: Set[int],
        now: float,
    ) -> Dict[int, Tuple[PodInfo, float]]:
        merged = {
            k: (info, seen) for k, (info, seen) in old.items() if k not in drop and now - seen <= self.expire_after
        }
        merged.update((k, (info, now)) for k, info in fresh.items())
        return merged

    def start(self) -> None:
        """Start the background refresher (idempotent).  It scans at once."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self._wake.set()
        self._thread = threading.Thread(target=self._run, name="rsttrace-enrich", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background refresher and wait for it to exit."""
        self._stopping.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while not self._stopping.is_set():
            # A miss sets _wake, so a new pod is picked up before the period ends.
            self._wake.wait(self.refresh_interval)
            if self._stopping.is_set():
                break
            self._wake.clear()
            try:
                self.refresh()
            except Exception:  # keep attributing from the last snapshot
                try:
                    rlog.get().exception("enrichment refresh failed")
                except Exception:  # a closed stderr must not end attribution either
                    pass
            self._stopping.wait(min(_MIN_RESCAN_GAP, self.refresh_interval))
