"""Enricher over fake node trees: proc root, kubelet log dirs, cgroup v2 tree."""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from rsttrace.enrich import Enricher, PodInfo
from rsttrace.enrich.procscan import ProcScan, scan_proc

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "enrich"

HOST_NS = 4026531840
NS_WEB = 4026532000
NS_DB = 4026532100
NS_OTHER = 4026532200

UID_WEB = "0a1b2c3d-4e5f-6789-abcd-ef0123456789"
UID_DB = "11111111-2222-3333-4444-555555555555"
CID_WEB_PAUSE = "a0" * 32
CID_WEB_APP = "b1" * 32
CID_WEB_SIDECAR = "c2" * 32
CID_DB_PAUSE = "d3" * 32
CID_DB_APP = "e4" * 32


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeNode:
    """A node's /proc, /var/log/pods, /var/log/containers and cgroup v2 tree."""

    def __init__(self, root: Path) -> None:
        self.proc = root / "proc"
        self.pods = root / "var-log-pods"
        self.containers = root / "var-log-containers"
        self.cgroup = root / "sys-fs-cgroup"
        for d in (self.proc, self.pods, self.containers, self.cgroup):
            d.mkdir()
        (self.cgroup / "cgroup.controllers").write_text("cpu memory pids\n")
        self.add_pid(1, HOST_NS, "v2-host-service.txt", comm="systemd")

    def add_pid(
        self,
        pid: int,
        netns: int,
        cgroup_fixture: str,
        uid: str = "",
        cid: str = "",
        comm: str = "app",
    ) -> None:
        d = self.proc / str(pid)
        (d / "ns").mkdir(parents=True)
        # The kernel's ns links are "magic" links whose text is net:[inode].
        os.symlink("net:[%s]" % (netns,), d / "ns" / "net")
        text = (FIXTURES / "proc-cgroup" / cgroup_fixture).read_text()
        (d / "cgroup").write_text(text.format(uid=uid, uid_=uid.replace("-", "_"), cid=cid))
        (d / "comm").write_text(comm + "\n")

    def remove_pid(self, pid: int) -> None:
        d = self.proc / str(pid)
        for p in sorted(d.rglob("*"), key=lambda p: -len(p.parts)):
            p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
        d.rmdir()

    def add_pod(self, ns: str, pod: str, uid: str, containers: List[str]) -> None:
        for name in containers:
            (self.pods / ("%s_%s_%s" % (ns, pod, uid)) / name).mkdir(parents=True, exist_ok=True)

    def add_container_log(self, ns: str, pod: str, uid: str, container: str, cid: str) -> None:
        target = self.pods / ("%s_%s_%s" % (ns, pod, uid)) / container / "0.log"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("")
        os.symlink(target, self.containers / ("%s_%s_%s-%s.log" % (pod, ns, container, cid)))

    def add_cgroup(self, rel: str) -> int:
        d = self.cgroup / rel
        d.mkdir(parents=True, exist_ok=True)
        return os.stat(d).st_ino

    def enricher(self, clock: Optional[FakeClock] = None, **kw: float) -> Enricher:
        return Enricher(
            proc_root=str(self.proc),
            cgroup_root=str(self.cgroup),
            pods_dir=str(self.pods),
            containers_dir=str(self.containers),
            clock=clock or FakeClock(),
            **kw,
        )


def add_web_pod(node: FakeNode, with_container_logs: bool = True) -> None:
    """web-7d9f: a pause container and one app container, systemd/containerd v2."""
    node.add_pod("shop", "web-7d9f", UID_WEB, ["nginx"])
    if with_container_logs:
        node.add_container_log("shop", "web-7d9f", UID_WEB, "nginx", CID_WEB_APP)
    fx = "v2-systemd-containerd.txt"
    node.add_pid(100, NS_WEB, fx, UID_WEB, CID_WEB_PAUSE, comm="pause")
    node.add_pid(101, NS_WEB, fx, UID_WEB, CID_WEB_APP, comm="nginx")
    node.add_pid(102, NS_WEB, fx, UID_WEB, CID_WEB_APP, comm="nginx")


