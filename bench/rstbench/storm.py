"""Running the C storm generator (bench/storm.c) inside the bench's namespace."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import List, Optional

from .system import BenchError, Netns, run


@dataclass
class StormResult:
    mode: str
    procs: int
    iterations: int
    seconds: float
    per_sec: float
    errors: int


def storm(exe: str, ns: Netns, mode: str = "closed", procs: int = 1, duration: float = 5.0,
          iterations: Optional[int] = None, rate: Optional[float] = None, peers: Optional[int] = None) -> StormResult:
    """One storm; ``rate`` is per process (iterations/s), ``iterations`` in all."""
    argv: List[str] = [exe, "-m", mode, "-p", str(procs), "-d", "%g" % duration]
    if iterations:
        argv += ["-n", str(iterations)]
    if rate:
        argv += ["-r", "%g" % rate]
    if peers:
        argv += ["-P", str(peers)]
    p = run(ns.prefix() + argv, timeout=duration + 120)
    try:
        d = json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as e:
        raise BenchError("storm printed no result: %r %s" % (p.stdout[-200:], p.stderr[-200:])) from e
    return StormResult(str(d["mode"]), int(d["procs"]), int(d["iterations"]), float(d["seconds"]),
                       float(d["per_sec"]), int(d["errors"]))


# Resets each iteration makes, each way (sent and received): what an every-event tracer
# should deliver or count as lost, per iteration.
EVENTS_PER_ITERATION = {"closed": 2, "abort": 2, "overflow": 3}
