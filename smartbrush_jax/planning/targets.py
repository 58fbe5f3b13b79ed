"""TPU slices by the names Cloud TPU sells them (`v4-32`, `v5p-128`, `v5litepod-256` or
`v5e-256`, `v6e-256`, multi-slice `2xv5p-128`), the topology XLA compiles for, and each chip
kind's memory and speed, in one table.

`Target.devices()` gives the slice's devices from the `libtpu` wheel on any host (no TPU
needed): `jax.experimental.topologies.get_topology_desc`, what `aot.py` compiles for.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Dict, Tuple

from smartbrush_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class Chip:
    kind: str  # what our names say (v4, v5p, v5e, v6e)
    topology: str  # libtpu's topology prefix
    device_kind: str  # jax's device_kind of one chip
    hbm_gib: float  # per chip
    bf16_tflops: float  # dense peak per chip
    hbm_gbps: float  # HBM bandwidth, GB/s per chip
    cores_in_name: bool  # the slice name counts TensorCores (2 per chip: v4, v5p) or chips (v5e, v6e)
    dims: int  # 3D torus (v4, v5p) or 2D (v5e, v6e)
    chip_config: str  # "megacore": one device per chip (both TensorCores)
    ici_gbps: float = 0.0  # inter-chip links, GB/s a chip sends (all links, one direction)


# Spec sheets (cloud.google.com/tpu/docs/system-architecture-tpu-vm and per-version pages).
# ICI: the pages' "interchip interconnect BW" in Gbps / 8 (v5p: 4800 Gbps = 600 GB/s, which
# the newer page writes as 1200 GB/s bidirectional).
CHIPS: Dict[str, Chip] = {
    "v4": Chip("v4", "v4", "TPU v4", 32, 275, 1228, True, 3, "megacore", 300),
    "v5p": Chip("v5p", "v5p", "TPU v5", 95, 459, 2765, True, 3, "megacore", 600),
    "v5e": Chip("v5e", "v5e", "TPU v5 lite", 16, 197, 819, False, 2, "default", 200),
    "v6e": Chip("v6e", "v6e", "TPU v6 lite", 32, 918, 1640, False, 2, "default", 448),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}

# chips in a slice -> the torus shape Cloud TPU gives it (the documented default shapes)
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
             256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
CHIPS_PER_HOST = (2, 2, 1)  # 4 chips per host on every kind here (v5e/v6e training hosts: 2x2)


class TargetError(InputError):
    """A slice name we cannot compile for, or no libtpu."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    chip: Chip
    chips: int  # per slice
    slices: int

    @property
    def shape(self) -> Tuple[int, ...]:
        return (SHAPES_3D if self.chip.dims == 3 else SHAPES_2D)[self.chips]

    @property
    def topology_name(self) -> str:
        return f"{self.chip.topology}:{'x'.join(map(str, self.shape))}"

    @property
    def hosts(self) -> int:
        return self.slices * max(1, self.chips // 4)

    def devices(self):
        """The devices of the whole target (every slice), for AOT compilation."""
        import importlib.util

        from jax.experimental import topologies

        if importlib.util.find_spec("libtpu") is None:
            raise TargetError(f"cannot compile for {self.name}: the libtpu wheel is not installed (pip install "
                              "libtpu==0.0.42.1, the version jax[tpu]==0.10.2 pins; it is in requirements-dev.txt)")
        # no TPU is opened, so a second compiling process (a test, another search) may load
        # libtpu too instead of failing on its lockfile
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        bounds = tuple(min(c, s) for c, s in zip(CHIPS_PER_HOST, self.shape + (1,) * (3 - len(self.shape))))
        try:
            desc = topologies.get_topology_desc(platform="tpu", topology_name=self.topology_name,
                                                chip_config_name=self.chip.chip_config,
                                                chips_per_host_bounds=bounds, num_slices=self.slices)
        except Exception as e:  # a libtpu that does not load, a topology it does not know
            raise TargetError(f"cannot compile for {self.name} ({self.topology_name}): {type(e).__name__}: "
                              f"{str(e)[:300]}") from None
        return list(desc.devices)


def parse(name: str) -> Target:
    """`v4-32`, `v5p-128`, `v5litepod-256`, `v6e-256`, `2xv5p-128` -> Target; TargetError
    (exit 2) for anything else, listing what is known."""
    m = re.fullmatch(r"(?:(\d+)x)?([a-z0-9]+)-(\d+)", name.strip().lower())
    known = ", ".join(f"{k}-N" for k in CHIPS) + " (v5litepod-N for v5e), with NxKIND-N for N slices"
    if not m:
        raise TargetError(f"--topology {name}: not a slice name like v4-32, v5p-128, v6e-256 or 2xv5p-128 ({known})")
    slices, kind, count = int(m.group(1) or 1), ALIASES.get(m.group(2), m.group(2)), int(m.group(3))
    if kind not in CHIPS:
        raise TargetError(f"--topology {name}: unknown TPU kind {m.group(2)!r}; known: {known}")
    chip = CHIPS[kind]
    chips = count // 2 if chip.cores_in_name else count
    shapes = SHAPES_3D if chip.dims == 3 else SHAPES_2D
    if (chip.cores_in_name and count % 2) or chips not in shapes or slices < 1:
        sizes = ", ".join(f"{kind}-{c * 2 if chip.cores_in_name else c}" for c in shapes)
        raise TargetError(f"--topology {name}: {kind} slices come as {sizes}")
    return Target(name, chip, chips, slices)
