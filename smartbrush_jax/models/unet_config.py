"""The architecture of the Stable Diffusion U-Net as a config: the fields of a diffusers
`UNet2DConditionModel` config.json this port implements (`UNetConfig.from_diffusers` refuses
the others, loudly), and their way back (`to_diffusers`). The modules are in `unet.py`."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
TIME_IDS = 6  # SDXL's micro-conditioning: original (h, w), crop top-left (y, x), target (h, w)
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers options this port implements only at their default value: a config that
# changes one of them describes another architecture, and loading it must fail loudly.
_FIXED_OPTIONS = {
    "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "dual_cross_attention": False,
    "class_embed_type": None,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_cond_proj_dim": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "reverse_transformer_layers_per_block": None,
    "attention_type": "default",
}


def _per_block(value, n: int, name: str) -> Tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNet config: {name} has {len(value)} entries, expected {n} (one per block)")
        return tuple(int(v) for v in value)
    return (int(value),) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The architecture fields of a diffusers `UNet2DConditionModel` config."""

    in_channels: int = 4
    out_channels: int = 4
    down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: Tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    num_heads: Tuple[int, ...] = (8, 8, 8, 8)
    transformer_layers_per_block: Tuple[int, ...] = (1, 1, 1, 1)
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    num_class_embeddings: Optional[int] = None
    sample_size: int = 64
    # SDXL's micro-conditioning ("text_time"): the pooled text embedding and the six size
    # and crop numbers (each embedded sinusoidally in `addition_time_embed_dim`), through a
    # TimestepEmbedding of `projection_class_embeddings_input_dim` inputs, added to temb
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None

    @property
    def micro_conditioning(self) -> bool:
        return self.addition_embed_type == "text_time"

    @property
    def pooled_text_dim(self) -> Optional[int]:
        """The pooled text embedding's width the "text_time" embedding takes (SDXL: 1280)."""
        if not self.micro_conditioning:
            return None
        return self.projection_class_embeddings_input_dim - TIME_IDS * self.addition_time_embed_dim

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "UNetConfig":
        """Validate and convert a diffusers `UNet2DConditionModel` config dict."""
        for key, default in _FIXED_OPTIONS.items():
            if cfg.get(key, default) != default:
                raise ValueError(f"UNet config: {key}={cfg[key]!r} is not supported (only {default!r})")
        down = tuple(cfg.get("down_block_types", cls.down_block_types))
        up = tuple(cfg.get("up_block_types", cls.up_block_types))
        for t in down:
            if t not in _DOWN_TYPES:
                raise ValueError(f"UNet config: down block type {t!r} is not supported ({_DOWN_TYPES})")
        for t in up:
            if t not in _UP_TYPES:
                raise ValueError(f"UNet config: up block type {t!r} is not supported ({_UP_TYPES})")
        n = len(down)
        boc = tuple(int(c) for c in cfg.get("block_out_channels", cls.block_out_channels))
        if len(boc) != n or len(up) != n:
            raise ValueError("UNet config: block_out_channels, down_block_types and up_block_types differ in length")
        lpb = cfg.get("layers_per_block", 2)
        if isinstance(lpb, (list, tuple)):
            raise ValueError("UNet config: per-block layers_per_block is not supported")
        # diffusers quirk: `attention_head_dim` is the number of heads unless
        # `num_attention_heads` is given (SD 2.x relies on it).
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        cross = cfg.get("cross_attention_dim", 768)
        if isinstance(cross, (list, tuple)):
            raise ValueError("UNet config: per-block cross_attention_dim is not supported")
        num_heads = _per_block(heads, n, "attention_head_dim")
        for c, h in zip(boc, num_heads):
            if c % h:
                raise ValueError(f"UNet config: {c} channels do not split into {h} attention heads")
        extra = cfg.get("addition_embed_type")
        if extra not in (None, "text_time"):
            raise ValueError(f"UNet config: addition_embed_type={extra!r} is not supported (None or 'text_time')")
        time_dim, proj_dim = cfg.get("addition_time_embed_dim"), cfg.get("projection_class_embeddings_input_dim")
        if extra == "text_time" and (not time_dim or not proj_dim or proj_dim <= TIME_IDS * time_dim):
            raise ValueError("UNet config: addition_embed_type='text_time' needs addition_time_embed_dim and a "
                             f"projection_class_embeddings_input_dim above {TIME_IDS} x it (the pooled text's width "
                             f"plus the {TIME_IDS} time ids), got {time_dim} and {proj_dim}")
        if extra is None and proj_dim is not None:
            raise ValueError("UNet config: projection_class_embeddings_input_dim without addition_embed_type")
        groups = int(cfg.get("norm_num_groups", 32))
        for c in boc:
            if c % groups:
                raise ValueError(f"UNet config: {c} channels are not divisible by norm_num_groups={groups}")
        return cls(
            in_channels=int(cfg.get("in_channels", 4)),
            out_channels=int(cfg.get("out_channels", 4)),
            down_block_types=down,
            up_block_types=up,
            block_out_channels=boc,
            layers_per_block=int(lpb),
            num_heads=num_heads,
            transformer_layers_per_block=_per_block(
                cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block"),
            cross_attention_dim=int(cross),
            norm_num_groups=groups,
            norm_eps=float(cfg.get("norm_eps", 1e-5)),
            use_linear_projection=bool(cfg.get("use_linear_projection", False)),
            flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
            freq_shift=int(cfg.get("freq_shift", 0)),
            num_class_embeddings=cfg.get("num_class_embeds"),
            sample_size=int(cfg.get("sample_size") or 64),
            addition_embed_type=extra,
            addition_time_embed_dim=int(time_dim) if extra else None,
            projection_class_embeddings_input_dim=int(proj_dim) if extra else None,
        )

    def to_diffusers(self) -> dict:
        """The diffusers config dict that rebuilds this architecture in PyTorch."""
        return {
            "_class_name": "UNet2DConditionModel",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": list(self.down_block_types),
            "up_block_types": list(self.up_block_types),
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "attention_head_dim": list(self.num_heads),
            "transformer_layers_per_block": list(self.transformer_layers_per_block),
            "cross_attention_dim": self.cross_attention_dim,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "use_linear_projection": self.use_linear_projection,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "num_class_embeds": self.num_class_embeddings,
            "sample_size": self.sample_size,
            **({"addition_embed_type": self.addition_embed_type,
                "addition_time_embed_dim": self.addition_time_embed_dim,
                "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim}
               if self.micro_conditioning else {}),
            "act_fn": "silu",
            "center_input_sample": False,
            "downsample_padding": 1,
            "mid_block_scale_factor": 1,
        }
