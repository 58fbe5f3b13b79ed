"""FLOP accounting: the analytic U-Net count against XLA's cost analysis, a count by hand,
the SD v1 reference figures, the peak table and the MFU arithmetic."""

import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from smartbrush_jax.interop.loader import SD_V1_UNET
from smartbrush_jax.models import UNet2DConditionModel, UNetConfig
from smartbrush_jax.planning import flops, xla

_BASE = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=24, attention_head_dim=4,
             norm_num_groups=8, in_channels=5, out_channels=5, num_class_embeds=11,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
CONFIGS = {  # name: (diffusers config, latent height, width)
    "cross_attention_conv_proj": (_BASE, 16, 16),
    "cross_attention_linear_proj": ({**_BASE, "use_linear_projection": True}, 16, 8),
    "no_attention_blocks": ({**_BASE, "down_block_types": ("DownBlock2D",) * 2,
                             "up_block_types": ("UpBlock2D",) * 2}, 16, 16),
    "three_levels_depth_2": ({**_BASE, "block_out_channels": (16, 32, 32), "layers_per_block": 2,
                              "transformer_layers_per_block": 2, "num_class_embeds": None,
                              "down_block_types": ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                              "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2}, 8, 8),
}


def _forward(cfg: UNetConfig, b: int, h: int, w: int, t: int):
    # XLA's attention: the chunked one ("auto" on CPU) pads the queries to whole blocks, and
    # XLA counts the padding
    model = UNet2DConditionModel(cfg, attention_impl="xla")
    args = (jnp.zeros((b, h, w, cfg.in_channels)), jnp.zeros((b,), jnp.int32),
            jnp.zeros((b, t, cfg.cross_attention_dim)),
            jnp.zeros((b,), jnp.int32) if cfg.num_class_embeddings else None)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args))["params"]
    return lambda p, *a: model.apply({"params": p}, *a), (params, *args)


