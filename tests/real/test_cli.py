"""The `rsttrace` command as a user runs it: real processes, real resets, real exit codes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, TypeVar

from rsttrace.kernel import procnet, tracefs
from tests.real.netlab import Netns, closed_port, connect_refused, delta, overflow_accept_queue
from tests.real.realkernel import require_real_kernel

CONTRACT_KEYS = {
    "time", "ktime_ns", "kind", "reason", "reason_raw", "reason_source", "state", "family",
    "laddr", "lport", "raddr", "rport", "netns", "cookie", "pid", "comm",
}


def rsttrace(*args: str) -> List[str]:
    return [sys.executable, "-m", "rsttrace", *args]


def prog_ids_of(pid: int) -> Set[int]:
    """BPF programs a process holds: its fds' fdinfo name them (prog_id:), whoever else traces."""
    ids: Set[int] = set()
    fd_dir = "/proc/%d/fdinfo" % pid
    for fd in os.listdir(fd_dir):
        try:
            with open(os.path.join(fd_dir, fd)) as f:
                for line in f:
                    if line.startswith("prog_id:"):
                        ids.add(int(line.split()[1]))
        except OSError:
            continue
    return ids


def loaded_prog_ids() -> Set[int]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], check=True, capture_output=True, text=True).stdout
    return {int(p["id"]) for p in json.loads(out)}


def wait_ready(proc: subprocess.Popen[Any], timeout: float = 60.0) -> None:
    """Read stderr (text or bytes) until the tracer logs that it is attached."""
    assert proc.stderr is not None
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        raw = proc.stderr.readline()
        line = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        if not line:
            raise AssertionError("rsttrace exited before it was ready (exit %s)" % proc.poll())
        if '"ready"' in line or "ready" in line.split():
            return
    raise AssertionError("rsttrace not ready after %.0fs" % timeout)




T = TypeVar("T")


