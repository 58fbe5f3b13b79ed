"""The trainer's device prefetch: batches read ahead are not counted as consumed, so a
checkpoint taken mid-queue resumes at the first batch no step has seen (the end-to-end
version is test_train.py::test_resume_after_sigkill_is_exact)."""

import json

import grain
import numpy as np
import pytest

from smartbrush_jax.train import DevicePrefetch


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
