"""Attribute TCP reset events to Kubernetes pods and containers.

Given the network-namespace inode (and optionally the cgroup v2 id) of an
event, ``Enricher`` answers which pod/container it belongs to by reading node
files only: ``/proc``, the cgroup v2 tree and the kubelet's log directories.
No Kubernetes API or container runtime socket is needed.
"""

from __future__ import annotations

from rsttrace.enrich.cgroups import (
    CgroupIdentity,
    find_cgroup2_root,
    normalize_uid,
    parse_cgroup_path,
    parse_proc_cgroup,
)
from rsttrace.enrich.enricher import Enricher, PodInfo
from rsttrace.enrich.procscan import parse_netns_link

__all__ = [
    "CgroupIdentity",
    "Enricher",
    "PodInfo",
    "find_cgroup2_root",
    "normalize_uid",
    "parse_cgroup_path",
    "parse_netns_link",
    "parse_proc_cgroup",
]
