"""An iterator advanced on a thread of its own, so that its next item is computed while the caller works.

    for item in run_ahead(device_loop()):   # the device renders window k+1 ...
        write(item)                         # ... while this thread encodes and stores window k

The thread is at most `depth` items ahead of the caller. An exception in the thread is raised in the
caller, with its own traceback, at the point where its item would have come. When the caller stops early
(an exception, `close()`), the thread stops after the item it is computing and is joined.
"""

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")

_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def run_ahead(items: Iterator[T], depth: int = 1, name: str = "ahead") -> Iterator[T]:
    """The items of `items`, in order, each computed on a background thread while the caller handles the
    previous one. The iterator's thread-local state (torch's grad mode, the current CUDA device) is the
    new thread's, not the caller's."""
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        """Hand over `item`; False once the caller has stopped (it no longer takes items)."""
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def advance() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as error:  # raised again in the caller
            put(_Failed(error))
            return
        put(_END)

    thread = threading.Thread(target=advance, name=name, daemon=True)
    thread.start()
    try:
        while (item := handoff.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
        close = getattr(items, "close", None)
        if close is not None:  # a generator's own `finally` runs now, on the caller's thread
            close()
