"""Batches read ahead and placed on the devices while the current step computes, with the
data-iterator state a checkpoint must hold: that of the batches the steps consumed."""

from __future__ import annotations

import collections
import json


class DevicePrefetch:
    """Up to `size` batches read from `data_iter` and already sharded onto the devices
    (`put(local_batch)` starts the host-to-device copies, which run while the current step
    computes). A checkpoint must hold the iterator state of the batches the steps actually
    consumed, so each queued batch keeps the state from before it was read:
    `consumed_state()` is that of the oldest one, or, while a read is unfinished (or
    failed), the state from before that read. `size=0`: read on demand, no queue."""

    def __init__(self, data_iter, put, size: int):
        self._it, self._put, self._size = data_iter, put, int(size)
        self._queue = collections.deque()
        self._reading = None  # the iterator state before the read in progress (or the one that failed)

    def fill(self) -> None:
        while len(self._queue) < self._size:
            self._read()

    def next(self):
        if not self._queue:
            self._read()
        return self._queue.popleft()[1]

    def consumed_state(self):
        """Something `checkpoints.save` stores as the data iterator: the state before
        the first batch not yet handed out."""
        if self._queue:
            return IteratorState(self._queue[0][0])
        return IteratorState(self._reading if self._reading is not None else self._it.get_state())

    def _read(self) -> None:
        self._reading = self._it.get_state()
        batch = self._put(next(self._it))
        self._queue.append((self._reading, batch))
        self._reading = None


class IteratorState:
    """A frozen iterator state for Grain's checkpoint handler, which stores
    `get_state()` of an object that is not a `grain.DatasetIterator` as bytes (here the
    same JSON it writes for a `DatasetIterator`, so `CheckpointRestore` into the real
    iterator reads it back)."""

    def __init__(self, state):
        self._json = json.dumps(state, indent=4).encode()

    def get_state(self) -> bytes:
        return self._json
