"""py-spy on rsttrace's Python side: where the time per event goes (a dev tool, optional)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Any, Dict, List, Optional, Sequence, Tuple

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def find_pyspy(rsttrace: Sequence[str]) -> Optional[str]:
    """py-spy on PATH, or beside rsttrace's interpreter (pip install py-spy into its venv)."""
    cands = [shutil.which("py-spy")]
    for word in rsttrace[:1]:
        cands.append(os.path.join(os.path.dirname(word), "py-spy"))
    cands.append("/tmp/venv/bin/py-spy")
    for c in cands:
        if c and os.access(c, os.X_OK):
            return c
    return None


def record(pyspy: str, pid: int, seconds: float, out_dir: str, fmt: str = "raw") -> Dict[str, Any]:
    """Sample ``pid`` for ``seconds`` without stopping it (--nonblocking: the tracer keeps its
    pace), aggregated by function; for ``raw`` (folded stacks) also the tallies."""
    ext = {"raw": "folded.txt", "flamegraph": "svg", "speedscope": "speedscope.json"}[fmt]
    path = os.path.join(out_dir, "profile-%d.%s" % (pid, ext))
    cmd = [pyspy, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate", "250",
           "--nonblocking", "--function", "--format", fmt, "-o", path]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False,
                       timeout=seconds + 60)
    if p.returncode != 0 or not os.path.exists(path):
        return {"error": (p.stderr or p.stdout).strip()[-400:]}
    out: Dict[str, Any] = {"file": path}
    if fmt == "raw":
        with open(path) as f:
            out.update(tally(f.read()))
    return out


def _name(frame: str) -> str:
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    f = m.group("file")
    # site-packages/rsttrace/events.py -> rsttrace/events.py; keep what tells modules apart
    parts = f.replace("\\", "/").split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else f
    return "%s (%s)" % (m.group("func"), short)


def tally(folded: str, top: int = 15) -> Dict[str, Any]:
    """Self and inclusive sample shares by function from py-spy's folded stacks."""
    self_n: Dict[str, int] = {}
    incl_n: Dict[str, int] = {}
    total = 0
    for line in folded.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        # The first frames are "process ..." and "thread ..." pseudo-frames when present.
        frames = [fr for fr in stack.split(";") if not fr.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        names = [_name(fr) for fr in frames]
        leaf = names[-1]
        self_n[leaf] = self_n.get(leaf, 0) + count
        for nm in set(names):
            incl_n[nm] = incl_n.get(nm, 0) + count

    def rank(d: Dict[str, int]) -> List[Tuple[str, float]]:
        return [(k, 100.0 * v / total) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]] if total else []

    return {"samples": total, "self": rank(self_n), "inclusive": rank(incl_n)}
