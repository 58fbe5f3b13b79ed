"""FLOPs of the U-Net and the train step, the accelerator's peak, and MFU.

Two counts of the same work, so each checks the other:
- `unet_forward_flops`: analytic, walking a `UNetConfig` exactly as `models/unet.py` builds
  the network (convs, dense layers, the two attention matmuls).
- XLA's cost analysis of a compiled program (`planning/xla.py`, `costs`). It counts every op
  (elementwise ones too, one FLOP per element), only the taps of a convolution that land
  inside the input (zero padding is skipped), and for a sharded program it reports the
  program of *one device* (after SPMD partitioning), not the global step.

MFU = achieved model FLOP/s per device / the device's bf16 dense peak. "Model FLOPs" are
the U-Net's forward + backward (3x forward), the usual convention: the frozen text
encoder and VAE encoder that the step also runs (at 512 px the VAE encode alone is ~46%
of the U-Net's training FLOPs), the optimizer update and recomputation are not model
FLOPs (XLA's count includes them, so it exceeds the analytic one).
"""

from __future__ import annotations

from typing import Dict, Optional

from smartbrush_jax.models.unet_config import UNetConfig

# bf16 dense (no sparsity) peak FLOP/s per device, from the vendors' spec sheets.
_PEAK_BY_KIND = {  # jax `device.device_kind`, lower-cased, exact
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5": 459e12,  # v5p
    "tpu v5p": 459e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
}
_PEAK_BY_NAME = (  # CUDA device names ("NVIDIA H100 80GB HBM3"): first substring that matches
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h200 nvl", 835e12),
    ("h100", 989e12),  # SXM ("H100 80GB HBM3"), GH200
    ("h200", 989e12),
    ("a100", 312e12),
)


def unet_forward_flops(config: UNetConfig, batch: int, height: int, width: int, context_len: int,
                       count_padding: bool = True) -> int:
    """FLOPs (2 x multiply-adds) of one U-Net forward pass on `[batch, height, width, C_in]`
    latents with a `[batch, context_len, cross_attention_dim]` text context.

    Counts the convolutions (3x3, stride-2, 1x1 shortcuts and projections), the dense
    layers (time embedding MLP, each resnet's time projection, attention q/k/v/out, GEGLU
    feed-forward, linear projections) and both attention matmuls (QK^T and AV,
    2 x 2 x B x heads x N_q x N_k x head_dim). Elementwise work (norms, activations,
    softmax, residual adds, the sinusoidal embedding) is ignored: it is a few percent of
    the total at SD sizes. The class (precision-level) embedding is a table lookup: 0.

    `count_padding=True` is the usual convention (every output position costs the whole
    kernel, as in PyTorch's FlopCounter); False counts only the taps inside the input, as
    XLA's cost analysis does.
    """
    return sum(_forward_counts(config, batch, height, width, context_len, count_padding).values())


def train_step_flops(forward_flops: int) -> int:
    """Model FLOPs of one training step: forward + backward = 3 x forward (the backward
    pass costs two matmuls per forward matmul: gradients of inputs and of weights). XLA's
    gradient of the SD v1 U-Net measures 2.985 x its forward: conv_in and the time MLP
    need no input gradient."""
    return 3 * int(forward_flops)


def peak_flops_per_device(device) -> Optional[float]:
    """bf16 dense peak FLOP/s of `device` (a `jax.Device`) from its `device_kind`; None
    when unknown (CPU, unlisted accelerators)."""
    kind = str(getattr(device, "device_kind", "")).lower().strip()
    if kind in _PEAK_BY_KIND:
        return _PEAK_BY_KIND[kind]
    if getattr(device, "platform", "gpu") == "cpu":
        return None
    for name, peak in _PEAK_BY_NAME:
        if name in kind:
            return peak
    return None


def mfu(flops_per_step: float, step_time_s: float, n_devices: int, peak: float) -> float:
    """Model FLOPs utilisation: (global FLOPs per step / step time / devices) / peak per device."""
    return flops_per_step / step_time_s / n_devices / peak


def throughput(flops_per_step: float, step_time_s: float, n_devices: int,
               peak: Optional[float]) -> Dict[str, float]:
    """The log's `tflops_per_s` (model TFLOP/s per device) and, when the peak is known, `mfu`."""
    out = {"tflops_per_s": flops_per_step / step_time_s / n_devices / 1e12}
    if peak:
        out["mfu"] = mfu(flops_per_step, step_time_s, n_devices, peak)
    return out


# Matmuls of a flash-style attention kernel's backward per forward matmul pair (QK^T, PV):
# splash's fused backward (models/attention.py) recomputes S and forms dP, dV, dK and dQ:
# 5 matmuls against the forward's 2 (separate dQ and dK/dV kernels would take 7).
KERNEL_BACKWARD_RATIO = 2.5