WEB = PodInfo(
    namespace="shop",
    pod="web-7d9f",
    container="nginx",
    container_id=CID_WEB_APP,
    pod_uid=UID_WEB,
)


@pytest.fixture
def node(tmp_path: Path) -> FakeNode:
    return FakeNode(tmp_path)


# --- netns attribution --------------------------------------------------


def test_netns_maps_to_pod_and_its_app_container_not_pause(node: FakeNode) -> None:
    add_web_pod(node)
    enr = node.enricher()
    enr.refresh()
    assert enr.lookup_netns(NS_WEB) == WEB


@pytest.mark.parametrize(
    "fixture",
    ["v1-hybrid-systemd-containerd.txt", "v1-cgroupfs-docker.txt", "v2-systemd-crio.txt"],
)
def test_netns_attribution_for_each_cgroup_layout(node: FakeNode, fixture: str) -> None:
    node.add_pod("db", "pg-0", UID_DB, ["postgres"])
    node.add_pid(200, NS_DB, fixture, UID_DB, CID_DB_PAUSE, comm="pause")
    node.add_pid(201, NS_DB, fixture, UID_DB, CID_DB_APP, comm="postgres")
    enr = node.enricher()
    enr.refresh()
    assert enr.lookup_netns(NS_DB) == PodInfo("db", "pg-0", "postgres", CID_DB_APP, UID_DB)


def test_host_netns_is_never_attributed(node: FakeNode) -> None:
    # A hostNetwork pod's process lives in the host netns with a pod cgroup;
    # the host netns still must not be attributed to it.
    node.add_pod("kube-system", "kube-proxy-x", UID_DB, ["kube-proxy"])
    node.add_pid(300, HOST_NS, "v2-systemd-containerd.txt", UID_DB, CID_DB_APP)
    enr = node.enricher()
    enr.refresh()
    assert enr.lookup_netns(HOST_NS) is None


def test_unknown_and_non_pod_netns_return_none(node: FakeNode) -> None:
    add_web_pod(node)
    # A process in its own netns but outside any pod (e.g. `ip netns exec`).
    node.add_pid(400, NS_OTHER, "v2-host-service.txt")
    enr = node.enricher()
    enr.refresh()
    assert enr.lookup_netns(NS_OTHER) is None
    assert enr.lookup_netns(4026539999) is None


def test_pause_recognized_by_comm_without_containers_dir(node: FakeNode) -> None:
    add_web_pod(node, with_container_logs=False)
    enr = node.enricher()
    enr.refresh()
    # No log symlink names the id, but the pod has one container and the
    # other id in the netns is the `pause` process: the app is identified.
    assert enr.lookup_netns(NS_WEB) == WEB


def test_sandbox_recognized_by_missing_log_even_if_not_named_pause(
    node: FakeNode,
) -> None:
    node.add_pod("shop", "web-7d9f", UID_WEB, ["nginx"])
    node.add_container_log("shop", "web-7d9f", UID_WEB, "nginx", CID_WEB_APP)
    fx = "v2-systemd-crio.txt"
    # CRI-O infra container binary with another name.
    node.add_pid(100, NS_WEB, fx, UID_WEB, CID_WEB_PAUSE, comm="infra")
    node.add_pid(101, NS_WEB, fx, UID_WEB, CID_WEB_APP, comm="nginx")
    enr = node.enricher()
    enr.refresh()
    assert enr.lookup_netns(NS_WEB) == WEB


