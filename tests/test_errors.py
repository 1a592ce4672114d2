"""Errors from workers: picklable whatever they wrap, with the traceback's text, and classified once
as worth a retry or not."""

import json
import pickle
import weakref

import pytest
import torch

from farm.errors import Loaded, WorkerError, as_worker_error
from pipeline.job import JobError


class Unpicklable(RuntimeError):
    """Like torch.compile's errors: it holds a weak reference, which pickle refuses."""

    def __init__(self, message):
        super().__init__(message)
        self.ref = weakref.ref(torch.nn.Linear(1, 1))


def raised(error: BaseException) -> WorkerError:
    with pytest.raises(WorkerError) as caught, as_worker_error():
        raise error
    return caught.value


def test_an_unpicklable_error_crosses_as_type_message_and_traceback():
    with pytest.raises(TypeError):
        pickle.dumps(Unpicklable("x"))
    error = pickle.loads(pickle.dumps(raised(Unpicklable("shape '[96, 32]' is invalid\n\nset TORCH_LOGS for more"))))
    assert error.kind == "Unpicklable" and error.message.startswith("shape '[96, 32]'")
    assert "Traceback (most recent call last)" in error.traceback_text and "test_errors.py" in error.traceback_text
    assert error.reason == "Unpicklable: shape '[96, 32]' is invalid"  # the first line, not the hint's tail
    assert not error.retryable and not error.startup


@pytest.mark.parametrize("error, retryable", [
    (OSError("connection reset"), True),
    (TimeoutError("slow store"), True),
    (torch.OutOfMemoryError("CUDA out of memory"), True),
    (RuntimeError("Expected all tensors to be on the same device"), False),
    (json.JSONDecodeError("Expecting value", "x", 0), False),
    (JobError("job 'a': bad box"), False),
])
def test_only_what_a_retry_can_fix_is_retryable(error, retryable):
    assert raised(error).retryable is retryable


def test_an_input_error_keeps_its_own_message():
    assert raised(JobError("job 'a': seed -1 must be in [0, 2**63)")).reason == "job 'a': seed -1 must be in [0, 2**63)"


def test_a_load_that_failed_raises_at_every_call_as_a_startup_error():
    def load():
        raise FileNotFoundError("/weights/Wan2.1_VAE.pth: no such checkpoint file")

    loaded = Loaded(load)
    for _ in range(2):
        with pytest.raises(WorkerError) as caught:
            loaded.get()
        assert caught.value.startup and "Wan2.1_VAE.pth" in caught.value.reason
    assert Loaded(lambda: 7).get() == 7
