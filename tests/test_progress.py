"""The console: the progress line's rate and ETA on a clock the test sets (measured from the run's first window on,
over the manifest's windows from the start), and which log records it shows where."""

import io
import logging

import pytest

import farm.progress
from farm.actors import Activity
from farm.progress import Progress


@pytest.fixture
def clock(monkeypatch):
    now = {"t": 0.0}
    monkeypatch.setattr(farm.progress.time, "monotonic", lambda: now["t"])
    return now


def test_the_rate_starts_at_the_first_window_and_the_eta_counts_jobs_not_yet_encoded(clock):
    progress = Progress(io.StringIO())
    progress.start({"a": 3, "b": 2, "c": None})  # c: remote audio, its windows not known before its encode
    assert "windows 0/~8" in progress.summary()  # c at the mean of the others
    progress.planned("a", 4)  # the encoder's count replaces the manifest's
    progress.planned("b", 2)
    assert progress.rate() is None and progress.eta() == "?"

    clock["t"] = 100.0  # the first window: 100 s of loading and compiling, not part of the rate
    progress.window("a", 1, 4)
    assert progress.rate() is None
    clock["t"] = 110.0
    progress.window("b", 1, 2)
    clock["t"] = 120.0
    progress.window("a", 2, 4)
    assert progress.rate() == pytest.approx(2 / 20)  # 2 windows in the 20 s after the first
    # left: a 2, b 1, and job 3 not yet encoded at the mean of 4 and 2 windows
    assert progress.windows_left() == pytest.approx(2 + 1 + 3)
    assert progress.eta() == "0:01:00"
    assert "6.0 windows/min" in progress.summary() and "windows 3/~9" in progress.summary()
    progress.planned("c", 3)
    assert "windows 3/9," in progress.summary()


def test_a_failed_job_leaves_the_eta(clock):
    progress = Progress(io.StringIO())
    progress.start({"a": 5, "b": 3})
    progress.job_failed("b", "audio: no such file")
    assert progress.windows_left() == 5
    progress.window("a", 5, 5)
    progress.job_done("a")
    assert progress.windows_left() == 0 and progress.eta() == "0:00:00"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def record(name: str, level: int = logging.INFO, **extra) -> logging.LogRecord:
    made = logging.LogRecord(name, level, __file__, 1, "message", (), None)
    made.__dict__.update(extra)
    return made


@pytest.mark.parametrize("verbose", [False, True])
def test_the_console_shows_talkfarms_lines_and_warnings_and_the_rest_only_when_verbose(verbose):
    progress = Progress(io.StringIO(), verbose=verbose)
    assert progress.shown(record("talkfarm")) and progress.shown(record("farm.scheduler", logging.WARNING))
    assert progress.shown(record("actors")) == verbose  # the actors' output
    assert progress.shown(record("farm.scheduler")) == verbose
    assert progress.shown(record("talkfarm", progress=True))  # a plain log line where there is no terminal
    assert not Progress(Terminal(), verbose=verbose).shown(record("talkfarm", progress=True))  # the line shows it


def test_on_a_terminal_log_lines_print_above_the_progress_line_and_a_finished_job_stage_goes(clock):
    screen = Terminal()
    progress = Progress(screen)
    progress.start({"a": 2})
    progress.doing("renderer-0", Activity("a", 2, 2, "dit", 3, 4))
    assert screen.getvalue().endswith("| a window 2/2: sampling step 3/4")
    progress.handler().handle(record("talkfarm", logging.WARNING))
    # the line is erased, the record printed, the line drawn again below it
    shown = screen.getvalue().rsplit("\r\033[K", 2)
    assert shown[-2].endswith("talkfarm: message\n") and shown[-1].endswith("a window 2/2: sampling step 3/4")
    progress.finishing("a")
    assert screen.getvalue().endswith("| a: muxing and verifying the video")
    progress.doing("renderer-0", Activity("a", 2, 2, "decode", 1, 4))  # an answer sent before the job ended
    assert screen.getvalue().endswith("| a: muxing and verifying the video")
