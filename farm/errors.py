"""Errors from the workers as the driver receives them: picklable, with the traceback as text, and
with the decision whether a retry can help made once, where the exception is still itself.

Ray pickles an actor's exception to send it to the driver. Some cannot be pickled (torch.compile's
errors hold weak references), and then the driver gets only the tail of a hint. A worker therefore
raises a WorkerError, which holds strings only.
"""

import contextlib
import traceback
from collections.abc import Iterator

import torch

from farm.storage import UNREACHABLE
from pipeline.job import JobError
from pipeline.media import MediaError
from pipeline.models.checkpoints import CheckpointError

INPUT_ERRORS = (JobError, MediaError, CheckpointError)  # their message is the row's reason as it is
# What a second attempt (a fresh renderer, another node, the object store again) can get past; any other
# exception is deterministic for the same inputs and settings, and is not retried.
RETRYABLE = (OSError, torch.OutOfMemoryError, torch.distributed.DistError, *UNREACHABLE)  # UNREACHABLE: timeouts too


class WorkerError(Exception):
    """An exception raised in a worker: its type's name, message, traceback text, and whether a retry
    can help."""

    def __init__(self, kind: str, message: str, traceback_text: str, retryable: bool, input_error: bool, startup: bool):
        super().__init__(kind, message, traceback_text, retryable, input_error, startup)
        self.kind, self.message, self.traceback_text = kind, message, traceback_text
        self.retryable, self.input_error = retryable, input_error
        self.startup = startup  # raised while the worker loaded its models: every job would fail the same way

    @classmethod
    def of(cls, error: BaseException, startup: bool = False) -> "WorkerError":
        text = "".join(traceback.format_exception(error))
        return cls(type(error).__name__, str(error), text, isinstance(error, RETRYABLE), isinstance(error, INPUT_ERRORS),
                   startup)

    @property
    def reason(self) -> str:
        """One line for the results table: an input error's own message, else the type and the first
        line of the message."""
        first = next((line.strip() for line in self.message.splitlines() if line.strip()), "")
        if self.input_error:
            return first or self.kind
        return f"{self.kind}: {first}" if first else self.kind

    def __str__(self) -> str:
        return self.reason


@contextlib.contextmanager
def as_worker_error() -> Iterator[None]:
    """Re-raise any exception of the block as a WorkerError (inside a generator too)."""
    try:
        yield
    except WorkerError:
        raise
    except Exception as error:  # noqa: BLE001 - every exception crosses to the driver the same way
        raise WorkerError.of(error) from None


class Loaded:
    """What a worker's __init__ loaded, or the error that stopped it. Raising in an actor's __init__
    would kill the actor and reach the driver as a bare 'actor died' with the text in its message; a
    worker keeps the error instead and raises it from every call, as a startup WorkerError."""

    def __init__(self, load):
        self.value, self.error = None, None
        try:
            self.value = load()
        except Exception as error:  # noqa: BLE001
            self.error = WorkerError.of(error, startup=True)

    def get(self):
        if self.error is not None:
            raise self.error
        return self.value