def test_several_app_containers_leave_container_empty(node: FakeNode) -> None:
    add_web_pod(node)
    node.add_pod("shop", "web-7d9f", UID_WEB, ["nginx", "envoy"])
    node.add_container_log("shop", "web-7d9f", UID_WEB, "envoy", CID_WEB_SIDECAR)
    node.add_pid(103, NS_WEB, "v2-systemd-containerd.txt", UID_WEB, CID_WEB_SIDECAR, comm="envoy")
    enr = node.enricher()
    enr.refresh()
    # The netns is shared: the pod is certain, the container is not.
    assert enr.lookup_netns(NS_WEB) == PodInfo("shop", "web-7d9f", "", "", UID_WEB)


def test_container_name_unknown_when_pod_has_several_and_no_log_links(
    node: FakeNode,
) -> None:
    add_web_pod(node, with_container_logs=False)
    # An init container that already ran also has a log dir.
    node.add_pod("shop", "web-7d9f", UID_WEB, ["nginx", "init-db"])
    enr = node.enricher()
    enr.refresh()
    assert enr.lookup_netns(NS_WEB) == PodInfo("shop", "web-7d9f", "", CID_WEB_APP, UID_WEB)


def test_without_kubelet_dirs_uid_and_container_id_still_reported(
    tmp_path: Path,
) -> None:
    node = FakeNode(tmp_path)
    add_web_pod(node, with_container_logs=False)
    enr = Enricher(
        proc_root=str(node.proc),
        cgroup_root=str(node.cgroup),
        pods_dir=str(tmp_path / "absent-pods"),
        containers_dir=str(tmp_path / "absent-containers"),
    )
    enr.refresh()
    assert enr.lookup_netns(NS_WEB) == PodInfo("", "", "", CID_WEB_APP, UID_WEB)


def test_pod_named_from_containers_dir_when_pods_dir_lacks_it(node: FakeNode) -> None:
    add_web_pod(node)
    for d in sorted(node.pods.rglob("*"), key=lambda p: -len(p.parts)):
        d.unlink() if d.is_file() else d.rmdir()
    enr = node.enricher()
    enr.refresh()
    assert enr.lookup_netns(NS_WEB) == WEB


def test_two_pods_in_one_netns_is_not_guessed(node: FakeNode) -> None:
    add_web_pod(node)
    node.add_pid(500, NS_WEB, "v2-systemd-crio.txt", UID_DB, CID_DB_APP)
    enr = node.enricher()
    enr.refresh()
    assert enr.lookup_netns(NS_WEB) is None


def test_unreadable_processes_are_skipped(node: FakeNode) -> None:
    add_web_pod(node)
    (node.proc / "600").mkdir()  # exited mid-scan: no ns link, no cgroup
    (node.proc / "self").mkdir()  # non-pid entries are ignored
    enr = node.enricher()
    enr.refresh()
    assert enr.lookup_netns(NS_WEB) == WEB


# --- cgroup id attribution ----------------------------------------------


def web_cgroups(node: FakeNode, root: str = "") -> Dict[str, int]:
    pod = "%skubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod%s.slice" % (root, UID_WEB.replace("-", "_"))
    return {
        "pod": node.add_cgroup(pod),
        "pause": node.add_cgroup("%s/cri-containerd-%s.scope" % (pod, CID_WEB_PAUSE)),
        "app": node.add_cgroup("%s/cri-containerd-%s.scope" % (pod, CID_WEB_APP)),
        "host": node.add_cgroup("%ssystem.slice/containerd.service" % (root,)),
    }


def test_cgroup_id_maps_to_exact_container(node: FakeNode) -> None:
    add_web_pod(node)
    ids = web_cgroups(node)
    enr = node.enricher()
    enr.refresh()
    assert enr.lookup_cgroup(ids["app"]) == WEB
    assert enr.lookup_cgroup(ids["pause"]) == PodInfo("shop", "web-7d9f", "", CID_WEB_PAUSE, UID_WEB)
    assert enr.lookup_cgroup(ids["pod"]) == PodInfo("shop", "web-7d9f", "", "", UID_WEB)
    assert enr.lookup_cgroup(ids["host"]) is None