def kernel_attention_flops(cfg: UNetConfig, batch: int, height: int, width: int, min_tokens: int,
                           recompute: bool, lane: int = 128) -> Dict[str, float]:
    """FLOPs of the self-attention calls of >= `min_tokens` tokens that a Pallas kernel runs
    in one train step (forward, backward and, under `recompute`, remat's second forward),
    which XLA's cost analysis does not see (a custom call). "padded" counts the head dim
    rounded up to the MXU's `lane` width, as the kernel's tiles are (40 and 80 -> 128,
    160 -> 256): the cost of SD's head dims on a 128-wide systolic array."""
    calls: list = []
    _forward_counts(cfg, batch, height, width, 77, True, calls)
    # what the kernel takes (models/attention.choose): enough tokens, in whole 128-token blocks
    kernel = [(t, c // heads, heads) for t, c, heads in calls if t >= min_tokens and t % 128 == 0]
    fwd = sum(2 * 2 * batch * heads * t * t * hd for t, hd, heads in kernel)
    padded = sum(2 * 2 * batch * heads * t * t * (-(-hd // lane) * lane) for t, hd, heads in kernel)
    factor = 1 + KERNEL_BACKWARD_RATIO + (1 if recompute else 0)
    return {"forward": fwd, "step": fwd * factor, "step_padded": padded * factor, "passes": factor,
            "calls": len(kernel)}


# ---------------------------------------------------------------------------- the walk
def _forward_counts(cfg: UNetConfig, b: int, h: int, w: int, t: int, count_padding: bool,
                    calls: Optional[list] = None) -> Dict[str, int]:
    """FLOPs by kind ("conv", "dense", "attention"), following `UNet2DConditionModel.__call__`;
    `calls` (a list) gets (tokens, channels, heads) of every self-attention call."""
    n = {"conv": 0, "dense": 0, "attention": 0}
    boc, lpb = cfg.block_out_channels, cfg.layers_per_block
    temb = 4 * boc[0]

    def conv(cin, cout, k, stride=1):  # on the current (h, w); returns the output size
        pad = k // 2
        taps = [_conv_taps(size, k, stride, pad, count_padding) for size in (h, w)]
        n["conv"] += 2 * b * cin * cout * taps[0][0] * taps[1][0]
        return taps[0][1], taps[1][1]

    def dense(rows, cin, cout):
        n["dense"] += 2 * rows * cin * cout

    def resnet(cin, cout):
        conv(cin, cout, 3)
        dense(b, temb, cout)  # time_emb_proj
        conv(cout, cout, 3)
        if cin != cout:
            conv(cin, cout, 1)  # conv_shortcut

    def transformer(c, depth, heads):
        tokens = b * h * w
        if calls is not None:
            calls.extend([(h * w, c, heads)] * depth)
        dense(tokens, c, c)  # proj_in (1x1 conv or linear: the same matmul)
        for _ in range(depth):
            for kv_tokens, kv_dim, kv_len in ((tokens, c, h * w), (b * t, cfg.cross_attention_dim, t)):
                dense(tokens, c, c)  # to_q
                dense(kv_tokens, kv_dim, 2 * c)  # to_k, to_v
                n["attention"] += 2 * 2 * b * (h * w) * kv_len * c  # QK^T and AV over all heads
                dense(tokens, c, c)  # to_out_0
            dense(tokens, c, 8 * c)  # GEGLU proj (hidden and gate)
            dense(tokens, 4 * c, c)  # net_2
        dense(tokens, c, c)  # proj_out

    dense(b, boc[0], temb)  # time_embedding.linear_1
    dense(b, temb, temb)  # time_embedding.linear_2
    conv(cfg.in_channels, boc[0], 3)  # conv_in
    ch, skips = boc[0], [boc[0]]
    for i, kind in enumerate(cfg.down_block_types):
        for _ in range(lpb):
            resnet(ch, boc[i])
            ch = boc[i]
            if kind == "CrossAttnDownBlock2D":
                transformer(ch, cfg.transformer_layers_per_block[i], cfg.num_heads[i])
            skips.append(ch)
        if i < len(boc) - 1:
            h, w = conv(ch, ch, 3, stride=2)  # downsamplers_0
            skips.append(ch)
    resnet(ch, ch)
    transformer(ch, cfg.transformer_layers_per_block[-1], cfg.num_heads[-1])
    resnet(ch, ch)
    rev_depth = cfg.transformer_layers_per_block[::-1]
    for i, kind in enumerate(cfg.up_block_types):
        out = boc[::-1][i]
        for _ in range(lpb + 1):
            resnet(ch + skips.pop(), out)
            ch = out
            if kind == "CrossAttnUpBlock2D":
                transformer(ch, rev_depth[i], cfg.num_heads[::-1][i])
        if i < len(boc) - 1:
            h, w = 2 * h, 2 * w  # nearest 2x, then the conv
            conv(ch, ch, 3)  # upsamplers_0
    conv(boc[0], cfg.out_channels, 3)  # conv_out
    return n


def _conv_taps(size: int, k: int, stride: int, pad: int, count_padding: bool):
    """(kernel taps summed over the output positions of one spatial axis, output size)."""
    out = (size + 2 * pad - k) // stride + 1
    if count_padding:
        return out * k, out
    return sum(0 <= o * stride - pad + i < size for o in range(out) for i in range(k)), out
