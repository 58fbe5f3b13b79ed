"""The knobs of each part, with their defaults and what they mean, written once.

One frozen dataclass per config section: `ModelConfig`, `DataConfig` (the data pipeline),
`LossConfig` (the loss and its mask degradation), `OptimConfig`, `TrainConfig`,
`MeshConfig`; and `SamplerConfig` for inference. `config.base_config()` is built from
their fields, so a default lives here and nowhere else; `from_section` turns a section
back into its dataclass. One idiom for reading them: the training loop reads a value where
it uses it (`config.train.steps`, `config.data.resolution`), and a component that takes a
whole section (the data pipeline, the loss, the sampler) is given its dataclass, built with
`from_section` (its `__post_init__` checks the ranges), never the `ConfigDict`. No JAX, no torch: a
config can be read anywhere.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Sequence, Tuple

from smartbrush_jax.errors import InputError

# the samplers (sampling/solvers.py) and the schedule's choices, named here so a config can
# be checked without the sampler
SAMPLERS = ("ddim", "dpm++2m", "euler", "euler_a")
KARRAS = ("dpm++2m", "euler")  # the samplers with a Karras-sigmas option
SPACINGS = ("leading", "linspace", "trailing")
PREDICTIONS = ("epsilon", "v_prediction")
# the schedule's length when the weights do not say (`diffusion.NoiseSchedule`'s default, every SD release's)
TRAIN_TIMESTEPS = 1000
VAE_FACTOR = 8  # SD's VAE (every family's) halves the image 3 times: the latents are 1/8 of the pixels


class SettingsError(InputError, ValueError):
    """A setting out of its range; the message names it."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise SettingsError(message)


