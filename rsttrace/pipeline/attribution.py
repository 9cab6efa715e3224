"""Glue between events/metrics and the enrichment layer (rsttrace.enrich): who a reset belongs to.

Lookups only read the enricher's current snapshot: a miss returns at once with empty names and
the enricher's own thread catches up, so the event path never waits on /proc.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

from rsttrace.enrich import Enricher, PodInfo
from rsttrace.pipeline.events import Attribution, Event


def pod_of(enricher: Enricher, cgroup_id: Optional[int], netns: Optional[int]) -> Optional[PodInfo]:
    # The socket owner's cgroup names the exact container (and catches hostNetwork pods);
    # the namespace names the pod when the cgroup is unknown.
    info = enricher.lookup_cgroup(cgroup_id) if cgroup_id else None
    if info is None and netns:
        info = enricher.lookup_netns(netns)
    return info


def event_attributor(enricher: Enricher) -> Callable[[Event], None]:
    """Sets ``ev.attribution`` when the owner's container (or the namespace's pod) is known; a host
    process's event stays without it, so machines without containers print no empty pod keys."""

    def attribute(ev: Event) -> None:
        info = pod_of(enricher, ev.cgroup_id, ev.netns)
        if info is not None:
            ev.attribution = Attribution(namespace=info.namespace, pod=info.pod, container=info.container,
                                         container_id=info.container_id)

    return attribute


def metric_labeler(enricher: Enricher) -> Callable[[Optional[int]], Dict[str, str]]:
    """namespace/pod labels for a counter's netns ({} when host or unknown)."""

    def labels(netns: Optional[int]) -> Dict[str, str]:
        info = enricher.lookup_netns(netns) if netns else None
        return {"namespace": info.namespace, "pod": info.pod} if info else {}

    return labels
