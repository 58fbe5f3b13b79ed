"""One U-Net training step, ours (jax.jit + optax.adamw) against diffusers PyTorch
(`UNet2DConditionModel` + `torch.optim.AdamW`), same config, batch and dtype, in one run.

    python bench/unet_step.py                      # `tiny` config on CPU (BENCH.md)
    python bench/unet_step.py --steps 20 --json out.json
    python bench/unet_step.py --config sd_v1       # SD v1 at 64x64 latents, bf16 (GPU; bench/gpu.sh)
    python bench/unet_step.py --config sd_v1 --find-max-batch --side ours --remat full
    python bench/unet_step.py --check              # our U-Net against diffusers on this device, fp32/bf16

The step on both sides: forward with text context and precision level, MSE of the
5-channel output against a fixed target, backward, AdamW update (lr 1e-4, wd 1e-2).
Ours: fp32 parameters, compute in `--dtype`, attention through `jax.nn.dot_product_attention`
("cudnn" on GPU, falling back to "xla" if cuDNN refuses), jit with the state donated.
PyTorch: fp32 parameters under `torch.autocast` for bf16, SDPA attention (diffusers'
default), `torch.compile` on CUDA (`--no-compile` turns it off), channels-last and fused
AdamW on CUDA. TFLOP/s and MFU count model FLOPs (3 x the analytic forward of
`smartbrush_jax.planning.flops`, the same for both sides); the peak is the device's bf16 dense peak.
On an accelerator each side runs in its own process, so neither framework holds memory
while the other runs. Prints images/s for each and the ratio ours / PyTorch last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import _common
import numpy as np

from smartbrush_jax.planning.search import Probe, is_oom, largest_batch

_UNET = dict(layers_per_block=2, attention_head_dim=8, in_channels=5, out_channels=5, num_class_embeds=11)
CONFIGS = {
    "tiny": dict(unet=dict(block_out_channels=(64, 128, 256, 256), cross_attention_dim=256, **_UNET),
                 batch=8, latent=32, tokens=77, dtype="float32", granularity=1),
    "sd_v1": dict(unet=dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, **_UNET),
                  batch=8, latent=64, tokens=77, dtype="bfloat16", granularity=8),
}


def make_batch(cfg, batch=None, latent=None, seed=0):
    """Random step inputs, channels-last numpy (the config's batch and latent size by default)."""
    batch, latent = batch or cfg["batch"], latent or cfg["latent"]
    rng = np.random.default_rng(seed)
    c = cfg["unet"]["cross_attention_dim"]
    return dict(x=rng.standard_normal((batch, latent, latent, 5)).astype(np.float32),
                t=rng.integers(0, 1000, batch).astype(np.int32),
                ctx=rng.standard_normal((batch, cfg["tokens"], c)).astype(np.float32),
                s=rng.integers(0, 11, batch).astype(np.int32),
                target=rng.standard_normal((batch, latent, latent, 5)).astype(np.float32))


# ---------------------------------------------------------------------------- PyTorch
def torch_setup(cfg, args, checkpointing=False, dynamic=False):
    """(model, step(x, t, ctx, s, target) -> loss tensor, to_device(numpy batch), device)."""
    import torch
    from diffusers import UNet2DConditionModel

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = UNet2DConditionModel(**cfg["unet"]).to(dev).train()
    fmt = torch.channels_last if dev == "cuda" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if checkpointing:
        model.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-2, fused=dev == "cuda")
    fwd = torch.compile(model, dynamic=dynamic) if dev == "cuda" and not args.no_compile else model
    bf16 = args.dtype == "bfloat16"

    def step(x, t, ctx, s, target):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            out = fwd(x, t, ctx, class_labels=s).sample
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        return loss.detach()

    def to_device(b):
        nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).to(dev).contiguous(memory_format=fmt)  # noqa
        return (nchw(b["x"]), torch.from_numpy(b["t"]).long().to(dev), torch.from_numpy(b["ctx"]).to(dev),
                torch.from_numpy(b["s"]).long().to(dev), nchw(b["target"]))

    step.compiled = fwd is not model
    step.zero_grad = lambda: opt.zero_grad(set_to_none=True)
    return model, step, to_device, dev


