"""The trainer's device prefetch: batches read ahead are not counted as consumed, so a
checkpoint taken mid-queue resumes at the first batch no step has seen (the end-to-end
version is test_train.py::test_resume_after_sigkill_is_exact); a read that fails (Grain's
workers killed) leaves the state of the batches consumed before it."""

import json

import grain
import numpy as np
import pytest

from smartbrush_jax.train.prefetch import DevicePrefetch


def _iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=3).to_iter_dataset().batch(2))


@pytest.mark.parametrize("size", [0, 1, 3])
def test_checkpointed_state_is_that_of_the_consumed_batches(size):
    put = lambda b: np.asarray(b) * 10  # noqa: E731 (stands in for the sharded device copy)
    batches = DevicePrefetch(_iterator(), put, size)
    seen = []
    for _ in range(4):
        seen.append(batches.next())
        batches.fill()
    assert len(batches._queue) == size
    saved = batches.consumed_state().get_state()  # what Grain's handler writes (bytes)

    resumed = _iterator()
    resumed.set_state(json.loads(saved.decode()))  # what CheckpointRestore does with the file
    straight = DevicePrefetch(_iterator(), put, size)
    expected = [straight.next() for _ in range(6)]
    np.testing.assert_array_equal(np.stack(seen), np.stack(expected[:4]))
    np.testing.assert_array_equal(put(next(resumed)), expected[4])
    np.testing.assert_array_equal(put(next(resumed)), expected[5])


class _FailingAt:
    """An iterator that raises like a Grain pipeline whose workers were killed, at read `n`."""

    def __init__(self, it, n):
        self.it, self.n, self.reads = it, n, 0

    def get_state(self):
        return self.it.get_state()

    def __next__(self):
        self.reads += 1
        if self.reads == self.n:
            raise RuntimeError("Worker process was terminated unexpectedly with exit code -15")
        return next(self.it)


@pytest.mark.parametrize("size", [0, 1, 3])
def test_a_failed_read_keeps_the_state_of_the_consumed_batches(size):
    put = lambda b: np.asarray(b)  # noqa: E731
    batches = DevicePrefetch(_FailingAt(_iterator(), 6), put, size)
    seen = []
    with pytest.raises(RuntimeError, match="terminated"):
        while True:
            seen.append(batches.next())
            batches.fill()
    resumed = _iterator()
    resumed.set_state(json.loads(batches.consumed_state().get_state().decode()))
    straight = _iterator()
    expected = [next(straight) for _ in range(len(seen) + 1)]
    np.testing.assert_array_equal(np.stack(seen), np.stack(expected[:-1]))
    np.testing.assert_array_equal(next(resumed), expected[-1])  # the first batch no step has seen
