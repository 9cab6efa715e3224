"""``rsttrace reasons``: every reason name this kernel and rsttrace can print, each explained."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List

from rsttrace.cli import common
from rsttrace.pipeline import names
from rsttrace.pipeline.reasons_text import explain


def add_parser(sub: Any) -> None:
    r = sub.add_parser("reasons", help="the running kernel's reason table, explained")
    r.add_argument("--json", action="store_true", help="as a JSON array")


def cmd_reasons(args: argparse.Namespace) -> int:
    facts = common.prepare(need_root=False)
    rows: List[Dict[str, Any]] = []
    source = "tcp:tcp_send_reset format (enum sk_rst_reason)"
    for raw, name in sorted(facts.rst_reasons.items()):
        rows.append({"kind": "sent", "raw": raw, "name": name, "source": source})
    drop = "skb:kfree_skb format (enum skb_drop_reason)"
    if facts.listen_overflow_reason is not None:
        rows.append({"kind": "listen_overflow_ack", "raw": facts.listen_overflow_reason,
                     "name": "TCP_LISTEN_OVERFLOW", "source": drop})
    if facts.kfree_cookie_overflow:
        rows.append({"kind": "listen_overflow_ack", "raw": facts.drop_reason("NO_SOCKET"), "name": "NO_SOCKET",
                     "source": drop + ", the SYN-cookie path (syncookie: true)", "by_kind": True})
    # every name rsttrace itself gives, on this kernel (names.OWN_REASONS says which kinds)
    for name, (kind, where) in names.own_reasons(facts).items():
        rows.append({"kind": kind, "raw": None, "name": name, "source": where})
    for row in rows:
        by_kind = row.pop("by_kind", False)  # a name that means something else for this kind
        ex = (None if by_kind else explain(row["name"])) or explain("kind:" + row["kind"])
        row["cause"] = ex.cause if ex else ""
        row["check"] = ex.check if ex else ""
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
        return 0
    sys.stdout.write("Reasons reported by this kernel (%s), numbers as it numbers them:\n\n" % facts.release)
    for row in rows:
        number = "" if row["raw"] is None else str(row["raw"])
        sys.stdout.write("%-19s %4s  %s\n" % (row["kind"], number, row["name"]))
        if row["cause"]:
            sys.stdout.write("%25s why:   %s\n%25s check: %s\n" % ("", row["cause"], "", row["check"]))
    return 0