def bench_torch(cfg, args):
    import torch

    model, step, to_device, dev = torch_setup(cfg, args)
    batch = to_device(make_batch(cfg, args.batch, args.latent))
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    compile_s = None
    for i in range(max(args.warmup, 1 if step.compiled else 0)):
        t0 = time.perf_counter()
        step(*batch)
        sync()
        compile_s = time.perf_counter() - t0 if i == 0 and step.compiled else compile_s
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step(*batch)
    loss.item()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    from smartbrush_jax.planning.flops import peak_flops_per_device

    peak = None if dev == "cpu" else peak_flops_per_device(_common.Named(torch.cuda.get_device_name()))
    return dict(params=sum(p.numel() for p in model.parameters()), compile_s=compile_s, compiled=step.compiled,
                device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                loss=float(loss), peak_bytes=torch.cuda.max_memory_allocated() if dev == "cuda" else None,
                **_common.speed(cfg, args.batch, args.latent, dt, peak))


def max_batch_torch(cfg, args, checkpointing, budget_s):
    import gc

    import torch

    if not torch.cuda.is_available():
        print("[max-batch] PyTorch: no CUDA device; probing up to --max-batch-limit on the CPU")
    # one dynamic-shape compile serves every batch size of the search
    _, step, to_device, dev = torch_setup(cfg, args, checkpointing=checkpointing, dynamic=True)
    capacity = 0.95 * torch.cuda.mem_get_info()[1] if dev == "cuda" else None
    state = {"step": step}

    def fits(b) -> Probe:
        batch = to_device(make_batch(cfg, b, args.latent))
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            for _ in range(2):
                state["step"](*batch)
            if dev == "cuda":
                torch.cuda.synchronize()
                return Probe(True, torch.cuda.max_memory_allocated())
            return Probe(True)
        except Exception as e:
            if is_oom(e):
                return Probe(False)
            if not state["step"].compiled:
                raise
            print(f"[max-batch] torch.compile failed ({type(e).__name__}: {str(e)[:200]}); searching in eager mode")
            torch._dynamo.reset()
            eager = argparse.Namespace(**{**vars(args), "no_compile": True})
            state["step"] = torch_setup(cfg, eager, checkpointing=checkpointing)[1]
            return fits(b)
        finally:
            del batch
            state["step"].zero_grad()
            gc.collect()
            if dev == "cuda":
                torch.cuda.empty_cache()

    out = search(fits, args, cfg, budget_s, capacity)
    return dict(out, gradient_checkpointing=checkpointing, compiled=state["step"].compiled)


