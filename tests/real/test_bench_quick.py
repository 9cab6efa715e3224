"""`bench/run --quick` works end to end: every configuration measured, the table printed.

No timing is asserted (this machine's load decides the figures); only that the bench runs from
the source tree with the rsttrace under test and reports each configuration's row.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.real.realkernel import require_real_kernel

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from rstbench.tools import configurations  # noqa: E402


@pytest.mark.root
def test_bench_quick(tmp_path: Path) -> None:
    require_real_kernel()
    out = tmp_path / "bench"
    # The rsttrace of this interpreter (the checkout under test), not whatever is on PATH.
    cmd = [str(REPO / "bench" / "run"), "--quick", "--out", str(out),
           "--rsttrace", "%s -m rsttrace" % shlex.quote(sys.executable)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(REPO),
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.returncode == 0, "bench/run --quick failed:\n%s\n%s" % (p.stdout[-3000:], p.stderr[-3000:])
    # this rsttrace has --no-raw-tracepoints, -w and top, so the bench adds the perf tracepoint,
    # pcapng and top rows
    expected = configurations(all_events_flag=False, raw_flag=True, write_flag=True, top_flag=True)
    for cfg in expected:
        assert any(line.startswith(cfg.label) for line in p.stdout.splitlines()), (
            "no row for %s:\n%s\n%s" % (cfg.label, p.stdout, p.stderr[-2000:]))
    assert "targets:" in p.stdout
    results = json.loads((out / "results.json").read_text())
    measured = {r["config"] for r in results["rounds"]}
    assert measured == {c.key for c in expected}
    # counters-only and export counts are exact whatever the load: that one is not a timing claim
    for r in results["rounds"]:
        if r["config"] in ("counters", "counters_perf", "export"):
            assert r["counted"] == r["out_rsts"], r
