"""Progress of a run: jobs done/total, windows rendered, ETA. One updating line on a terminal, plain
log lines otherwise (CI, `kubectl logs`, files)."""

import logging
import sys
import time

log = logging.getLogger("talkfarm")


class Progress:
    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.live = stream.isatty()
        self.total = self.done = self.failed = 0
        self.windows: dict[str, tuple[int, int]] = {}  # job -> (rendered, of)
        self.started = time.monotonic()
        self.rendered_since_start = 0

    def start(self, jobs: int) -> None:
        self.total, self.started = jobs, time.monotonic()
        self._show(f"{jobs} jobs to render")

    def window(self, job: str, window: int, windows: int) -> None:
        self.windows[job] = (window, windows)
        self.rendered_since_start += 1
        self._show(f"{job}: window {window}/{windows}")

    def job_done(self, job: str) -> None:
        self.done += 1
        self._show(f"{job}: done")

    def job_failed(self, job: str, reason: str) -> None:
        self.failed += 1
        self._show(f"{job}: FAILED: {reason}", always_log=True)

    def eta(self) -> str:
        """Remaining windows at the rate seen so far in this run (jobs not yet encoded are not counted)."""
        left = sum(of - done for done, of in self.windows.values())
        if not self.rendered_since_start or not left:
            return "?"
        seconds = left * (time.monotonic() - self.started) / self.rendered_since_start
        return time.strftime("%H:%M:%S", time.gmtime(seconds))

    def summary(self) -> str:
        rendered = sum(done for done, _ in self.windows.values())
        return (f"jobs {self.done + self.failed}/{self.total} ({self.failed} failed), "
                f"windows {rendered}/{sum(of for _, of in self.windows.values())}, ETA {self.eta()}")

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
