"""Image-level SmartBrush inpainting: prepare image and mask, encode, sample, decode,
composite. The `inpaint` command is a thin shell around `Inpainter`.

    inpainter = Inpainter(load_diffusers_folder("/models/smartbrush"))
    result = inpainter(image_u8, mask_bool, "a flamingo", precision=3, seed=0)
    result.images[0], result.predicted_masks[0]

Background guarantee: every output pixel outside the user's mask is the input pixel,
byte for byte (compositing happens on the original uint8 image at its original size).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from smartbrush_jax.compositing import InpaintResult, check_inputs, finish, model_inputs, working_size
from smartbrush_jax.diffusion import NoiseSchedule
from smartbrush_jax.errors import InputError
from smartbrush_jax.interop.loader import StableDiffusion
from smartbrush_jax.models.autoencoder import downsampling_factor, make_autoencoder
from smartbrush_jax.models.conditioning import plain_micro, text_encoders, unet_apply
from smartbrush_jax.sampling.sampler import plan_for, sample
from smartbrush_jax.settings import SamplerConfig

MAX_SEED = 2**32 - 1  # seeds are 32-bit: jax.random.PRNGKey overflows past 2**63


class MemoryNeeded(InputError):
    """A request that needs more memory than the device has free (the message has both)."""


def program_bytes(compiled) -> Optional[int]:
    """What a compiled program holds at its peak, from XLA's memory analysis: arguments,
    outputs and temporaries (None where the backend gives no analysis)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001  (a backend without it)
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - getattr(m, "alias_size_in_bytes", 0))


