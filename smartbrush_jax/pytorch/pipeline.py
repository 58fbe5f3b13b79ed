"""SmartBrush inpainting in PyTorch on stock diffusers/transformers components: the same
sampler as `smartbrush_jax.sampling.sampler.sample` (DDIM, DPM-Solver++ 2M, Euler or Euler
ancestral through diffusers' own schedulers, classifier-free guidance, precision level as
`class_labels`, background restored outside the predicted mask after every step) and the
same image handling (`smartbrush_jax.compositing`). No JAX needed.

    pipe = SmartBrushPipeline.from_pretrained("exports/smartbrush")   # smartbrush-export output
    result = pipe(image_u8, mask_bool, "a flamingo", precision=3, seed=0)
    result.images[0], result.predicted_masks[0]

SDXL exports (text_encoder_2/, tokenizer_2/) are conditioned as diffusers' SDXL pipeline
conditions its U-Net: both encoders' penultimate hidden states concatenated, the second's
projected pooled output, and the micro-conditioning of an uncropped canvas (original size =
target size = the working size), as `smartbrush_jax.models.conditioning` does in JAX.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from smartbrush_jax.compositing import (
    InpaintResult,
    check_inputs,
    downsampling_factor,
    finish,
    model_inputs,
    working_size,
)
from smartbrush_jax.errors import InputError
from smartbrush_jax.interop.diffusers_writer import SETTINGS_VERSION  # the writer owns the format
from smartbrush_jax.interop.file_hashes import verify_export
from smartbrush_jax.settings import SamplerConfig

SETTINGS_FILE = "smartbrush.json"




class PipelineError(InputError, ValueError):
    """An exported folder that is incomplete or inconsistent."""


class SmartBrushPipeline:
    """unet: diffusers `UNet2DConditionModel` (latent+1 in, latent+1 out, class embedding
    with S + 1 rows); vae: `AutoencoderKL` or None for a pixel-space model; text_encoder:
    transformers `CLIPTextModel`; scheduler: diffusers `DDIMScheduler`; text_encoder_2 and
    tokenizer_2: SDXL's second (projected) encoder and its tokenizer, for a U-Net with
    `addition_embed_type="text_time"`."""

    def __init__(self, unet, text_encoder, tokenizer, scheduler, vae=None, settings: Optional[dict] = None,
                 text_encoder_2=None, tokenizer_2=None):
        self.unet, self.text_encoder, self.tokenizer = unet.eval(), text_encoder.eval(), tokenizer
        self.text_encoder_2 = None if text_encoder_2 is None else text_encoder_2.eval()
        self.tokenizer_2 = tokenizer_2
        self.vae = None if vae is None else vae.eval()
        self.scheduler = scheduler
        self.settings = dict(settings or {})
        latent = 3 if vae is None else vae.config.latent_channels
        cfg = unet.config
        if cfg.in_channels != latent + 1 or cfg.out_channels != latent + 1 or cfg.num_class_embeds is None:
            raise PipelineError(f"a SmartBrush U-Net has {latent + 1} in / {latent + 1} out channels and a class "
                                f"embedding; this one has {cfg.in_channels} / {cfg.out_channels} and "
                                f"num_class_embeds={cfg.num_class_embeds}")
        self.sdxl = cfg.get("addition_embed_type") == "text_time"
        if self.sdxl != (text_encoder_2 is not None) or (text_encoder_2 is None) != (tokenizer_2 is None):
            raise PipelineError("an SDXL U-Net (addition_embed_type 'text_time') needs text_encoder_2 and "
                                "tokenizer_2, and only it takes them; this U-Net "
                                f"{'is' if self.sdxl else 'is not'} one, text_encoder_2 is "
                                f"{'missing' if text_encoder_2 is None else 'given'}")
        if scheduler.config.get("clip_sample") or scheduler.config.get("thresholding"):
            raise PipelineError("the scheduler clips or thresholds samples; SmartBrush's samplers do neither")
        self.latent_channels = latent
        self.num_levels = cfg.num_class_embeds - 1
        self.vae_factor = 1 if vae is None else downsampling_factor(vae.config.block_out_channels)
        self.size_multiple = self.vae_factor * downsampling_factor(cfg.block_out_channels)
        self.sampler = SamplerConfig(**self.settings.get("sampler", {}))

    # -- loading
    @classmethod
    def from_pretrained(cls, folder: str, torch_dtype=torch.float32, device: str = "cpu") -> "SmartBrushPipeline":
        """Load a folder written by `smartbrush-export` (or any diffusers SD folder whose
        U-Net is a SmartBrush U-Net, plus a `smartbrush.json`). Files whose sha256 differs
        from the one its smartbrush.json records are refused (`interop.file_hashes`)."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        settings = read_settings(folder)
        for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
            if not os.path.isdir(os.path.join(folder, sub)):
                raise PipelineError(f"{folder}: no {sub}/ folder: not a SmartBrush export")
        verify_export(folder, None, PipelineError)
        kw = dict(torch_dtype=torch_dtype, local_files_only=True, use_safetensors=True)
        try:
            unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"), low_cpu_mem_usage=False, **kw)
            text = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"), **kw)
            vae = None
            if settings.get("autoencoder", "kl") != "identity":
                vae = AutoencoderKL.from_pretrained(os.path.join(folder, "vae"), low_cpu_mem_usage=False, **kw)
            tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"), local_files_only=True)
            scheduler = DDIMScheduler.from_pretrained(os.path.join(folder, "scheduler"), local_files_only=True)
            text2 = tokenizer2 = None
            if os.path.isdir(os.path.join(folder, "text_encoder_2")):  # SDXL
                text2 = CLIPTextModelWithProjection.from_pretrained(os.path.join(folder, "text_encoder_2"), **kw)
                tokenizer2 = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer_2"), local_files_only=True)
        except Exception as e:  # a truncated or corrupt weights file, a config that is not one: not our bug
            raise PipelineError(f"{folder}: cannot load the export ({type(e).__name__}: {str(e)[:300]})") from e
        return cls(unet, text, tokenizer, scheduler, vae, settings, text2, tokenizer2).to(device)

    def to(self, device) -> "SmartBrushPipeline":
        for m in (self.unet, self.text_encoder, self.text_encoder_2, self.vae):
            if m is not None:
                m.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    # -- pieces
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], size: Optional[tuple[int, int]] = None):
        """SD: [N, T, D] last hidden states for prompts padded/truncated to the model's length.
        SDXL: {"hidden": [N, T, D1 + D2] both encoders' penultimate states, "pooled": [N, P]
        the second's projected pooled output, "micro": [N, 6] for an uncropped canvas of
        `size` (h, w): (h, w, 0, 0, h, w)}."""
        def ids(tokenizer, encoder):
            return tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt",
                             max_length=encoder.config.max_position_embeddings).input_ids.to(self.device)

        if not self.sdxl:
            return self.text_encoder(ids(self.tokenizer, self.text_encoder))[0]
        if size is None:
            raise ValueError("SDXL's conditioning needs the canvas size (h, w)")
        first = self.text_encoder(ids(self.tokenizer, self.text_encoder), output_hidden_states=True)
        second = self.text_encoder_2(ids(self.tokenizer_2, self.text_encoder_2), output_hidden_states=True)
        h, w = size
        micro = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=self.device).repeat(len(prompts), 1)
        return {"hidden": torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1),
                "pooled": second.text_embeds, "micro": micro}

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N,3,H,W] in [-1, 1] -> scaled latents (the pixels themselves without a VAE)."""
        if self.vae is None:
            return pixels
        return self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> [N,3,H,W] float in [0, 255]."""
        pixels = latents if self.vae is None else self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return ((pixels.float() + 1.0) * 127.5).clamp(0.0, 255.0)

    @torch.no_grad()
    def sample(self, x0: torch.Tensor, mask: torch.Tensor, levels: torch.Tensor, cond: torch.Tensor,
               uncond: torch.Tensor, noise: torch.Tensor, sampler: Optional[SamplerConfig] = None,
               generator: Optional[torch.Generator] = None,
               progress: Optional[Callable[[int], None]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x0: [B,C,h,w] scaled latents; mask: [B,h,w] in {0,1}; levels: [B] int;
        cond/uncond: [B,T,D] (SDXL: dicts of `encode_prompt`); noise: [B,C,h,w] the initial
        noise. Returns (latents [B,C,h,w], predicted mask [B,h,w] in {0,1} within the user's
        mask, last step)."""
        cfg = sampler or self.sampler
        c, b = x0.shape[1], x0.shape[0]
        m = (mask > 0.5).to(x0.dtype)
        m4 = m[:, None]
        sched = self.scheduler_for(cfg)
        sched.set_timesteps(cfg.num_steps)
        # Euler's sample lives in sigma space (the U-Net's input times sqrt(1 + sigma^2)): the
        # clean background is put back at the scale of the level the sample is at
        sigma_space = type(sched).__name__.startswith("Euler")
        scale = (lambda i: float((1.0 + sched.sigmas[i] ** 2) ** 0.5)) if sigma_space else (lambda i: 1.0)
        warmup = int(round(cfg.mask_warmup * cfg.num_steps))
        x = noise.to(x0.dtype) * float(sched.init_noise_sigma) * m4 + x0 * scale(0) * (1.0 - m4)
        context = _join(cond, uncond, lambda c, u: torch.cat([c, u]).to(self.dtype))
        if isinstance(context, dict):  # SDXL
            hidden, extra = context["hidden"], {"added_cond_kwargs": {"text_embeds": context["pooled"],
                                                                      "time_ids": context["micro"]}}
        else:
            hidden, extra = context, {}
        labels = torch.cat([levels, levels]).to(self.device)
        step_kw = {"eta": cfg.eta} if cfg.sampler == "ddim" else {}
        if cfg.sampler in ("ddim", "euler_a"):
            step_kw["generator"] = generator
        pred = m
        for i, t in enumerate(sched.timesteps):
            inp = torch.cat([sched.scale_model_input(x, t), m4], dim=1)
            out = self.unet(torch.cat([inp, inp]).to(self.dtype), t, hidden, class_labels=labels,
                            **extra).sample.to(x0.dtype)
            out_c, out_u = out[:b, :c], out[b:, :c]
            x = sched.step(out_u + cfg.guidance_scale * (out_c - out_u), t, x, **step_kw).prev_sample
            pred = predicted_region(out[:b, c], m, cfg)
            region = m if (not cfg.use_predicted_mask or i < warmup) else pred
            x = x * region[:, None] + x0 * scale(i + 1) * (1.0 - region[:, None])
            if progress is not None:
                progress(i)
        return x, pred

    def scheduler_for(self, cfg: SamplerConfig):
        """A fresh diffusers scheduler of `cfg.sampler` on the export's scheduler config (keys
        the file left unset take the class's own defaults, as in diffusers)."""
        from diffusers import (
            DDIMScheduler,
            DPMSolverMultistepScheduler,
            EulerAncestralDiscreteScheduler,
            EulerDiscreteScheduler,
        )

        classes = {"ddim": DDIMScheduler, "dpm++2m": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler,
                   "euler_a": EulerAncestralDiscreteScheduler}
        extra = {"use_karras_sigmas": True} if cfg.karras else {}
        return classes[cfg.sampler].from_config(self.scheduler.config, **extra)

    # -- the whole thing
    def __call__(self, image: np.ndarray, mask: np.ndarray, prompt: str, negative_prompt: str = "",
                 precision: int = 0, seed: int = 0, num_samples: int = 1, sampler: Optional[SamplerConfig] = None,
                 resolution: Optional[int] = None, feather: Optional[float] = None,
                 noise: Optional[torch.Tensor] = None,
                 progress: Optional[Callable[[int], None]] = None) -> InpaintResult:
        """image [H,W,3] uint8; mask [H,W] bool (True = region to fill). `noise`
        ([N,C,h,w]) replaces the initial noise drawn from `seed`."""
        image, mask = check_inputs(image, mask, precision, self.num_levels, num_samples)
        resolution = resolution or self.settings.get("resolution", 512)
        feather = self.settings.get("feather", 4.0) if feather is None else feather
        size = working_size(*mask.shape, resolution, self.size_multiple)
        pixels, latent_mask = model_inputs(image, mask, size, self.vae_factor)
        dev, n = self.device, num_samples
        x0 = self.encode_image(torch.from_numpy(pixels).permute(2, 0, 1)[None].to(dev, self.dtype)).float()
        context = _join(self.encode_prompt([prompt, negative_prompt], size), None, lambda c, _: c.float())
        generator = torch.Generator(device="cpu").manual_seed(seed)
        if noise is None:
            noise = torch.randn((n, *x0.shape[1:]), generator=generator).to(dev)
        latents, pred = self.sample(
            x0.repeat(n, 1, 1, 1), torch.from_numpy(latent_mask)[None].repeat(n, 1, 1).to(dev),
            torch.full((n,), precision, dtype=torch.long, device=dev), _pick(context, 0, n), _pick(context, 1, n),
            noise.to(dev), sampler, generator, progress)
        decoded = self.decode(latents.to(self.dtype)).permute(0, 2, 3, 1).cpu().numpy()
        return finish(image, mask, decoded, pred.cpu().numpy(), feather, size)


def _join(a, b, fn):
    """fn over a conditioning (a tensor, or SDXL's dict of them) and its twin, key by key."""
    if isinstance(a, dict):
        return {k: fn(a[k], None if b is None else b[k]) for k in a}
    return fn(a, b)


def _pick(context, i: int, n: int):
    """Row i of a conditioning, repeated n times."""
    return _join(context, None, lambda c, _: c[i:i + 1].repeat(n, *([1] * (c.ndim - 1))))


def predicted_region(mask_logit: torch.Tensor, user_mask: torch.Tensor, cfg: SamplerConfig) -> torch.Tensor:
    """As `smartbrush_jax.sampling.sampler.predicted_region`: threshold, dilate by a
    (2r+1)^2 square, clip to the user's mask, fall back to it when nearly empty."""
    pred = (torch.sigmoid(mask_logit.float()) > cfg.mask_threshold).to(user_mask.dtype)
    r = cfg.mask_dilate
    if r > 0:
        pred = F.max_pool2d(pred[:, None], 2 * r + 1, stride=1, padding=r)[:, 0]
    pred = pred * user_mask
    share = pred.sum(dim=(1, 2)) / user_mask.sum(dim=(1, 2)).clamp(min=1.0)
    return torch.where((share < cfg.min_predicted_fraction)[:, None, None], user_mask, pred)


def read_settings(folder: str) -> dict[str, Any]:
    """`smartbrush.json` of an exported folder, checked."""
    path = os.path.join(folder, SETTINGS_FILE)
    if not os.path.isdir(folder):
        raise PipelineError(f"{folder}: no such folder")
    if not os.path.isfile(path):
        raise PipelineError(f"{folder}: no {SETTINGS_FILE}: not a SmartBrush export (write one with smartbrush-export)")
    with open(path) as f:
        settings = json.load(f)
    if settings.get("format_version") != SETTINGS_VERSION:
        raise PipelineError(f"{path}: format_version {settings.get('format_version')!r}, expected {SETTINGS_VERSION}")
    return settings
