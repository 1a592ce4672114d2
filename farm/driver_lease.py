"""One driver per run root: a lease in the run root (driver.json) that the driver takes before it writes
anything there and renews while it runs. Two drivers on one run root would render the same rows twice
and race on results.parquet, so a second `talkfarm` on a root that a live driver holds refuses, naming
the holder (host, pid, start time).

A lease is the holder's: host, process id (and the process's start time, so a reused pid is not
mistaken for it), when it started, when it last renewed, and a token. It is live while
- the holder is on this machine: its process runs (a killed driver's lease is taken over at once);
- the holder is elsewhere: it renewed within LEASE_S (a driver renews every RENEW_EVERY_S, so a lease
  left by a lost machine is taken over after LEASE_S).

Taking a lease is a write then, SETTLE_S later, a read: two drivers that start at once both write, the
later write wins, and the other reads a token not its own and refuses. The same code works on a local
disk and on an object store (no conditional writes needed); SETTLE_S is longer on an object store, where a
write takes longer to land. A driver that finds its lease taken by another (its renewals failed for LEASE_S:
the store out of reach, the process suspended) logs it and calls `on_lost`: farm.run stops the run.
"""

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from farm.config import ConfigError
from farm.stop import process_start
from farm.storage import RunStore

log = logging.getLogger("talkfarm")

LEASE_S = 60  # a lease of another machine not renewed for this long is stale
RENEW_EVERY_S = 10
SETTLE_S = {True: 0.2, False: 2.0}  # by store.is_local: from writing a lease to reading it back


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _age_s(lease: dict) -> float:
    return (datetime.now(UTC) - datetime.fromisoformat(lease["renewed"])).total_seconds()


def is_live(lease: dict) -> bool:
    if lease["host"] == socket.gethostname() and lease.get("pid_start") is not None:
        return process_start(lease["pid"]) == lease["pid_start"]
    return _age_s(lease) < LEASE_S


def holder(lease: dict) -> str:
    return (f"the talkfarm driver on {lease['host']} (pid {lease['pid']}, started {lease['started']}, "
            f"renewed {_age_s(lease):.0f} s ago)")


def _refusal(store: RunStore, lease: dict) -> ConfigError:
    return ConfigError(f"storage.root: {store.url} is in use by {holder(lease)}; one driver per run root: wait "
                       f"for it to end, or stop it (`python -m farm.stop {lease['pid']}` on {lease['host']})")


@contextlib.contextmanager
def hold_run_root(store: RunStore, on_lost: Callable[[], None]) -> Iterator[None]:
    """Hold `store`'s run root for the duration, renewing the lease on a thread; raises ConfigError if a
    live driver holds it. The lease is removed at the end if it is still this driver's."""
    held = store.read_driver_lease()
    if held is not None and is_live(held):
        raise _refusal(store, held)
    if held is not None:
        log.warning("%s: taking over the run root from %s, which is gone", store.url, holder(held))
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start(os.getpid()),
            "started": _now(), "renewed": _now(), "token": uuid.uuid4().hex}
    store.write_driver_lease(mine)
    time.sleep(SETTLE_S[store.is_local])
    now = store.read_driver_lease()
    if now is None or now["token"] != mine["token"]:
        raise _refusal(store, now) if now else ConfigError(f"storage.root: {store.url}: the driver lease just "
                                                           "written is gone; another driver may be starting")
    done = threading.Event()

    def renew() -> None:
        while not done.wait(RENEW_EVERY_S):
            try:
                current = store.read_driver_lease()
                if current is None or current["token"] != mine["token"]:
                    log.error("%s: this driver's lease was taken over%s; stopping the run", store.url,
                              f" by {holder(current)}" if current else "")
                    on_lost()
                    return
                store.write_driver_lease({**mine, "renewed": _now()})
            except Exception as e:  # noqa: BLE001 - the store out of reach past its retries: try again next time
                log.warning("%s: could not renew the driver lease (%s: %s)", store.url, type(e).__name__, e)

    renewer = threading.Thread(target=renew, name="driver-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        done.set()
        renewer.join()
        current = store.read_driver_lease()
        if current is not None and current["token"] == mine["token"]:
            store.remove_driver_lease()
