"""Building blocks shared by the U-Net, the VAE and the CLIP text encoder.

Every layer is a thin wrapper over a flax.linen layer whose parameters carry logical
axis names (see `smartbrush_jax.train.sharding` once it exists): dense and conv kernels are
annotated `(..., "in_features", "out_features")`, biases and norm scales
`("out_features",)` / `("norm",)`, embedding tables `("vocab", "out_features")`. The
names are data: a sharding config maps them to mesh axes (replicated by default, FSDP by
rule), so the model code never mentions a mesh.

Layout is channels-last (`[B, H, W, C]`), the natural layout for XLA on TPU and GPU.
Parameter *names* follow diffusers/transformers module names, so the weight mapping in
`smartbrush_jax.interop.weights` is mechanical.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from smartbrush_jax.models import attention

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


# Target size of one [B, N, chunk, Tk] float32 score block in the "chunked" attention:
# small enough to stay in the last-level cache of a CPU core (see bench/CPU_PROFILE.md).
CHUNK_SCORE_BYTES = 4 << 20


def multi_head_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    num_heads: int,
    is_causal: bool = False,
    mask: Optional[jax.Array] = None,
    implementation: Optional[str] = None,
) -> jax.Array:
    """Scaled dot-product attention.

    q: [B, Tq, C], k/v: [B, Tk, C] with C = num_heads * head_dim; mask: broadcastable to
    [B, N, Tq, Tk] bool (True = attend). Returns [B, Tq, C]. `implementation` is one of
    `attention.IMPLEMENTATIONS` (None = "auto"); `attention.choose` picks the kernel of this
    call from it, the shapes and the platform (splash and cuDNN only where they apply, XLA
    otherwise; a masked or causal call never goes to splash). "chunked" is our
    query-blocked attention with a flash-style backward (`chunked_attention`): the fast
    choice on CPU, where XLA otherwise materialises and re-reads the [B, N, Tq, Tk]
    probabilities.
    """
    b, tq, c = q.shape
    tk = k.shape[1]
    head_dim = c // num_heads
    plain = mask is None and not is_causal
    impl = attention.choose(implementation, tq, tk, head_dim, q.dtype, self_attention=plain and tq == tk)
    q = q.reshape(b, tq, num_heads, head_dim)
    k = k.reshape(b, tk, num_heads, head_dim)
    v = v.reshape(b, tk, num_heads, head_dim)
    if impl == "chunked":
        out = chunked_attention(q, k, v, mask=mask, is_causal=is_causal)
    elif impl == "splash":
        out = attention.splash_attention(q, k, v)
    else:
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=impl)
    return out.reshape(b, tq, c)


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Optional[jax.Array] = None,
    is_causal: bool = False,
    query_chunk: Optional[int] = None,
) -> jax.Array:
    """`jax.nn.dot_product_attention` semantics ([B, T, N, H] in and out, softmax in float32,
    masked logits set to -0.7 * finfo.max) computed one block of queries at a time.

    Forward: for each block of `query_chunk` queries, scores, a fused max/exp/sum and the
    value product, keeping only the output and the row max and 1/sum. Backward (custom
    VJP): recomputes each block's probabilities from those row statistics and accumulates
    dK/dV. Peak memory is one [B, N, chunk, Tk] block instead of the full score tensor,
    and each block stays in cache. `query_chunk=None` sizes blocks to `CHUNK_SCORE_BYTES`.
    """
    b, tq, n, h = q.shape
    tk = k.shape[1]
    if query_chunk is None:
        query_chunk = max(8, CHUNK_SCORE_BYTES // (4 * b * n * tk))
    qc = min(tq, query_chunk)
    n_chunks = -(-tq // qc)
    pad = n_chunks * qc - tq
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if is_causal:
        causal = jnp.tril(jnp.ones((tq, tk), dtype=bool))[None, None]
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    # [B, T, N, H] -> [B, N, T, H]; queries padded to a whole number of chunks.
    qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    if pad:
        qt = jnp.pad(qt, ((0, 0), (0, 0), (0, pad), (0, 0)))
    if mask is not None and mask.shape[2] != 1 and n_chunks > 1:
        if pad:
            mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True)
        # [mb, mn, n_chunks * qc, mk] -> [n_chunks, mb, mn, qc, mk]
        mask = jnp.moveaxis(mask.reshape(mask.shape[:2] + (n_chunks, qc, mask.shape[3])), 2, 0)
        mask_chunked = True
    else:
        mask_chunked = False
    out = _chunked_attention_core(qt, kt, vt, mask, n_chunks, mask_chunked)
    if pad:
        out = out[:, :, :tq]
    return out.transpose(0, 2, 1, 3)


def _attention_block(qb, k, mask_b, scale):
    """float32 logits of one query block [B, N, qc, H] against all keys, masked."""
    s = jnp.einsum("bnqh,bnkh->bnqk", qb, k, preferred_element_type=jnp.float32) * jnp.float32(scale)
    if mask_b is not None:
        s = jnp.where(mask_b, s, jnp.float32(-0.7 * jnp.finfo(jnp.float32).max))
    return s


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_attention_core(q, k, v, mask, n_chunks, mask_chunked):
    return _chunked_attention_fwd(q, k, v, mask, n_chunks, mask_chunked)[0]


def _split_chunks(x, n_chunks):
    """[B, N, n_chunks * qc, ...] -> [n_chunks, B, N, qc, ...]."""
    return jnp.moveaxis(x.reshape(x.shape[:2] + (n_chunks, -1) + x.shape[3:]), 2, 0)


def _merge_chunks(x):
    """[n_chunks, B, N, qc, ...] -> [B, N, n_chunks * qc, ...]."""
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])


def _chunked_attention_fwd(q, k, v, mask, n_chunks, mask_chunked):
    scale = 1.0 / float(q.shape[-1]) ** 0.5

    def block(xs):
        qb, mb = xs
        s = _attention_block(qb, k, mb, scale)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bnqk,bnkh->bnqh", p.astype(v.dtype), v, preferred_element_type=jnp.float32) / denom
        # max and 1/sum kept apart: m + log(sum) would round to m for fully masked rows
        return o.astype(q.dtype), (m[..., 0], 1.0 / denom[..., 0])

    if n_chunks == 1:
        out, stats = block((q, mask))
    else:
        qs = _split_chunks(q, n_chunks)
        if mask is None or mask_chunked:
            out, stats = jax.lax.map(block, (qs, mask))
        else:
            out, stats = jax.lax.map(lambda qb: block((qb, mask)), qs)
        out, stats = _merge_chunks(out), tuple(_merge_chunks(x) for x in stats)
    return out, (q, k, v, mask, out, stats)


def _chunked_attention_bwd(n_chunks, mask_chunked, res, dout):
    q, k, v, mask, out, (m, inv_l) = res
    scale = 1.0 / float(q.shape[-1]) ** 0.5
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

    # dK and dV sum over each block's queries. On CPU they are accumulated as [B, N, H, Tk],
    # the key axis minor as in the score block: XLA:CPU then runs each as one plain matmul
    # with the small operand transposed, where [B, N, Tk, H] took a strided path (the tiny
    # step's attention backward: 399 -> 239 ms at 1024 tokens, bench/CPU_PROFILE.md). Other
    # platforms keep [B, N, Tk, H]: their layout pass chooses for itself, and their
    # committed compiles were made with it.
    keys_minor = attention.platform() == "cpu"

    def grad_kv(x, blk):  # sum over the block's queries of x (a score block) times blk
        if keys_minor:
            return jnp.einsum("bnqh,bnqk->bnhk", blk, x, preferred_element_type=jnp.float32)
        return jnp.einsum("bnqk,bnqh->bnkh", x, blk, preferred_element_type=jnp.float32)

    def block(carry, xs):
        dk, dv = carry
        qb, dob, mrow, il, db, mb = xs
        s = _attention_block(qb, k, mb, scale)
        p = jnp.exp(s - mrow[..., None]) * il[..., None]
        dv = dv + grad_kv(p.astype(dob.dtype), dob)
        dp = jnp.einsum("bnqh,bnkh->bnqk", dob, v, preferred_element_type=jnp.float32)
        ds = p * (dp - db[..., None]) * jnp.float32(scale)
        if mb is not None:  # masked logits are constants: no gradient (matters for fully masked rows)
            ds = jnp.where(mb, ds, jnp.float32(0))
        ds = ds.astype(q.dtype)
        dqb = jnp.einsum("bnqk,bnkh->bnqh", ds, k, preferred_element_type=jnp.float32)
        dk = dk + grad_kv(ds, qb)
        return (dk, dv), dqb.astype(q.dtype)

    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    if keys_minor:
        zeros = tuple(jnp.swapaxes(z, 2, 3) for z in zeros)
    if n_chunks == 1:
        (dk, dv), dq = block(zeros, (q, dout, m, inv_l, delta, mask))
    else:
        xs = tuple(_split_chunks(x, n_chunks) for x in (q, dout, m, inv_l, delta))
        if mask is None or mask_chunked:
            (dk, dv), dq = jax.lax.scan(block, zeros, xs + (mask,))
        else:
            (dk, dv), dq = jax.lax.scan(lambda c, x: block(c, x + (mask,)), zeros, xs)
        dq = _merge_chunks(dq)
    if keys_minor:
        dk, dv = jnp.swapaxes(dk, 2, 3), jnp.swapaxes(dv, 2, 3)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_chunked_attention_core.defvjp(_chunked_attention_fwd, _chunked_attention_bwd)


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
