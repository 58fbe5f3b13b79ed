"""SmartBrush sampling, ours (one jitted `jax.lax` loop) against the same loop written
with diffusers' PyTorch U-Net and `DDIMScheduler`, same config, in one run.

    python bench/sample.py                 # tiny config, 50 DDIM steps, guidance 7.5, CPU
    python bench/sample.py --steps 20 --json out.json

Both sides: batch 1 with classifier-free guidance (conditional and unconditional in one
U-Net call of batch 2), the precision level as class label, DDIM (eta 0), the user mask
for the first 30% of steps then the predicted mask, the clean latent restored outside.
VAE and text encoder are left out (the same cost on both sides). Prints seconds per image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from unet_step import CONFIGS  # noqa: E402


def make_inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    s, c = cfg["latent"], cfg["unet"]["cross_attention_dim"]
    mask = np.zeros((1, s, s), np.float32)
    mask[:, s // 4: 3 * s // 4, s // 5: 4 * s // 5] = 1
    return dict(x0=rng.standard_normal((1, s, s, 4)).astype(np.float32), mask=mask,
                cond=rng.standard_normal((1, cfg["tokens"], c)).astype(np.float32),
                uncond=rng.standard_normal((1, cfg["tokens"], c)).astype(np.float32),
                noise=rng.standard_normal((1, s, s, 4)).astype(np.float32))


def bench_torch(cfg, inp, steps, guidance, repeats):
    import torch
    import torch.nn.functional as F
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg["unet"]).eval()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    x0, noise = nchw(inp["x0"]), nchw(inp["noise"])
    m = torch.from_numpy(inp["mask"])[:, None]
    context = torch.cat([torch.from_numpy(inp["cond"]), torch.from_numpy(inp["uncond"])])
    labels = torch.tensor([3, 3])
    warmup = round(0.3 * steps)

    @torch.no_grad()
    def run():
        sched.set_timesteps(steps)
        x = noise * m + x0 * (1 - m)
        for i, t in enumerate(sched.timesteps):
            inp_ = torch.cat([x, m], 1)
            out = unet(torch.cat([inp_, inp_]), t, context, class_labels=labels).sample
            eps = out[1:, :4] + guidance * (out[:1, :4] - out[1:, :4])
            x = sched.step(eps, t, x).prev_sample
            pred = (torch.sigmoid(out[:1, 4:5]) > 0.5).float()
            pred = F.max_pool2d(pred, 3, 1, 1) * m
            region = m if i < warmup or pred.sum() < 0.02 * m.sum() else pred
            x = x * region + x0 * (1 - region)
        return x

    run()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        run()
    return dict(seconds_per_image=(time.perf_counter() - t0) / repeats, compile_s=None)


def bench_jax(cfg, inp, steps, guidance, repeats):
    import jax
    import jax.numpy as jnp

    from smartbrush_jax.interop.loader import init_params
    from smartbrush_jax.models import UNet2DConditionModel, UNetConfig
    from smartbrush_jax.sampling.sampler import sample
    from smartbrush_jax.settings import SamplerConfig

    model = UNet2DConditionModel(UNetConfig.from_diffusers(cfg["unet"]))
    params = init_params(model, jax.random.PRNGKey(0))
    scfg = SamplerConfig(num_steps=steps, guidance_scale=guidance)

    def apply_fn(p, x, t, c, s):
        return model.apply({"params": p}, x, t, c, s)

    run = jax.jit(lambda p, x0, m, c, u, key: sample(apply_fn, p, x0, m, jnp.array([3]), c, u, key, cfg=scfg)[0])
    args = (params, jnp.asarray(inp["x0"]), jnp.asarray(inp["mask"]), jnp.asarray(inp["cond"]),
            jnp.asarray(inp["uncond"]), jax.random.PRNGKey(0))
    t0 = time.perf_counter()
    compiled = run.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    compiled(*args).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        compiled(*args).block_until_ready()
    return dict(seconds_per_image=(time.perf_counter() - t0) / repeats, compile_s=compile_s)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    cfg = CONFIGS[args.config]
    inp = make_inputs(cfg)
    print(f"[bench] sampling: config={args.config} latent={cfg['latent']} steps={args.steps} "
          f"guidance={args.guidance}", flush=True)
    print("[bench] PyTorch (diffusers) ...", flush=True)
    torch_res = bench_torch(cfg, inp, args.steps, args.guidance, args.repeats)
    print("[bench] JAX (ours) ...", flush=True)
    jax_res = bench_jax(cfg, inp, args.steps, args.guidance, args.repeats)
    speedup = torch_res["seconds_per_image"] / jax_res["seconds_per_image"]

    import jax
    import torch

    result = dict(config=args.config, steps=args.steps, guidance=args.guidance, date=time.strftime("%Y-%m-%d"),
                  machine=platform.machine(), cpus=os.cpu_count(), jax=jax.__version__, torch=torch.__version__,
                  ours=jax_res, pytorch=torch_res, speedup=speedup)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(f"\n{'':12s}{'s/image':>10s}{'compile s':>11s}")
    for name, r in (("ours (JAX)", jax_res), ("PyTorch", torch_res)):
        comp = f"{r['compile_s']:.1f}" if r["compile_s"] else "-"
        print(f"{name:12s}{r['seconds_per_image']:>10.2f}{comp:>11s}")
    print(f"speed ratio ours/PyTorch (PyTorch s/image over ours): {speedup:.2f}")
    return result


if __name__ == "__main__":
    main()
