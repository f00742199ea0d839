"""One progress convention for every long step: `[tag] what: done/total (pct%), elapsed` lines.

A step that can take more than ~10 s says what it does when it starts, prints a line at most every
`every_s` seconds or every `every_fraction` of the way (whichever comes first), and one line when it ends.
Plain lines, flushed at once, so they read the same on a terminal, in a pipe and in a log file.

    progress = Progress("latents", "std of sampled latents", total=rows, unit="rows")
    for batch in batches:
        ...
        progress.advance(len(batch))
    progress.finish()

`heartbeat` is for a blocking call that cannot count (a Ray Data write): it runs the call and says every
`every_s` seconds that it is still running.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")

EVERY_S = 10.0
EVERY_FRACTION = 0.1


def say(tag: str, text: str) -> None:
    """One console line `[tag] text`, flushed."""
    print(f"[{tag}] {text}", file=sys.stdout, flush=True)


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Counts work done towards `total` (None: unknown) and prints a line per `every_s` or `every_fraction`."""

    def __init__(self, tag: str, what: str, total: int | None = None, unit: str = "", *,
                 every_s: float = EVERY_S, every_fraction: float = EVERY_FRACTION,
                 clock: Callable[[], float] = time.monotonic, announce: bool = True):
        self.tag, self.what, self.total, self.unit = tag, what, total, unit
        self.every_s, self.every_fraction, self.clock = every_s, every_fraction, clock
        self.done = 0
        self.started = self.last_line = clock()
        self.last_fraction = 0.0
        if announce:
            say(tag, f"{what}: started" + (f" ({total} {unit})".rstrip() if total else ""))

    def elapsed(self) -> float:
        return self.clock() - self.started

    def status(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            return f"{self.done}/{self.total}{unit} ({100 * self.done / self.total:.0f}%), {format_seconds(self.elapsed())}"
        return f"{self.done}{unit}, {format_seconds(self.elapsed())}"

    def advance(self, n: int = 1, note: str = "") -> None:
        """`n` more units done; prints a line when `every_s` passed or another `every_fraction` is done."""
        self.done += n
        now = self.clock()
        fraction = self.done / self.total if self.total else 0.0
        due = now - self.last_line >= self.every_s
        if self.total and self.done < self.total and fraction - self.last_fraction >= self.every_fraction:
            due = True
        if due and not (self.total and self.done >= self.total):  # the last line is finish()'s
            self.last_line, self.last_fraction = now, fraction
            say(self.tag, f"{self.what}: {self.status()}" + (f"; {note}" if note else ""))

    def tick(self, note: str = "") -> None:
        """A still-running line (no count) when `every_s` passed since the last line."""
        now = self.clock()
        if now - self.last_line >= self.every_s:
            self.last_line = now
            say(self.tag, f"{self.what}: {self.status()}" + (f"; {note}" if note else ""))

    def finish(self, note: str = "") -> None:
        say(self.tag, f"{self.what}: done, {self.status()}" + (f"; {note}" if note else ""))


def heartbeat(tag: str, what: str, fn: Callable[[], T], *, every_s: float = EVERY_S,
              status: Callable[[], str] | None = None) -> T:
    """Run `fn()` here; while it runs, a line every `every_s` seconds (with `status()` when given)."""
    progress = Progress(tag, what, every_s=every_s)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            extra = status() if status else ""
            say(tag, f"{what}: running, {format_seconds(progress.elapsed())}" + (f"; {extra}" if extra else ""))

    thread = threading.Thread(target=beat, name=f"raydae-heartbeat-{tag}", daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        stop.set()
        thread.join()
    say(tag, f"{what}: done in {format_seconds(progress.elapsed())}")
    return result