def run_rsttrace(args: Sequence[str], during: Callable[[subprocess.Popen[Any]], T],
                 stop: Optional[int] = None, binary: bool = False) -> Tuple[int, Any, str, T]:
    """`rsttrace ARGS` as a user runs it: started, waited for until attached, ``during(proc)``
    done meanwhile, then (with ``stop``, that signal) read to its end; killed if it outlives
    that. Returns (exit status, stdout, stderr, what ``during`` returned); ``binary``: stdout
    as bytes (a capture on a pipe)."""
    proc = subprocess.Popen(rsttrace(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=not binary)
    try:
        wait_ready(proc)
        value = during(proc)
        if stop is not None:
            proc.send_signal(stop)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err if isinstance(err, str) else err.decode(errors="replace"), value


def refused(ns: Netns, n: int) -> Tuple[procnet.Counters, procnet.Counters]:
    """``n`` refused IPv4 connects in ``ns`` (n RSTs sent, n received): its counters before and after."""
    before = ns.counters()
    with ns.inside():
        connect_refused(socket.AF_INET, "127.0.0.1", closed_port(socket.AF_INET, "127.0.0.1"), n)
    return before, ns.counters()


def test_trace_json_contract_and_counts(ns: Netns) -> None:
    ours: Set[int] = set()

    def during(proc: subprocess.Popen[str]) -> Tuple[procnet.Counters, procnet.Counters]:
        ours.update(prog_ids_of(proc.pid))
        return refused(ns, 3)

    rc, out, err, (before, after) = run_rsttrace(
        ("--log-format", "json", "trace", "--json", "--netns", str(ns.inode), "--count", "6", "--duration", "60"),
        during)
    assert rc == 0, err
    events: List[Dict[str, Any]] = [json.loads(line) for line in out.splitlines()]
    assert len(events) == 6
    for e in events:
        assert set(e) >= CONTRACT_KEYS, CONTRACT_KEYS - set(e)
        assert e["netns"] == ns.inode
        assert e["time"].endswith("Z") and "T" in e["time"]
    sent = [e for e in events if e["kind"] == "sent"]
    assert len(sent) == 3 == delta(before, after, "Tcp", "OutRsts")
    assert {e["reason"] for e in sent} == {"NO_SOCKET"}
    assert {e["kind"] for e in events} == {"sent", "received"}
    # the stop line reports delivered and lost events
    assert '"delivered": 6' in err and '"lost_kernel": 0' in err
    assert ours and not (ours & loaded_prog_ids()), "a program of ours stayed loaded after exit"


def test_human_lines_and_filters(ns: Netns) -> None:
    def resets(_proc: subprocess.Popen[str]) -> int:
        with ns.inside():
            connect_refused(socket.AF_INET6, "::1", closed_port(socket.AF_INET6, "::1"), 2)  # filtered out by -4
            port = closed_port(socket.AF_INET, "127.0.0.1")
            connect_refused(socket.AF_INET, "127.0.0.1", port, 1)
        return port

    rc, out, err, port = run_rsttrace(("--log-format", "json", "trace", "--netns", str(ns.inode), "--kind", "sent",
                                       "-4", "--count", "1"), resets)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["TIME", "KIND", "REASON", "STATE"]
    assert len(lines) == 2
    assert "SENT" in lines[1] and "NO_SOCKET" in lines[1] and "127.0.0.1:%d" % port in lines[1]
    assert str(ns.inode) in lines[1]
    assert len(lines[1]) < 100


def test_sigterm_detaches_everything(ns: Netns) -> None:
    proc = subprocess.Popen(rsttrace("trace"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_ready(proc)
    ours = prog_ids_of(proc.pid)
    assert len(ours) >= 2 and ours <= loaded_prog_ids(), "programs should be loaded while tracing"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert not (ours & loaded_prog_ids()), "a program of ours stayed loaded after exit"


def test_summary_counts(ns: Netns) -> None:
    proc = subprocess.Popen(
        rsttrace("summary", "--json", "--interval", "1", "--duration", "4", "--netns", str(ns.inode)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    wait_ready(proc)
    with ns.inside():
        connect_refused(socket.AF_INET, "127.0.0.1", closed_port(socket.AF_INET, "127.0.0.1"), 4)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    last = json.loads(out.splitlines()[-1])
    rows = {(r["kind"], r["reason"], r["state"]): r["total"] for r in last["rows"]}
    assert rows[("sent", "NO_SOCKET", "-")] == 4
    assert rows[("received", "ECONNREFUSED", "TCP_SYN_SENT")] == 4
    assert last["lost"]["lost_kernel"] == 0


def test_reasons_from_the_running_kernel() -> None:
    require_real_kernel()
    out = subprocess.run(rsttrace("reasons", "--json"), check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)
    root, _ = tracefs.ensure_tracefs()
    fmt = tracefs.Tracefs(root).format("tcp", "tcp_send_reset")
    assert fmt is not None
    table = {int(v): n for v, n in fmt.symbolic("reason")}
    sent = {r["raw"]: r["name"] for r in rows if r["kind"] == "sent"}
    if table:
        assert sent == table  # exactly the kernel's numbering, nothing hard-coded
        assert all(r["cause"] and r["check"] for r in rows if r["name"] in ("NO_SOCKET", "TCP_ABORT_ON_CLOSE"))


def test_doctor_says_tracing_works() -> None:
    require_real_kernel()
    p = subprocess.run(rsttrace("doctor"), capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "tracing can work" in p.stdout
    assert "[ok  ] load test" in p.stdout


def test_ebpf_prints_generated_c() -> None:
    require_real_kernel()
    p = subprocess.run(rsttrace("trace", "--ebpf"), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "struct rsttrace_tp_send_reset {" in p.stdout and "int rsttrace_send_reset(" in p.stdout


def test_not_root_exits_2_with_one_line() -> None:
    require_real_kernel()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))

    def drop() -> None:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    p = subprocess.run(rsttrace("trace"), capture_output=True, text=True, preexec_fn=drop, env=env, cwd="/")
    assert p.returncode == 2
    err_lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(err_lines) == 1 and "Traceback" not in p.stderr
    assert err_lines[0].startswith("rsttrace: error:") and "root" in err_lines[0]


def test_overflow_interval_events_in_cli(ns: Netns) -> None:
    """The counter-derived kinds reach `trace --json` too, with their count and source."""
    def overflow(_proc: subprocess.Popen[str]) -> Tuple[int, List[socket.socket]]:
        with ns.inside():
            return overflow_accept_queue("127.0.0.1", clients=5, backlog=1)

    rc, out, err, (port, socks) = run_rsttrace(
        ("trace", "--json", "--netns", str(ns.inode), "--kind", "listen_overflow_syn", "--count", "1",
         "--overflow-interval", "0.5", "--duration", "30"), overflow)
    for s in socks:
        s.close()
    assert rc == 0, err
    e = json.loads(out.splitlines()[0])
    assert (e["kind"], e["source"], e["lport"]) == ("listen_overflow_syn", "counters", port)
    assert e["count"] >= 1
