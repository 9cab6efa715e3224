"""Reading the in-kernel counter maps: exact counts per key, namespaces' generations, retiring
the counts of namespaces that are gone (so a reused inode never inherits a dead one's history)."""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Set, Tuple

from rsttrace.capture import contract as c

# (kind, reason raw or None, state raw, family raw, netns, port, flags) -> count
CounterTuple = Tuple[int, Optional[int], int, int, int, int, int]


class CounterMaps:
    """What reading the counter map remembers between reads. Not locked: the tracer calls it
    under its own lock (scrapes read from HTTP threads while the main thread may close the maps)."""

    def __init__(self) -> None:
        # inode -> {namespace generation: the read it was first seen in} (see _newest_generations)
        self._gen_order: Dict[int, Dict[int, int]] = {}
        self._reads = 0
        self.live_generations: Dict[int, int] = {}  # see retire()

    def read(self, bpf: Any) -> Dict[CounterTuple, int]:
        """Exact in-kernel counts, summed over CPUs (the caller holds the tracer's lock).
        Spilled counts (map full) appear with netns 0 and reason None."""
        out: Dict[CounterTuple, int] = {}
        if bpf is None:
            return out
        items = [(k, sum(int(x) for x in v)) for k, v in bpf[b"counters"].items()]
        newest = self._newest_generations(k for k, _n in items)
        for k, total in items:
            reason = None if k.reason == c.REASON_NONE else int(k.reason)
            # An older generation of an inode is a namespace that is gone (its inode went to a
            # newer one): netns 0 until retire() folds it away.
            netns = int(k.netns) if int(k.netns_gen) == newest.get(int(k.netns), int(k.netns_gen)) else 0
            key: CounterTuple = (
                int(k.kind), reason, int(k.state), int(k.family), netns, int(k.port), int(k.flags)
            )
            out[key] = out.get(key, 0) + total
        for k, v in bpf[b"counters_spill"].items():
            total = sum(int(x) for x in v)
            if total:
                key = (int(k.value), None, 0, 0, 0, 0, 0)
                out[key] = out.get(key, 0) + total
        return out

    def _newest_generations(self, keys: Iterable[Any]) -> Dict[int, int]:
        """inode -> the newest namespace generation counted under it.

        Generations are unique but not ordered (the kernel hands ns_id and net_cookie out in
        per-CPU batches: seen here, two CPUs' ranges interleave), and an inode is only reused
        once its namespace is freed: so the generation first seen last is the live one. Two new
        generations of one inode within one read are ordered by value, a guess.
        """
        self._reads += 1
        newest: Dict[int, Tuple[int, int]] = {}
        for k in keys:
            ino, gen = int(k.netns), int(k.netns_gen)
            order = self._gen_order.setdefault(ino, {})
            seen = order.setdefault(gen, self._reads)
            if (seen, gen) > newest.get(ino, (-1, -1)):
                newest[ino] = (seen, gen)
        for ino in [i for i, o in self._gen_order.items() if not o]:
            del self._gen_order[ino]
        out = {ino: gen for ino, (_seen, gen) in newest.items()}
        # where the live namespace's own id is known (read by the poller) and counted, it decides
        out.update((ino, gen) for ino, gen in self.live_generations.items() if gen in self._gen_order.get(ino, ()))
        return out

    def retire(self, bpf: Any, dead: Set[int], live_ids: Dict[int, int], unknown: Set[int], seen_by: int
               ) -> Dict[CounterTuple, int]:
        """Delete, in one pass over the counter map, the counters of namespaces that are gone and
        return what they held, so a caller can keep totals monotonic:

        - every key of an inode in ``dead`` (no namespace has it now);
        - every generation of an inode in ``live_ids`` but the live namespace's own (its id,
          read by the poller: KernelFacts.netns_gen says which);
        - for inodes in ``unknown`` (alive, own id not known: no setns), every generation but
          the newest that was already seen by read ``seen_by`` (a predecessor's).
        """
        out: Dict[CounterTuple, int] = {}
        self.live_generations = dict(live_ids)
        if bpf is None:
            return out
        table = bpf[b"counters"]
        keys = list(table.keys())
        newest = self._newest_generations(keys) if unknown else {}
        for k in keys:
            ino, gen = int(k.netns), int(k.netns_gen)
            if ino in dead:
                pass
            elif ino in live_ids:
                if not gen or gen == live_ids[ino]:
                    continue
            elif ino not in unknown or gen == newest.get(ino) or self._gen_order.get(ino, {}).get(
                    gen, seen_by + 1) > seen_by:
                continue
            self._take(table, k, out)
        return out

    def _take(self, table: Any, k: Any, out: Dict[CounterTuple, int]) -> None:
        """Delete one counter key, adding what it held to ``out``."""
        reason = None if k.reason == c.REASON_NONE else int(k.reason)
        key: CounterTuple = (int(k.kind), reason, int(k.state), int(k.family), int(k.netns), int(k.port),
                             int(k.flags))
        try:
            # read again right before the delete: a count made since items() is kept
            total = sum(int(x) for x in table[k])
            del table[k]
        except KeyError:
            return
        self._gen_order.get(int(k.netns), {}).pop(int(k.netns_gen), None)
        out[key] = out.get(key, 0) + total

    @property
    def reads(self) -> int:
        """How many times the counters were read: generations are ordered by it."""
        return self._reads


def stats(bpf: Any) -> Dict[str, int]:
    """The stats map by name (the caller holds the tracer's lock).

    lost_user: events dropped after reaching user space. No stage drops any today (the
    callback hands each event on synchronously); the key stays for the contract."""
    s = {"events": 0, "lost_kernel": 0, "counter_map_full": 0, "lost_user": 0, "suppressed": 0}
    if bpf is None:
        return s
    names = {c.STAT_EVENTS: "events", c.STAT_BUFFER_FULL: "lost_kernel", c.STAT_COUNTER_FULL: "counter_map_full",
             c.STAT_SUPPRESSED: "suppressed"}
    for k, v in bpf[b"stats"].items():
        name = names.get(int(k.value))
        if name:
            s[name] = sum(int(x) for x in v)
    return s