def _xla_matmul_flops(fn, *args) -> float:
    """XLA's cost analysis restricted to the matmuls: each dot_general / convolution of the
    traced program, costed on its own by XLA (its total also counts elementwise ops)."""
    cache = {}

    def walk(jaxpr):
        total = 0.0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                avals = tuple(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars)
                key = (eqn.primitive.name, avals, repr(sorted(eqn.params.items())))
                if key not in cache:
                    one = jax.jit(lambda *a, e=eqn: e.primitive.bind(*a, **e.params))
                    cache[key] = one.lower(*avals).cost_analysis()["flops"]
                total += cache[key]
            for p in eqn.params.values():  # nested jaxprs: pjit, custom_jvp/vjp, ...
                for sub in p if isinstance(p, (list, tuple)) else (p,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        total += walk(inner)
        return total

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_analytic_count_matches_xla(name):
    d, h, w = CONFIGS[name]
    cfg, b, t = UNetConfig.from_diffusers(d), 2, 7
    fn, args = _forward(cfg, b, h, w, t)
    exact = flops.unet_forward_flops(cfg, b, h, w, t, count_padding=False)
    # the matmuls, to the FLOP: XLA skips the conv taps that fall in the zero padding
    assert _xla_matmul_flops(fn, *args) == exact
    # the whole forward: the matmuls plus elementwise work, which XLA counts too (one FLOP
    # per element and op; exact GELU's erf ~64 on CPU, softmax ~5, a norm ~7). At these
    # widths (16-64 channels) that adds 2-25%; at SD's, 1% (test_sd_v1_matches_xla).
    total = jax.jit(fn).lower(*args).cost_analysis()["flops"]
    assert exact < total < 1.3 * exact
    # the usual convention costs every output position the whole kernel: more
    assert flops.unet_forward_flops(cfg, b, h, w, t) > exact
    if name == "no_attention_blocks":  # the trainer's path, compile then count: the same (cheapest here)
        assert xla.costs(jax.jit(fn).lower(*args).compile())["flops"] == pytest.approx(total, rel=0.005)


def test_count_by_hand_one_level_unet():
    """One level, c=8 channels, 4x4 latents, batch 2, 2 text tokens of width 6."""
    cfg = UNetConfig.from_diffusers(dict(block_out_channels=(8,), layers_per_block=1, cross_attention_dim=6,
                                         attention_head_dim=2, norm_num_groups=4, in_channels=5, out_channels=3,
                                         down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",)))
    b, hw, c, t, d, temb = 2, 16, 8, 2, 6, 32
    time_mlp = 2 * b * (c * temb + temb * temb)
    conv_in, conv_out = 2 * b * hw * 9 * 5 * c, 2 * b * hw * 9 * c * 3
    resnet = 2 * (2 * b * hw * 9 * c * c) + 2 * b * temb * c
    resnet_skip = 2 * b * hw * 9 * 2 * c * c + 2 * b * hw * 9 * c * c + 2 * b * hw * 2 * c * c + 2 * b * temb * c
    n = b * hw  # tokens in the mid block's transformer
    transformer = (2 * 2 * n * c * c  # proj_in, proj_out
                   + 4 * 2 * n * c * c + 2 * 2 * b * hw * hw * c  # self-attention: q,k,v,out; QK^T, AV
                   + 2 * 2 * n * c * c + 2 * 2 * b * t * d * c + 2 * 2 * b * hw * t * c  # cross-attention
                   + 2 * n * c * 8 * c + 2 * n * 4 * c * c)  # GEGLU feed-forward
    # down: 1 resnet; mid: resnet, transformer, resnet; up: 2 resnets on [h, skip] (2c -> c)
    want = time_mlp + conv_in + resnet + (2 * resnet + transformer) + 2 * resnet_skip + conv_out
    assert flops.unet_forward_flops(cfg, b, 4, 4, t) == want
    # XLA's convention: on a 4-wide axis a padded 3-tap kernel has 2+3+3+2 = 10 taps, not 4 x 3;
    # the 3x3 convs' C_in x C_out: conv_in, down resnet, 2 mid resnets, 2 up resnets, conv_out
    taps3 = 5 * c + 2 * c * c + 2 * 2 * c * c + 2 * (2 * c * c + c * c) + c * 3
    assert want - flops.unet_forward_flops(cfg, b, 4, 4, t, count_padding=False) == 2 * b * (12 * 12 - 10 * 10) * taps3


def test_sd_v1_matches_the_reference_figures():
    """BENCH.md: the SD v1 U-Net forward at 64x64 is ~0.80 TFLOP per sample with the
    attention matmuls, ~0.68 without (PyTorch's FlopCounter); training ~2.4 TFLOP."""
    cfg = dataclasses.replace(SD_V1_UNET, in_channels=5, out_channels=5, num_class_embeddings=11)
    fwd = flops.unet_forward_flops(cfg, 1, 64, 64, 77)
    # QK^T and AV of self- (N keys) and cross-attention (77): 5 transformers at 64x64, 32x32
    # and 16x16 (2 down, 3 up), 1 at 8x8 (mid)
    attention = sum(k * 2 * 2 * n * (n + 77) * c for n, c, k in ((64 * 64, 320, 5), (32 * 32, 640, 5),
                                                               (16 * 16, 1280, 5), (8 * 8, 1280, 1)))
    assert fwd == 803_320_627_200
    assert 0.67e12 < fwd - attention < 0.69e12
    assert flops.train_step_flops(fwd) == 3 * fwd
    assert 2.40e12 < flops.train_step_flops(fwd) < 2.42e12


def test_sd_v1_matches_xla():
    """At SD v1 widths the elementwise work XLA also counts is ~1% of the forward."""
    cfg = dataclasses.replace(SD_V1_UNET, in_channels=5, out_channels=5, num_class_embeddings=11)
    fn, args = _forward(cfg, 1, 64, 64, 77)
    exact = flops.unet_forward_flops(cfg, 1, 64, 64, 77, count_padding=False)
    total = jax.jit(fn).lower(*args).cost_analysis()["flops"]  # before XLA's passes: compiling is slow
    assert exact < total < 1.015 * exact


def test_peak_table():
    def dev(kind, platform="gpu"):
        return SimpleNamespace(device_kind=kind, platform=platform)

    for kind, peak in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
                       ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
                       ("TPU v4", 275e12), ("TPU v5", 459e12), ("TPU v5 lite", 197e12), ("TPU v6 lite", 918e12)]:
        assert flops.peak_flops_per_device(dev(kind, "tpu" if "TPU" in kind else "gpu")) == peak, kind
    assert flops.peak_flops_per_device(dev("TPU v4 lite", "tpu")) is None
    assert flops.peak_flops_per_device(dev("NVIDIA GeForce RTX 4090")) is None
    assert flops.peak_flops_per_device(jax.devices("cpu")[0]) is None


def test_mfu_and_throughput():
    # 8 devices at 989 TFLOP/s peak, 2.4 TFLOP per image, 256 images per 2 s step
    step_flops = 2.4e12 * 256
    assert flops.mfu(step_flops, 2.0, 8, 989e12) == pytest.approx(2.4e12 * 256 / 2.0 / 8 / 989e12)
    assert flops.mfu(989e12 * 8 * 2.0, 2.0, 8, 989e12) == pytest.approx(1.0)
    out = flops.throughput(step_flops, 2.0, 8, 989e12)
    assert out["tflops_per_s"] == pytest.approx(38.4)
    assert out["mfu"] == pytest.approx(38.4 / 989)
    assert flops.throughput(step_flops, 2.0, 8, None) == {"tflops_per_s": pytest.approx(38.4)}


def test_compiled_flops_forms():
    """XLA's count as the one reader (`planning.xla.costs`) gives it, and the start-up
    report's FLOPs line built from it."""
    m, k, n = 4, 5, 6
    compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
    xla_flops = lambda c: xla.costs(c)["flops"]  # noqa: E731
    assert xla_flops(compiled) == 2 * m * k * n
    assert xla_flops(SimpleNamespace(cost_analysis=lambda: [{"flops": 7.0}])) == 7.0  # older JAX
    assert xla_flops(SimpleNamespace(cost_analysis=lambda: None)) is None

    def unsupported():
        raise NotImplementedError

    assert xla_flops(SimpleNamespace(cost_analysis=unsupported)) is None
    assert xla.costs(SimpleNamespace(cost_analysis=unsupported)) == \
        {"flops": None, "bytes_accessed": None, "optimal_seconds": None}

    from smartbrush_jax.planning.estimate import Spec

    fake = lambda cost: SimpleNamespace(cost_analysis=cost, memory_analysis=lambda: None)  # noqa: E731
    report = xla.step_report(fake(lambda: {"flops": 3e12}), analytic_flops=10e12 / 4,
                             spec=Spec("h100", 989e12, None, None), devices=4)
    assert report["flops"]["xla_flops_per_step"] == 12e12 and report["flops"]["xla_over_model"] == pytest.approx(1.2)
    assert "XLA cost analysis 12 TFLOP (4 x 3)" in xla.format_report(report)
    none = xla.step_report(fake(lambda: {}), analytic_flops=1, spec=Spec("cpu", None, None, None))
    assert "XLA cost analysis unavailable" in xla.format_report(none) and "no MFU" in xla.format_report(none)


def test_splash_kernel_flops_of_sd_v1_in_closed_form():
    """The self-attention the splash kernel runs in SD v1 at 512 px: five transformers at
    the 64x64 level (4096 tokens, 320 channels, 8 heads of 40) and five at 32x32 (1024
    tokens, 640 channels, heads of 80); 4 x T^2 x C a call, forward. On the MXU the head
    dims run padded to 128 lanes (x 128/40 and x 128/80)."""
    cfg = dataclasses.replace(SD_V1_UNET, in_channels=5, out_channels=5, num_class_embeddings=11)
    k = flops.kernel_attention_flops(cfg, 1, 64, 64, min_tokens=1024, recompute=False)
    top, second = 4 * 4096**2 * 320, 4 * 1024**2 * 640
    assert k["calls"] == 10 and k["forward"] == 5 * (top + second)
    assert k["step_padded"] == 3.5 * 5 * (top * 128 / 40 + second * 128 / 80)
    only_top = flops.kernel_attention_flops(cfg, 2, 64, 64, min_tokens=4096, recompute=True)
    assert only_top["calls"] == 5 and only_top["step"] == 4.5 * 2 * 5 * top
    # the attention term of the U-Net's own count holds the same self-attention FLOPs
    counts = flops._forward_counts(cfg, 1, 64, 64, 77, True)
    assert counts["attention"] > k["forward"]
