"""Progress of a study: trials done / running / failed / remaining, ETA and the current best.

:class:`Progress` prints one plain line per event (logs, CI, pipes); :class:`LiveProgress` keeps
a live bar at the bottom of a terminal and prints the same events above it.
:func:`make_progress` picks the live one when stdout is a terminal.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

SCORE = "test/union_acc"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Counts and events of one study invocation, printed as plain lines.

    Args:
        total: trials to run in this invocation (finished ones already skipped).
        concurrency: how many run at a time (for the ETA).
        out: where lines go (default stdout).
    """

    def __init__(self, total: int, concurrency: int, out: IO[str] | None = None) -> None:
        self.total = total
        self.concurrency = max(1, concurrency)
        self.out = out or sys.stdout
        self.done = self.failed = self.retried = 0
        self.running: dict[str, float] = {}
        self.durations: list[float] = []
        self.best: tuple[float, str] | None = None
        self.t0 = time.time()

    # events --------------------------------------------------------------------------
    def started(self, name: str, slot: str | None, attempt: int = 0) -> None:
        self.running[name] = time.time()
        again = f" (attempt {attempt + 1})" if attempt else ""
        self.emit(f"start  {name}{' on ' + slot if slot else ''}{again}")

    def finished(self, name: str, metrics: dict[str, Any], ranked: bool = True) -> None:
        """A trial finished; ``ranked`` trials compete for the current best."""
        seconds = self._end(name)
        self.durations.append(seconds)
        self.done += 1
        score = metrics.get(SCORE)
        if ranked and isinstance(score, float) and score == score and (self.best is None or score > self.best[0]):
            self.best = (score, name)
        acc = f"union acc {score:.4f}" if isinstance(score, float) else "done"
        self.emit(f"done   {name}: {acc} in {fmt_seconds(seconds)}")

    def failed_attempt(self, name: str, reason: str, retrying: bool) -> None:
        self._end(name)
        if retrying:
            self.retried += 1
        else:
            self.failed += 1
        self.emit(f"FAILED {name}: {reason}{' (will retry)' if retrying else ''}")

    # state ---------------------------------------------------------------------------
    @property
    def remaining(self) -> int:
        return self.total - self.done - self.failed - len(self.running)

    def eta(self) -> float | None:
        """Seconds left: the mean time of the finished trials spread over the concurrency (None
        before one finished)."""
        if not self.durations:
            return None
        mean = sum(self.durations) / len(self.durations)
        now = time.time()
        left = self.remaining * mean + sum(max(0.0, mean - (now - t)) for t in self.running.values())
        return left / self.concurrency

    def status(self) -> str:
        best = f", best {self.best[0]:.4f} ({self.best[1]})" if self.best else ""
        return (f"{self.done} done, {len(self.running)} running, {self.failed} failed, {self.remaining} remaining, "
                f"ETA {fmt_seconds(self.eta()) if self.remaining or self.running else '0s'}{best}")

    def _end(self, name: str) -> float:
        return time.time() - self.running.pop(name, time.time())

    # output --------------------------------------------------------------------------
    def emit(self, line: str) -> None:
        n = self.done + self.failed
        print(f"[{n}/{self.total} {fmt_seconds(time.time() - self.t0)}] {line} | {self.status()}",
              file=self.out, flush=True)

    def tick(self) -> None:
        """Called about once a second; plain output has nothing to refresh."""

    def close(self) -> None:
        pass

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LiveProgress(Progress):
    """A rich live bar (done of total, elapsed, counts, ETA, best) with events printed above it."""

    def __init__(self, total: int, concurrency: int, out: IO[str] | None = None) -> None:
        super().__init__(total, concurrency, out)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

        self.bar = Bar(TextColumn("trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("{task.fields[status]}"), console=Console(file=self.out), transient=False)
        self.task = self.bar.add_task("trials", total=total, status=self.status())
        self.bar.start()

    def emit(self, line: str) -> None:
        self.bar.console.print(line, highlight=False, markup=False)
        self.tick()

    def tick(self) -> None:
        self.bar.update(self.task, completed=self.done + self.failed, status=self.status())

    def close(self) -> None:
        self.tick()
        self.bar.stop()


def make_progress(total: int, concurrency: int, live: bool | None = None) -> Progress:
    """The live display on a terminal, plain lines otherwise (``live`` forces either)."""
    live = sys.stdout.isatty() if live is None else live
    return (LiveProgress if live else Progress)(total, concurrency)
