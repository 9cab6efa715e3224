"""Reading a running Session with a top map into ``rsttrace top`` Snapshots."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Set, Tuple

from rsttrace.capture import contract as c
from rsttrace.pipeline.top import Namer, Row, Snapshot, TopModel


def session_rows(session: Any, namer: Namer) -> Tuple[Dict[Row, int], Dict[str, int], int]:
    """(rows, spill by kind name, keys in the map) from a running Session with a top map, plus
    its counter-derived kinds as rows without peers."""
    raw, spill = session.tracer.top_counts()
    rows: Dict[Row, int] = {}
    for t, n in raw.items():
        r = namer.row(t)
        rows[r] = rows.get(r, 0) + n
    for (kind, reason, netns, port, state), n in session.derived().items():
        r = Row(kind, reason, state, None, netns or None, None, port or None, None, None, "counters")
        rows[r] = rows.get(r, 0) + n
    return rows, {c.KIND_NAMES.get(k, "unknown:%d" % k): n for k, n in spill.items()}, len(raw)


def session_totals(session: Any, netns: Optional[Set[int]], family: Optional[str]) -> Dict[str, int]:
    """The exact counters by kind (and the counter-derived kinds), filtered as the rows are."""
    out: Dict[str, int] = {}
    for k, n in session.counts().items():
        if netns is not None and k.netns not in netns:
            continue
        if family is not None and k.family not in (family, None):
            continue
        out[k.kind] = out.get(k.kind, 0) + n
    return out


class Sampler:
    """A started Session with a top map, read into Snapshots; polls the counter-derived kinds
    while it waits (every ``overflow_interval``), as Session.run does for the other commands."""

    def __init__(self, session: Any, model: TopModel, stop: Any, overflow_interval: float = 1.0) -> None:
        self.session = session
        self.model = model
        self.stop = stop
        self.namer = Namer(session.facts)
        self.overflow_interval = overflow_interval
        self._next_poll = time.monotonic() + overflow_interval

    def wait(self, seconds: float, tick: Optional[Callable[[], bool]] = None) -> bool:
        """Wait ``seconds`` (polling overflows meanwhile); ``tick`` runs every 100 ms and ends the
        wait early by returning True. False when stopped."""
        end = time.monotonic() + seconds
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= self._next_poll:
                self.session.poll_overflows()
                self._next_poll = now + self.overflow_interval
            if now >= end:
                return True
            if tick is not None:
                if tick():
                    return True
            else:
                self.stop.wait(min(0.1, end - now, max(0.0, self._next_poll - now)))
        return False

    def sample(self, sort: str = "rate", last: bool = False) -> Snapshot:
        if last:
            self.session.finish(settle=1.0)  # the last seconds' counter-derived counts
        rows, spill, keys = session_rows(self.session, self.namer)
        totals = session_totals(self.session, self.model.netns, self.model.family)
        if self.model.kinds is not None:
            totals = {k: n for k, n in totals.items() if k in self.model.kinds}
        return self.model.snapshot(rows, spill, keys, totals, sort=sort)
