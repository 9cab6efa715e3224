"""``python -m rsttrace.enrich``: print what the enricher sees on this node.

For checking attribution on a real node (or in the tracer's pod, with the
host paths mounted elsewhere) before trusting it on reset events.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional, TextIO

from rsttrace.enrich.enricher import Enricher, PodInfo


def _describe(info: PodInfo) -> str:
    pod = "%s/%s" % (info.namespace, info.pod) if info.pod else "pod-uid:%s" % (info.pod_uid,)
    container = info.container or "?"
    cid = info.container_id[:12] or "-"
    return "%s container=%s id=%s" % (pod, container, cid)


def main(argv: Optional[Sequence[str]] = None, out: TextIO = sys.stdout) -> int:
    ap = argparse.ArgumentParser(prog="python -m rsttrace.enrich", description=__doc__)
    ap.add_argument("--proc-root", default="/proc")
    ap.add_argument("--cgroup-root", default="/sys/fs/cgroup")
    ap.add_argument("--pods-dir", default="/var/log/pods")
    ap.add_argument("--containers-dir", default="/var/log/containers")
    args = ap.parse_args(argv)
    enr = Enricher(
        proc_root=args.proc_root,
        cgroup_root=args.cgroup_root,
        pods_dir=args.pods_dir,
        containers_dir=args.containers_dir,
    )
    enr.refresh()
    for inode, info in sorted(enr.netns_entries().items()):
        print("netns %s %s" % (inode, _describe(info)), file=out)
    for cgid, info in sorted(enr.cgroup_entries().items()):
        print("cgroup %s %s" % (cgid, _describe(info)), file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
