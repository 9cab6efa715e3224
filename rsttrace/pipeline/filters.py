"""User-space event filters for ``rsttrace trace`` (counters always count everything)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import List, Optional, Sequence, Set, Union

from rsttrace.capture.contract import KIND_BY_NAME
from rsttrace.pipeline.events import Event

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class FilterError(ValueError):
    pass


def parse_kinds(values: Optional[Sequence[str]]) -> Optional[List[str]]:
    if not values:
        return None
    out: List[str] = []
    for v in values:
        for k in v.split(","):
            k = k.strip()
            if k not in KIND_BY_NAME:
                raise FilterError("unknown kind %r (one of: %s)" % (k, ", ".join(KIND_BY_NAME)))
            out.append(k)
    return out


def parse_ports(values: Optional[Sequence[str]]) -> Optional[Set[int]]:
    if not values:
        return None
    out: Set[int] = set()
    for v in values:
        for p in v.split(","):
            port = int(p) if p.strip().isascii() and p.strip().isdigit() else -1  # int() takes "８０", "8_0"
            if not 0 < port < 65536:
                raise FilterError("bad port %r: a number from 1 to 65535" % p)
            out.add(port)
    return out


def parse_addrs(values: Optional[Sequence[str]]) -> Optional[List[Network]]:
    if not values:
        return None
    out: List[Network] = []
    for v in values:
        for a in v.split(","):
            try:
                out.append(ipaddress.ip_network(a.strip(), strict=False))
            except ValueError:
                raise FilterError("bad address %r: an IP address or CIDR such as 10.0.0.0/8 or fd00::/8" % a) from None
    return out


def parse_reasons(values: Optional[Sequence[str]]) -> Optional[Set[str]]:
    if not values:
        return None
    return {r.strip().upper() for v in values for r in v.split(",") if r.strip()}


@dataclass
class EventFilter:
    kinds: Optional[List[str]] = None
    reasons: Optional[Set[str]] = None
    ports: Optional[Set[int]] = None
    addrs: Optional[List[Network]] = None
    netns: Optional[int] = None
    family: Optional[str] = None  # "ipv4" | "ipv6"

    def match(self, e: Event) -> bool:
        if self.kinds is not None and e.kind not in self.kinds:
            return False
        if self.reasons is not None and (e.reason or "").upper() not in self.reasons:
            return False
        if self.netns is not None and e.netns != self.netns:
            return False
        if self.family is not None and e.family != self.family:
            return False
        if self.ports is not None and e.lport not in self.ports and e.rport not in self.ports:
            return False
        if self.addrs is not None:
            ips = [ipaddress.ip_address(a) for a in (e.laddr, e.raddr) if a]
            if not any(ip in net for ip in ips for net in self.addrs if ip.version == net.version):
                return False
        return True

    def match_count(self, kind: str, netns: Optional[int], family: Optional[str]) -> bool:
        """The same filter on a counter (``summary``): counters have a kind, a namespace and a
        family, where known (a counter-derived kind has no family: it passes a family filter)."""
        if self.kinds is not None and kind not in self.kinds:
            return False
        if self.netns is not None and netns != self.netns:
            return False
        return self.family is None or family in (self.family, None)
