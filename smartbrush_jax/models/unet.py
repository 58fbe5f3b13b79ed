"""The Stable Diffusion U-Net (diffusers `UNet2DConditionModel`) in flax.linen.

Built from a diffusers config dict (`UNetConfig.from_diffusers`), so a `unet/config.json`
from a diffusers folder describes it. SmartBrush's additions are plain config values:
`in_channels=5` (latent + mask), `out_channels=5` (noise + mask logit) and
`num_class_embeddings=S+1`, the precision-level embedding added to the time embedding
exactly as diffusers adds `class_labels`, so the model exports to a stock
`UNet2DConditionModel` called with `class_labels=s`.

Inputs and outputs are channels-last: sample `[B, H, W, C_in]`, output `[B, H, W, C_out]`.

`remat` (a key of `REMAT_POLICIES`) rematerialises every resnet block and every
transformer (`nn.remat` with a `jax.checkpoint` policy): the backward pass recomputes
their activations instead of keeping them, trading FLOPs for memory. Parameter names and
values do not change with it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from smartbrush_jax.models import attention
from smartbrush_jax.models.layers import (
    Downsample2D,
    ResnetBlock2D,
    Upsample2D,
    conv,
    dense,
    embed,
    group_norm,
    layer_norm,
    multi_head_attention,
)
from smartbrush_jax.models.unet_config import TIME_IDS, UNetConfig

Dtype = Any

# What the backward pass may keep from the forward of a rematerialised block (the rest is
# recomputed). "none": no remat, keep everything; "full": keep only the block's inputs;
# "dots_saveable": keep matmul and convolution outputs; "dots_with_no_batch_dims_saveable":
# keep the dense layers' outputs only (not convolutions, not the attention matmuls);
# "attention_saveable": keep each attention's output (before `to_out`) and the splash
# kernel's logsumexp, so the backward re-runs no attention; "dots_and_attention_saveable":
# both of the last two.
ATTENTION_OUT = "attention_out"
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attention_saveable": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT, attention.RESIDUALS),
    "dots_and_attention_saveable": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT, attention.RESIDUALS)),
}
# the policies under which the backward pass re-runs no attention forward
KEEPS_ATTENTION = ("none", "attention_saveable", "dots_and_attention_saveable")
@functools.lru_cache(maxsize=None)
def remat_class(cls: type, remat: str) -> type:
    """`cls` itself for remat "none", else `nn.remat(cls)` with that policy. The wrapped
    class takes the same `name=`, so the parameter tree is unchanged. `prevent_cse` stays
    on: without a scan around it, XLA would otherwise merge the recomputation back into
    the forward pass and keep the activations after all."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat {remat!r} is not one of {sorted(REMAT_POLICIES)}")
    if remat == "none":
        return cls
    return nn.remat(cls, policy=REMAT_POLICIES[remat], prevent_cse=True)


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> jax.Array:
    """Sinusoidal embedding of `timesteps` [B] -> [B, dim] float32 (diffusers `get_timestep_embedding`)."""
    half = dim // 2
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class CrossAttention(nn.Module):
    """diffusers `Attention` as used in the U-Net: q/k/v without bias, output with bias."""

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        context = x if context is None else context
        q = dense(c, "to_q", use_bias=False, **kw)(x)
        k = dense(c, "to_k", use_bias=False, **kw)(context)
        v = dense(c, "to_v", use_bias=False, **kw)(context)
        out = multi_head_attention(q, k, v, self.num_heads, implementation=self.attention_impl)
        return dense(c, "to_out_0", **kw)(checkpoint_name(out, ATTENTION_OUT))


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, GEGLU feed-forward; pre-LayerNorm."""

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(num_heads=self.num_heads, attention_impl=self.attention_impl, **kw)
        x = x + CrossAttention(name="attn1", **attn)(layer_norm(1e-5, "norm1", **kw)(x))
        x = x + CrossAttention(name="attn2", **attn)(layer_norm(1e-5, "norm2", **kw)(x), context)
        return x + FeedForward(name="ff", **kw)(layer_norm(1e-5, "norm3", **kw)(x))


class FeedForward(nn.Module):
    """diffusers `FeedForward` with GEGLU: `net.0.proj` to 2x4C, gate with exact GELU, `net.2` back."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        inner = c * self.mult
        h = GEGLU(inner, self.dtype, self.param_dtype, name="net_0")(x)
        return dense(c, "net_2", self.dtype, self.param_dtype)(h)


