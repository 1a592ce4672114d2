"""What the console shows of a run: jobs done/failed/total, windows rendered of the manifest's total,
windows per minute and an ETA from that measured rate, and what each renderer's device is doing (window,
stage, sampling step). One updating line on a terminal, with log lines printed above it; plain log lines
otherwise (CI, `kubectl logs`, files). The console shows talkfarm's own messages and every warning; the
rest (the actors' output, the scheduler's routine) goes to the run's log (farm.runlog) unless `verbose`.
"""

import logging
import sys
import time
from datetime import timedelta
from typing import TYPE_CHECKING

from farm.runlog import FORMAT

if TYPE_CHECKING:
    from farm.actors import Activity

log = logging.getLogger("talkfarm")

# How a window's stage reads on the progress line (pipeline.timing's names, as pipeline.render times them).
STAGES = {"conditioning": "encoding the reference", "decode": "decoding", "color": "matching colours",
          "to_host": "copying frames", "motion": "encoding motion"}


class Progress:
    def __init__(self, stream=sys.stderr, verbose: bool = False):
        self.stream, self.verbose = stream, verbose
        self.live = stream.isatty()
        self.total = self.done = self.failed = 0
        self.windows: dict[str, tuple[int, int | None]] = {}  # job -> (rendered, of); of: None until known
        self.exact: set[str] = set()  # jobs whose window count is the encoder's, not the manifest's estimate
        self.first_window_at: float | None = None  # when this run's first window ended
        self.windows_since_first = 0  # windows ended after it
        self.activities: dict[str, "Activity"] = {}  # renderer -> what its device does now
        self.off_device: set[str] = set()  # jobs finishing or ended (a retry renders them again)
        self.event = ""  # the latest event, shown while no renderer reports an activity

    def start(self, expected: dict[str, int | None]) -> None:
        """The run's jobs, each with its windows as the manifest's durations give them (None: not known
        before its encode, e.g. a remote file): the total counts them from the start."""
        self.total = len(expected)
        self.windows = {job: (0, windows) for job, windows in expected.items()}
        self._show(f"{self.total} jobs to render")

    def planned(self, job: str, windows: int) -> None:
        """The job is encoded: its exact window count replaces the estimate."""
        self.windows[job] = (self.windows.get(job, (0, None))[0], windows)
        self.exact.add(job)

    def window(self, job: str, window: int, windows: int) -> None:
        self.windows[job] = (window, windows)
        self.off_device.discard(job)  # rendering again (a retry)
        if self.first_window_at is None:
            self.first_window_at = time.monotonic()
        else:
            self.windows_since_first += 1
        self._show(f"{job}: window {window}/{windows}")

    def doing(self, renderer: str, activity: "Activity | None") -> None:
        """What `renderer`'s device does now (None: nothing to show); redraws the line."""
        if activity is None or activity.job in self.off_device:
            self.activities.pop(renderer, None)
        else:
            self.activities[renderer] = activity
        if self.live:
            self._draw()

    def finishing(self, job: str) -> None:
        self._off_device(job)
        self._show(f"{job}: muxing and verifying the video", quiet=True)

    def job_done(self, job: str) -> None:
        self.done += 1
        self._off_device(job)
        self._show(f"{job}: done")

    def job_failed(self, job: str, reason: str) -> None:
        self.failed += 1
        self.windows.pop(job, None)  # its windows will not be rendered
        self._off_device(job)
        self._show(f"{job}: FAILED: {reason}", keep=True)

    def _off_device(self, job: str) -> None:
        """The job's device work is over: a renderer's last answer about it is no longer shown."""
        self.off_device.add(job)
        self.activities = {name: a for name, a in self.activities.items() if a.job != job}

    def rate(self) -> float | None:
        """Windows per second over all renderers, measured from the end of the run's first window (which
        carries the models' loading and compile warm-up) to now; None before a second window."""
        if not self.windows_since_first:
            return None
        return self.windows_since_first / max(time.monotonic() - self.first_window_at, 1e-9)

    def windows_total(self) -> float:
        """The windows of the jobs not failed; a job whose count is not known yet at the known ones' mean."""
        known = [of for _, of in self.windows.values() if of is not None]
        mean = sum(known) / len(known) if known else 0
        return sum(mean if of is None else of for _, of in self.windows.values())

    def windows_left(self) -> float:
        return self.windows_total() - sum(done for done, _ in self.windows.values())

    def eta(self) -> str:
        rate, left = self.rate(), self.windows_left()
        if not left:
            return "0:00:00"
        if rate is None:
            return "?"
        return str(timedelta(seconds=round(left / rate)))

    def summary(self) -> str:
        rendered = sum(done for done, _ in self.windows.values())
        known = any(of is not None for _, of in self.windows.values())
        total = round(self.windows_total()) if known or not self.windows else "?"
        estimated = "~" if known and any(job not in self.exact for job in self.windows) else ""
        rate = self.rate()
        per_minute = f"{rate * 60:.1f} windows/min" if rate is not None else "? windows/min"
        return (f"jobs {self.done + self.failed}/{self.total} ({self.failed} failed), "
                f"windows {rendered}/{estimated}{total}, {per_minute}, ETA {self.eta()}")

    def handler(self) -> logging.Handler:
        """The console's log handler: records printed above the progress line on a terminal."""
        return _ConsoleHandler(self)

    def shown(self, record: logging.LogRecord) -> bool:
        """Whether the console shows `record`: talkfarm's own and every warning, all of it when verbose;
        on a terminal, not the progress records, which the updating line shows."""
        if getattr(record, "progress", False) and self.live:
            return False
        return self.verbose or record.levelno >= logging.WARNING or record.name == log.name

    def _show(self, event: str, keep: bool = False, quiet: bool = False) -> None:
        """A new event: logged with the summary (`quiet`: not, as it says nothing a log reader needs), and
        on a terminal the line redrawn (`keep`: the event also left on screen as a line of its own)."""
        self.event = event
        if not quiet:
            log.info("%s | %s", self.summary(), event, extra={"progress": True})
        if self.live:
            self._draw()
            if keep:
                self.stream.write("\n")

    def _draw(self) -> None:
        doing = "; ".join(map(_described, self.activities.values())) or self.event
        self.stream.write(f"\r\033[K{self.summary()} | {doing}")
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.live = False  # later log lines print plainly


def _described(activity: "Activity") -> str:
    stage = (f"sampling step {activity.count}/{activity.steps}" if activity.stage == "dit"
             else STAGES.get(activity.stage, activity.stage))
    return f"{activity.job} window {activity.window}/{activity.windows}: {stage}"


class _ConsoleHandler(logging.Handler):
    def __init__(self, progress: Progress):
        super().__init__()
        self.progress = progress
        self.setFormatter(logging.Formatter(FORMAT))
        self.addFilter(progress.shown)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - logging's own rule: a bad record never stops the run
            self.handleError(record)
            return
        stream, live = self.progress.stream, self.progress.live
        stream.write(f"\r\033[K{text}\n" if live else f"{text}\n")
        if live:
            self.progress._draw()
        stream.flush()
