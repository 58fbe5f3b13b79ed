"""The one config schema: `base_config()` holds every field with its default (both
written once, in `settings.py`); the files in `configs/` start from it and override.
Unknown fields are refused (by ml_collections, also for `--config.x.y=...` overrides), and
`validate()` checks values with clear errors.
"""

from __future__ import annotations

import json
import math

import ml_collections

from smartbrush_jax import libtpu_flags as tpu_flags
from smartbrush_jax.errors import InputError
from smartbrush_jax.settings import SAMPLERS, TRAIN_TIMESTEPS, VAE_FACTOR

DTYPES = ("float32", "bfloat16")
# `models.unet.REMAT_POLICIES` (kept here too so that reading a config imports no JAX)
REMAT = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "attention_saveable",
         "dots_and_attention_saveable")
# `models.attention.IMPLEMENTATIONS`, likewise
ATTENTION = ("auto", "xla", "chunked", "splash", "cudnn")
FSDP_GATHER = ("once", "per_use")
# `models.unet_config`'s block types, likewise
DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


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
    _check_periodic(c, need)
    need(c.train.sample_sampler in SAMPLERS, "train.sample_sampler",
         f"must be one of {SAMPLERS}, got {c.train.sample_sampler!r}")
    need(c.train.batch_size > 0, "train.batch_size", "must be > 0")
    need(c.train.max_nonfinite_in_a_row >= 1, "train.max_nonfinite_in_a_row", "must be >= 1")
    need(c.train.peak_tflops >= 0, "train.peak_tflops", f"must be >= 0 (0: from the device), got {c.train.peak_tflops}")
    try:
        tpu_flags.resolve(c.train.libtpu_flags)
    except ValueError as e:
        need(False, "train.libtpu_flags", str(e))
    unet = _check_architecture(c, need)
    _check_resolution(c, unet, need)
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


def _check_periodic(c, need) -> None:
    """Every `*_every` setting and the held-out grids' sampler: a period of 0 divided by
    zero at the first step that checked it (0 keeps its documented meaning where it has
    one: `sample_every` none, `keep_every` only the last ones)."""
    t = c.train
    need(t.log_every >= 1, "train.log_every", f"must be >= 1 (metrics every N steps), got {t.log_every}")
    need(t.checkpoint_every >= 1, "train.checkpoint_every",
         f"must be >= 1 (a checkpoint every N steps; the last step is always saved), got {t.checkpoint_every}")
    need(t.sample_every >= 0, "train.sample_every", f"must be >= 0 (0: no held-out grids), got {t.sample_every}")
    need(t.keep_every >= 0, "train.keep_every", f"must be >= 0 (0: keep only the last ones), got {t.keep_every}")
    need(t.profile_steps >= 0, "train.profile_steps", f"must be >= 0 (0: no profile), got {t.profile_steps}")
    need(t.num_sample_examples >= 1 or not t.sample_every, "train.num_sample_examples",
         f"must be >= 1 while train.sample_every > 0, got {t.num_sample_examples}")
    steps = train_timesteps(c.model.init_from)
    need(1 <= t.sample_steps <= steps, "train.sample_steps",
         f"must be in [1, {steps}] (the noise schedule's num_train_timesteps), got {t.sample_steps}")
    need(math.isfinite(t.sample_guidance) and t.sample_guidance >= 0, "train.sample_guidance",
         f"must be finite and >= 0, got {t.sample_guidance}")


def train_timesteps(init_from: str) -> int:
    """The noise schedule's num_train_timesteps: the diffusers folder's
    `scheduler/scheduler_config.json` when it says, else `TRAIN_TIMESTEPS` (from scratch, a
    single file, every SD release)."""
    n = _weights_json(init_from, "scheduler", "scheduler_config.json").get("num_train_timesteps")
    return int(n) if isinstance(n, int) and n > 0 else TRAIN_TIMESTEPS


