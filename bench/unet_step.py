"""One U-Net training step, ours (jax.jit + optax.adamw) against diffusers PyTorch
(`UNet2DConditionModel` + `torch.optim.AdamW`), same config, batch and dtype, in one run.

    python bench/unet_step.py                      # `tiny` config on CPU (BENCH.md)
    python bench/unet_step.py --steps 20 --json out.json

The step on both sides: forward with text context and precision level, MSE of the
5-channel output against a fixed target, backward, AdamW update (lr 1e-4, wd 1e-2).
Prints images/s for each and the ratio ours / PyTorch as the last table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

CONFIGS = {
    "tiny": dict(unet=dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, cross_attention_dim=256,
                           attention_head_dim=8, in_channels=5, out_channels=5, num_class_embeds=11),
                 batch=8, latent=32, tokens=77),
}


def make_batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    b, s, c = cfg["batch"], cfg["latent"], cfg["unet"]["cross_attention_dim"]
    return dict(x=rng.standard_normal((b, s, s, 5)).astype(np.float32),
                t=rng.integers(0, 1000, b).astype(np.int32),
                ctx=rng.standard_normal((b, cfg["tokens"], c)).astype(np.float32),
                s=rng.integers(0, 11, b).astype(np.int32),
                target=rng.standard_normal((b, s, s, 5)).astype(np.float32))


def bench_torch(cfg, batch, steps, warmup):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**cfg["unet"]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-2)
    x = torch.from_numpy(batch["x"]).permute(0, 3, 1, 2).contiguous()
    target = torch.from_numpy(batch["target"]).permute(0, 3, 1, 2).contiguous()
    t, ctx, s = (torch.from_numpy(batch[k]) for k in ("t", "ctx", "s"))

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(x, t.long(), ctx, class_labels=s.long()).sample
        loss = torch.nn.functional.mse_loss(out, target)
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t0) / steps
    n_params = sum(p.numel() for p in model.parameters())
    return dict(step_s=dt, images_per_s=cfg["batch"] / dt, params=n_params, compile_s=None)


def bench_jax(cfg, batch, steps, warmup):
    import jax
    import jax.numpy as jnp
    import optax

    from smartbrush_jax.models import UNet2DConditionModel, UNetConfig
    from smartbrush_jax.pretrained import init_params

    model = UNet2DConditionModel(UNetConfig.from_diffusers(cfg["unet"]))
    params = init_params(model, jax.random.PRNGKey(0))
    opt = optax.adamw(1e-4, weight_decay=1e-2)
    opt_state = opt.init(params)
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}

    def loss_fn(p, b):
        out = model.apply({"params": p}, b["x"], b["t"], b["ctx"], b["s"])
        return jnp.mean((out - b["target"]) ** 2)

    def train_step(p, o, b):
        loss, grads = jax.value_and_grad(loss_fn)(p, b)
        updates, o = opt.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    train_step = jax.jit(train_step, donate_argnums=(0, 1))
    t0 = time.perf_counter()
    compiled = train_step.lower(params, opt_state, arrays).compile()
    compile_s = time.perf_counter() - t0
    flops = (compiled.cost_analysis() or {}).get("flops") if hasattr(compiled, "cost_analysis") else None
    for _ in range(warmup):
        params, opt_state, loss = compiled(params, opt_state, arrays)
    loss.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(steps):
        params, opt_state, loss = compiled(params, opt_state, arrays)
    loss.block_until_ready()
    dt = (time.perf_counter() - t0) / steps
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    return dict(step_s=dt, images_per_s=cfg["batch"] / dt, params=int(n_params), compile_s=compile_s,
                flops_per_step=flops, device=str(jax.devices()[0].device_kind))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    cfg = CONFIGS[args.config]
    batch = make_batch(cfg)
    print(f"[bench] config={args.config} batch={cfg['batch']} latent={cfg['latent']} steps={args.steps}", flush=True)
    print("[bench] PyTorch (diffusers) ...", flush=True)
    torch_res = bench_torch(cfg, batch, args.steps, args.warmup)
    print("[bench] JAX (ours) ...", flush=True)
    jax_res = bench_jax(cfg, batch, args.steps, args.warmup)
    ratio = jax_res["images_per_s"] / torch_res["images_per_s"]

    import jax
    import torch

    result = dict(config=args.config, batch=cfg["batch"], latent=cfg["latent"], steps=args.steps,
                  date=time.strftime("%Y-%m-%d"), machine=platform.machine(), cpus=os.cpu_count(),
                  python=sys.version.split()[0], jax=jax.__version__, torch=torch.__version__,
                  ours=jax_res, pytorch=torch_res, ratio=ratio)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(f"\n{'':12s}{'params':>12s}{'step s':>10s}{'images/s':>10s}{'compile s':>11s}")
    for name, r in (("ours (JAX)", jax_res), ("PyTorch", torch_res)):
        comp = f"{r['compile_s']:.1f}" if r["compile_s"] else "-"
        print(f"{name:12s}{r['params']:>12,d}{r['step_s']:>10.3f}{r['images_per_s']:>10.2f}{comp:>11s}")
    print(f"ratio ours/PyTorch images/s: {ratio:.2f}")
    return result


if __name__ == "__main__":
    main()
