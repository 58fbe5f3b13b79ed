"""`config.model.attention`: the splash kernel (Pallas, interpret mode on this CPU) equals
XLA's attention (values and gradients, float32) at SD's head dims, alone and in `shard_map`
over a mesh; each call goes to the kernel `attention.choose` names. (The chunked attention's
parity: tests/test_models.py; the remat policies': tests/test_remat.py.)"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smartbrush_jax.models import attention
from smartbrush_jax.models.layers import multi_head_attention

pytestmark = pytest.mark.timeout(600)
HERE = os.path.dirname(os.path.abspath(__file__))


def _qkv(b, t, heads, head_dim, seed=0):
    r = np.random.default_rng(seed)
    c = heads * head_dim
    return tuple(jnp.asarray(r.standard_normal((b, t, c)), jnp.float32) for _ in range(3))


def _value_and_grads(impl, q, k, v, heads):
    w = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape), jnp.float32)

    def loss(q, k, v):  # a weighted sum: every output element has its own cotangent
        return jnp.sum(multi_head_attention(q, k, v, heads, implementation=impl) * w)

    out = multi_head_attention(q, k, v, heads, implementation=impl)
    return out, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _uses(impl, q, k, v, heads) -> set:
    """The primitives of one call's jaxpr that tell the kernels apart."""
    text = str(jax.make_jaxpr(lambda q, k, v: multi_head_attention(q, k, v, heads, implementation=impl))(q, k, v))
    return {p for p in ("pallas_call", "dot_product_attention", "while", "custom_vjp") if p in text}


@pytest.mark.parametrize("head_dim", [40, 80, 160])  # SD v1's three head dims
def test_splash_equals_xla_values_and_gradients(head_dim):
    q, k, v = _qkv(2, 1024, 2, head_dim)
    with attention.mesh_scope(None, splash_min_tokens=1024):
        assert "pallas_call" in _uses("splash", q, k, v, 2)  # the kernel runs, not a fallback
        ref, gref = _value_and_grads("xla", q, k, v, 2)
        out, g = _value_and_grads("splash", q, k, v, 2)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-5)
    for a, b in zip(g, gref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-4 * float(jnp.abs(b).max()))


def test_splash_blocks_divide_every_level_size():
    """The kernel's block divides the sequence (it refuses otherwise): 512 where it can,
    else the largest multiple of 128 that does; and the kernel equals XLA at a length 512
    does not divide (640 here; SD 2.x at 768 px has 2304)."""
    for tokens, block in ((4096, 512), (1024, 512), (2304, 384), (9216, 512), (640, 128), (384, 384), (128, 128)):
        assert attention.splash_block(tokens) == block and tokens % block == 0
    q, k, v = _qkv(1, 640, 1, 40)
    with attention.mesh_scope(None, splash_min_tokens=512):
        assert "pallas_call" in _uses("splash", q, k, v, 1)
        ref, gref = _value_and_grads("xla", q, k, v, 1)
        out, g = _value_and_grads("splash", q, k, v, 1)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-5)
    for a, b in zip(g, gref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-4 * float(jnp.abs(b).max()))


def check_sharded():
    """Run in a 4-device process by the test below."""
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 1, 2), ("data", "fsdp", "tensor"))
    q, k, v = _qkv(4, 256, 2, 40, seed=3)
    ref, gref = _value_and_grads("xla", q, k, v, 2)
    with attention.mesh_scope(mesh, splash_min_tokens=256):
        text = str(jax.make_jaxpr(lambda q, k, v: multi_head_attention(q, k, v, 2, implementation="splash"))(q, k, v))
        out, g = jax.jit(lambda q, k, v: _value_and_grads("splash", q, k, v, 2))(q, k, v)
    assert "shard_map" in text and "pallas_call" in text
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-5)
    for a, b in zip(g, gref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-4 * float(jnp.abs(b).max()))
    print("sharded splash ok")


def test_splash_in_shard_map_over_the_batch_axes_equals_xla():
    """On a 4-device mesh (2 data x 2 tensor) the kernel runs per shard: batch over data,
    heads over tensor, the same numbers as XLA's unsharded attention."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    p = subprocess.run([sys.executable, "-c", "import test_attention as t; t.check_sharded()"], cwd=HERE, env=env,
                       capture_output=True, text=True, timeout=500)
    assert p.returncode == 0 and "sharded splash ok" in p.stdout, p.stderr[-3000:]


def test_each_call_gets_the_kernel_the_rule_names():
    """splash only for unmasked self-attention of >= the threshold and whole 128-token
    blocks (cross-attention to 77 text tokens stays on XLA); cudnn only on a GPU; auto is
    chunked on this CPU."""
    with attention.mesh_scope(None, splash_min_tokens=1024):
        assert attention.choose("splash", 4096, 4096, 40, jnp.bfloat16, True) == "splash"
        assert attention.choose("splash", 4096, 77, 40, jnp.bfloat16, False) == "xla"  # cross-attention
        assert attention.choose("splash", 256, 256, 160, jnp.bfloat16, True) == "xla"  # below the threshold
        assert attention.choose("splash", 1000, 1000, 40, jnp.bfloat16, True) == "xla"  # not whole blocks
        assert attention.choose("cudnn", 4096, 4096, 40, jnp.bfloat16, True) == "xla"  # no GPU here
        assert attention.choose("auto", 4096, 4096, 40, jnp.float32, True) == "chunked"
    with attention.mesh_scope(None, splash_min_tokens=256):
        assert attention.choose("splash", 256, 256, 160, jnp.bfloat16, True) == "splash"
    q, k, v = _qkv(1, 77, 2, 8)
    x = _qkv(1, 256, 2, 8)[0]
    with attention.mesh_scope(None, splash_min_tokens=256):
        assert "pallas_call" not in _uses("splash", x, k, v, 2)  # 256 queries over 77 keys: XLA
    with pytest.raises(ValueError, match="one of"):
        attention.choose("flash", 64, 64, 8, jnp.float32, True)
    assert "splash (Pallas) for self-attention of >= 1024 tokens" in attention.describe("auto", "tpu")


def test_config_names_match_the_kernels():
    from smartbrush_jax.config import ATTENTION

    assert tuple(ATTENTION) == attention.IMPLEMENTATIONS