class GEGLU(nn.Module):
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = dense(2 * self.features, "proj", self.dtype, self.param_dtype)(x)
        hidden, gate = jnp.split(h, 2, axis=-1)
        return hidden * nn.gelu(gate, approximate=False)


class Transformer2DModel(nn.Module):
    """GroupNorm, projection in (1x1 conv or linear), transformer blocks, projection out, residual."""

    num_heads: int
    depth: int
    num_groups: int
    use_linear_projection: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hgt, wid, c = x.shape
        h = group_norm(self.num_groups, 1e-6, "norm", **kw)(x)
        if self.use_linear_projection:
            h = dense(c, "proj_in", **kw)(h.reshape(b, hgt * wid, c))
        else:
            h = conv(c, 1, "proj_in", **kw)(h).reshape(b, hgt * wid, c)
        for d in range(self.depth):
            h = BasicTransformerBlock(
                self.num_heads, attention_impl=self.attention_impl, name=f"transformer_blocks_{d}", **kw
            )(h, context)
        if self.use_linear_projection:
            h = dense(c, "proj_out", **kw)(h).reshape(b, hgt, wid, c)
        else:
            h = conv(c, 1, "proj_out", **kw)(h.reshape(b, hgt, wid, c))
        return h + x


class TimestepEmbedding(nn.Module):
    """Two Dense layers with SiLU between: [B, C0] -> [B, 4*C0]."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = dense(self.features, "linear_1", self.dtype, self.param_dtype)(x)
        return dense(self.features, "linear_2", self.dtype, self.param_dtype)(nn.silu(x))


@dataclasses.dataclass(frozen=True)
class _BlockSpec:
    """What one down/up/mid block needs to know besides its input."""

    out_channels: int
    num_layers: int
    attention: bool
    resample: bool
    num_heads: int
    depth: int
    groups: int
    eps: float
    use_linear_projection: bool


class _Block(nn.Module):
    """Shared body of diffusers' (CrossAttn)DownBlock2D and (CrossAttn)UpBlock2D:
    `num_layers` x [resnet, optional transformer], then an optional resampler. Up blocks
    concatenate one skip connection before each resnet."""

    spec: _BlockSpec
    up: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None
    remat: str = "none"

    @nn.compact
    def __call__(self, h, temb, context, skips=()):
        sp, kw = self.spec, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet, transformer = remat_class(ResnetBlock2D, self.remat), remat_class(Transformer2DModel, self.remat)
        skips, outputs = list(skips), []
        for j in range(sp.num_layers):
            if self.up:
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = resnet(sp.out_channels, sp.groups, sp.eps, name=f"resnets_{j}", **kw)(h, temb)
            if sp.attention:
                h = transformer(
                    sp.num_heads, sp.depth, sp.groups, sp.use_linear_projection,
                    attention_impl=self.attention_impl, name=f"attentions_{j}", **kw,
                )(h, context)
            outputs.append(h)
        if sp.resample and self.up:
            h = Upsample2D(sp.out_channels, name="upsamplers_0", **kw)(h)
        elif sp.resample:
            h = Downsample2D(sp.out_channels, padding=1, name="downsamplers_0", **kw)(h)
            outputs.append(h)
        return h, outputs


class _MidBlock(nn.Module):
    """diffusers `UNetMidBlock2DCrossAttn`: resnet, transformer, resnet."""

    spec: _BlockSpec
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None
    remat: str = "none"

    @nn.compact
    def __call__(self, h, temb, context):
        sp, kw = self.spec, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet, transformer = remat_class(ResnetBlock2D, self.remat), remat_class(Transformer2DModel, self.remat)
        h = resnet(sp.out_channels, sp.groups, sp.eps, name="resnets_0", **kw)(h, temb)
        h = transformer(
            sp.num_heads, sp.depth, sp.groups, sp.use_linear_projection,
            attention_impl=self.attention_impl, name="attentions_0", **kw,
        )(h, context)
        return resnet(sp.out_channels, sp.groups, sp.eps, name="resnets_1", **kw)(h, temb)


class UNet2DConditionModel(nn.Module):
    """The conditional U-Net. `__call__(sample [B,H,W,Cin], timesteps [B] or scalar,
    encoder_hidden_states [B,T,D], class_labels [B] int or None) -> [B,H,W,Cout]`.

    `class_labels` carries SmartBrush's precision level `s`; it is required when the
    config has `num_class_embeddings` (as in diffusers). An SDXL U-Net
    (`addition_embed_type="text_time"`) also takes `text_embeds` [B, pooled_text_dim] and
    `time_ids` [B, 6] (diffusers' `added_cond_kwargs`). `dtype` is the compute dtype
    (bf16 for training), `param_dtype` the storage dtype (fp32 master weights). `remat`:
    a key of `REMAT_POLICIES` (the module docstring).
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None
    remat: str = "none"

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: Union[jax.Array, int, float],
        encoder_hidden_states: jax.Array,
        class_labels: Optional[jax.Array] = None,
        text_embeds: Optional[jax.Array] = None,
        time_ids: Optional[jax.Array] = None,
    ) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        blk = dict(attention_impl=self.attention_impl, remat=self.remat, **kw)
        n_blocks = len(cfg.block_out_channels)

        # -- time embedding, plus the precision-level embedding (diffusers `class_labels`)
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
        t_proj = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb_dim = cfg.block_out_channels[0] * 4
        temb = TimestepEmbedding(temb_dim, name="time_embedding", **kw)(t_proj.astype(self.dtype))
        if cfg.num_class_embeddings is not None:
            if class_labels is None:
                raise ValueError("this U-Net has num_class_embeddings: pass class_labels (the precision level)")
            table = embed(cfg.num_class_embeddings, temb_dim, "class_embedding", self.param_dtype)
            temb = temb + table(jnp.asarray(class_labels, jnp.int32)).astype(temb.dtype)
        if cfg.micro_conditioning:
            if text_embeds is None or time_ids is None:
                raise ValueError("an SDXL U-Net (addition_embed_type='text_time') needs text_embeds (the pooled "
                                 "text embedding) and time_ids (original size, crop top-left, target size)")
            b = sample.shape[0]
            ids = jnp.broadcast_to(jnp.asarray(time_ids, jnp.float32), (b, TIME_IDS)).reshape(-1)
            t_ids = timestep_embedding(ids, cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
            added = jnp.concatenate([jnp.asarray(text_embeds, jnp.float32).reshape(b, -1), t_ids.reshape(b, -1)], -1)
            temb = temb + TimestepEmbedding(temb_dim, name="add_embedding", **kw)(added.astype(self.dtype))
        context = encoder_hidden_states.astype(self.dtype)

        def spec(i: int, ch: Tuple[int, ...], heads, depth, num_layers, attention, resample):
            return _BlockSpec(ch[i], num_layers, attention, resample, heads[i], depth[i],
                              cfg.norm_num_groups, cfg.norm_eps, cfg.use_linear_projection)

        # -- down path; every intermediate state is a skip connection for the up path
        h = conv(cfg.block_out_channels[0], 3, "conv_in", **kw)(sample.astype(self.dtype))
        skips = [h]
        for i, block_type in enumerate(cfg.down_block_types):
            s = spec(i, cfg.block_out_channels, cfg.num_heads, cfg.transformer_layers_per_block,
                     cfg.layers_per_block, block_type == "CrossAttnDownBlock2D", i < n_blocks - 1)
            h, outs = _Block(s, up=False, name=f"down_blocks_{i}", **blk)(h, temb, context)
            skips.extend(outs)

        s = spec(-1, cfg.block_out_channels, cfg.num_heads, cfg.transformer_layers_per_block, 1, True, False)
        h = _MidBlock(s, name="mid_block", **blk)(h, temb, context)

        # -- up path: each block consumes layers_per_block + 1 skips, last first
        rev = lambda xs: tuple(xs[::-1])  # noqa: E731
        for i, block_type in enumerate(cfg.up_block_types):
            s = spec(i, rev(cfg.block_out_channels), rev(cfg.num_heads), rev(cfg.transformer_layers_per_block),
                     cfg.layers_per_block + 1, block_type == "CrossAttnUpBlock2D", i < n_blocks - 1)
            n_skip = cfg.layers_per_block + 1
            mine, skips = skips[-n_skip:], skips[:-n_skip]
            h, _ = _Block(s, up=True, name=f"up_blocks_{i}", **blk)(h, temb, context, mine)

        h = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, "conv_norm_out", **kw)(h))
        return conv(cfg.out_channels, 3, "conv_out", **kw)(h)
