"""When a training run must stop: SIGTERM, as clusters deliver preemption and time limits.

Schedulers (SLURM, Cloud TPU maintenance, Kubernetes) send SIGTERM to every process of a
job, then SIGKILL after a grace period. The trainer stops at the next step boundary,
saves a checkpoint and exits 0.

- Several processes (`jax.distributed.initialize()` ran, so there is a coordination
  service): JAX's preemption notifier owns SIGTERM from `initialize()` on (a C++ handler;
  a Python handler installed afterwards would replace it). `reached_preemption_sync_point
  (step)` turns a notice on any process into the same stop step on all of them, through
  the coordination service: no device collective runs per step for it, and a SIGTERM at
  any moment after `initialize()` (loading models, restoring, compiling) is honoured at
  the first step. A SIGTERM caught by our handler *before* `initialize()` is re-delivered
  to JAX's notifier once it is in place.
- One process, no coordination service: our own handler sets a flag; it is installed
  before any slow start-up work and restored when the run returns.

Grain worker processes ignore SIGTERM (`ignore_sigterm`, their `worker_init_fn`): a
group-wide SIGTERM would otherwise kill them, and the main process's next read would fail
before it could save.
"""

from __future__ import annotations

import os
import signal


class StopRequest:
    """`install()` first thing, `attach_to_jax()` after `jax.distributed.initialize()`,
    `should_stop(step)` once per step, `uninstall()` at the end."""

    def __init__(self):
        self.signalled = False  # SIGTERM seen by our own handler
        self._previous = None
        self.coordinated = False  # JAX's preemption service decides (set by attach_to_jax)

    def install(self) -> "StopRequest":
        import threading

        if threading.current_thread() is threading.main_thread():  # Python allows handlers there only
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        self.signalled = True

    def attach_to_jax(self) -> bool:
        """Call once, after `jax.distributed.initialize()` would have run. True when JAX's
        preemption service is running: from now on it decides (our handler is no longer
        called)."""
        from jax._src import distributed

        self.coordinated = distributed.global_state.preemption_sync_manager is not None
        if self.coordinated and self.signalled:  # SIGTERM came before initialize()
            os.kill(os.getpid(), signal.SIGTERM)  # now JAX's notifier sees it
        return self.coordinated

    def should_stop(self, step: int) -> bool:
        """Call at every step on every process, with the same step numbers everywhere."""
        if self.coordinated:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.signalled

    def uninstall(self) -> None:
        """Puts back the SIGTERM handler from before `install()` (one process only: with a
        coordination service JAX's notifier keeps the signal for the process's lifetime)."""
        if self._previous is not None and not self.coordinated:
            signal.signal(signal.SIGTERM, self._previous)
        self._previous = None


def ignore_sigterm(worker_index: int = 0, worker_count: int = 0) -> None:
    """`worker_init_fn` of Grain's worker processes: the main process owns shutdown; the
    workers end when it closes the pipeline, and on their own when it is gone (SIGKILL,
    OOM: nothing else would end a worker that ignores SIGTERM)."""
    import threading

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True, name="exit-with-parent").start()


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    import time

    while os.getppid() == parent:  # re-parented (to init or a subreaper) once the parent died
        time.sleep(every)
    os._exit(0)
