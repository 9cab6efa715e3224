"""`rsttrace export` for real: scraped by hand, checked by promtool, scraped by a real Prometheus."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, Iterator, List, Optional

import pytest

from tests.real.netlab import Netns, closed_port, connect_refused, delta, wait_for
from tests.real.realkernel import IN_CI, require_real_kernel
from tests.real.test_cli import loaded_prog_ids, prog_ids_of, rsttrace, wait_ready


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=10) as r:
        return str(r.read().decode())


def sample(text: str, name: str, labels: Dict[str, str]) -> float:
    """Value of the series with exactly these labels (0 when absent: a counter not yet seen)."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        body, _, value = line.rpartition(" ")
        got = dict(kv.split("=", 1) for kv in body[len(name) + 1:-1].split(","))
        if {k: v.strip('"') for k, v in got.items()} == labels:
            return float(value)
    return 0.0


class Exporter:
    def __init__(self, *extra: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            rsttrace("--log-format", "json", "export", "--listen", "127.0.0.1:%d" % self.port, *extra),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.stderr = ""
        wait_ready(self.proc)
        assert wait_for(lambda: self._up(), timeout=10), "exporter did not serve"

    def _up(self) -> bool:
        try:
            scrape(self.port, "/healthz")
            return True
        except OSError:
            return False

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _out, self.stderr = self.proc.communicate(timeout=30)
        return int(self.proc.returncode)




@pytest.fixture()
def exporter() -> Iterator[Exporter]:
    require_real_kernel()
    e = Exporter("--netns-label", "--log-rate", "100")
    yield e
    e.stop()


def sent_labels(ns: Netns) -> Dict[str, str]:
    return {"reason": "NO_SOCKET", "reason_source": "kernel", "state": "", "family": "ipv4", "netns": str(ns.inode)}


def test_counters_rise_by_exactly_the_resets_made(exporter: Exporter, ns: Netns) -> None:
    before_text, before = scrape(exporter.port), ns.counters()
    with ns.inside():
        connect_refused(socket.AF_INET, "127.0.0.1", closed_port(socket.AF_INET, "127.0.0.1"), 4)
    after = ns.counters()
    made = delta(before, after, "Tcp", "OutRsts")
    assert made == 4
    after_text = scrape(exporter.port)
    rose = sample(after_text, "rsttrace_tcp_resets_sent_total", sent_labels(ns)) - sample(
        before_text, "rsttrace_tcp_resets_sent_total", sent_labels(ns))
    assert rose == made
    recv = {"state": "TCP_SYN_SENT", "family": "ipv4", "netns": str(ns.inode)}
    assert sample(after_text, "rsttrace_tcp_resets_received_total", recv) - sample(
        before_text, "rsttrace_tcp_resets_received_total", recv) == 4
    assert sample(after_text, "rsttrace_program_attached", {"program": "rsttrace_send_reset"}) == 1
    assert "rsttrace_kernel_tcp_out_rsts_total " in after_text
    assert scrape(exporter.port, "/healthz") == "ok\n"


def test_promtool_accepts_the_exposition(exporter: Exporter, ns: Netns) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if IN_CI:
            pytest.fail("promtool missing in CI (Debian package prometheus)")
        pytest.skip("promtool not installed")
    with ns.inside():
        connect_refused(socket.AF_INET, "127.0.0.1", closed_port(socket.AF_INET, "127.0.0.1"), 1)
    text = scrape(exporter.port)
    p = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_event_log_lines_are_canonical_json(ns: Netns) -> None:
    require_real_kernel()
    e = Exporter("--log-rate", "2", "--log-interval", "1")
    try:
        with ns.inside():
            connect_refused(socket.AF_INET, "127.0.0.1", closed_port(socket.AF_INET, "127.0.0.1"), 5)
        time.sleep(2.5)
    finally:
        assert e.stop() == 0
    lines = [json.loads(ln) for ln in e.stderr.splitlines() if ln.startswith("{")]
    # Whichever namespace they come from (the machine may be busy), at most 2 lines a second
    # over the ~3 s after start, a burst of 2 included.
    events = [ln for ln in lines if ln["event"] == "tcp_reset_event"]
    assert 1 <= len(events) <= 2 * 4
    assert {"time", "kind", "reason", "laddr", "lport", "raddr", "rport", "netns"} <= set(events[0])
    suppressed = [ln for ln in lines if ln["event"] == "event lines suppressed"]
    assert suppressed and suppressed[0]["suppressed"] >= 1


def test_sigterm_during_scrapes(ns: Netns) -> None:
    require_real_kernel()
    e = Exporter()
    ours = prog_ids_of(e.proc.pid)
    assert ours
    errors: List[BaseException] = []
    done = threading.Event()

    def hammer() -> None:
        while not done.is_set():
            try:
                scrape(e.port)
            except urllib.error.HTTPError as ex:
                errors.append(ex)  # an answer, but a failed one: a scrape must never see a 5xx
            except (OSError, http.client.HTTPException):
                pass  # the server going away mid-scrape (refused, reset, cut short) is expected
            except BaseException as ex:  # anything else is a bug
                errors.append(ex)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    code = e.stop()
    done.set()
    for t in threads:
        t.join()
    assert code == 0
    assert not errors, errors
    assert not (ours & loaded_prog_ids()), "a program stayed loaded"


def test_bad_listen_address_exits_2() -> None:
    require_real_kernel()
    p = subprocess.run(rsttrace("export", "--listen", "::1:80"), capture_output=True, text=True)
    assert p.returncode == 2 and "brackets" in p.stderr and "Traceback" not in p.stderr
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    p = subprocess.run(rsttrace("export", "--listen", "127.0.0.1:%d" % busy.getsockname()[1]),
                       capture_output=True, text=True, timeout=120)
    busy.close()
    assert p.returncode == 2 and "cannot listen" in p.stderr and "Traceback" not in p.stderr


class Prometheus:
    def __init__(self, target_port: int) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            if IN_CI:
                pytest.fail("prometheus missing in CI (Debian package prometheus)")
            pytest.skip("prometheus not installed")
        self.dir = tempfile.mkdtemp(prefix="rsttrace-prom-")
        self.port = free_port()
        cfg = os.path.join(self.dir, "prometheus.yml")
        with open(cfg, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    "scrape_configs:\n  - job_name: rsttrace\n    static_configs:\n"
                    "      - targets: ['127.0.0.1:%d']\n" % target_port)
        self.proc = subprocess.Popen(
            [binary, "--config.file=" + cfg, "--storage.tsdb.path=" + os.path.join(self.dir, "data"),
             "--web.listen-address=127.0.0.1:%d" % self.port],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )

    def query(self, q: str) -> List[Dict[str, Any]]:
        url = "http://127.0.0.1:%d/api/v1/query?%s" % (self.port, urllib.parse.urlencode({"query": q}))
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read().decode())
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def value(self, q: str) -> Optional[float]:
        try:
            res = self.query(q)
        except OSError:
            return None
        return float(res[0]["value"][1]) if res else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_real_prometheus_sees_the_resets(exporter: Exporter, ns: Netns) -> None:
    prom = Prometheus(exporter.port)
    try:
        assert wait_for(lambda: prom.value('up{job="rsttrace"}') == 1.0, timeout=60), "prometheus never scraped"
        sel = 'rsttrace_tcp_resets_sent_total{reason="NO_SOCKET",netns="%d"}' % ns.inode
        made = 0
        # Two batches: the series is born with the first, so increase() has a start to rise from.
        for n in (1, 5):
            before = ns.counters()
            with ns.inside():
                connect_refused(socket.AF_INET, "127.0.0.1", closed_port(socket.AF_INET, "127.0.0.1"), n)
            made += delta(before, ns.counters(), "Tcp", "OutRsts")
            want = float(made)
            assert wait_for(lambda: prom.value(sel) == want, timeout=30), (prom.value(sel), want)  # noqa: B023
            time.sleep(2)
        rise = prom.value("increase(%s[1m])" % sel)
        assert rise is not None and rise > 0
        assert prom.value('rsttrace_program_attached{program="rsttrace_send_reset"}') == 1.0
    finally:
        prom.stop()


