"""farm.driver_lease: one driver per run root, on a local root and an in-memory object store (S3:
tests/test_object_store.py, through the CLI)."""

import logging
import os
import re
import socket
import subprocess
import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest

import farm.driver_lease
from farm.config import ConfigError
from farm.driver_lease import hold_run_root
from farm.stop import process_start
from farm.storage import RunStore


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path) -> RunStore:
    return RunStore(str(tmp_path / "run") if request.param == "local" else f"memory://lease-{uuid.uuid4().hex}/run")


def lease(**fields) -> dict:
    now = datetime.now(UTC).isoformat(timespec="seconds")
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": None, "started": now, "renewed": now,
            "token": "theirs", **fields}


def test_a_held_run_root_is_refused_naming_its_holder_and_freed_at_the_end(store):
    with hold_run_root(store, on_lost=lambda: None):
        held = store.read_driver_lease()
        assert held["host"] == socket.gethostname() and held["pid"] == os.getpid()
        with pytest.raises(ConfigError) as refused:
            with hold_run_root(store, on_lost=lambda: None):
                pass
        assert re.fullmatch(re.escape(
            f"storage.root: {store.url} is in use by the talkfarm driver on {held['host']} (pid {os.getpid()}, "
            f"started {held['started']}, renewed ") + r"\d+" + re.escape(
            f" s ago); one driver per run root: wait for it to end, or stop it (`python -m farm.stop {os.getpid()}` "
            f"on {held['host']})"), str(refused.value))
        assert store.read_driver_lease() == held  # the refused one changed nothing
    assert store.read_driver_lease() is None
    with hold_run_root(store, on_lost=lambda: None):  # free again
        pass


def test_a_lease_whose_driver_is_gone_is_taken_over(store, caplog):
    ended = subprocess.Popen(["true"])
    ended.wait()
    start = process_start(os.getpid())
    gone = [lease(pid=ended.pid, pid_start=start),  # a killed driver on this machine
            lease(pid=os.getpid(), pid_start=start - 1),  # its pid reused by another process
            lease(host="elsewhere", renewed=(datetime.now(UTC) - timedelta(seconds=61)).isoformat())]  # not renewed
    for stale in gone:
        store.write_driver_lease(stale)
        with caplog.at_level(logging.WARNING, logger="talkfarm"), hold_run_root(store, on_lost=lambda: None):
            assert store.read_driver_lease()["token"] != "theirs"
        assert f"taking over the run root from the talkfarm driver on {stale['host']} (pid {stale['pid']}" in caplog.text
    store.write_driver_lease(lease(host="elsewhere"))  # renewed just now, on another machine: live
    with pytest.raises(ConfigError, match="is in use by the talkfarm driver on elsewhere"):
        with hold_run_root(store, on_lost=lambda: None):
            pass


def test_of_two_drivers_starting_at_once_one_holds_the_root(store):
    outcomes, barrier = [], threading.Barrier(2)

    def start() -> None:
        barrier.wait()
        try:
            with hold_run_root(store, on_lost=lambda: None):
                outcomes.append("held")
                barrier.wait()  # until the other has given up
        except ConfigError:
            outcomes.append("refused")
            barrier.wait()

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes) == ["held", "refused"]


def test_a_driver_whose_lease_was_taken_over_is_told(store, monkeypatch, caplog):
    monkeypatch.setattr(farm.driver_lease, "RENEW_EVERY_S", 0.05)
    lost = threading.Event()
    with caplog.at_level(logging.ERROR, logger="talkfarm"), hold_run_root(store, on_lost=lost.set):
        store.write_driver_lease(lease(host="elsewhere"))
        assert lost.wait(timeout=10)
    assert "this driver's lease was taken over by the talkfarm driver on elsewhere" in caplog.text
    assert store.read_driver_lease()["host"] == "elsewhere"  # not removed: it is the other driver's
