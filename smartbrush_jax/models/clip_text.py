"""The CLIP text transformer (transformers `CLIPTextModel`) in flax.linen.

`__call__(input_ids [B,T] int32) -> (last_hidden_state [B,T,D], pooled [B,D])`. Stable
Diffusion v1 conditions on `last_hidden_state` of CLIP ViT-L/14 (77 tokens, D=768, causal
mask, final LayerNorm applied); SD 2.x on that of OpenCLIP ViT-H as diffusers ships it (a
`CLIPTextModel` of 23 layers, gelu). SDXL conditions on the penultimate layer's hidden
states of two encoders (`penultimate=True`) and on the pooled output of the second,
projected (`CLIPTextModelWithProjection`: `projection_dim` set, `pooled` is its
`text_embeds`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from smartbrush_jax.models.layers import activation, dense, embed, layer_norm, multi_head_attention

Dtype = Any


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The architecture fields of a transformers `CLIPTextConfig` (defaults: SD v1's ViT-L/14)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    bos_token_id: int = 49406
    pad_token_id: int = 1
    projection_dim: Optional[int] = None  # CLIPTextModelWithProjection (SDXL's second encoder)

    @classmethod
    def from_transformers(cls, cfg: dict) -> "CLIPTextConfig":
        if "text_config" in cfg:  # a full CLIPConfig
            cfg = cfg["text_config"]
        activation(cfg.get("hidden_act", "quick_gelu"))  # validates the name
        fields = {f.name for f in dataclasses.fields(cls)} - {"projection_dim"}
        kwargs = {k: cfg[k] for k in fields if k in cfg and cfg[k] is not None}
        if "CLIPTextModelWithProjection" in (cfg.get("architectures") or ()):
            kwargs["projection_dim"] = int(cfg.get("projection_dim") or 512)  # transformers' default
        out = cls(**kwargs)
        if out.hidden_size % out.num_attention_heads:
            raise ValueError(f"CLIP config: hidden_size {out.hidden_size} not divisible by "
                             f"num_attention_heads {out.num_attention_heads}")
        return out

    def to_transformers(self) -> dict:
        d = dataclasses.asdict(self)
        arch = "CLIPTextModelWithProjection" if self.projection_dim else "CLIPTextModel"
        if not self.projection_dim:
            del d["projection_dim"]
        d.update({"architectures": [arch], "model_type": "clip_text_model"})
        return d


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections."""

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = x.shape[-1]
        q, k, v = (dense(d, name, **kw)(x) for name in ("q_proj", "k_proj", "v_proj"))
        out = multi_head_attention(q, k, v, self.num_heads, mask=mask, implementation=self.attention_impl)
        return dense(d, "out_proj", **kw)(out)


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = activation(cfg.hidden_act)(dense(cfg.intermediate_size, "fc1", **kw)(x))
        return dense(cfg.hidden_size, "fc2", **kw)(h)


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layer_norm(cfg.layer_norm_eps, "layer_norm1", **kw)(x)
        x = x + CLIPAttention(cfg.num_attention_heads, attention_impl=self.attention_impl, name="self_attn", **kw)(
            h, mask
        )
        h = layer_norm(cfg.layer_norm_eps, "layer_norm2", **kw)(x)
        return x + CLIPMLP(cfg, name="mlp", **kw)(h)


class CLIPEmbeddings(nn.Module):
    config: CLIPTextConfig
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        tok = embed(cfg.vocab_size, cfg.hidden_size, "token_embedding", self.param_dtype)(input_ids)
        pos = embed(cfg.max_position_embeddings, cfg.hidden_size, "position_embedding", self.param_dtype)(
            jnp.arange(input_ids.shape[1])
        )
        return tok + pos[None]


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array):
        """(the last layer's output, the one before it: `hidden_states[-2]` of transformers)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl)
        before = x
        for i in range(self.config.num_hidden_layers):
            before, x = x, CLIPEncoderLayer(self.config, name=f"layers_{i}", **kw)(x, mask)
        return x, before


class CLIPTextModel(nn.Module):
    """`__call__(input_ids [B,T] int, attention_mask [B,T] or None) -> (last_hidden_state
    [B,T,D], pooled [B,D] (projected to [B,projection_dim] with a projection))`, plus the
    penultimate layer's hidden states [B,T,D] with `penultimate=True`. Parameter names
    follow transformers >= 5 (`embeddings.*`, `encoder.layers.N.*`, `final_layer_norm.*`,
    `text_projection`); older files' `text_model.` prefix is stripped on import."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None, penultimate: bool = False):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        input_ids = jnp.asarray(input_ids, jnp.int32)
        b, t = input_ids.shape
        if t > cfg.max_position_embeddings:
            raise ValueError(f"CLIP text encoder: {t} tokens exceed "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        x = CLIPEmbeddings(cfg, self.param_dtype, name="embeddings")(input_ids).astype(self.dtype)
        # causal mask, combined with the optional padding mask: [B, 1, T, T] bool (True = attend)
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        mask = jnp.broadcast_to(mask, (b, 1, t, t))
        x, before = CLIPEncoder(cfg, attention_impl=self.attention_impl, name="encoder", **kw)(x, mask)
        x = layer_norm(cfg.layer_norm_eps, "final_layer_norm", **kw)(x)
        pooled = x[jnp.arange(b), _eos_position(input_ids, cfg.eos_token_id)]
        if cfg.projection_dim:
            pooled = dense(cfg.projection_dim, "text_projection", use_bias=False, **kw)(pooled)
        return (x, pooled, before) if penultimate else (x, pooled)


def _eos_position(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Where the pooled output is read: the first EOS token (transformers' rule; legacy
    configs with eos_token_id == 2 take the highest token id instead)."""
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)