def test_cgroup_ids_of_sibling_containers_are_told_apart(node: FakeNode) -> None:
    add_web_pod(node)
    node.add_pod("shop", "web-7d9f", UID_WEB, ["nginx", "envoy"])
    node.add_container_log("shop", "web-7d9f", UID_WEB, "envoy", CID_WEB_SIDECAR)
    ids = web_cgroups(node)
    sidecar = node.add_cgroup(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod%s.slice/cri-containerd-%s.scope"
        % (UID_WEB.replace("-", "_"), CID_WEB_SIDECAR)
    )
    enr = node.enricher()
    enr.refresh()
    assert enr.lookup_cgroup(ids["app"]) == WEB
    assert enr.lookup_cgroup(sidecar) == PodInfo("shop", "web-7d9f", "envoy", CID_WEB_SIDECAR, UID_WEB)


def test_cgroup_ids_found_under_hybrid_unified_mount(tmp_path: Path) -> None:
    node = FakeNode(tmp_path)
    (node.cgroup / "cgroup.controllers").unlink()
    (node.cgroup / "memory").mkdir()
    (node.cgroup / "unified").mkdir()
    (node.cgroup / "unified" / "cgroup.controllers").write_text("")
    add_web_pod(node)
    ids = web_cgroups(node, root="unified/")
    # A v1 hierarchy with the same layout must not be what is read.
    v1_app = node.add_cgroup(
        "memory/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod%s.slice/cri-containerd-%s.scope"
        % (UID_WEB.replace("-", "_"), CID_WEB_APP)
    )
    enr = node.enricher()
    enr.refresh()
    assert enr.lookup_cgroup(ids["app"]) == WEB
    assert enr.lookup_cgroup(v1_app) is None


def test_cgroup_v1_only_host_maps_no_cgroup_ids(node: FakeNode) -> None:
    (node.cgroup / "cgroup.controllers").unlink()
    add_web_pod(node)
    ids = web_cgroups(node)
    enr = node.enricher()
    enr.refresh()
    assert enr.lookup_cgroup(ids["app"]) is None
    assert enr.lookup_netns(NS_WEB) == WEB  # netns attribution does not need v2


# --- refresh, expiry ----------------------------------------------------


def test_new_pod_seen_after_refresh(node: FakeNode) -> None:
    enr = node.enricher()
    enr.refresh()
    assert enr.lookup_netns(NS_WEB) is None
    add_web_pod(node)
    assert enr.lookup_netns(NS_WEB) is None  # not before a scan
    enr.refresh()
    assert enr.lookup_netns(NS_WEB) == WEB


def test_deleted_pod_kept_for_grace_period_then_expires(node: FakeNode) -> None:
    clock = FakeClock()
    add_web_pod(node)
    ids = web_cgroups(node)
    enr = node.enricher(clock, expire_after=10.0)
    enr.refresh()
    assert enr.lookup_netns(NS_WEB) == WEB

    for pid in (100, 101, 102):
        node.remove_pid(pid)
    shutil.rmtree(node.cgroup / "kubepods.slice")

    clock.now += 2.0
    enr.refresh()
    # Resets of a dying pod arrive just after it vanishes: still attributed.
    assert enr.lookup_netns(NS_WEB) == WEB
    assert enr.lookup_cgroup(ids["app"]) == WEB

    clock.now += 9.0  # 11 s after it was last seen
    enr.refresh()
    assert enr.lookup_netns(NS_WEB) is None
    assert enr.lookup_cgroup(ids["app"]) is None


def test_live_pod_does_not_expire(node: FakeNode) -> None:
    clock = FakeClock()
    add_web_pod(node)
    enr = node.enricher(clock, expire_after=10.0)
    for _ in range(5):
        enr.refresh()
        clock.now += 60.0
    enr.refresh()
    assert enr.lookup_netns(NS_WEB) == WEB


