"""libtpu/XLA flag sets a run or a compile may set (`config.train.libtpu_flags`), in one home:
"" (none: XLA's defaults), "mlperf_v4.1" (what MaxDiffusion's MLPerf Training v4.1 SD2 run sets,
less what this libtpu refuses), or the flags themselves ("--xla_tpu_...=true ...").

They reach libtpu through LIBTPU_INIT_ARGS, which it reads once when it loads: `apply` is
called by `smartbrush-train` and `smartbrush-aot` before JAX opens a TPU or a topology.
"""

from __future__ import annotations

import os

# LIBTPU_INIT_ARGS of MaxDiffusion's MLPerf v4.1 run.sh (mlcommons/training_results_v4.1,
# Google/benchmarks/stable_diffusion/implementations/maxdiffusion/run.sh), in order; one flag
# is there twice
MAXDIFFUSION_MLPERF_V41 = (
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true --xla_tpu_megacore_fusion_allow_ags=false "
    "--xla_enable_async_collective_permute=true --xla_tpu_enable_ag_backward_pipelining=true "
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true --xla_tpu_data_parallel_opt_different_sized_ops=true "
    "--xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_multiple_steps=true "
    "--xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true "
    "--xla_tpu_spmd_threshold_for_allgather_cse=1000000 --xla_jf_spmd_threshold_for_windowed_einsum_mib=1000000 "
    "--xla_sc_disable_megacore_partitioning=true --xla_tpu_use_tc_device_shape_on_sc=true "
    "--tpu_use_continuations=true --xla_sc_enable_instruction_fusion=false --xla_sc_disjoint_spmem=false "
    "--2a886c8_chip_config_name=megachip_tccontrol --xla_jf_crs_combiner_threshold_count=10 "
    "--xla_tpu_enable_sparse_core_collective_offload_all_reduce=true "
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true").split()
# an internal flag of their image's libtpu: libtpu 0.0.42.1 stops at it ("Unknown command line flag")
REFUSED = ("--2a886c8_chip_config_name=megachip_tccontrol",)
PRESETS = {"": "", "mlperf_v4.1": " ".join(dict.fromkeys(f for f in MAXDIFFUSION_MLPERF_V41 if f not in REFUSED))}


def resolve(setting: str) -> str:
    """The flags a setting stands for; ValueError naming the presets for anything else."""
    setting = (setting or "").strip()
    if setting in PRESETS:
        return PRESETS[setting]
    if all(f.startswith("--") for f in setting.split()):
        return setting
    raise ValueError(f"{setting!r} is neither a preset ({', '.join(repr(k) for k in PRESETS)}) nor flags "
                     "(--name=value ...)")


def apply(setting: str) -> str:
    """Add the setting's flags to LIBTPU_INIT_ARGS (after what the environment already has);
    returns what LIBTPU_INIT_ARGS holds now."""
    flags = resolve(setting)
    have = os.environ.get("LIBTPU_INIT_ARGS", "")
    if flags:
        os.environ["LIBTPU_INIT_ARGS"] = " ".join(dict.fromkeys((have + " " + flags).split()))
    return os.environ.get("LIBTPU_INIT_ARGS", "")