def free_memory(device) -> Optional[int]:
    """Bytes free for a new program on `device`: an accelerator's allocator limit less what
    is in use; on the CPU, the kernel's MemAvailable (None when neither can be read)."""
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001
        pass
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Inpainter:
    """Runs a SmartBrush Stable Diffusion (5-in/5-out U-Net with precision embedding)."""

    @classmethod
    def load(cls, path: str, tokenizer_dir: Optional[str] = None, levels: int = 10, ema="auto",
             warn: Callable[[str], None] = lambda message: None) -> "Inpainter":
        """From anything `pretrained.load_model` reads (a training workdir, a SmartBrush
        export, an SD folder or single file); a plain SD U-Net gets SmartBrush's channels,
        untrained (`warn` says so). InputError for what cannot be used."""
        from smartbrush_jax.interop.loader import as_smartbrush, load_model, trained_resolution

        sd = load_model(path, tokenizer_dir=tokenizer_dir, ema=ema)
        plain = sd.unet_config.in_channels == 4 and sd.unet_config.num_class_embeddings is None
        if plain:
            warn(f"{path} is a plain Stable Diffusion U-Net: adding SmartBrush's mask channels and {levels} "
                 "precision levels, untrained (zero), so this behaves like SD with background preservation")
        try:
            return cls(as_smartbrush(sd, levels), resolution=trained_resolution(path) or 512)
        except ValueError as e:
            raise InputError(f"{path}: {e}") from None

    def __init__(self, sd: StableDiffusion, dtype=jnp.float32, resolution: int = 512):
        self.resolution = resolution  # the long side it was trained at: the default working size
        self.autoencoder = make_autoencoder(sd.vae_config, dtype)
        # a SmartBrush U-Net takes latent + mask and returns noise + mask logit
        latent = self.autoencoder.channels
        if sd.unet_config.in_channels != latent + 1 or sd.unet_config.out_channels != latent + 1 \
                or sd.unet_config.num_class_embeddings is None:
            raise ValueError(f"Inpainter needs a SmartBrush U-Net ({latent + 1} in / {latent + 1} out channels, "
                             "precision embedding); apply pretrained.to_smartbrush to a plain SD U-Net first")
        if sd.tokenizer is None:
            raise ValueError("Inpainter needs a tokenizer (load_single_file(..., tokenizer_dir=...))")
        self.sd = sd
        self.num_levels = sd.unet_config.num_class_embeddings - 1
        self.schedule = NoiseSchedule.from_diffusers(sd.scheduler_config)
        self.unet = sd.unet(dtype)
        self.encoders = text_encoders(sd, "the model", dtype)
        self.text_params = {"text": sd.text_params, **({"text2": sd.text2_params} if self.encoders.text2 else {})}
        self.vae_factor = self.autoencoder.factor
        # the U-Net halves the latent grid (len(blocks) - 1) times
        self.size_multiple = self.vae_factor * downsampling_factor(sd.unet_config.block_out_channels)
        self.max_tokens = sd.text_config.max_position_embeddings
        self._samplers: dict = {}
        self._programs: dict = {}
        self._progress: Optional[Callable[[int], None]] = None

    # -- text
    def tokenize(self, prompt: str) -> tuple[np.ndarray, bool]:
        """Token ids [77] padded to the model's length; and whether the prompt was truncated."""
        tok = self.sd.tokenizer
        full = tok(prompt, truncation=False).input_ids
        ids = tok(prompt, padding="max_length", max_length=self.max_tokens, truncation=True,
                  return_tensors="np").input_ids[0]
        return ids.astype(np.int32), len(full) > self.max_tokens

    @functools.partial(jax.jit, static_argnums=0)
    def _encode_text(self, params, ids, micro):
        return self.encoders(params, ids, micro)

    @functools.partial(jax.jit, static_argnums=0)
    def _encode_image(self, params, pixels):
        return self.autoencoder.encode(params, pixels)

    @functools.partial(jax.jit, static_argnums=0)
    def _decode(self, params, latents):
        return jnp.clip((self.autoencoder.decode(params, latents) + 1.0) * 127.5, 0.0, 255.0)

    def _sampler(self, cfg: SamplerConfig):
        """The jitted sampler for `cfg`, made once and kept: jit compiles it once per working
        size and sample count, and every later request of that size reuses the program (a
        server answers many). Progress goes through `self._progress`, read at each step."""
        if cfg not in self._samplers:
            def apply_fn(params, x, t, context, levels):
                return unet_apply(self.unet, params, x, t, context, levels)

            def run(params, x0, mask, levels, cond, uncond, rng):
                return sample(apply_fn, params, x0, mask, levels, cond, uncond, rng, self.schedule, cfg,
                              self._on_step)

            self._samplers[cfg] = jax.jit(run)
        return self._samplers[cfg]

    def _compiled(self, cfg: SamplerConfig, args: tuple, size: tuple, host_bytes: int = 0):
        """The sampler compiled for these shapes (`args`: arrays or `jax.ShapeDtypeStruct`s;
        kept: a server answers many requests of one size), after checking that it fits in the
        memory this machine has free: asked for more, the process would be killed (a photo at
        the wrong size once took a pixel-space demo model past 7 GB) or XLA would fail to
        allocate (a million samples' text context is 20 GB) instead of saying so. Nothing of a
        request is allocated before this: first its inputs (the latents, masks and text
        context of every sample, and the `host_bytes` of results) are counted, then what XLA's
        memory analysis of the compiled program says it needs."""
        n = args[1].shape[0]
        inputs = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                     for a in jax.tree_util.tree_leaves(args[1:]))
        self._check_memory(inputs, host_bytes, n, size)
        key = (cfg, tuple((tuple(a.shape), str(a.dtype)) for a in jax.tree_util.tree_leaves(args[1:])))
        if key not in self._programs:
            compiled = self._sampler(cfg).lower(*args).compile()
            need = program_bytes(compiled)
            if need is not None:
                self._check_memory(need, host_bytes, n, size)
            self._programs[key] = compiled
        return self._programs[key]

    def _check_memory(self, device_bytes: int, host_bytes: int, n: int, size: tuple) -> None:
        """MemoryNeeded when `device_bytes` (on the accelerator) and `host_bytes` (results in
        this process) do not fit in what is free; on the CPU both come out of one memory."""
        device = jax.devices()[0]
        checks = [(device_bytes + host_bytes, free_memory(device), device.platform)] if device.platform == "cpu" \
            else [(device_bytes, free_memory(device), device.platform),
                  (host_bytes, free_memory(jax.devices("cpu")[0]), "this host")]
        for need, free, where in checks:
            # headroom: the process itself, the decode and the composite at the input's size
            if free is not None and need * 1.15 + 2**30 > free:
                raise MemoryNeeded(
                    f"sampling {n} image(s) at {size[1]}x{size[0]} needs about {need / 2**30:.1f} GiB, and "
                    f"{where} has {free / 2**30:.1f} GiB free: use a smaller resolution (this model was trained "
                    f"at {self.resolution}) or fewer samples")

    def _on_step(self, i) -> None:
        if self._progress is not None:
            self._progress(int(i))

    # -- the whole thing
    def __call__(self, image: np.ndarray, mask: np.ndarray, prompt: str, negative_prompt: str = "",
                 precision: int = 0, seed: int = 0, num_samples: int = 1, sampler: SamplerConfig = SamplerConfig(),
                 resolution: int = 512, feather: float = 4.0,
                 progress: Optional[Callable[[int], None]] = None) -> InpaintResult:
        """image [H,W,3] uint8; mask [H,W] bool (True = region to fill). Returns `InpaintResult`."""
        image, mask = check_inputs(image, mask, precision, self.num_levels, num_samples)
        if not 0 <= seed <= MAX_SEED:
            raise InputError(f"seed must be in [0, {MAX_SEED}], got {seed}")
        self.check_sampler(sampler)
        size = working_size(*mask.shape, resolution, self.size_multiple)
        pixels, latent_mask = model_inputs(image, mask, size, self.vae_factor)

        x0 = self._encode_image(self.sd.vae_params, jnp.asarray(pixels[None]))
        ids = np.stack([self.tokenize(prompt)[0], self.tokenize(negative_prompt)[0]])
        micro = jnp.asarray(plain_micro(*size))  # the working size (h, w): the whole canvas, uncropped
        context = self._encode_text(self.text_params, jnp.asarray(ids), micro)
        n = num_samples
        rep = lambda a: jnp.repeat(a, n, axis=0)  # noqa: E731
        pick = lambda i: jax.tree_util.tree_map(lambda c: rep(c[i:i + 1]), context)  # noqa: E731
        make = lambda: (self.sd.unet_params, rep(x0), rep(jnp.asarray(latent_mask)[None]),  # noqa: E731
                        jnp.full((n,), precision, jnp.int32), pick(0), pick(1), jax.random.PRNGKey(seed))
        # the shapes first: the memory check runs before the n copies are made
        abstract = (self.sd.unet_params,) + tuple(jax.eval_shape(lambda: make()[1:]))
        h, w = mask.shape
        # the decoded latents (float32 at the working size) and the results at the input's size
        host_bytes = n * (size[0] * size[1] * 3 * 4 + 2 * h * w * 4)
        program = self._compiled(sampler, abstract, size, host_bytes)
        args = make()
        self._progress = progress
        try:
            latents, pred = jax.block_until_ready(program(*args))
        finally:
            self._progress = None
        del args
        # one sample at a time: the decoder's memory does not grow with the number of samples
        decoded = np.stack([np.asarray(self._decode(self.sd.vae_params, latents[i:i + 1]))[0] for i in range(n)])
        return finish(image, mask, decoded, np.asarray(pred), feather, size)

    @property
    def num_train_timesteps(self) -> int:
        """The length of the model's noise schedule: no sampler takes more steps."""
        return self.schedule.num_train_timesteps

    def check_sampler(self, cfg: SamplerConfig, flag: str = "steps") -> None:
        """InputError when `cfg` cannot run on this model's schedule (more steps than it has
        training timesteps); `flag` names the setting in the message."""
        n_train = self.num_train_timesteps
        if not 1 <= cfg.num_steps <= n_train:
            raise InputError(f"{flag} must be in [1, {n_train}] for this model: its scheduler has "
                             f"num_train_timesteps={n_train}, got {cfg.num_steps}")
        try:
            plan_for(self.schedule, cfg)
        except ValueError as e:
            raise InputError(f"the sampler settings do not fit this model's scheduler: {e}") from None

    def latent_size(self, shape: tuple, resolution: int) -> tuple[int, int]:
        """(h, w) of the latent grid an image of `shape` [H, W] is sampled on at `resolution`."""
        h, w = working_size(shape[0], shape[1], resolution, self.size_multiple)
        return h // self.vae_factor, w // self.vae_factor
