"""Host memory where CUDA memory is unavailable: peak resident set size (RSS) of this process.

The trainer logs CUDA's peak allocation, which is 0 on a CPU. `RssMonitor` samples the process RSS in a
background thread while something runs (psutil when installed, else /proc/self/statm, else ru_maxrss), keeps
the peak of that window and, given a training CSV log, the peak reached by each logged step.
"""
from __future__ import annotations

import csv
import io
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional, Tuple


def max_rss_mb() -> float:
    """Peak RSS of the process since it started (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def current_rss_mb() -> float:
    """RSS now (falls back to the process peak where neither psutil nor /proc is available)."""
    try:
        import psutil  # optional dependency

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return max_rss_mb()


def _last_step(path: Path) -> Optional[float]:
    """The `step` of the last complete row of a CSV log (None when there is none yet)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    lines = text.splitlines()
    if not text.endswith("\n"):
        lines = lines[:-1]  # a row being written
    lines = [line for line in lines if line.strip()]
    if len(lines) < 2:
        return None
    row = next(csv.DictReader(io.StringIO(lines[0] + "\n" + lines[-1] + "\n")), None)
    try:
        return float(row["step"]) if row else None
    except (KeyError, TypeError, ValueError):
        return None


class RssMonitor:
    """Context manager: `peak_mb` (the largest RSS sampled inside the block) and `curve`, a list of
    (step, peak RSS so far) for each new row of `log_path` seen while the block ran."""

    def __init__(self, log_path=None, interval_s: float = 0.05):
        self.log_path = Path(log_path) if log_path is not None else None
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self.curve: List[Tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._log_size = -1

    def _sample(self) -> None:
        self.peak_mb = max(self.peak_mb, current_rss_mb())
        if self.log_path is None:
            return
        try:
            size = self.log_path.stat().st_size
        except OSError:
            return
        if size != self._log_size:  # parse only when the trainer appended a row
            self._log_size = size
            step = _last_step(self.log_path)
            if step is not None and (not self.curve or step > self.curve[-1][0]):
                self.curve.append((step, round(self.peak_mb, 1)))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "RssMonitor":
        self._sample()
        self._thread = threading.Thread(target=self._run, name="rss-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self.peak_mb = round(self.peak_mb, 1)
