"""``rsttrace top``'s refreshing screen, drawn with curses.

Why curses: it is in Python's standard library, so the image and the distro install need no new
package (rich and textual would add a dependency tree to the DaemonSet's image and to
``scripts/install``), and it imports in a few milliseconds where textual takes hundreds, next to
a start already spent compiling the BPF program. The screen is a table of text lines
(``top.table``) that curses only places, so batch output and the screen cannot disagree.

Log lines (a namespace gone, a warning) would draw over the screen: they are held while it is up
(``log.held``), counted on the status line, and written to stderr, in order, once the terminal is
restored.

Keys: ``q`` quits (the terminal is restored by ``curses.wrapper``, on any exit), ``s`` cycles the
sort (rate, total, then each column), ``r`` rate, ``t`` total, space refreshes now; a resize
redraws at once.
"""

from __future__ import annotations

import curses
from typing import Any, List, Optional

from rsttrace import log
from rsttrace.pipeline.top import SORTS, Snapshot, rank
from rsttrace.pipeline.topsample import Sampler
from rsttrace.sinks.toptext import Labels, table

HELP = "q quit  s sort: %s  r rate  t total  space refresh"


def _draw(scr: Any, snap: Optional[Snapshot], labels: Labels, sort: str, whole: bool = False,
          held: Optional[List[str]] = None) -> None:
    """One frame; ``whole`` repaints every cell (after a key or a resize) rather than what changed."""
    if whole:
        scr.clear()
    else:
        scr.erase()
    height, width = scr.getmaxyx()
    if snap is None:
        lines: List[str] = ["rsttrace top: counting; first sample in a moment"]
    else:
        lines = table(snap, labels, rows=None, width=max(1, width - 1))
    body = max(1, height - 1)
    if len(lines) > body:  # rows that do not fit: say how many
        more = len(lines) - body + 1
        lines = lines[:body - 1] + ["... %d more rows (a taller terminal, or -b)" % more]
    header_at = next((i for i, line in enumerate(lines) if line.startswith(("POD", "KIND", "REASON", "STATE",
                                                                           "LOCAL", "PORT", "PEER", "PID"))), -1)
    for i, line in enumerate(lines[:body]):
        try:
            scr.addstr(i, 0, line[:max(0, width - 1)], curses.A_REVERSE if i == header_at else curses.A_NORMAL)
        except curses.error:
            pass  # the bottom-right cell, or a terminal shrinking while we draw
    status = HELP % sort
    n = "".join(held).count("\n") if held else 0  # writes are pieces of lines
    if n:
        status += "  (%d log line%s shown at exit)" % (n, "" if n == 1 else "s")
    try:
        scr.addstr(height - 1, 0, status[:max(0, width - 1)], curses.A_BOLD)
    except curses.error:
        pass
    scr.refresh()


def run_screen(sampler: Sampler, delay: float, labels: Labels, sort: str = "rate",
               iterations: Optional[int] = None) -> None:
    """Draw every ``delay`` seconds until q, a signal, or ``iterations`` samples."""

    def main(scr: Any, held: List[str]) -> None:
        nonlocal sort
        try:
            curses.curs_set(0)
        except curses.error:
            pass  # a terminal without cursor control
        scr.timeout(100)  # getch() returns -1 after 100 ms: the wait's tick
        snap: Optional[Snapshot] = None
        n = 0
        _draw(scr, snap, labels, sort, held=held)
        quit_ = [False]

        def tick() -> bool:
            nonlocal sort, snap
            key = scr.getch()
            if key == -1:
                return False
            if key in (ord("q"), ord("Q")):
                quit_[0] = True
                return True
            if key == curses.KEY_RESIZE:
                curses.update_lines_cols()
            elif key in (ord("s"), ord("r"), ord("t")):
                sort = {ord("r"): "rate", ord("t"): "total"}.get(key) or SORTS[(SORTS.index(sort) + 1) % len(SORTS)]
                if snap is not None:
                    snap.groups = rank(snap.groups, sort, snap.by)
                    snap.sort = sort
            elif key == ord(" "):
                return True
            _draw(scr, snap, labels, sort, whole=True, held=held)
            return False

        while not quit_[0] and (iterations is None or n < iterations):
            if not sampler.wait(delay, tick) or quit_[0]:
                break
            snap = sampler.sample(sort)
            n += 1
            _draw(scr, snap, labels, sort, held=held)

    with log.held() as held:
        curses.wrapper(main, held)
