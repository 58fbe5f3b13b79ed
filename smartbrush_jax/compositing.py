"""The image side of inpainting, shared by the JAX `Inpainter` and the PyTorch
`SmartBrushPipeline` (numpy and PIL only, no JAX, no torch): the working size, the image
and mask on the model's grid, and compositing the decoded result back into the original.

Background guarantee: every output pixel outside the user's mask is the input pixel,
byte for byte (compositing happens on the original uint8 image at its original size).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageFilter


@dataclasses.dataclass
class InpaintResult:
    images: np.ndarray  # [N, H, W, 3] uint8, the input's size
    predicted_masks: np.ndarray  # [N, H, W] bool, within the user's mask
    working_size: tuple  # (height, width) the model ran at


def downsampling_factor(block_out_channels) -> int:
    """The spatial factor of a VAE's latents, or of a U-Net's coarsest level: each block
    after the first halves the grid."""
    return 2 ** (len(block_out_channels) - 1)


def check_inputs(image: np.ndarray, mask: np.ndarray, precision: int, num_levels: int,
                 num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated `(image [H,W,3] uint8, mask [H,W] bool)`; ValueError says what is wrong."""
    image = np.asarray(image)
    mask = np.asarray(mask).astype(bool)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be [H, W, 3] uint8, got {image.shape} {image.dtype}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask {mask.shape} and image {image.shape[:2]} differ in size")
    if not mask.any():
        raise ValueError("the mask is empty: mark the region to fill")
    if not 0 <= precision <= num_levels:
        raise ValueError(f"precision must be in [0, {num_levels}], got {precision}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return image, mask


def working_size(h: int, w: int, resolution: int, multiple: int) -> tuple[int, int]:
    """The size the model runs at: the long side at most `resolution`, both sides
    rounded to the nearest multiple of `multiple` (at least one multiple)."""
    scale = min(1.0, resolution / max(h, w))
    return (max(multiple, int(round(h * scale / multiple)) * multiple),
            max(multiple, int(round(w * scale / multiple)) * multiple))


def model_inputs(image: np.ndarray, mask: np.ndarray, size: tuple[int, int],
                 vae_factor: int) -> tuple[np.ndarray, np.ndarray]:
    """The image at the working size in [-1, 1] ([h,w,3] float32) and the user's mask on
    the latent grid ([h/f, w/f] float32 in {0,1}: a cell is in if any pixel of it is)."""
    wh, ww = size
    pixels = np.asarray(Image.fromarray(image).resize((ww, wh), Image.Resampling.LANCZOS), np.float32)
    work_mask = np.asarray(Image.fromarray(mask).resize((ww, wh), Image.Resampling.NEAREST))
    f = vae_factor
    latent_mask = work_mask.reshape(wh // f, f, ww // f, f).max(axis=(1, 3)).astype(np.float32)
    return pixels / 127.5 - 1.0, latent_mask


def finish(image: np.ndarray, mask: np.ndarray, decoded: np.ndarray, predicted: np.ndarray,
           feather: float, size: tuple[int, int]) -> InpaintResult:
    """decoded: [N,h,w,3] float in [0, 255] at the working size; predicted: [N,h',w'] on
    the latent grid. Resizes both to the input's size and composites."""
    h, w = mask.shape
    images, masks = [], []
    for out_i, pred_i in zip(decoded, predicted):
        out = np.asarray(Image.fromarray(np.round(out_i).astype(np.uint8)).resize((w, h), Image.Resampling.LANCZOS))
        region = np.asarray(Image.fromarray((pred_i > 0.5).astype(np.uint8) * 255)
                            .resize((w, h), Image.Resampling.NEAREST)) > 127
        region &= mask
        images.append(composite(image, out, region, mask, feather))
        masks.append(region)
    return InpaintResult(np.stack(images), np.stack(masks), tuple(size))


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


def outlined(image: np.ndarray, mask: np.ndarray, width: int = 2) -> np.ndarray:
    """A copy of `image` with the border of `mask` drawn in red."""
    out = image.copy()
    out[outline(mask, width)] = (255, 0, 0)
    return out


def make_grid(image: np.ndarray, mask: np.ndarray, result: InpaintResult) -> np.ndarray:
    """One row per sample: input with the mask outlined in red | result | predicted mask."""
    return np.concatenate([grid_row(image, mask, img, pm) for img, pm in zip(result.images, result.predicted_masks)],
                          axis=0)


def grid_row(image: np.ndarray, user_mask: np.ndarray, result: np.ndarray, predicted: np.ndarray,
             outline_width: int = 2) -> np.ndarray:
    """[H, 3W, 3] uint8: the input with the user's mask outlined in red | the result | the
    predicted mask (white), all at one size (the one grid drawing of the project)."""
    shown = outlined(image, user_mask, outline_width)
    pred_rgb = np.repeat((predicted.astype(np.uint8) * 255)[..., None], 3, axis=2)
    return np.concatenate([shown, result, pred_rgb], axis=1)
