"""The run's log: logs/<stamp>.log in the run root, beside configs/<stamp>.yaml (the same run's config).
It keeps every record of the driver's loggers at INFO and above and every line the actors print (Ray
forwards their output to the driver), so the console (farm.progress) can stay quiet and nothing is lost.
On a local run root the file grows as the run goes (`tail -f` works); on an object store it is written
on this machine and put into the run root as the run ends.
"""

import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from farm.storage import RunStore

FORMAT = "%(asctime)s %(name)s: %(message)s"
DRIVER_LOGGERS = ("talkfarm", "farm", "pipeline")  # logged at INFO and above
ACTORS = logging.getLogger("actors")  # the actors' output, a record per line: their warnings reach the console
LEVEL = re.compile(r"\S+ \S+ (WARNING|ERROR|CRITICAL) ")


@contextmanager
def run_log(store: RunStore, stamp: str, console: logging.Handler) -> Iterator[str]:
    """For the block: the run's log file and `console` on the root logger, the driver's loggers at INFO;
    yields where the log is. Afterwards the loggers are as they were, and on an object store the file is
    put into the run root."""
    local = store.local_log(stamp)
    path = local or Path(tempfile.mkstemp(prefix="talkfarm-", suffix=".log")[1])
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in (*DRIVER_LOGGERS, ACTORS.name)}
    for name in levels:
        logging.getLogger(name).setLevel(logging.INFO)
    root.addHandler(to_file)
    root.addHandler(console)
    try:
        yield store.log_path(stamp)
    finally:
        root.removeHandler(console)
        root.removeHandler(to_file)
        to_file.close()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if local is None:
            try:
                store.put_log(path, stamp)
            finally:
                os.unlink(path)


def take_actor_output() -> None:
    """Route what the actors print (their logs, warnings, tracebacks, progress bars) into the ACTORS logger
    instead of Ray's printing it on the console; for a Ray this process started (ray.init(log_to_driver=True)),
    until it shuts down. Ray has no public hook for this: its dispatcher of worker output is the one place."""
    from ray._private import worker

    def forward(data: dict) -> None:
        lines = data.get("lines", [])
        if data.get("pid") == "autoscaler":  # its status every 5 s; only its events, as Ray prints them
            lines = worker.filter_autoscaler_events(lines)
        who = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({who} pid={data.get('pid')})".replace("( ", "(")
        for line in lines:
            level = LEVEL.match(line)  # a log record's (farm.actors.ACTOR_LOG_FORMAT); other output is INFO
            ACTORS.log(logging.getLevelName(level.group(1)) if level else logging.INFO, "%s %s", prefix, line)

    dispatcher = worker.global_worker_stdstream_dispatcher
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("talkfarm")  # an earlier run's, in this process
    dispatcher.add_handler("talkfarm", forward)
