"""Attribute TCP reset events to Kubernetes pods and containers.

Pod and container identity is read from node files only (cgroup paths here);
no Kubernetes API or container runtime socket is needed.
"""

from __future__ import annotations

from .cgroups import (
    CgroupIdentity,
    find_cgroup2_root,
    normalize_uid,
    parse_cgroup_path,
    parse_proc_cgroup,
)

__all__ = [
    "CgroupIdentity",
    "find_cgroup2_root",
    "normalize_uid",
    "parse_cgroup_path",
    "parse_proc_cgroup",
]