def test_reused_netns_inode_drops_stale_pod_at_once(node: FakeNode) -> None:
    clock = FakeClock()
    add_web_pod(node)
    enr = node.enricher(clock, expire_after=10.0)
    enr.refresh()
    for pid in (100, 101, 102):
        node.remove_pid(pid)
    # The kernel hands the freed inode number to a new, non-pod netns.
    node.add_pid(700, NS_WEB, "v2-host-service.txt")
    clock.now += 1.0
    enr.refresh()
    assert enr.lookup_netns(NS_WEB) is None


# --- concurrency --------------------------------------------------------


def _in_thread(fn: Callable[[], object], timeout: float) -> Tuple[bool, List[object]]:
    """Run fn() in a thread; (finished within timeout, [result])."""
    out: List[object] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive(), out


def test_lookup_does_not_wait_for_a_running_refresh(node: FakeNode) -> None:
    add_web_pod(node)
    enr = node.enricher()
    enr.refresh()

    # A new pod whose cgroup file is a FIFO: the next scan blocks reading it,
    # as a scan may stall on a slow /proc, until we write to it.
    d = node.proc / "800"
    (d / "ns").mkdir(parents=True)
    os.symlink("net:[%s]" % (NS_DB,), d / "ns" / "net")
    (d / "comm").write_text("postgres\n")
    node.add_pod("db", "pg-0", UID_DB, ["postgres"])
    fifo = d / "cgroup"
    os.mkfifo(fifo)

    refresher = threading.Thread(target=enr.refresh, daemon=True)
    refresher.start()
    writer = _open_writer_when_reader_waits(fifo)
    try:
        assert refresher.is_alive()  # the scan is stuck inside the proc read
        started = time.monotonic()
        done, results = _in_thread(lambda: (enr.lookup_netns(NS_WEB), enr.lookup_netns(NS_DB)), 2.0)
        assert done, "lookup blocked behind the refresh"
        assert time.monotonic() - started < 0.5
        # The previous snapshot answers; the pod being scanned is not there yet.
        assert results == [(WEB, None)]
    finally:
        line = "0::/kubepods/pod%s/%s\n" % (UID_DB, CID_DB_APP)
        os.write(writer, line.encode())
        os.close(writer)
    refresher.join(5.0)
    assert not refresher.is_alive()
    assert enr.lookup_netns(NS_DB) == PodInfo("db", "pg-0", "postgres", CID_DB_APP, UID_DB)


def _open_writer_when_reader_waits(fifo: Path) -> int:
    # O_NONBLOCK write-open of a FIFO fails with ENXIO until a reader has it
    # open, so success means the refresh is parked on it.
    deadline = time.monotonic() + 5.0
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def test_lookups_during_refreshes_see_whole_snapshots(node: FakeNode) -> None:
    add_web_pod(node)
    enr = node.enricher()
    enr.refresh()
    errors: List[BaseException] = []
    wrong: List[object] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                got = enr.lookup_netns(NS_WEB)
                if got != WEB:
                    wrong.append(got)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    readers = [threading.Thread(target=reader) for _ in range(4)]
    for t in readers:
        t.start()
    try:
        for _ in range(30):
            enr.refresh()
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert errors == []
    assert wrong == []


@pytest.fixture
def counted_scans(monkeypatch: pytest.MonkeyPatch) -> Iterator[List[float]]:
    calls: List[float] = []

    def counting(proc_root: str) -> ProcScan:
        calls.append(time.monotonic())
        return scan_proc(proc_root)

    monkeypatch.setattr("rsttrace.enrich.enricher.scan_proc", counting)
    yield calls