# ---------------------------------------------------------------------------- ours (JAX)
def jax_setup(cfg, args, remat, attention):
    """(model, init() -> fresh state on the device, jitted donated step(state, batch))."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax.core import meta

    from smartbrush_jax.models import UNet2DConditionModel, UNetConfig

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = UNet2DConditionModel(UNetConfig.from_diffusers(cfg["unet"]), dtype=dtype, attention_impl=attention,
                                 remat=remat)
    opt = optax.adamw(1e-4, weight_decay=1e-2)
    dummy = make_batch(cfg, 1, 8)
    abstract = jax.eval_shape(lambda: meta.unbox(model.init(jax.random.PRNGKey(0), dummy["x"], dummy["t"],
                                                            dummy["ctx"], dummy["s"])["params"]))

    @jax.jit
    def init():  # flax-like scales without compiling the model's own init (a whole forward)
        leaves, tree = jax.tree_util.tree_flatten_with_path(abstract)
        keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
        params = []
        for k, (path, a) in zip(keys, leaves):
            name = str(path[-1].key)
            if name in ("kernel", "embedding"):
                params.append(jax.random.normal(k, a.shape, a.dtype) / np.sqrt(np.prod(a.shape[:-1])))
            else:
                params.append(jnp.ones(a.shape, a.dtype) if name == "scale" else jnp.zeros(a.shape, a.dtype))
        params = jax.tree_util.tree_unflatten(tree, params)
        return params, opt.init(params)

    def loss_fn(p, b):
        out = model.apply({"params": p}, b["x"], b["t"], b["ctx"], b["s"])
        return jnp.mean((out.astype(jnp.float32) - b["target"]) ** 2)

    def train_step(state, b):
        p, o = state
        loss, grads = jax.value_and_grad(loss_fn)(p, b)
        updates, o = opt.update(grads, o, p)
        return (optax.apply_updates(p, updates), o), loss

    return model, init, jax.jit(train_step, donate_argnums=(0,))


def jax_attention(cfg, args, remat, batch):
    """(model, init, step, attention): the platform's fastest attention: cuDNN on GPU unless
    tracing refuses it (cuDNN's limits are checked while lowering), then XLA's; on CPU our
    query-chunked attention (bench/CPU_PROFILE.md)."""
    import jax

    gpu = jax.devices()[0].platform == "gpu"
    impls = [args.attention] if args.attention != "auto" else (["cudnn", "xla"] if gpu else ["chunked"])
    for i, impl in enumerate(impls):
        model, init, step = jax_setup(cfg, args, remat, impl)
        try:
            step.lower(jax.eval_shape(init), batch)
            return model, init, step, impl
        except Exception as e:
            if i == len(impls) - 1:
                raise
            print(f"[bench] attention {impl!r} failed ({type(e).__name__}: {str(e)[:200]}); trying {impls[i + 1]!r}")


def bench_jax(cfg, args):
    import jax

    from smartbrush_jax.planning import estimate
    from smartbrush_jax.planning.flops import peak_flops_per_device
    from smartbrush_jax.planning.xla import collectives, costs, custom_calls

    batch = jax.device_put(make_batch(cfg, args.batch, args.latent))
    _, init, step, impl = jax_attention(cfg, args, args.remat, batch)
    state = init()
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        state, loss = compiled(state, batch)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, loss = compiled(state, batch)
    loss.block_until_ready()
    dt = (time.perf_counter() - t0) / args.steps
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    # the package's one estimate of this very program, beside the measured step: the first real
    # accelerator run's measured / estimated recalibrates the planner (planning/estimate.py)
    est = estimate.step_estimate(costs(compiled), estimate.spec_of_device(dev),
                                 analytic_flops=_common.model_flops(cfg, args.batch, args.latent),
                                 collectives=collectives(compiled, 1), custom_calls=custom_calls(compiled))
    return dict(params=int(sum(x.size for x in jax.tree_util.tree_leaves(state[0]))), compile_s=compile_s,
                attention=impl, remat=args.remat, loss=float(loss), xla_flops_per_step=costs(compiled)["flops"],
                peak_bytes=stats.get("peak_bytes_in_use"), device=str(dev.device_kind),
                estimate=est, measured_over_estimated=dt / est["seconds"] if est.get("seconds") else None,
                **_common.speed(cfg, args.batch, args.latent, dt, peak_flops_per_device(dev)))


def max_batch_jax(cfg, args, remat, budget_s):
    import gc

    import jax

    _, init, step, impl = jax_attention(cfg, args, remat, jax.device_put(make_batch(cfg, args.batch, args.latent)))
    capacity = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")

    def fits(b) -> Probe:
        batch = jax.device_put(make_batch(cfg, b, args.latent))
        state = init()
        try:
            compiled = step.lower(state, batch).compile()
            m = compiled.memory_analysis()
            peak = None if m is None else (m.argument_size_in_bytes + m.output_size_in_bytes
                                           - m.alias_size_in_bytes + m.temp_size_in_bytes)
            for _ in range(2):
                state, loss = compiled(state, batch)
            loss.block_until_ready()
            return Probe(True, peak)
        except Exception as e:
            if not is_oom(e):
                raise
            return Probe(False)
        finally:
            del state, batch
            gc.collect()

    out = search(fits, args, cfg, budget_s, capacity)
    return dict(out, remat=remat, attention=impl)


def search(fits, args, cfg, budget_s, capacity) -> dict:
    """The package's one largest-batch search (`smartbrush_jax/planning/search.py`), run on this device."""
    log = lambda line: print(f"[max-batch] {line.strip()}")  # noqa: E731
    out = largest_batch(fits, args.batch, capacity=capacity, limit=args.max_batch_limit,
                        granularity=cfg["granularity"], budget_s=budget_s, log=log)
    out.pop("detail")
    return out


# ---------------------------------------------------------------------------- parity check
def check(args):
    """Our U-Net against diffusers' on this machine's devices (the `tiny` architecture at
    16x16): fp32 with full-precision matmuls, and our bf16 step's settings (bf16 compute,
    the attention `bench_jax` picks). Relative error max|ours - ref| / max|ref|."""
    import jax
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet
    from flax.core import meta

    from smartbrush_jax.interop.weights import torch_to_flax

    cfg = CONFIGS["tiny"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    tm = TorchUNet(**cfg["unet"]).to(dev).eval()
    b = make_batch(cfg, 2, 16)
    with torch.no_grad():
        ref = tm(torch.from_numpy(b["x"]).permute(0, 3, 1, 2).to(dev), torch.from_numpy(b["t"]).long().to(dev),
                 torch.from_numpy(b["ctx"]).to(dev), class_labels=torch.from_numpy(b["s"]).long().to(dev)).sample
    ref = ref.permute(0, 2, 3, 1).cpu().numpy()
    out = {"device": str(jax.devices()[0].device_kind), "torch_device": dev}
    for name, dtype, attention in (("fp32", "float32", "xla"), ("bf16", "bfloat16", args.attention)):
        a = argparse.Namespace(**{**vars(args), "dtype": dtype, "attention": attention})
        impls = ["cudnn", "xla"] if attention == "auto" and jax.devices()[0].platform == "gpu" else \
            ["xla" if attention == "auto" else attention]
        for i, impl in enumerate(impls):
            model, _, _ = jax_setup(cfg, a, "none", impl)
            shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), b["x"], b["t"], b["ctx"], b["s"]))
            params = torch_to_flax({k: v.cpu().numpy() for k, v in tm.state_dict().items()},
                                   meta.unbox(shapes["params"]))
            try:
                with jax.default_matmul_precision("highest" if name == "fp32" else "default"):
                    ours = np.asarray(jax.jit(model.apply)({"params": params}, b["x"], b["t"], b["ctx"], b["s"]),
                                      np.float32)
                break
            except Exception as e:  # cuDNN attention unavailable: report it and use XLA's
                if i == len(impls) - 1:
                    raise
                out[f"{name}_{impl}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        out[f"{name}_attention"] = impl
        out[f"{name}_rel_err"] = float(np.abs(ours - ref).max() / np.abs(ref).max())
    out["ok"] = out["fp32_rel_err"] < 1e-4 and out["bf16_rel_err"] < 5e-2
    print(f"[check] ours vs diffusers on {out['device']}: fp32 rel err {out['fp32_rel_err']:.2e} (bound 1e-4), "
          f"bf16 ({out['bf16_attention']} attention) rel err {out['bf16_rel_err']:.2e} (bound 5e-2): "
          f"{'OK' if out['ok'] else 'FAILED'}")
    return out


# ---------------------------------------------------------------------------- main
def run_side(args, side):
    """Results of one side: here, or in a child process on an accelerator."""
    if not args.isolate:
        if side == "ours":
            res = {"step": bench_jax(CONFIGS[args.config], args)} if not args.skip_step else {}
            if args.find_max_batch:
                for remat in ("none", args.max_batch_remat):
                    print(f"[max-batch] ours, remat {remat} ...", flush=True)
                    res[f"max_batch_remat_{remat}"] = max_batch_jax(CONFIGS[args.config], args, remat,
                                                                     args.time_budget / 2)
            return res
        res = {"step": bench_torch(CONFIGS[args.config], args)} if not args.skip_step else {}
        if args.find_max_batch:
            for ckpt in (False, True):
                print(f"[max-batch] PyTorch, gradient checkpointing {ckpt} ...", flush=True)
                res[f"max_batch{'_checkpointing' if ckpt else ''}"] = max_batch_torch(
                    CONFIGS[args.config], args, ckpt, args.time_budget / 2)
        return res
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, f"{side}.json")
        argv = [a for a in sys.argv[1:] if a != "--isolate"]
        env = dict(os.environ)
        if side == "ours":  # JAX may take what the device has (default: 75%)
            env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
        else:  # the PyTorch side imports JAX (FLOP counts) but must not touch the GPU with it
            env["JAX_PLATFORMS"] = "cpu"
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--side", side, "--no-isolate",
                               "--side-json", out], env=env)
        if proc.returncode or not os.path.isfile(out):  # report the other side all the same
            print(f"[bench] {side}: the child process failed (exit {proc.returncode})", flush=True)
            return {"error": f"exit {proc.returncode}"}
        with open(out) as f:
            return json.load(f)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, help="per-device batch (default: the config's)")
    ap.add_argument("--latent", type=int, help="latent height = width (default: the config's; smaller to smoke-test)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the config's)")
    ap.add_argument("--remat", default="none", help="ours: model.remat for the timed step")
    ap.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn", "chunked"),
                    help="ours: auto = cudnn on GPU (xla if it fails), chunked on CPU")
    ap.add_argument("--no-compile", action="store_true", help="PyTorch: no torch.compile (it is used on CUDA only)")
    ap.add_argument("--side", default="both", choices=("both", "ours", "torch"))
    ap.add_argument("--find-max-batch", action="store_true",
                    help="also search the largest batch that fits: ours with remat none and --max-batch-remat, "
                         "PyTorch without and with gradient checkpointing")
    ap.add_argument("--skip-step", action="store_true", help="with --find-max-batch: do not time the step")
    ap.add_argument("--max-batch-remat", default="full", help="ours: the remat policy of the second search")
    ap.add_argument("--max-batch-limit", type=int, default=1024)
    ap.add_argument("--time-budget", type=float, default=480.0, help="seconds for the searches of one side")
    ap.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                    help="each side in its own process (default on when CUDA is present)")
    ap.add_argument("--no-isolate", dest="isolate", action="store_false")
    ap.add_argument("--check", action="store_true", help="only the parity check against diffusers")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--side-json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cfg = CONFIGS[args.config]
    args.batch, args.latent = args.batch or cfg["batch"], args.latent or cfg["latent"]
    args.dtype = args.dtype or cfg["dtype"]
    if args.check:
        result = check(args)
        _common.write_json(args.json, result)
        return result
    if args.isolate is None:
        import torch

        args.isolate = torch.cuda.is_available() and args.side == "both"
    if args.side_json:  # a child of run_side
        _common.write_json(args.side_json, run_side(args, args.side))
        return None
    print(f"[bench] config={args.config} batch={args.batch} latent={args.latent} dtype={args.dtype} "
          f"steps={args.steps}", flush=True)
    result = dict(config=args.config, batch=args.batch, latent=args.latent, steps=args.steps, warmup=args.warmup,
                  dtype=args.dtype, tokens=cfg["tokens"], **_common.environment())
    sides = {"ours": ("ours", "ours (JAX)"), "torch": ("pytorch", "PyTorch")}
    rows = []
    for side in ("torch", "ours") if args.side == "both" else (args.side,):
        print(f"[bench] {sides[side][1]} ...", flush=True)
        res = run_side(args, side)
        step = res.pop("step", None)
        result[sides[side][0]] = step
        if res:
            result[f"{sides[side][0]}_max_batch"] = res
        if step:
            rows.append(dict(step, name=sides[side][1] + (f" remat={args.remat}" if side == "ours" and
                                                           args.remat != "none" else "")))
    for key in ("ours", "pytorch"):
        if (result.get(key) or {}).get("device"):
            result[f"{key}_device"] = result[key]["device"]
    if result.get("ours") and result.get("pytorch"):
        result["ratio"] = result["ours"]["images_per_s"] / result["pytorch"]["images_per_s"]
    _common.write_json(args.json, result)
    if rows:
        _common.print_table(rows[::-1])
    for key in ("ours_max_batch", "pytorch_max_batch"):
        for name, r in (result.get(key) or {}).items():
            bound = "" if r["exact"] else f" (search cut short: fails at {r['first_failure']})" \
                if r["first_failure"] else " (no failure up to the last probe)"
            print(f"largest batch, {key.split('_')[0]} {name}: {r['max_batch']}{bound}")
    if "ratio" in result:
        print(f"ratio ours/PyTorch images/s: {result['ratio']:.2f}")
    return result


if __name__ == "__main__":
    main()
