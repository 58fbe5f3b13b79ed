"""Building blocks shared by the U-Net, the VAE and the CLIP text encoder.

Every layer is a thin wrapper over a flax.linen layer whose parameters carry logical
axis names (see `smartbrush_jax.sharding` once it exists): dense and conv kernels are
annotated `(..., "in_features", "out_features")`, biases and norm scales
`("out_features",)` / `("norm",)`, embedding tables `("vocab", "out_features")`. The
names are data: a sharding config maps them to mesh axes (replicated by default, FSDP by
rule), so the model code never mentions a mesh.

Layout is channels-last (`[B, H, W, C]`), the natural layout for XLA on TPU and GPU.
Parameter *names* follow diffusers/transformers module names, so the weight mapping in
`smartbrush_jax.weights` is mechanical.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

DENSE_AXES = ("in_features", "out_features")
CONV_AXES = ("kernel_h", "kernel_w", "in_features", "out_features")


def _partitioned(init, axes):
    return nn.with_logical_partitioning(init, axes)


def dense(features: int, name: str, dtype: Dtype, param_dtype: Dtype, use_bias: bool = True) -> nn.Dense:
    """A Dense layer (PyTorch `nn.Linear`) with logical axis names on its parameters."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_partitioned(nn.initializers.lecun_normal(), DENSE_AXES),
        bias_init=_partitioned(nn.initializers.zeros_init(), ("out_features",)),
        name=name,
    )


def conv(
    features: int,
    kernel_size: int,
    name: str,
    dtype: Dtype,
    param_dtype: Dtype,
    stride: int = 1,
    padding: Any = "SAME_TORCH",
) -> nn.Conv:
    """A 2-D convolution on `[B, H, W, C]` (PyTorch `nn.Conv2d` with padding k//2 by default)."""
    if padding == "SAME_TORCH":
        p = kernel_size // 2
        padding = ((p, p), (p, p))
    return nn.Conv(
        features,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_partitioned(nn.initializers.lecun_normal(), CONV_AXES),
        bias_init=_partitioned(nn.initializers.zeros_init(), ("out_features",)),
        name=name,
    )


def group_norm(num_groups: int, eps: float, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.GroupNorm:
    """GroupNorm over the channel axis; statistics in float32 with the two-pass variance
    (the fast E[x^2]-E[x]^2 form costs ~1e-5 relative error against PyTorch)."""
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=_partitioned(nn.initializers.ones_init(), ("norm",)),
        bias_init=_partitioned(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def layer_norm(eps: float, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    """LayerNorm over the last axis, two-pass variance (see `group_norm`)."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=_partitioned(nn.initializers.ones_init(), ("norm",)),
        bias_init=_partitioned(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def embed(num_embeddings: int, features: int, name: str, param_dtype: Dtype, init=None) -> nn.Embed:
    """An embedding table (PyTorch `nn.Embedding`)."""
    return nn.Embed(
        num_embeddings,
        features,
        param_dtype=param_dtype,
        embedding_init=_partitioned(init or nn.initializers.normal(stddev=0.02), ("vocab", "out_features")),
        name=name,
    )


def multi_head_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    num_heads: int,
    is_causal: bool = False,
    mask: Optional[jax.Array] = None,
    implementation: Optional[str] = None,
) -> jax.Array:
    """Scaled dot-product attention through `jax.nn.dot_product_attention`.

    q: [B, Tq, C], k/v: [B, Tk, C] with C = num_heads * head_dim; mask: broadcastable to
    [B, N, Tq, Tk] bool (True = attend). Returns [B, Tq, C]. `implementation=None` lets JAX
    pick (cuDNN flash attention on GPU for bf16/fp16, XLA elsewhere); "xla" or "cudnn"
    force one.
    """
    b, tq, c = q.shape
    tk = k.shape[1]
    head_dim = c // num_heads
    q = q.reshape(b, tq, num_heads, head_dim)
    k = k.reshape(b, tk, num_heads, head_dim)
    v = v.reshape(b, tk, num_heads, head_dim)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=implementation)
    return out.reshape(b, tq, c)


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x upsampling of `[B, H, W, C]` (PyTorch `F.interpolate(scale_factor=2)`)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def activation(name: str):
    """Activation by its diffusers/transformers name. GELU is the exact (erf) form."""
    table = {
        "silu": nn.silu,
        "swish": nn.silu,
        "gelu": lambda x: nn.gelu(x, approximate=False),
        "gelu_new": lambda x: nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(table)}")
    return table[name]


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` (pre-norm, optional time-embedding add, 1x1 shortcut)."""

    out_channels: int
    num_groups: int
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(group_norm(self.num_groups, self.eps, "norm1", **kw)(x))
        h = conv(self.out_channels, 3, "conv1", **kw)(h)
        if temb is not None:
            h = h + dense(self.out_channels, "time_emb_proj", **kw)(nn.silu(temb))[:, None, None, :]
        h = nn.silu(group_norm(self.num_groups, self.eps, "norm2", **kw)(h))
        h = conv(self.out_channels, 3, "conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", **kw)(x)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. `padding=1` (U-Net) pads symmetrically; `padding=0` (VAE) pads
    one row/column at the bottom/right first, as diffusers does."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            pad = ((0, 0), (0, 0))
        else:
            pad = ((self.padding, self.padding), (self.padding, self.padding))
        return conv(self.out_channels, 3, "conv", self.dtype, self.param_dtype, stride=2, padding=pad)(x)


class Upsample2D(nn.Module):
    """Nearest 2x upsampling followed by a 3x3 conv."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return conv(self.out_channels, 3, "conv", self.dtype, self.param_dtype)(upsample_nearest_2x(x))
