"""The progress line's rate and ETA, on a clock the test sets: measured from the run's first window on,
over the encoded jobs' windows plus an estimate for the jobs not yet encoded."""

import io

import pytest

import farm.progress
from farm.progress import Progress


@pytest.fixture
def clock(monkeypatch):
    now = {"t": 0.0}
    monkeypatch.setattr(farm.progress.time, "monotonic", lambda: now["t"])
    return now


def test_the_rate_starts_at_the_first_window_and_the_eta_counts_jobs_not_yet_encoded(clock):
    progress = Progress(io.StringIO())
    progress.start(3)
    progress.planned("a", 4)
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
    assert "6.0 windows/min" in progress.summary() and "windows 3/6" in progress.summary()


def test_a_failed_job_leaves_the_eta(clock):
    progress = Progress(io.StringIO())
    progress.start(2)
    progress.planned("a", 5)
    progress.planned("b", 3)
    progress.job_failed("b", "audio: no such file")
    assert progress.windows_left() == 5
    progress.window("a", 5, 5)
    progress.job_done("a")
    assert progress.windows_left() == 0 and progress.eta() == "0:00:00"