def _wait_for(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return False


def test_background_refresher_picks_up_new_pod(node: FakeNode) -> None:
    enr = node.enricher(refresh_interval=0.05)
    enr.start()
    try:
        add_web_pod(node)
        assert _wait_for(lambda: enr.lookup_netns(NS_WEB) == WEB, 3.0)
    finally:
        enr.stop()


def test_miss_nudges_refresher_long_before_its_period(node: FakeNode, counted_scans: List[float]) -> None:
    enr = node.enricher(refresh_interval=3600.0)
    enr.start()
    try:
        assert _wait_for(lambda: len(counted_scans) == 1, 2.0)  # the initial scan
        add_web_pod(node)
        started = time.monotonic()
        assert enr.lookup_netns(NS_WEB) is None  # a miss returns at once...
        assert time.monotonic() - started < 0.1
        # ...and the pod shows up without waiting an hour.
        assert _wait_for(lambda: enr.lookup_netns(NS_WEB) == WEB, 3.0)
    finally:
        enr.stop()


def test_known_non_pod_lookups_do_not_trigger_scans(node: FakeNode, counted_scans: List[float]) -> None:
    node.add_pid(400, NS_OTHER, "v2-host-service.txt")
    host_cg = node.add_cgroup("system.slice/containerd.service")
    enr = node.enricher(refresh_interval=3600.0)
    enr.start()
    try:
        assert _wait_for(lambda: len(counted_scans) == 1, 2.0)
        for _ in range(1000):
            assert enr.lookup_netns(HOST_NS) is None
            assert enr.lookup_netns(NS_OTHER) is None
            assert enr.lookup_cgroup(host_cg) is None
        time.sleep(0.8)
        assert len(counted_scans) == 1
    finally:
        enr.stop()


def test_miss_storm_is_rate_limited(node: FakeNode, counted_scans: List[float]) -> None:
    enr = node.enricher(refresh_interval=3600.0)
    enr.start()
    try:
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:
            enr.lookup_netns(4026539999)  # never exists
            time.sleep(0.001)
    finally:
        enr.stop()
    # Initial scan plus at most one per 0.5 s gap.
    assert 2 <= len(counted_scans) <= 4


def test_stop_joins_the_thread_and_start_is_idempotent(node: FakeNode) -> None:
    enr = node.enricher(refresh_interval=3600.0)
    enr.start()
    enr.start()
    threads = [t for t in threading.enumerate() if t.name == "rsttrace-enrich"]
    assert len(threads) == 1
    assert threads[0].daemon
    enr.stop()
    assert not threads[0].is_alive()
    enr.stop()  # a second stop is harmless


def test_refresh_failure_keeps_serving_last_snapshot(node: FakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    add_web_pod(node)
    enr = node.enricher(refresh_interval=0.01)
    enr.refresh()
    calls: List[int] = []

    def broken(proc_root: str) -> ProcScan:
        calls.append(1)
        raise RuntimeError("boom")

    monkeypatch.setattr("rsttrace.enrich.enricher.scan_proc", broken)
    enr.start()
    try:
        assert _wait_for(lambda: len(calls) >= 2, 3.0)  # the thread survives
        assert enr.lookup_netns(NS_WEB) == WEB
    finally:
        enr.stop()


# --- containers outside any pod (podman, Docker run by hand) ---------------


def test_podman_container_is_named_by_its_id_netns_and_cgroup(node: FakeNode) -> None:
    add_web_pod(node)
    cid = "f5" * 32
    # as podman's cgroupfs manager on a hybrid host places it (what tests/real/test_image.py meets)
    node.add_pid(500, NS_OTHER, "v1-hybrid-podman-cgroupfs.txt", cid=cid, comm="bash")
    ctr = node.add_cgroup("libpod_parent/libpod-%s" % (cid,))
    conmon = node.add_cgroup("libpod_parent/conmon")
    enr = node.enricher()
    enr.refresh()
    standalone = PodInfo(namespace="", pod="", container="", container_id=cid, pod_uid="")
    assert enr.lookup_netns(NS_OTHER) == standalone
    assert enr.lookup_cgroup(ctr) == standalone
    assert enr.lookup_cgroup(conmon) is None
    assert enr.lookup_netns(NS_WEB) == WEB  # pods as before
