"""How a process joins the others of a multi-host job (training, the latent cache)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax


@dataclasses.dataclass(frozen=True)
class Distributed:
    """How this process joins the others (`jax.distributed.initialize`): `auto` lets JAX find
    the cluster (Cloud TPU, SLURM, ...); the three fields name it by hand (CPU devices then
    use gloo collectives, as `launch/local_multiprocess.sh` runs them)."""

    auto: bool = False
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None

    def initialize(self) -> None:
        if self.num_processes and self.num_processes > 1:
            # cross-process collectives for CPU devices (ignored by GPU/TPU backends); set
            # before initialize(), which must come before any backend use
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(self.coordinator_address, self.num_processes, self.process_id)
        elif self.auto:
            jax.distributed.initialize()


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
