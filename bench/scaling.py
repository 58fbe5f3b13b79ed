"""Per-step compute and gradient-communication time of SmartBrush SD v1 training under data
parallelism and FSDP, and the global batch at which communication stays under 10% of the
step. Prints the tables of bench/SCALING.md (which explains the model).

    python bench/scaling.py                         # assumed MFU 0.45 (target) and 0.28 (anchor)
    python bench/scaling.py --measured bench/results/gpu_sd_v1_unet_step.json   # a measured step

Inputs: the SD v1 SmartBrush U-Net's parameter count (eval_shape, nothing allocated), its
training FLOPs per image from `smartbrush_jax.planning.flops` (3x the analytic forward at 512 px),
the VAE encode FLOPs (XLA's count of the lowered encoder) for steps that encode online,
and the hardware table below (spec-sheet peaks and interconnect bandwidths).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name: (bf16 peak FLOP/s per device, devices per fast domain g, its usable collective
# bandwidth per device, number of domains k, the bandwidth between domains per device).
# Bandwidths are what a ring/torus collective moves per device per second ("bus bandwidth"):
# H100 SXM in one node: NVLink 4 via NVSwitch, 450 GB/s per direction spec, ~360 GB/s as
# nccl-tests busbw; between nodes one 400 Gb/s NDR InfiniBand NIC per GPU, ~45 GB/s.
# TPU slices are not modelled here: their memory, collectives and step-time estimates come
# from compiling the step for them (smartbrush_jax.train.aot, bench/tpu_aot.sh, bench/aot_table.py).
HARDWARE = {
    "8xH100 (1 node, NVLink)": (989e12, 8, 360e9, 1, 45e9),
    "64xH100 (8 nodes, IB NDR)": (989e12, 8, 360e9, 8, 45e9),
}


def collective_s(nbytes: float, g: int, bw_in: float, k: int, bw_out: float) -> float:
    """One reduce-scatter + all-gather pass over `nbytes` per device, hierarchically: the
    fast domain moves (g-1)/g of the bytes; between domains each device carries 1/g of
    them over its own link, (k-1)/k of that."""
    t = (g - 1) / g * nbytes / bw_in
    if k > 1:
        t += (k - 1) / k * nbytes / g / bw_out
    return t


def model_numbers():
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from smartbrush_jax.interop.loader import SD_V1_UNET, SD_V1_VAE, abstract_params
    from smartbrush_jax.models import AutoencoderKL, UNet2DConditionModel
    from smartbrush_jax.planning.flops import train_step_flops, unet_forward_flops
    from smartbrush_jax.planning.xla import costs

    # SmartBrush: latent + mask in, noise + mask logit out, 11 precision levels
    unet_cfg = dataclasses.replace(SD_V1_UNET, in_channels=5, out_channels=5, num_class_embeddings=11)
    params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
        abstract_params(UNet2DConditionModel(unet_cfg))))
    unet_train = train_step_flops(unet_forward_flops(unet_cfg, 1, 64, 64, 77))
    vae = AutoencoderKL(SD_V1_VAE)
    vae_params = abstract_params(vae)
    lowered = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode)).lower(
        vae_params, jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32))
    return {"params": params, "unet_train_flops": unet_train, "vae_encode_flops": costs(lowered)["flops"]}


def analyse(m: dict, mfus, grad_bytes: int, online_vae: bool):
    """Rows: hardware x strategy x MFU -> per-image compute, comm per step, batch for <10%."""
    flops = m["unet_train_flops"] + (m["vae_encode_flops"] if online_vae else 0.0)
    nbytes = m["params"] * grad_bytes
    rows = []
    for name, (peak, g, bw_in, k, bw_out) in HARDWARE.items():
        n = g * k
        for strategy, factor in (("DP", 2.0), ("FSDP", 3.0)):
            # DP: all-reduce = reduce-scatter + all-gather of the gradients (2 passes).
            # FSDP: all-gather params for forward, again for backward, reduce-scatter grads (3).
            comm = factor * collective_s(nbytes, g, bw_in, k, bw_out)
            for mfu in mfus:
                per_image = flops / (mfu * peak)
                b = math.ceil(10 * comm / per_image)  # comm <= 10% of compute, no overlap
                b_overlap = math.ceil(comm / (per_image * 2 / 3))  # comm hidden under backward
                rows.append(dict(hardware=name, strategy=strategy, mfu=mfu, devices=n,
                                 compute_ms_per_image=1e3 * per_image, comm_ms=1e3 * comm,
                                 batch_per_device=b, global_batch=b * n, step_ms=1e3 * per_image * b,
                                 global_batch_overlapped=b_overlap * n))
    return rows


def table(rows) -> str:
    out = ["| hardware | strategy | MFU | compute ms/image | comm ms/step | batch/device for comm <10% "
           "| global batch | step ms | global batch if overlapped |", "|---" * 9 + "|"]
    for r in rows:
        out.append(f"| {r['hardware']} | {r['strategy']} | {r['mfu']:.2f} | {r['compute_ms_per_image']:.1f} | "
                   f"{r['comm_ms']:.1f} | {r['batch_per_device']} | {r['global_batch']} | {r['step_ms']:.0f} | "
                   f"{r['global_batch_overlapped']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mfu", type=float, action="append", help="assumed MFU (repeatable; default 0.45 and 0.28)")
    p.add_argument("--measured", help="a bench/unet_step.py sd_v1 JSON: use its measured MFU (ours)")
    p.add_argument("--grad-bytes", type=int, default=4, help="bytes per gradient element (fp32 params: 4)")
    p.add_argument("--online-vae", action="store_true", help="the step encodes images with the VAE")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    mfus = args.mfu or [0.45, 0.28]
    if args.measured:
        with open(args.measured) as f:
            mfus = [json.load(f)["ours"]["mfu"]]
    m = model_numbers()
    print(f"SmartBrush SD v1 U-Net: {m['params'] / 1e6:.1f}M parameters, "
          f"{m['unet_train_flops'] / 1e12:.2f} TFLOP per image per train step (512 px); "
          f"VAE encode {m['vae_encode_flops'] / 1e12:.2f} TFLOP per image")
    rows = analyse(m, mfus, args.grad_bytes, args.online_vae)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": m, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
