"""NVIDIA GPUs as ahead-of-time compile targets on a host without one (`--target=h100`,
`--target=h200`): a deviceless CUDA topology of the jax CUDA plugin, described by a
`stream_executor.GpuTargetConfigProto` that we write from each card's spec sheet.

    devices = gpus.parse("h100").devices()    # 8 GPUs of one node, for a Mesh

Needs the jax CUDA plugin wheels (`make .venv-gpu-aot`: jax-cuda12-plugin and -pjrt, and
nvidia-cudnn-cu12 for cuDNN convolutions and attention), which are not in the main venv:
on a machine without CUDA the plugin prints a traceback whenever JAX starts unless
JAX_PLATFORMS excludes it. No GPU, no driver: XLA compiles with its default kernel
choices (no autotuning), so argument and output bytes are exact and temporaries close
to, not exactly, what a real GPU run allocates. XLA:GPU gives no cost analysis here, so
no step time is claimed: the report gives our FLOP count at the peak, labelled as a bound.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Dict

from smartbrush_jax.planning.targets import Chip, TargetError

# Without a device XLA:GPU cannot autotune, and its default tiling of some Triton GEMM fusions
# fails on the SD step ("Couldn't find output tile sizes that satisfy hlo" in the text
# encoder's out_proj); cuBLAS GEMMs compile. The flag is added for the compile only.
XLA_FLAG = "--xla_gpu_enable_triton_gemm=false"

# JAX's GPU allocator takes this share of a GPU's memory unless XLA_PYTHON_CLIENT_MEM_FRACTION
# says otherwise: what a step must fit in.
DEFAULT_MEM_FRACTION = 0.75


def mem_fraction() -> float:
    try:
        return float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_MEM_FRACTION))
    except ValueError:
        return DEFAULT_MEM_FRACTION


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str  # what --target says
    device_kind: str  # what jax reports
    memory_bytes: int  # usable device memory
    hbm_gbps: float  # GB/s
    bf16_tflops: float  # dense peak
    sms: int
    l2_bytes: int
    clock_ghz: float
    nvlinks: int

    @property
    def hbm_gib(self) -> float:
        return self.memory_bytes / 2**30

    @property
    def nvlink_gbps(self) -> float:
        """GB/s a GPU sends over NVLink 4 (25 GB/s per link and direction)."""
        return 25.0 * self.nvlinks


# NVIDIA's data sheets (H100 SXM5 80 GB, H200 SXM 141 GB); memory as CUDA reports it.
GPUS: Dict[str, Gpu] = {
    "h100": Gpu("h100", "NVIDIA H100 80GB HBM3", 84_942_979_072, 3352, 989, 132, 50 * 2**20, 1.98, 18),
    "h200": Gpu("h200", "NVIDIA H200 141GB HBM3e", 151_397_597_184, 4800, 989, 132, 50 * 2**20, 1.98, 18),
}
ALIASES = {"h100_sxm": "h100", "h100-sxm": "h100", "h200_sxm": "h200"}
GPUS_PER_NODE = 8


def target_config(gpu: Gpu) -> str:
    """The GpuTargetConfigProto (text format) XLA:GPU compiles for: Hopper (sm_90a) limits,
    which the H100 and H200 share, and the card's own memory, bandwidth and size."""
    info = {
        "threads_per_block_limit": 1024, "threads_per_warp": 32, "shared_memory_per_block": 48 * 1024,
        "shared_memory_per_core": 228 * 1024, "threads_per_core_limit": 2048, "core_count": gpu.sms,
        "fpus_per_core": 128, "block_dim_limit_x": 2**31 - 1, "block_dim_limit_y": 65535, "block_dim_limit_z": 65535,
        "memory_bandwidth": int(gpu.hbm_gbps * 1e9), "l2_cache_size": gpu.l2_bytes, "clock_rate_ghz": gpu.clock_ghz,
        "device_memory_size": gpu.memory_bytes, "shared_memory_per_block_optin": 227 * 1024,
        "registers_per_core_limit": 65536, "registers_per_block_limit": 65536,
    }
    lines = ["gpu_device_info {"] + [f"  {k}: {v}" for k, v in info.items()]
    lines += ["  cuda_compute_capability { major: 9 minor: 0 feature_extension: ACCELERATED_FEATURES }",
              f'  name: "{gpu.device_kind}"', '  device_vendor: "NVIDIA Corporation"',
              f"  device_interconnect_info {{ active_links: {gpu.nvlinks} }}", "}",
              'platform_name: "CUDA"', "dnn_version_info { major: 9 minor: 8 patch: 0 }",
              f'device_description_str: "{gpu.device_kind}"']
    return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    name: str
    gpu: Gpu
    count: int  # GPUs (one node of 8)

    slices: int = 1

    @property
    def hosts(self) -> int:
        return max(1, self.count // GPUS_PER_NODE)

    @property
    def chips(self) -> int:
        return self.count

    @property
    def topology_name(self) -> str:
        return f"cuda 1x{self.hosts}x{self.count // self.hosts}"

    @property
    def chip(self) -> Chip:
        """The GPU in the TPU table's terms: its memory is what JAX's allocator gives a step
        (`mem_fraction()` of the card's)."""
        g = self.gpu
        return Chip(g.name, "cuda", g.device_kind, g.hbm_gib * mem_fraction(), g.bf16_tflops, g.hbm_gbps,
                    False, 1, f"mem_fraction {mem_fraction():g} of {g.hbm_gib:.1f} GiB", g.nvlink_gbps)

    def devices(self):
        """The node's GPUs as devices of a deviceless CUDA topology; TargetError (exit 2)
        with the one-line reason when the plugin cannot give them here."""
        if not _have_plugin():
            raise TargetError(f"cannot compile for {self.name}: the jax CUDA plugin is not installed in this "
                              "environment (make .venv-gpu-aot, then run the same command with "
                              ".venv-gpu-aot/bin/python)")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the plugin then skips its CUDA-library check
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_gpu_enable_triton_gemm" not in flags:  # read when the GPU compiler starts, below
            os.environ["XLA_FLAGS"] = f"{flags} {XLA_FLAG}".strip()
        from jax.experimental import topologies

        nodes = self.hosts
        try:
            desc = topologies.get_topology_desc(platform="cuda", target_config=target_config(self.gpu),
                                                topology=f"1x{nodes}x{self.count // nodes}")
        except Exception as e:  # a plugin that does not load, a proto it does not parse
            raise TargetError(f"cannot compile for {self.name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") \
                from None
        return list(desc.devices)


def _have_plugin() -> bool:
    for name in ("jax_plugins.xla_cuda12", "jax_cuda12_plugin"):
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except ImportError:  # no jax_plugins package at all
            pass
    return False


def parse(name: str) -> GpuTarget:
    """`h100`, `h200` (one 8-GPU node), or `h100x16` (two nodes)."""
    base, _, count = name.strip().lower().partition("x")
    if name.lower().startswith(("h100_", "h100-", "h200_")):
        base, count = name.lower(), ""
    base = ALIASES.get(base, base)
    if base not in GPUS or (count and not count.isdigit()):
        raise TargetError(f"--target {name}: one of {', '.join(GPUS)} (8 GPUs of a node; NAMExN for N GPUs)")
    n = int(count or GPUS_PER_NODE)
    if n > GPUS_PER_NODE and n % GPUS_PER_NODE:
        raise TargetError(f"--target {name}: more than one node is whole nodes of {GPUS_PER_NODE} GPUs")
    return GpuTarget(name, GPUS[base], n)
