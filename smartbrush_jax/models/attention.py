"""Which attention kernel runs where: `config.model.attention` and the Pallas splash path.

    auto     TPU: splash for self-attention of >= `splash_min_tokens` tokens, XLA otherwise;
             GPU: cuDNN flash attention where it takes the head dim and dtype, XLA otherwise;
             CPU: our query-chunked attention (`layers.chunked_attention`)
    xla      `jax.nn.dot_product_attention(implementation="xla")`: the scores materialised
    chunked  `layers.chunked_attention`: query blocks, flash-style backward
    splash   Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`)
             in `jax.shard_map` over the mesh's batch axes (heads over `tensor`), for the
             self-attention levels of >= `config.model.splash_min_tokens` tokens (default
             `SPLASH_MIN_TOKENS`); cross-attention (77
             text tokens: not a multiple of the kernel's 128-token blocks) stays on XLA.
             Off a TPU the kernel runs in Pallas interpret mode (slow; for tests).
    cudnn    `jax.nn.dot_product_attention(implementation="cudnn")` for self-attention where
             the head dim (<= 128, a multiple of 8) and dtype (bf16/fp16) allow, XLA otherwise

The mesh the step runs on is given by `mesh_scope(mesh)` around the traced function (the
trainer's step does it); without one, splash runs per device (one shard).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ("auto", "xla", "chunked", "splash", "cudnn")
# Self-attention levels of SD at 512 px have 4096, 1024, 256 and 64 tokens. Chosen from
# v5p-128 compiles of the tpu_v5p step (16 per chip, remat none; bench/SCALING.md, "Where
# splash pays"): from 256 tokens 203 ms and 30.4 GiB, from 1024 the same, from 4096 only
# 210 ms and 33.8 GiB. 1024 is the smallest level where the kernel is not a tie.
SPLASH_MIN_TOKENS = 1024
SPLASH_BLOCK = 512  # query and key block; fewer grid steps than the kernel's default 128
RESIDUALS = "splash_residuals"  # the kernel's saved logsumexp, by name for remat policies

# what "auto" means on each platform (jax names GPUs "gpu"; a deviceless CUDA topology "cuda")
AUTO = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}
GPU_PLATFORMS = ("gpu", "cuda")

_scope = threading.local()


@contextlib.contextmanager
def mesh_scope(mesh, splash_min_tokens: Optional[int] = None):
    """Trace the model for `mesh`: splash shards its kernel over this mesh's batch axes, and
    runs for self-attention of >= `splash_min_tokens` tokens (`config.model.splash_min_tokens`;
    None: `SPLASH_MIN_TOKENS`)."""
    prev = getattr(_scope, "mesh", None), getattr(_scope, "min_tokens", None)
    _scope.mesh, _scope.min_tokens = mesh, splash_min_tokens
    try:
        yield
    finally:
        _scope.mesh, _scope.min_tokens = prev


def current_mesh():
    return getattr(_scope, "mesh", None)


def min_tokens() -> int:
    return getattr(_scope, "min_tokens", None) or SPLASH_MIN_TOKENS


def platform() -> str:
    """The platform the traced program is for: the scoped mesh's devices, else JAX's default
    backend (an ahead-of-time compile for TPU on a CPU host sees the TPU mesh)."""
    mesh = current_mesh()
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def choose(implementation: Optional[str], tq: int, tk: int, head_dim: int, dtype, self_attention: bool) -> str:
    """The kernel one attention call gets: "xla", "chunked", "splash" or "cudnn"."""
    impl = implementation or "auto"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}; one of {IMPLEMENTATIONS}")
    if impl == "auto":
        impl = AUTO.get(platform(), "chunked")
    if impl == "splash":
        ok = self_attention and tq >= min_tokens() and tq % 128 == 0 and tk % 128 == 0
        return "splash" if ok else "xla"
    if impl == "cudnn":
        # self-attention only: cuDNN's training kernel refuses 77 keys (odd lengths); head dims
        # <= 128 (Hopper takes 256, but jax checks the host's backend in a deviceless compile)
        ok = self_attention and head_dim <= 128 and head_dim % 8 == 0 and tq % 2 == 0 and \
            jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        return "cudnn" if ok and platform() in GPU_PLATFORMS else "xla"
    return impl


def describe(implementation: Optional[str], platform_name: str, splash_min_tokens: Optional[int] = None) -> str:
    """One line for a run's start-up report: what `implementation` means on `platform_name`."""
    threshold = splash_min_tokens or SPLASH_MIN_TOKENS
    impl = implementation or "auto"
    if impl == "auto":
        impl = AUTO.get(platform_name, "chunked")
        head = f"auto on {platform_name}: "
    else:
        head = ""
    if impl == "splash":
        return head + (f"splash (Pallas) for self-attention of >= {threshold} tokens, XLA for the rest"
                       + ("" if platform_name == "tpu" else "; interpret mode off a TPU"))
    if impl == "cudnn":
        if platform_name not in GPU_PLATFORMS:
            return head + f"cudnn asked for, but {platform_name} has no cuDNN: XLA"
        return head + ("cuDNN flash attention for self-attention where the head dim (<= 128) and dtype (bf16/fp16) "
                       "allow, XLA otherwise")
    return head + {"xla": "XLA (scores materialised)", "chunked": "chunked (query blocks, flash-style backward)"}[impl]


def splash_block(tokens: int) -> int:
    """The kernel's block along a sequence of `tokens` (a multiple of 128): the largest
    multiple of 128 up to SPLASH_BLOCK that divides it (SD 2.x at 768 px has 48 x 48 = 2304
    tokens, which 512 does not divide; 384 does)."""
    block = min(SPLASH_BLOCK, tokens)
    while tokens % block:
        block -= 128
    return block


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, tq: int, tk: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    bq, bk = splash_block(tq), splash_block(tk)
    # the fused backward: one kernel forms dQ, dK and dV from one recomputation of the scores
    # (5 matmuls where separate dQ and dK/dV kernels take 7)
    blocks = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                           block_kv_dkv_compute=bk, use_fused_bwd_kernel=True)
    mask = sa.MultiHeadMask([sa.FullMask((tq, tk))] * heads)
    with jax.ensure_compile_time_eval():  # its block tables are constants, not tracers of the first trace
        return sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                  residual_checkpoint_name=RESIDUALS, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """`jax.nn.dot_product_attention` ([B, T, N, H] in and out, scale 1/sqrt(H), no mask)
    through the splash kernel, sharded over the scoped mesh's batch axes."""
    b, tq, n, h = q.shape
    scale = 1.0 / math.sqrt(h)
    mesh = current_mesh()
    interpret = platform() != "tpu"

    def local(q, k, v):  # [b, T, n, H] on one shard
        kern = _kernel(q.shape[2], q.shape[1], k.shape[1], interpret)
        qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q * jnp.asarray(scale, q.dtype), k, v))
        return jax.vmap(kern)(qt, kt, vt).transpose(0, 2, 1, 3).astype(q.dtype)

    if mesh is None or mesh.size == 1:
        return local(q, k, v)
    batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape and mesh.shape[a] > 1)
    shards = int(np.prod([mesh.shape[a] for a in batch_axes])) if batch_axes else 1
    if b % shards:
        raise ValueError(f"splash attention: batch {b} does not split over the mesh's {batch_axes} ({shards} ways)")
    tensor = "tensor" if mesh.shape.get("tensor", 1) > 1 and n % mesh.shape["tensor"] == 0 else None
    spec = P(batch_axes or None, None, tensor, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)
