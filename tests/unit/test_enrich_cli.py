"""``python -m rsttrace.enrich``: the diagnostic dump an operator runs on a node."""

from __future__ import annotations

import io
import os
from pathlib import Path

from rsttrace.enrich.__main__ import main

UID = "0a1b2c3d-4e5f-6789-abcd-ef0123456789"
CID = "b1" * 32


def test_cli_prints_netns_and_cgroup_attribution(tmp_path: Path) -> None:
    proc, pods, ctrs, cg = (tmp_path / d for d in ("proc", "pods", "containers", "cgroup"))
    for pid, ns, cgroup in (
        (1, 4026531840, "0::/init.scope\n"),
        (42, 4026532000, "0::/kubepods/besteffort/pod%s/%s\n" % (UID, CID)),
    ):
        (proc / str(pid) / "ns").mkdir(parents=True)
        os.symlink("net:[%s]" % (ns,), proc / str(pid) / "ns" / "net")
        (proc / str(pid) / "cgroup").write_text(cgroup)
        (proc / str(pid) / "comm").write_text("x\n")
    (pods / ("shop_web-7d9f_%s" % (UID,)) / "nginx").mkdir(parents=True)
    ctrs.mkdir()
    container_cg = cg / "kubepods" / "besteffort" / ("pod%s" % (UID,)) / CID
    container_cg.mkdir(parents=True)
    (cg / "cgroup.controllers").write_text("")

    out = io.StringIO()
    rc = main(
        [
            "--proc-root",
            str(proc),
            "--cgroup-root",
            str(cg),
            "--pods-dir",
            str(pods),
            "--containers-dir",
            str(ctrs),
        ],
        out=out,
    )

    assert rc == 0
    lines = out.getvalue().splitlines()
    assert "netns 4026532000 shop/web-7d9f container=nginx id=%s" % (CID[:12],) in lines
    assert "cgroup %s shop/web-7d9f container=nginx id=%s" % (os.stat(container_cg).st_ino, CID[:12]) in lines
    assert not any(line.startswith("netns 4026531840") for line in lines)
