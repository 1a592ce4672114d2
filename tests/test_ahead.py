"""pipeline.ahead.run_ahead: the iterator advances on its own thread while the caller works, in order,
with its errors raised in the caller and its thread stopped when the caller stops."""

import threading

import pytest

from pipeline.ahead import run_ahead


def test_the_next_item_is_computed_while_the_caller_still_holds_the_previous_one():
    second_started = threading.Event()

    def items():
        yield 1
        second_started.set()
        yield 2

    got = []
    for item in run_ahead(items()):
        if item == 1:
            # Serially the generator would only resume after this body: waiting here would time out.
            assert second_started.wait(timeout=10)
        got.append(item)
    assert got == [1, 2]


def test_items_come_in_order_from_another_thread_at_most_depth_ahead():
    produced, threads = [], set()

    def items():
        for i in range(20):
            threads.add(threading.get_ident())
            produced.append(i)
            yield i

    got = []
    for item in run_ahead(items(), depth=2):
        # taken: item + 1; in the queue: at most 2; one more being handed over
        assert len(produced) <= item + 1 + 2 + 1
        got.append(item)
    assert got == list(range(20))
    assert threads and threading.get_ident() not in threads


def test_an_error_in_the_iterator_is_raised_in_the_caller_after_the_items_before_it():
    def items():
        yield 1
        raise ValueError("window 2 failed")

    got = []
    with pytest.raises(ValueError, match="window 2 failed"):
        for item in run_ahead(items()):
            got.append(item)
    assert got == [1]


def test_a_caller_that_stops_early_stops_the_thread_and_closes_the_iterator():
    closed, produced = threading.Event(), []

    def items():
        try:
            for i in range(1000):
                produced.append(i)
                yield i
        finally:
            closed.set()

    ahead = run_ahead(items())
    assert next(ahead) == 0
    ahead.close()
    assert closed.is_set()
    assert len(produced) < 1000 and not [t for t in threading.enumerate() if t.name == "ahead"]