def test_every_metric_the_rules_use_is_exported(exporter: Exporter) -> None:
    import re

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    used: set = set()  # type: ignore[type-arg]
    for path in (os.path.join(root, "deploy", "prometheus", "rules.yml"),
                 os.path.join(root, "deploy", "grafana", "rsttrace-dashboard.json")):
        with open(path) as f:
            used |= set(re.findall(r"\b(rsttrace_[a-z_]+?(?:_total|_attached|_info))\b", f.read()))
    text = scrape(exporter.port)
    exported = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    exported |= {n + "_total" for n in exported}
    assert used and not (used - exported), sorted(used - exported)


def rss_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def scan(ns: Netns, ports: int) -> None:
    """A port scan's shape: one connect to each of many closed ports (a RST each way)."""
    with ns.inside():
        for port in range(20000, 20000 + ports):
            s = socket.socket()
            try:
                s.connect(("127.0.0.1", port))
            except ConnectionRefusedError:
                pass
            finally:
                s.close()


def test_memory_flat_under_port_scan(exporter: Exporter, ns: Netns) -> None:
    scan(ns, 3000)  # warm-up: allocator pools, first series
    scrape(exporter.port)
    time.sleep(1)
    base = rss_kib(exporter.proc.pid)
    for _ in range(3):
        scan(ns, 5000)
        scrape(exporter.port)
    time.sleep(1)
    grown = rss_kib(exporter.proc.pid) - base
    text = scrape(exporter.port)
    assert sample(text, "rsttrace_tcp_resets_sent_total", sent_labels(ns)) >= 18000
    series = [ln for ln in text.splitlines() if ln.startswith("rsttrace_tcp_")]
    assert len(series) < 20  # 18 000 peers and ports: still a handful of series
    assert grown < 4096, "RSS grew by %d KiB over 15 000 more scan resets" % grown
