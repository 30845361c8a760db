"""Is another process using this machine's cores? Benchmarks on a 2-core testbed mean nothing if so.

Counts the CPU time (utime + stime from /proc/PID/stat) of every process that is *not* this process or one
of its descendants (our engines, routers and load generators) over a short window, in cores. No psutil:
/proc is enough and always there on Linux. `BusySampler` keeps sampling in a thread during a run so a
benchmark can report the worst interval next to its figures.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
BUSY_CORES = 0.25  # foreign CPU above this (in cores, summed over processes) counts as a busy machine


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, utime + stime in ticks) of a live process, None if it vanished."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode(errors="replace")
    except OSError:
        return None
    fields = data.rpartition(")")[2].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])


def _snapshot() -> dict[int, tuple[int, int]]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                out[int(name)] = st
    return out


def _descendants(root: int, snap: dict[int, tuple[int, int]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in snap.items():
        children.setdefault(ppid, []).append(pid)
    mine, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in mine:
            mine.add(pid)
            todo.extend(children.get(pid, []))
    return mine


@dataclass
class Usage:
    foreign_cores: float
    top: list[tuple[float, int, str]]  # (cores, pid, command) of the busiest foreign processes

    @property
    def busy(self) -> bool:
        return self.foreign_cores > BUSY_CORES

    def describe(self) -> str:
        who = ", ".join(f"pid {pid} {cmd[:60]!r} {cores:.2f}" for cores, pid, cmd in self.top[:3])
        return f"{self.foreign_cores:.2f} cores used by other processes" + (f" ({who})" if who else "")


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def foreign_usage(window_s: float = 2.0, root: int | None = None) -> Usage:
    """CPU used by processes outside `root`'s tree (default: this process) during the next `window_s`."""
    root = root or os.getpid()
    before = _snapshot()
    time.sleep(window_s)
    after = _snapshot()
    mine = _descendants(root, after) | _descendants(root, before)
    per = []
    for pid, (_, ticks) in after.items():
        if pid in mine or pid not in before:
            continue
        delta = ticks - before[pid][1]
        if delta > 0:
            per.append((delta / CLK_TCK / window_s, pid))
    per.sort(reverse=True)
    top = [(cores, pid, _command(pid)) for cores, pid in per[:5]]
    return Usage(sum(c for c, _ in per), top)


@dataclass
class BusySampler:
    """Samples `foreign_usage` every `period_s` in a daemon thread; `worst` is the busiest window seen."""

    period_s: float = 10.0
    window_s: float = 2.0
    samples: list[float] = field(default_factory=list)
    worst: Usage | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> "BusySampler":
        root = os.getpid()

        def run() -> None:
            while not self._stop.is_set():
                usage = foreign_usage(self.window_s, root)
                self.samples.append(usage.foreign_cores)
                if len(self.samples) > 10_000:
                    del self.samples[:5_000]
                if self.worst is None or usage.foreign_cores > self.worst.foreign_cores:
                    self.worst = usage
                self._stop.wait(self.period_s)

        self._thread = threading.Thread(target=run, name="busy-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.window_s + 5)

    @property
    def busy(self) -> bool:
        return self.worst is not None and self.worst.busy
