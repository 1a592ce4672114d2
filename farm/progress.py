"""Progress of a run: jobs done/total, windows rendered, windows per minute, and an ETA from that
measured rate. One updating line on a terminal, plain log lines otherwise (CI, `kubectl logs`, files)."""

import logging
import sys
import time
from datetime import timedelta

log = logging.getLogger("talkfarm")


class Progress:
    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.live = stream.isatty()
        self.total = self.done = self.failed = 0
        self.windows: dict[str, tuple[int, int]] = {}  # job -> (rendered, of), from its encode on
        self.first_window_at: float | None = None  # when this run's first window ended
        self.windows_since_first = 0  # windows ended after it

    def start(self, jobs: int) -> None:
        self.total = jobs
        self._show(f"{jobs} jobs to render")

    def planned(self, job: str, windows: int) -> None:
        """The job is encoded: its windows count towards the ETA."""
        self.windows.setdefault(job, (0, windows))

    def window(self, job: str, window: int, windows: int) -> None:
        self.windows[job] = (window, windows)
        if self.first_window_at is None:
            self.first_window_at = time.monotonic()
        else:
            self.windows_since_first += 1
        self._show(f"{job}: window {window}/{windows}")

    def job_done(self, job: str) -> None:
        self.done += 1
        self._show(f"{job}: done")

    def job_failed(self, job: str, reason: str) -> None:
        self.failed += 1
        self.windows.pop(job, None)  # its windows will not be rendered
        self._show(f"{job}: FAILED: {reason}", always_log=True)

    def rate(self) -> float | None:
        """Windows per second over all renderers, measured from the end of the run's first window (which
        carries the models' loading and compile warm-up) to now; None before a second window."""
        if not self.windows_since_first:
            return None
        return self.windows_since_first / max(time.monotonic() - self.first_window_at, 1e-9)

    def windows_left(self) -> float:
        """Windows of the encoded jobs still to render, plus the jobs not yet encoded at the encoded
        jobs' mean windows each."""
        left = sum(of - done for done, of in self.windows.values())
        unplanned = self.total - self.failed - len(self.windows)
        if unplanned > 0 and self.windows:
            left += unplanned * sum(of for _, of in self.windows.values()) / len(self.windows)
        return left

    def eta(self) -> str:
        rate, left = self.rate(), self.windows_left()
        if not left:
            return "0:00:00"
        if rate is None:
            return "?"
        return str(timedelta(seconds=round(left / rate)))

    def summary(self) -> str:
        rendered = sum(done for done, _ in self.windows.values())
        rate = self.rate()
        per_minute = f"{rate * 60:.1f} windows/min" if rate is not None else "? windows/min"
        return (f"jobs {self.done + self.failed}/{self.total} ({self.failed} failed), "
                f"windows {rendered}/{sum(of for _, of in self.windows.values())}, {per_minute}, ETA {self.eta()}")

    def _show(self, event: str, always_log: bool = False) -> None:
        if self.live:
            self.stream.write(f"\r\033[K{self.summary()} | {event}")
            self.stream.flush()
            if always_log:
                self.stream.write("\n")
        else:
            log.info("%s | %s", self.summary(), event)

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
