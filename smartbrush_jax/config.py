"""The one config schema: `base_config()` holds every field with its default (both
written once, in `settings.py`); the files in `configs/` start from it and override.
Unknown fields are refused (by ml_collections, also for `--config.x.y=...` overrides), and
`validate()` checks values with clear errors.
"""

from __future__ import annotations

import ml_collections

from smartbrush_jax.errors import InputError
from smartbrush_jax.settings import SAMPLERS

DTYPES = ("float32", "bfloat16")
# `models.unet.REMAT_POLICIES` (kept here too so that reading a config imports no JAX)
REMAT = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "attention_saveable",
         "dots_and_attention_saveable")
# `models.attention.IMPLEMENTATIONS`, likewise
ATTENTION = ("auto", "xla", "chunked", "splash", "cudnn")
FSDP_GATHER = ("once", "per_use")


class ConfigError(InputError, ValueError):
    """A config value that cannot work; the message names the field."""


def base_config() -> ml_collections.ConfigDict:
    """Every section with its defaults, from the dataclasses of `settings.py` (which say what
    each field means)."""
    from smartbrush_jax import settings as s

    return ml_collections.ConfigDict({
        "model": s.section(s.ModelConfig),
        "data": s.section(s.DataConfig, exclude=s.DataConfig.RUNTIME),
        "loss": s.section(s.LossConfig, exclude=("num_levels",)),
        "optim": s.section(s.OptimConfig),
        "train": s.section(s.TrainConfig),
        "mesh": s.section(s.MeshConfig),
    })


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None, process_count: int = 1,
             data: bool = True) -> None:
    """Raise ConfigError naming the first field that cannot work. `data=False` skips the
    data sources (an ahead-of-time compile reads none)."""
    def need(cond, field, msg):
        if not cond:
            raise ConfigError(f"config.{field}: {msg}")

    need(c.model.num_levels >= 1, "model.num_levels", f"must be >= 1, got {c.model.num_levels}")
    need(c.model.family in ("auto", "sd1", "sd2", "sdxl"), "model.family",
         f"must be auto, sd1, sd2 or sdxl, got {c.model.family!r}")
    need(c.model.init_ema in ("auto", "ema", "raw"), "model.init_ema",
         f"must be 'auto', 'ema' or 'raw', got {c.model.init_ema!r}")
    need(c.model.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {c.model.dtype!r}")
    need(c.model.autoencoder in ("vae", "identity"), "model.autoencoder",
         f"must be 'vae' or 'identity', got {c.model.autoencoder!r}")
    need(c.model.autoencoder == "identity" or c.model.init_from, "model.autoencoder",
         "'vae' needs model.init_from (SD weights); train from scratch in pixel space with 'identity'")
    need(c.model.attention in ATTENTION, "model.attention",
         f"must be one of {ATTENTION} (see models/attention.py), got {c.model.attention!r}")
    need(c.model.splash_min_tokens >= 128, "model.splash_min_tokens",
         f"must be >= 128 (the kernel's block), got {c.model.splash_min_tokens}")
    need(c.model.remat in REMAT, "model.remat",
         f"must be one of {REMAT} (what the backward pass keeps; see models/unet.py), got {c.model.remat!r}")
    need(c.mesh.fsdp_gather in FSDP_GATHER, "mesh.fsdp_gather",
         f"must be one of {FSDP_GATHER} (see settings.MeshConfig), got {c.mesh.fsdp_gather!r}")
    need(c.data.prefetch_to_device >= 0, "data.prefetch_to_device", f"must be >= 0, got {c.data.prefetch_to_device}")
    need(c.loss.eps_region in ("all", "mask"), "loss.eps_region", f"must be 'all' or 'mask', got {c.loss.eps_region!r}")
    need(0.0 <= c.loss.text_dropout <= 1.0, "loss.text_dropout", "must be in [0, 1]")
    need(c.optim.lr > 0, "optim.lr", f"must be > 0, got {c.optim.lr}")
    need(c.optim.schedule in ("constant", "cosine"), "optim.schedule", "must be 'constant' or 'cosine'")
    need(0.0 <= c.optim.ema_decay < 1.0, "optim.ema_decay", "must be in [0, 1)")
    need(c.train.steps > 0, "train.steps", "must be > 0")
    need(c.train.sample_sampler in SAMPLERS, "train.sample_sampler",
         f"must be one of {SAMPLERS}, got {c.train.sample_sampler!r}")
    need(c.train.batch_size > 0, "train.batch_size", "must be > 0")
    need(c.train.max_nonfinite_in_a_row >= 1, "train.max_nonfinite_in_a_row", "must be >= 1")
    need(c.train.peak_tflops >= 0, "train.peak_tflops", f"must be >= 0 (0: from the device), got {c.train.peak_tflops}")
    need(not data or c.data.prepared_dirs or c.data.synthetic_scenes > 0, "data.prepared_dirs",
         "give prepared data folders (python -m smartbrush_jax.cli.prepare) or data.synthetic_scenes > 0")
    need(c.train.batch_size % process_count == 0, "train.batch_size",
         f"{c.train.batch_size} is not divisible by the {process_count} processes")
    if num_devices is not None:
        from smartbrush_jax.settings import resolve_shape

        try:
            data, fsdp, _ = resolve_shape(dict(c.mesh.shape), num_devices)
        except ValueError as e:
            raise ConfigError(f"config.mesh.shape: {e}") from None
        need(c.train.batch_size % (data * fsdp) == 0, "train.batch_size",
             f"{c.train.batch_size} is not divisible by the data-parallel size {data * fsdp} (mesh data x fsdp)")