def section(cls, exclude: Sequence[str] = ()) -> Dict[str, Any]:
    """The fields of `cls` (a dataclass) and their defaults, as a config section."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        out[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return out


def from_section(cls, values: Mapping[str, Any], **runtime):
    """`cls(**fields of the section that `cls` has, **runtime)`: a config section back into
    its dataclass (tuples and dicts of an ml_collections section become plain ones)."""
    names = {f.name for f in dataclasses.fields(cls)}
    plain = {k: (dict(v) if hasattr(v, "items") else v) for k, v in values.items() if k in names}
    return cls(**{**plain, **runtime})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """`config.model`: what is trained, from what."""

    init_from: str = ""  # diffusers SD folder or single-file checkpoint; "" = from scratch (pixel space)
    tokenizer: str = ""  # tokenizer folder (needed for a single file, or from scratch)
    init_ema: str = "auto"  # single-file init_from: "auto" (EMA when the file has them), "ema" or "raw"
    family: str = "auto"  # "sd1", "sd2", "sdxl" or "auto": what init_from must be (interop/families.py)
    unet: Dict[str, Any] = dataclasses.field(default_factory=lambda: {  # diffusers UNet2DConditionModel fields
        "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "cross_attention_dim": 768,
        "attention_head_dim": 8, "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, "norm_num_groups": 32})
    text: Dict[str, Any] = dataclasses.field(default_factory=lambda: {  # transformers CLIPTextConfig fields
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12})
    # SDXL's second text encoder (transformers CLIPTextConfig fields, with projection_dim), for
    # compiling without weights; {} = none. A run from weights takes both from init_from.
    text2: Dict[str, Any] = dataclasses.field(default_factory=dict)
    autoencoder: str = "vae"  # "vae" (SD's, from init_from) or "identity" (pixel space)
    num_levels: int = 10  # precision levels S
    dtype: str = "float32"  # compute dtype; parameters stay float32
    attention: str = "auto"  # auto, xla, chunked, splash or cudnn (models/attention.py; auto: splash on TPU,
    #   cuDNN on GPU, chunked on CPU)
    splash_min_tokens: int = 1024  # splash (and auto on TPU) runs self-attention of at least this many tokens
    remat: str = "none"  # U-Net activation rematerialisation, one of config.REMAT (models/unet.py)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """`config.optim`: AdamW with warm-up, global-norm clipping, and the EMA of the weights."""

    lr: float = 1e-5
    warmup_steps: int = 500
    schedule: str = "constant"  # "constant" or "cosine" (after warm-up, to 0 at train.steps)
    weight_decay: float = 1e-2
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0
    ema_decay: float = 0.9999


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """`config.train`: the loop, checkpoints, held-out grids, guards."""

    steps: int = 25_000
    batch_size: int = 1024  # global (split over processes and the data-parallel devices)
    seed: int = 0
    log_every: int = 50  # metrics every N steps (>= 1)
    sample_every: int = 1000  # held-out inpainting grids (0: none)
    sample_sampler: str = "ddim"  # sampler of the held-out grids, and the run's default for inpaint and the app
    sample_steps: int = 25  # sampler steps of the held-out grids (1 to the schedule's num_train_timesteps)
    sample_guidance: float = 3.0  # guidance scale of the held-out grids
    num_sample_examples: int = 4
    checkpoint_every: int = 1000  # a checkpoint every N steps (>= 1), and at the last step
    keep_last: int = 3
    keep_every: int = 5000  # also keep every K-th step (0: only the last ones)
    max_nonfinite_in_a_row: int = 20  # this many skipped (non-finite) updates in a row stop the run
    profile_steps: int = 0  # > 0: capture a profile of this many steps after warm-up
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = bf16 dense peak of the device kind (none on CPU)
    # libtpu/XLA flags (libtpu_flags.py): "" none, "mlperf_v4.1" MaxDiffusion's MLPerf set, or "--flag=v ..."
    libtpu_flags: str = ""


AXES = ("data", "fsdp", "tensor")


def resolve_shape(shape: Dict[str, int], num_devices: int) -> Tuple[int, ...]:
    """`{"data": -1, "fsdp": 2, "tensor": 1}` -> sizes in AXES order, filling one -1."""
    unknown = set(shape) - set(AXES)
    if unknown:
        raise ValueError(f"mesh.shape: unknown axes {sorted(unknown)}; the axes are {AXES}")
    sizes = [int(shape.get(a, 1)) for a in AXES]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ValueError("mesh.shape: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh.shape: sizes must be positive or -1, got {shape}")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(f"mesh.shape {shape}: {num_devices} devices are not divisible by {known}")
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh.shape {shape} needs {math.prod(sizes)} devices, there are {num_devices}")
    return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """`config.mesh`: the device mesh (sharding.py)."""

    shape: Dict[str, int] = dataclasses.field(default_factory=lambda: {"data": -1, "fsdp": 1, "tensor": 1})  # -1 fills
    dcn_shape: Dict[str, int] = dataclasses.field(default_factory=lambda: {"data": 1, "fsdp": 1, "tensor": 1})
    fsdp: bool = False  # shard parameters' out_features over the fsdp axis
    # with fsdp: "once" gathers the U-Net's weights in the compute dtype at the top of the step,
    # kept for the forward, its recompute and the backward (one gather per step, the gathered
    # copy in memory all step; gradients reduce-scattered in float32); "per_use": XLA gathers
    # each weight where it is used, again in the recompute and the backward
    fsdp_gather: str = "once"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The Grain input pipeline (`data/pipeline.py`); `config.data` holds these fields except
    the four the trainer derives (tokenizer_dir, latent_factor, batch_size per host, shuffle)."""

    prepared_dirs: Sequence[str] = ()  # folders written by `prepare` (or latent caches); components concatenated
    tokenizer_dir: str = ""  # derived: the run's tokenizer
    weights: Dict[str, float] = dataclasses.field(default_factory=lambda: {"seg": 0.8, "t2i": 0.2})  # mixture
    resolution: int = 512  # the square crop's side in pixels (> 0; config.validate: a multiple of the
    #   autoencoder's and the U-Net's downsampling)
    latent_factor: int = 1  # derived: the autoencoder's downsampling (8 for SD's VAE, 1 in pixel space)
    caption_mix: float = 0.5  # probability of the caption (when there is one) over the class label
    crop_context: tuple = (1.2, 3.0)  # crop side / object size, sampled uniformly
    min_mask_area: float = 0.0  # online check on top of prepare's (fraction of the image)
    max_pixels: int = 8192 * 8192  # larger images are skipped (too_many_pixels)
    batch_size: int = 8  # derived: examples per host per step
    seed: int = 0  # shuffling and augmentation
    shuffle: bool = True  # derived: off for the held-out set
    num_workers: int = 0  # worker processes (grain mp_prefetch); 0 = decode in this process
    read_threads: int = 2  # decode threads per process; more only helps when decoding releases the GIL
    prefetch: int = 16  # elements each process decodes ahead
    worker_buffer: int = 4  # elements each worker process hands over ahead
    max_bad_fraction: float = 0.05  # more bad records than this stop the run (DataError)
    min_examples_for_check: int = 200  # ... once this many records were read
    max_tokens: int = 77  # CLIP's context length
    synthetic_scenes: int = 0  # trainer: > 0 builds the bundled shapes set in the workdir and trains on it
    synthetic_size: int = 64  # trainer: the shapes set's image size
    prefetch_to_device: int = 1  # trainer: batches sharded onto the devices ahead of the step (0: none)

    RUNTIME = ("tokenizer_dir", "latent_factor", "batch_size", "shuffle")

    def __post_init__(self):
        _check(self.resolution > 0, f"data.resolution must be > 0, got {self.resolution}")
        _check(self.resolution % self.latent_factor == 0,
               f"data.resolution {self.resolution} is not a multiple of latent_factor {self.latent_factor}")
        _check(0.0 <= self.caption_mix <= 1.0, f"data.caption_mix must be in [0, 1], got {self.caption_mix}")
        _check(not any(w < 0 for w in self.weights.values()) and any(w > 0 for w in self.weights.values()),
               f"data.weights must be >= 0 with one > 0, got {self.weights}")
        lo, hi = (tuple(self.crop_context) + (math.nan, math.nan))[:2]
        _check(len(self.crop_context) == 2 and math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi,
               f"data.crop_context must be (lo, hi) with 0 < lo <= hi, both finite, got {self.crop_context}")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """SmartBrush's objective (`diffusion.smartbrush_loss`) and the mask degradation it
    trains with (`masks.degrade_mask`); `config.loss` holds these fields, `num_levels`
    comes from `config.model.num_levels`."""

    num_levels: int = 10  # precision levels S (from model.num_levels)
    dice_weight: float = 0.01  # lambda of the DICE term on the predicted mask (the paper's 0.01)
    eps_region: str = "all"  # where the noise MSE is taken: "all" (the latent) or "mask" (inside the degraded mask)
    sigma_scale: float = 0.15  # degradation: Gaussian sigma at level S, as a fraction of the object's size
    truncate: float = 2.0  # degradation: the blur kernel's radius in sigmas
    threshold: float = 0.0  # degradation: blurred mask > threshold is the degraded mask (0: it grows outward)
    text_dropout: float = 0.1  # probability of the empty prompt (classifier-free guidance)

    def __post_init__(self):
        _check(self.eps_region in ("all", "mask"), f"loss.eps_region must be 'all' or 'mask', got {self.eps_region!r}")
        _check(self.num_levels >= 1, f"num_levels must be >= 1, got {self.num_levels}")
        _check(0.0 <= self.text_dropout <= 1.0, "loss.text_dropout must be in [0, 1]")

    @property
    def degrade(self) -> Dict[str, float]:
        """The degradation settings, as `masks.degrade_mask` takes them and model.json stores them."""
        return {"sigma_scale": self.sigma_scale, "truncate": self.truncate, "threshold": self.threshold}


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Every knob of SmartBrush sampling, shared by the JAX sampler (`sampling.sampler.sample`) and
    the PyTorch pipeline (each is a CLI flag of `inpaint`)."""

    sampler: str = "ddim"  # "ddim", "dpm++2m", "euler", "euler_a" (sampling/solvers.py)
    karras: bool = False  # Karras sigmas (dpm++2m and euler)
    num_steps: int = 50
    guidance_scale: float = 7.5
    eta: float = 0.0
    use_predicted_mask: bool = True
    mask_warmup: float = 0.3  # fraction of steps that regenerate the whole user mask
    mask_threshold: float = 0.5  # on sigmoid(mask logit)
    mask_dilate: int = 1  # latent cells added around the predicted mask
    min_predicted_fraction: float = 0.02  # below this share of the user mask, keep the user mask

    def __post_init__(self):
        _check(0.0 <= self.mask_warmup <= 1.0, f"mask_warmup must be in [0, 1], got {self.mask_warmup}")
        _check(0.0 < self.mask_threshold < 1.0, f"mask_threshold must be in (0, 1), got {self.mask_threshold}")
        _check(self.num_steps >= 1, f"num_steps must be >= 1, got {self.num_steps}")
        _check(self.sampler in SAMPLERS, f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        _check(not self.karras or self.sampler in KARRAS,
               f"karras is an option of {' and '.join(KARRAS)}, not of {self.sampler}")
        _check(self.eta == 0 or self.sampler == "ddim", f"eta is DDIM's; {self.sampler} takes none")
        _check(math.isfinite(self.eta) and self.eta >= 0, f"eta must be finite and >= 0, got {self.eta}")
        _check(math.isfinite(self.guidance_scale) and self.guidance_scale >= 0,  # NaN painted the region black
               f"guidance_scale must be finite and >= 0, got {self.guidance_scale}")
        _check(self.mask_dilate >= 0, f"mask_dilate must be >= 0, got {self.mask_dilate}")
        _check(0.0 <= self.min_predicted_fraction <= 1.0,
               f"min_predicted_fraction must be in [0, 1], got {self.min_predicted_fraction}")


DEGRADE = LossConfig().degrade  # the default mask degradation (readers of runs that predate model.json's "degrade")
