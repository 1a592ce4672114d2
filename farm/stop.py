"""`python -m farm.stop [PID ...]`: stop talkfarm drivers as `ray job stop` does, with SIGTERM, and wait
for them to exit (each stores what its run needs to resume and ends its actors: farm.run._sigterm_stops_the_run).

Without PIDs it stops every talkfarm driver on this machine. It is the Ray head pod's preStop hook in
k8s/: a pod being deleted (a node drained, a RayJob deleted) gets its run stopped cleanly before the
kubelet's SIGTERM and SIGKILL reach Ray itself, which would take the driver down with no chance to record
its interrupted rows.
"""

import os
import signal
import sys
import time
from pathlib import Path

# How long a driver may take to stop once it has SIGTERM: ending the renderers (an idle one gets
# farm.scheduler.CLOSE_TIMEOUT_S, 10 s, to remove its scratch folder) and writing results.parquet, which on
# an object store that is briefly unreachable waits for it. The head's RAY_JOB_STOP_WAIT_TIME_S and
# terminationGracePeriodSeconds in k8s/ are at least this (tests/test_k8s.py checks them).
STOP_WAIT_S = 60


def drivers() -> list[int]:
    """The process ids of the talkfarm drivers running here: `talkfarm ...` or `python -m farm.cli ...`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # it ended, or is not ours to read
            continue
        names = [os.path.basename(arg.decode(errors="replace")) for arg in argv[:3]]
        if "talkfarm" in names or (len(argv) > 2 and argv[1:3] == [b"-m", b"farm.cli"]):
            found.append(int(entry.name))
    return found


def stop(pids: list[int], wait_s: float = STOP_WAIT_S) -> list[int]:
    """SIGTERM each of `pids`, then wait up to `wait_s` for them to exit; returns those still running."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    running = list(pids)
    while running and time.monotonic() < deadline:
        time.sleep(0.2)
        running = [pid for pid in running if process_start(pid) is not None]
    return running


def process_start(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (/proc/<pid>/stat); None if it is not running."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])  # a zombie has exited; its parent has not collected it


def main() -> None:
    pids = [int(arg) for arg in sys.argv[1:]] or drivers()
    left = stop(pids)
    print(f"talkfarm drivers stopped: {len(pids) - len(left)} of {len(pids)}"
          + (f"; still running after {STOP_WAIT_S} s: {', '.join(map(str, left))}" if left else ""))
    sys.exit(1 if left else 0)


if __name__ == "__main__":
    main()
