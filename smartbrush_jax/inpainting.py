"""Image-level SmartBrush inpainting: prepare image and mask, encode, sample, decode,
composite. The `inpaint` command is a thin shell around `Inpainter`.

    inpainter = Inpainter(load_diffusers_folder("/models/smartbrush"))
    result = inpainter(image_u8, mask_bool, "a flamingo", precision=3, seed=0)
    result.images[0], result.predicted_masks[0]

Background guarantee: every output pixel outside the user's mask is the input pixel,
byte for byte (compositing happens on the original uint8 image at its original size).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageFilter

from smartbrush_jax.diffusion import NoiseSchedule, SamplerConfig, sample
from smartbrush_jax.pretrained import StableDiffusion


@dataclasses.dataclass
class InpaintResult:
    images: np.ndarray  # [N, H, W, 3] uint8, the input's size
    predicted_masks: np.ndarray  # [N, H, W] bool, within the user's mask
    working_size: tuple  # (height, width) the model ran at


class Inpainter:
    """Runs a SmartBrush Stable Diffusion (5-in/5-out U-Net with precision embedding)."""

    def __init__(self, sd: StableDiffusion, dtype=jnp.float32):
        # a SmartBrush U-Net takes latent + mask and returns noise + mask logit
        latent = 3 if sd.vae_config is None else sd.vae_config.latent_channels
        if sd.unet_config.in_channels != latent + 1 or sd.unet_config.out_channels != latent + 1 \
                or sd.unet_config.num_class_embeddings is None:
            raise ValueError(f"Inpainter needs a SmartBrush U-Net ({latent + 1} in / {latent + 1} out channels, "
                             "precision embedding); apply pretrained.to_smartbrush to a plain SD U-Net first")
        if sd.tokenizer is None:
            raise ValueError("Inpainter needs a tokenizer (load_single_file(..., tokenizer_dir=...))")
        self.sd = sd
        self.num_levels = sd.unet_config.num_class_embeddings - 1
        self.schedule = NoiseSchedule.from_diffusers(sd.scheduler_config)
        # no VAE: a pixel-space model (the demo), whose "latents" are the pixels in [-1, 1]
        self.vae = None if sd.vae_config is None else sd.vae(dtype)
        self.unet, self.text = sd.unet(dtype), sd.text_encoder(dtype)
        self.vae_factor = 1 if self.vae is None else 2 ** (len(sd.vae_config.block_out_channels) - 1)
        # the U-Net halves the latent grid (len(blocks) - 1) times
        self.size_multiple = self.vae_factor * 2 ** (len(sd.unet_config.block_out_channels) - 1)
        self.max_tokens = sd.text_config.max_position_embeddings

    # -- text
    def tokenize(self, prompt: str) -> tuple[np.ndarray, bool]:
        """Token ids [77] padded to the model's length; and whether the prompt was truncated."""
        tok = self.sd.tokenizer
        full = tok(prompt, truncation=False).input_ids
        ids = tok(prompt, padding="max_length", max_length=self.max_tokens, truncation=True,
                  return_tensors="np").input_ids[0]
        return ids.astype(np.int32), len(full) > self.max_tokens

    @functools.partial(jax.jit, static_argnums=0)
    def _encode_text(self, params, ids):
        return self.text.apply({"params": params}, ids)[0]

    @functools.partial(jax.jit, static_argnums=0)
    def _encode_image(self, params, pixels):
        if self.vae is None:
            return pixels
        mean, _ = self.vae.apply({"params": params}, pixels, method=self.vae.encode)
        return mean * self.sd.vae_config.scaling_factor

    @functools.partial(jax.jit, static_argnums=0)
    def _decode(self, params, latents):
        if self.vae is None:
            pixels = latents
        else:
            pixels = self.vae.apply({"params": params}, latents / self.sd.vae_config.scaling_factor,
                                    method=self.vae.decode)
        return jnp.clip((pixels + 1.0) * 127.5, 0.0, 255.0)

    def _sampler(self, cfg: SamplerConfig, progress):
        def apply_fn(params, x, t, context, levels):
            return self.unet.apply({"params": params}, x, t, context, levels)

        def run(params, x0, mask, levels, cond, uncond, rng):
            return sample(apply_fn, params, x0, mask, levels, cond, uncond, rng, self.schedule, cfg, progress)

        return jax.jit(run)

    # -- the whole thing
    def __call__(self, image: np.ndarray, mask: np.ndarray, prompt: str, negative_prompt: str = "",
                 precision: int = 0, seed: int = 0, num_samples: int = 1, sampler: SamplerConfig = SamplerConfig(),
                 resolution: int = 512, feather: float = 4.0,
                 progress: Optional[Callable[[int], None]] = None) -> InpaintResult:
        """image [H,W,3] uint8; mask [H,W] bool (True = region to fill). Returns `InpaintResult`."""
        image = np.asarray(image)
        mask = np.asarray(mask).astype(bool)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be [H, W, 3] uint8, got {image.shape} {image.dtype}")
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask {mask.shape} and image {image.shape[:2]} differ in size")
        if not mask.any():
            raise ValueError("the mask is empty: mark the region to fill")
        if not 0 <= precision <= self.num_levels:
            raise ValueError(f"precision must be in [0, {self.num_levels}], got {precision}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        h, w = mask.shape
        wh, ww = working_size(h, w, resolution, self.size_multiple)
        pixels = np.asarray(Image.fromarray(image).resize((ww, wh), Image.Resampling.LANCZOS), np.float32)
        work_mask = np.asarray(Image.fromarray(mask).resize((ww, wh), Image.Resampling.NEAREST))
        f = self.vae_factor
        latent_mask = work_mask.reshape(wh // f, f, ww // f, f).max(axis=(1, 3)).astype(np.float32)

        x0 = self._encode_image(self.sd.vae_params, jnp.asarray(pixels[None] / 127.5 - 1.0))
        ids = np.stack([self.tokenize(prompt)[0], self.tokenize(negative_prompt)[0]])
        context = self._encode_text(self.sd.text_params, jnp.asarray(ids))
        n = num_samples
        rep = lambda a: jnp.repeat(a, n, axis=0)  # noqa: E731
        latents, pred = self._sampler(sampler, progress)(
            self.sd.unet_params, rep(x0), rep(jnp.asarray(latent_mask)[None]), jnp.full((n,), precision, jnp.int32),
            rep(context[:1]), rep(context[1:]), jax.random.PRNGKey(seed))
        decoded = np.asarray(self._decode(self.sd.vae_params, latents))
        pred = np.asarray(pred)

        images, masks = [], []
        for i in range(n):
            out = np.asarray(Image.fromarray(np.round(decoded[i]).astype(np.uint8)).resize((w, h),
                                                                                          Image.Resampling.LANCZOS))
            region = np.asarray(Image.fromarray((pred[i] > 0.5).astype(np.uint8) * 255)
                                .resize((w, h), Image.Resampling.NEAREST)) > 127
            region &= mask
            images.append(composite(image, out, region, mask, feather))
            masks.append(region)
        return InpaintResult(np.stack(images), np.stack(masks), (wh, ww))


def working_size(h: int, w: int, resolution: int, multiple: int) -> tuple[int, int]:
    """The size the model runs at: the long side at most `resolution`, both sides
    rounded to the nearest multiple of `multiple` (at least one multiple)."""
    scale = min(1.0, resolution / max(h, w))
    return (max(multiple, int(round(h * scale / multiple)) * multiple),
            max(multiple, int(round(w * scale / multiple)) * multiple))


def composite(original: np.ndarray, generated: np.ndarray, region: np.ndarray, user_mask: np.ndarray,
              feather: float) -> np.ndarray:
    """Blend `generated` into `original` inside the feathered `region`, never outside the
    user's mask: there the result is `original`, byte for byte. All [H,W(,3)] at one size."""
    weight = region.astype(np.float32)
    if feather > 0:
        blurred = Image.fromarray(region.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(feather))
        weight = np.maximum(weight, np.asarray(blurred, np.float32) / 255.0)  # soft edge outward
    weight = (weight * user_mask)[..., None]
    blend = np.round(original.astype(np.float32) * (1.0 - weight) + generated.astype(np.float32) * weight)
    return np.where(weight > 0, np.clip(blend, 0, 255).astype(np.uint8), original)


def outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Pixels on the border of a binary mask (for drawing it over the input)."""
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    eroded = np.asarray(img.filter(ImageFilter.MinFilter(2 * width + 1))) > 127
    return mask & ~eroded


def make_grid(image: np.ndarray, mask: np.ndarray, result: InpaintResult) -> np.ndarray:
    """One row per sample: input with the mask outlined in red | result | predicted mask."""
    shown = image.copy()
    shown[outline(mask)] = (255, 0, 0)
    rows = []
    for img, pm in zip(result.images, result.predicted_masks):
        pm_rgb = np.repeat((pm.astype(np.uint8) * 255)[..., None], 3, axis=2)
        rows.append(np.concatenate([shown, img, pm_rgb], axis=1))
    return np.concatenate(rows, axis=0)