def _weights_json(init_from: str, *parts: str) -> dict:
    """A JSON file of a local diffusers folder `init_from` ({} when there is none: a single
    file, a URL, no weights). The loader reads and checks it again."""
    if not init_from or "://" in init_from:
        return {}
    import os

    try:
        with open(os.path.join(init_from, *parts)) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _check_architecture(c, need) -> dict:
    """`config.model.unet` (the U-Net built without weights: from scratch, or an ahead-of-time
    compile) and `model.text`/`model.text2`: the widths that must divide, checked here rather
    than as a ValueError where the model is built. Returns the U-Net fields the run uses
    (the weights' own when `init_from` is a diffusers folder)."""
    u = dict(c.model.unet)
    boc = u.get("block_out_channels", ())
    down, up = tuple(u.get("down_block_types", ())), tuple(u.get("up_block_types", ()))
    need(isinstance(boc, (list, tuple)) and len(boc) >= 1 and all(isinstance(v, int) and v > 0 for v in boc),
         "model.unet.block_out_channels", f"must be a tuple of positive channel counts, got {boc!r}")
    need(len(down) == len(boc) and len(up) == len(boc), "model.unet.block_out_channels",
         f"{len(boc)} blocks, but {len(down)} down_block_types and {len(up)} up_block_types (one per block)")
    for field, types, known in (("down_block_types", down, DOWN_BLOCKS), ("up_block_types", up, UP_BLOCKS)):
        bad = [t for t in types if t not in known]
        need(not bad, f"model.unet.{field}", f"{bad[0] if bad else ''!r} is not one of {known}")
    layers = u.get("layers_per_block", 2)
    need(isinstance(layers, int) and layers >= 1, "model.unet.layers_per_block", f"must be >= 1, got {layers!r}")
    groups = u.get("norm_num_groups", 32)
    need(isinstance(groups, int) and groups >= 1, "model.unet.norm_num_groups", f"must be >= 1, got {groups!r}")
    for ch in boc:
        need(ch % groups == 0, "model.unet.block_out_channels",
             f"{ch} channels are not divisible by model.unet.norm_num_groups={groups} (GroupNorm's groups), "
             f"got {tuple(boc)}")
    # diffusers' quirk: attention_head_dim is the number of heads unless num_attention_heads is given
    head_field = "num_attention_heads" if u.get("num_attention_heads") else "attention_head_dim"
    heads = u.get(head_field, 8)
    per_block = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * len(boc)
    need(len(per_block) == len(boc) and all(isinstance(h, int) and h >= 1 for h in per_block),
         f"model.unet.{head_field}", f"must be a number of heads >= 1, or one per block, got {heads!r}")
    for ch, h in zip(boc, per_block):
        need(ch % h == 0, "model.unet.block_out_channels",
             f"{ch} channels do not split into model.unet.{head_field}={h} attention heads, got {tuple(boc)}")
    for name in ("text", "text2"):
        t = dict(c.model.get(name) or {})
        if not t:
            continue
        width, n = t.get("hidden_size"), t.get("num_attention_heads")
        need(isinstance(n, int) and n >= 1, f"model.{name}.num_attention_heads", f"must be >= 1, got {n!r}")
        need(isinstance(width, int) and width >= 1 and width % n == 0, f"model.{name}.hidden_size",
             f"{width} is not divisible by model.{name}.num_attention_heads={n}")
    return _weights_json(c.model.init_from, "unet", "config.json") or u


def _check_resolution(c, unet: dict, need) -> None:
    """The crop's side must go through the autoencoder (SD's VAE: 1/8; the weights' own VAE
    when `init_from` is a diffusers folder) and every U-Net downsampling (one per block but
    the last) to whole, even cells, or the up path's skip connections do not line up."""
    res = c.data.resolution
    blocks = len(unet.get("block_out_channels") or c.model.unet.block_out_channels)
    vae = 1
    if c.model.autoencoder == "vae":  # each VAE block after the first halves the grid; SD's 4: 8
        vae_blocks = _weights_json(c.model.init_from, "vae", "config.json").get("block_out_channels")
        vae = 2 ** (len(vae_blocks) - 1) if isinstance(vae_blocks, list) and vae_blocks else VAE_FACTOR
    factor = vae * 2 ** (blocks - 1)
    how = (f"{vae} for the VAE x " if vae > 1 else "") + f"2**{blocks - 1} for the U-Net's {blocks} blocks"
    need(isinstance(res, int) and res > 0 and res % factor == 0, "data.resolution",
         f"must be a positive multiple of {factor} ({how}), got {res}")
