"""The knobs of SmartBrush sampling, shared by the JAX sampler (`diffusion.sample`) and the
PyTorch pipeline (`pytorch.SmartBrushPipeline`): no JAX or torch imports here."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Every knob of SmartBrush sampling (each is a CLI flag of `inpaint`)."""

    num_steps: int = 50
    guidance_scale: float = 7.5
    eta: float = 0.0
    use_predicted_mask: bool = True
    mask_warmup: float = 0.3  # fraction of steps that regenerate the whole user mask
    mask_threshold: float = 0.5  # on sigmoid(mask logit)
    mask_dilate: int = 1  # latent cells added around the predicted mask
    min_predicted_fraction: float = 0.02  # below this share of the user mask, keep the user mask

    def __post_init__(self):
        if not 0.0 <= self.mask_warmup <= 1.0:
            raise ValueError(f"mask_warmup must be in [0, 1], got {self.mask_warmup}")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ValueError(f"mask_threshold must be in (0, 1), got {self.mask_threshold}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
