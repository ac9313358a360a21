"""Progress display for a study run: rich on a terminal, plain log lines otherwise."""
from __future__ import annotations

import sys
import time
from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Display(Protocol):
    def trial_start(self, k: int, n: int, label: str, hash: str) -> None: ...
    def stage(self, name: str, total: int) -> None: ...
    def epoch(self, name: str, epoch: int, total: int, metrics: dict[str, Any]) -> None: ...
    def trial_end(self, line: str) -> None: ...
    def message(self, line: str) -> None: ...
    def close(self) -> None: ...


def _fmt(metrics: dict[str, Any]) -> str:
    parts = []
    for key in ("loss", "lr", "top1", "knn_top1", "images_per_s"):
        if key in metrics and metrics[key] is not None:
            v = metrics[key]
            parts.append(f"{key}={v:.3g}" if key != "images_per_s" else f"img/s={v:.0f}")
    return " ".join(parts)


class PlainDisplay:
    """One log line per event: for logs, CI and pipes."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(file=sys.stdout, highlight=False, soft_wrap=True)
        self.t0 = time.time()

    def _print(self, line: str) -> None:  # soft_wrap: one event, one line, whatever the console's width
        self.console.print(f"[{time.time() - self.t0:7.1f}s] {line}", markup=False, soft_wrap=True)

    def trial_start(self, k, n, label, hash):
        self._print(f"trial {k}/{n} {hash[:8]} {label}")

    def stage(self, name, total):
        pass

    def epoch(self, name, epoch, total, metrics):
        self._print(f"  {name} epoch {epoch}/{total} {_fmt(metrics)}")

    def trial_end(self, line):
        self._print(line)

    def message(self, line):
        self._print(line)

    def close(self):
        pass


class RichDisplay:
    """A live bar per trial stage (epoch k of n, loss, images/s, time left) above one summary line per trial."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=True)
        self.progress.start()
        self.task = None
        self.head = ""

    def trial_start(self, k, n, label, hash):
        self.head = f"trial {k}/{n} {label}"

    def stage(self, name, total):
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(f"{self.head} · {name}", total=max(total, 1), info="")

    def epoch(self, name, epoch, total, metrics):
        if self.task is not None:
            self.progress.update(self.task, completed=epoch, info=_fmt(metrics))

    def trial_end(self, line):
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
        self.progress.console.print(line, highlight=False)

    def message(self, line):
        self.progress.console.print(line, highlight=False)

    def close(self):
        self.progress.stop()


def make_display(console: Console | None = None) -> Display:
    console = console or Console()
    return RichDisplay(console) if console.is_terminal else PlainDisplay(console)
