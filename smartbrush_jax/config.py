"""The one config schema: `base_config()` holds every field with its default; the files
in `configs/` start from it and override. Unknown fields are refused (by ml_collections,
also for `--config.x.y=...` overrides), and `validate()` checks values with clear errors.
"""

from __future__ import annotations

import ml_collections

from smartbrush_jax.errors import InputError

DTYPES = ("float32", "bfloat16")
# `models.unet.REMAT_POLICIES` (kept here too so that reading a config imports no JAX)
REMAT = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


class ConfigError(InputError, ValueError):
    """A config value that cannot work; the message names the field."""


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.init_from = ""  # diffusers SD folder or single-file checkpoint; "" = from scratch
    c.model.tokenizer = ""  # tokenizer folder (needed for a single file, or from scratch)
    c.model.init_ema = "auto"  # single-file init_from: "auto" (EMA when the file has them), "ema" or "raw"
    c.model.unet = ml_collections.ConfigDict({"block_out_channels": (320, 640, 1280, 1280)})  # diffusers fields
    c.model.unet.layers_per_block = 2
    c.model.unet.cross_attention_dim = 768
    c.model.unet.attention_head_dim = 8
    c.model.unet.down_block_types = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    c.model.unet.up_block_types = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    c.model.unet.norm_num_groups = 32
    c.model.text = ml_collections.ConfigDict({"hidden_size": 768, "intermediate_size": 3072,
                                              "num_hidden_layers": 12, "num_attention_heads": 12})
    c.model.autoencoder = "vae"  # "vae" (SD's, from init_from) or "identity" (pixel space)
    c.model.num_levels = 10  # precision levels S
    c.model.dtype = "float32"  # compute dtype; parameters stay float32
    c.model.attention_impl = ""  # "" (JAX picks), "xla", "cudnn" or "chunked" (query-blocked; fastest on CPU)
    c.model.remat = "none"  # U-Net activation rematerialisation, one of REMAT (models/unet.py)

    c.data = ml_collections.ConfigDict()
    c.data.prepared_dirs = ()
    c.data.synthetic_scenes = 0  # > 0: build the bundled shapes set in the workdir and train on it
    c.data.synthetic_size = 64
    c.data.weights = ml_collections.ConfigDict({"seg": 0.8, "t2i": 0.2})
    c.data.resolution = 512
    c.data.caption_mix = 0.5
    c.data.min_mask_area = 0.0
    c.data.num_workers = 0
    c.data.read_threads = 4
    c.data.max_bad_fraction = 0.05
    c.data.seed = 0
    c.data.prefetch_to_device = 1  # batches sharded onto the devices ahead of the step (0: none)

    c.loss = ml_collections.ConfigDict()
    c.loss.dice_weight = 0.01
    c.loss.eps_region = "all"
    c.loss.sigma_scale = 0.15
    c.loss.truncate = 2.0
    c.loss.threshold = 0.0
    c.loss.text_dropout = 0.1

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 500
    c.optim.schedule = "constant"  # "constant" or "cosine" (after warm-up)
    c.optim.weight_decay = 1e-2
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.clip_norm = 1.0
    c.optim.ema_decay = 0.9999

    c.train = ml_collections.ConfigDict()
    c.train.steps = 25_000
    c.train.batch_size = 1024  # global
    c.train.seed = 0
    c.train.log_every = 50
    c.train.sample_every = 1000
    c.train.sample_steps = 25
    c.train.sample_guidance = 3.0
    c.train.num_sample_examples = 4
    c.train.checkpoint_every = 1000
    c.train.keep_last = 3
    c.train.keep_every = 5000
    c.train.max_nonfinite_in_a_row = 20
    c.train.profile_steps = 0  # > 0: capture a profile of this many steps after warm-up
    c.train.peak_tflops = 0.0  # per-device peak for MFU; 0 = bf16 dense peak of the device kind (none on CPU)
    c.train.debug_nan_steps = ()  # test hook: steps (0-based) whose gradients are replaced by inf

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.mesh.dcn_shape = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
    c.mesh.fsdp = False  # shard parameters' out_features over the fsdp axis
    return c


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None, process_count: int = 1) -> None:
    def need(cond, field, msg):
        if not cond:
            raise ConfigError(f"config.{field}: {msg}")

    need(c.model.num_levels >= 1, "model.num_levels", f"must be >= 1, got {c.model.num_levels}")
    need(c.model.init_ema in ("auto", "ema", "raw"), "model.init_ema",
         f"must be 'auto', 'ema' or 'raw', got {c.model.init_ema!r}")
    need(c.model.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {c.model.dtype!r}")
    need(c.model.autoencoder in ("vae", "identity"), "model.autoencoder",
         f"must be 'vae' or 'identity', got {c.model.autoencoder!r}")
    need(c.model.autoencoder == "identity" or c.model.init_from, "model.autoencoder",
         "'vae' needs model.init_from (SD weights); train from scratch in pixel space with 'identity'")
    need(c.model.attention_impl in ("", "xla", "cudnn", "chunked"), "model.attention_impl",
         "must be '', 'xla', 'cudnn' or 'chunked'")
    need(c.model.remat in REMAT, "model.remat",
         f"must be one of {REMAT} (what the backward pass keeps; see models/unet.py), got {c.model.remat!r}")
    need(c.data.prefetch_to_device >= 0, "data.prefetch_to_device", f"must be >= 0, got {c.data.prefetch_to_device}")
    need(c.loss.eps_region in ("all", "mask"), "loss.eps_region", f"must be 'all' or 'mask', got {c.loss.eps_region!r}")
    need(0.0 <= c.loss.text_dropout <= 1.0, "loss.text_dropout", "must be in [0, 1]")
    need(c.optim.lr > 0, "optim.lr", f"must be > 0, got {c.optim.lr}")
    need(c.optim.schedule in ("constant", "cosine"), "optim.schedule", "must be 'constant' or 'cosine'")
    need(0.0 <= c.optim.ema_decay < 1.0, "optim.ema_decay", "must be in [0, 1)")
    need(c.train.steps > 0, "train.steps", "must be > 0")
    need(c.train.batch_size > 0, "train.batch_size", "must be > 0")
    need(c.train.max_nonfinite_in_a_row >= 1, "train.max_nonfinite_in_a_row", "must be >= 1")
    need(c.train.peak_tflops >= 0, "train.peak_tflops", f"must be >= 0 (0: from the device), got {c.train.peak_tflops}")
    need(c.data.prepared_dirs or c.data.synthetic_scenes > 0, "data.prepared_dirs",
         "give prepared data folders (python -m smartbrush_jax.data.prepare) or data.synthetic_scenes > 0")
    need(c.train.batch_size % process_count == 0, "train.batch_size",
         f"{c.train.batch_size} is not divisible by the {process_count} processes")
    if num_devices is not None:
        from smartbrush_jax.sharding import resolve_shape

        try:
            data, fsdp, _ = resolve_shape(dict(c.mesh.shape), num_devices)
        except ValueError as e:
            raise ConfigError(f"config.mesh.shape: {e}") from None
        need(c.train.batch_size % (data * fsdp) == 0, "train.batch_size",
             f"{c.train.batch_size} is not divisible by the data-parallel size {data * fsdp} (mesh data x fsdp)")
