"""Hints for ``rsttrace top``: what the counts show, where they show it, each naming the reason
to read in ``rsttrace reasons`` (factual: a hint states what was counted)."""

from __future__ import annotations

from typing import Dict, List, Optional, Set, Tuple

from rsttrace.pipeline.top import ABORTS, APP_ABORTS, MANY_PEERS, SCAN_PORTS, Hint, Row


def _where(ns: Optional[int]) -> str:
    return "netns %d" % ns if ns else "an unknown netns"


def hints(rows: Dict[Row, int]) -> List[Hint]:
    """What the counts show, where they show it: many closed ports from one peer, one closed port
    from many peers, SYN-queue overflows on a port, one namespace's processes aborting connections.
    Factual: each says what was counted and names the reason to read in `rsttrace reasons`."""
    by_peer: Dict[Tuple[Optional[int], str], Tuple[Set[int], int]] = {}
    by_port: Dict[Tuple[Optional[int], int], Tuple[Set[str], int]] = {}
    floods: Dict[Tuple[Optional[int], Optional[int], str], int] = {}
    aborts: Dict[Tuple[Optional[int], str], Tuple[Set[int], int]] = {}
    for r, n in rows.items():
        if r.kind == "sent" and r.reason == "NO_SOCKET":
            if r.raddr is not None and r.port is not None:
                ports, total = by_peer.get((r.netns, r.raddr), (set(), 0))
                ports.add(r.port)
                by_peer[(r.netns, r.raddr)] = (ports, total + n)
                peers, total = by_port.get((r.netns, r.port), (set(), 0))
                peers.add(r.raddr)
                by_port[(r.netns, r.port)] = (peers, total + n)
        elif r.kind in ("syn_queue_overflow", "listen_drop") and r.reason:
            k = (r.netns, r.port, r.reason)
            floods[k] = floods.get(k, 0) + n
        elif r.kind == "sent" and r.reason is not None and r.reason in APP_ABORTS:
            akey = (r.netns, r.reason)
            pids, total = aborts.get(akey, (set(), 0))
            if r.pid is not None:
                pids.add(r.pid)
            aborts[akey] = (pids, total + n)
    out: List[Hint] = []
    for (ns, peer), (ports, total) in sorted(by_peer.items(), key=lambda kv: -len(kv[1][0])):
        if len(ports) >= SCAN_PORTS:
            out.append(Hint("scan", "NO_SOCKET", "peer %s refused on %d closed ports in %s (%d resets): a port "
                                                 "scan's shape" % (peer, len(ports), _where(ns), total),
                            {"netns": ns, "peer": peer, "ports": len(ports), "resets": total}))
    for (ns, port), (peers, total) in sorted(by_port.items(), key=lambda kv: -len(kv[1][0])):
        if len(peers) >= MANY_PEERS:
            out.append(Hint("port", "NO_SOCKET", "port %d in %s refused %d peers (%d resets): nothing listens: "
                                                 "service down, or a SYN flood at it"
                            % (port, _where(ns), len(peers), total),
                            {"netns": ns, "port": port, "peers": len(peers), "resets": total}))
    for (ns, lport, reason), count in sorted(floods.items(), key=lambda kv: -kv[1]):
        what = "port %d" % lport if lport else "a listener"
        out.append(Hint("synflood", reason, "%s in %s: %d SYNs it could not queue: a SYN flood, or a backlog too "
                                            "small" % (what, _where(ns), count),
                        {"netns": ns, "port": lport, "resets": count}))
    for (ns, reason), (pids, total) in sorted(aborts.items(), key=lambda kv: -kv[1][1]):
        if total >= ABORTS:
            who = " (pid %s)" % ", ".join(str(p) for p in sorted(pids)[:5]) if pids else ""
            out.append(Hint("aborts", reason, "%s%s: %d resets, the application %s"
                            % (_where(ns), who, total, APP_ABORTS[reason]),
                            {"netns": ns, "pids": sorted(pids), "resets": total}))
    return out
