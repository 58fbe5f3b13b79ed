"""MaxDiffusion's own SD 2.x U-Net train step, compiled ahead of time for a TPU slice on this
host (the `libtpu` wheel, no TPU) and reported as `smartbrush-aot --json` reports are, so our
step-time estimate can be set against MaxDiffusion's published MLPerf Training v4.1 SD2 step
times (512 px; v5p-128 at 16 images per chip, v5p-16 at 32).

    python bench/maxdiffusion_aot.py --maxdiffusion ~/maxdiffusion --topology v5p-128 \\
        --per-chip-batch 16 --json bench/results/maxdiffusion_v5p-128_b16.json [--their-flags] [--tiny]

Nothing of MaxDiffusion is in this repository: its `FlaxUNet2DConditionModel` (with what it
imports) and `configs/base_2_base.yml` are read from the checkout given, at run time; modules
the U-Net path imports but never calls are stood in for where not installed (chex,
tensorboardX, aqt: quantization is off). Theirs: the U-Net code; its attention (`attention:
flash`: Pallas splash attention for sequences >= `flash_min_seq_length` 4096, the 64x64
self-attention, with separate dQ and dK/dV backward kernels; XLA dot products elsewhere); no
remat (their linen U-Net has none); bf16 activations over fp32 weights and AdamW state; their
yml's mesh axes, logical axis rules and data sharding (every chip on the data axis:
ici_data_parallelism=-1); gradient clipping and AdamW with their yml's numbers. From their
MLPerf v4.1 scripts (mlcommons/training_results_v4.1, Google/benchmarks/stable_diffusion):
norm_num_groups=16, v_prediction, the step's inputs (pre-encoded VAE moments [B,64,64,8],
sampled in the step, and OpenCLIP states [B,77,1024]) and their LIBTPU_INIT_ARGS (only with
--their-flags; those this libtpu refuses are dropped and listed). Ours: the few lines of the
step (DDPM scaled-linear noising, v target, MSE) and the report.

Exit: 0 compiled, or "skipped" (no checkout at --maxdiffusion); 1 it does not fit the chip's
HBM; 2 bad input (topology, batch, no libtpu, a checkout whose U-Net does not import here).
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from smartbrush_jax.libtpu_flags import MAXDIFFUSION_MLPERF_V41 as THEIR_FLAGS  # noqa: E402

STUBS = ("chex", "tensorboardX", "aqt", "aqt.jax", "aqt.jax.v2", "aqt.jax.v2.flax")  # imported, never called here
TINY = {"block_out_channels": (32, 64), "attention_head_dim": (4, 4), "layers_per_block": 1,
        "cross_attention_dim": 32, "use_linear_projection": True, "sample_size": 16, "norm_num_groups": 16,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}
TOKENS, VAE_SCALE, T_TRAIN, FLASH_MIN_SEQ = 77, 0.18215, 1000, 4096
SPLASH_BACKWARD = 3.5  # their splash backward (use_fused_bwd_kernel False): dQ and dK/dV kernels, 7 matmuls per 2


def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def find_checkout(path):
    """The folder holding the `maxdiffusion` package (PATH/src or PATH), or None."""
    for root in ([os.path.join(path, "src"), path] if path else []):
        if os.path.isfile(os.path.join(root, "maxdiffusion", "models", "unet_2d_condition_flax.py")):
            return os.path.abspath(root)
    return None


def import_unet(src: str):
    """Their U-Net class from the checkout, with stand-ins for the STUBS not installed."""
    import importlib.util
    import types

    class Placeholder:  # what `from chex import Array` or `aqt_config.DotGeneral` reads
        def __init__(self, *a, **k): pass
        def __call__(self, *a, **k): return Placeholder()
        def __getattr__(self, name): return Placeholder()

    def attr(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Placeholder()

    stubbed = []
    for name in STUBS:
        parent, _, leaf = name.rpartition(".")
        if name in sys.modules or (parent not in stubbed if parent else importlib.util.find_spec(name) is not None):
            continue  # installed (a real package's submodules are real too)
        mod = types.ModuleType(name)
        mod.__path__, mod.__getattr__ = [], attr
        sys.modules[name] = mod
        if parent:
            setattr(sys.modules[parent], leaf, mod)
        stubbed.append(name)
    sys.path.insert(0, src)
    try:
        from maxdiffusion.models.unet_2d_condition_flax import FlaxUNet2DConditionModel
    except Exception as e:
        fail(f"MaxDiffusion's U-Net at {src} does not import here: {type(e).__name__}: {e} (stand-ins for "
             f"{stubbed or 'nothing'}; install what else its U-Net path needs)")
    return FlaxUNet2DConditionModel, stubbed


def git_commit(path: str):
    import subprocess

    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=30).stdout.strip() or None
    except Exception:
        return None


def libtpu_knows(flags: str, topology: str):
    """(`flags` less those this libtpu refuses, the refused): libtpu stops at the first flag it does
    not know (their scripts carry an internal one), so each is found in a child process."""
    import re
    import subprocess

    kept, dropped = flags.split(), []
    code = f"import sys; sys.path.insert(0, {ROOT!r}); from smartbrush_jax.planning import targets; " \
           f"targets.parse({topology!r}).devices()"
    for _ in range(len(kept)):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "LIBTPU_INIT_ARGS": " ".join(kept)}
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        m = re.search(r"Unknown command line flag '([^']+)'", p.stderr)
        if not m:
            break
        dropped += [f for f in kept if f.lstrip("-").split("=")[0] == m.group(1)]
        kept = [f for f in kept if f not in dropped]
    return " ".join(kept), dropped


def report(compiled, chip, analytic, kernel, n: int, b: int) -> dict:
    """`xla.step_report` with the package's one estimate (and its calibration), as ours gets it."""
    from smartbrush_jax.planning import estimate, xla

    r = xla.step_report(compiled, analytic_flops=analytic, spec=estimate.spec_of_chip(chip), devices=n,
                        hbm_bytes=chip.hbm_gib * 2**30, kernel=kernel, per_chip_batch=b)
    r["flops"]["analytic_note"] = "our count: the U-Net forward + backward (3x forward) only"
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--maxdiffusion", required=True, help="a local checkout of AI-Hypercomputer/maxdiffusion")
    p.add_argument("--topology", default="v5p-128", help="a TPU slice: v5p-128, v5p-16, v4-32, ...")
    p.add_argument("--per-chip-batch", type=int, default=16)
    p.add_argument("--json", help="write the report here")
    p.add_argument("--their-flags", action="store_true", help="their MLPerf LIBTPU_INIT_ARGS, set before jax loads")
    p.add_argument("--tiny", action="store_true", help="a tiny U-Net on 16x16 latents (tests)")
    p.add_argument("--weights-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="their yml and MLPerf run: float32 (activations are bfloat16)")
    a = p.parse_args()
    src = find_checkout(a.maxdiffusion)
    if src is None:
        print(f"skipped: {a.maxdiffusion!r} is not a MaxDiffusion checkout (no src/maxdiffusion/models/"
              "unet_2d_condition_flax.py there); clone github.com/AI-Hypercomputer/maxdiffusion and pass its path")
        sys.exit(0)
    if a.per_chip_batch < 1:
        fail(f"--per-chip-batch {a.per_chip_batch}: must be at least 1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["JAX_PLATFORMS"] = "cpu"  # the host compiles; the TPU is the target
    a.flags_dropped = []
    if a.their_flags:
        os.environ["LIBTPU_INIT_ARGS"], a.flags_dropped = libtpu_knows(" ".join(THEIR_FLAGS), a.topology)
    from smartbrush_jax.planning import targets

    try:
        target = targets.parse(a.topology)
        devices = target.devices()
    except targets.TargetError as e:
        fail(str(e))
    sys.exit(run(a, src, target, devices))


def run(a, src, target, devices) -> int:
    import dataclasses
    import time
    import warnings

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import yaml
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from smartbrush_jax.cli.aot import _write_json, versions
    from smartbrush_jax.interop.families import ARCHITECTURES
    from smartbrush_jax.models.unet_config import UNetConfig
    from smartbrush_jax.planning import flops, search
    from smartbrush_jax.train.aot import summary_lines

    warnings.filterwarnings("ignore", message=".*with mesh.*", category=DeprecationWarning)  # theirs uses `with mesh`
    Unet, stubbed = import_unet(src)
    with open(os.path.join(src, "maxdiffusion", "configs", "base_2_base.yml")) as f:
        yml = yaml.safe_load(f)
    n, b = len(devices), a.per_chip_batch
    arch = dict(TINY) if a.tiny else {**{k: v for k, v in ARCHITECTURES["sd2"]["unet"].items()
                                         if k != "upcast_attention"}, "sample_size": 64, "norm_num_groups": 16}
    side, ctx_dim = arch["sample_size"], arch["cross_attention_dim"]
    min_seq = side * side if a.tiny else FLASH_MIN_SEQ  # tiny: its top level, so the kernel path is compiled too
    axes = tuple(yml["mesh_axes"])
    shape = tuple(n if ax == "data" else 1 for ax in axes)  # ici_data_parallelism=-1, the other axes 1
    try:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # a layout mesh_utils does not know: plain order
        grid = np.array(devices).reshape(shape)
    mesh = jax.sharding.Mesh(grid, axes)
    rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in yml["logical_axis_rules"])
    wanted = dict(arch, in_channels=4, out_channels=4, dtype=jnp.bfloat16, weights_dtype=jnp.dtype(a.weights_dtype),
                  attention_kernel=yml.get("attention", "flash"), split_head_dim=yml.get("split_head_dim", True),
                  flash_min_seq_length=min_seq, flash_block_sizes=None, mesh=mesh, precision=None)
    kwargs = {k: v for k, v in wanted.items() if k in getattr(Unet, "__dataclass_fields__", wanted)}
    model = Unet(**kwargs)
    lr = optax.linear_schedule(0.0, 4.024e-4, 1000)  # their v5p-128 run's peak LR after warm-up; no cost of its own
    tx = optax.chain(optax.clip_by_global_norm(float(yml.get("max_grad_norm", 1.0))),
                     optax.adamw(lr, b1=yml["adam_b1"], b2=yml["adam_b2"], eps=yml["adam_eps"],
                                 weight_decay=yml["adam_weight_decay"]))

    def init(rng):  # as their init_weights: one sample per device
        x, ctx = jnp.zeros((n, 4, side, side), jnp.bfloat16), jnp.zeros((n, TOKENS, ctx_dim), jnp.bfloat16)
        params = model.init({"params": rng, "dropout": rng}, x, jnp.ones((n,), jnp.int32), ctx)["params"]
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    with mesh, nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init, rng)  # shapes and logical axes only: no weights exist
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), nn.unbox(boxed),
                         shardings)
    data = NamedSharding(mesh, P(*[tuple(x) if isinstance(x, list) else x for x in yml["data_sharding"]]))
    batch = {"moments": jax.ShapeDtypeStruct((n * b, side, side, 8), jnp.float32, sharding=data),
             "clip_embeddings": jax.ShapeDtypeStruct((n * b, TOKENS, ctx_dim), jnp.float32, sharding=data)}
    betas = np.linspace(0.00085**0.5, 0.012**0.5, T_TRAIN, dtype=np.float64) ** 2  # SD's scaled-linear DDPM
    alphas_cumprod = jnp.asarray(np.cumprod(1.0 - betas), jnp.float32)

    def train_step(state, batch, rng):
        sample_rng, noise_rng, t_rng = jax.random.split(rng, 3)
        mean, logvar = jnp.split(batch["moments"], 2, axis=-1)  # the VAE posterior, pre-encoded
        latents = mean + jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)) * jax.random.normal(sample_rng, mean.shape)
        latents = jnp.transpose(latents, (0, 3, 1, 2)) * VAE_SCALE  # their U-Net takes NCHW
        noise = jax.random.normal(noise_rng, latents.shape)
        t = jax.random.randint(t_rng, (latents.shape[0],), 0, T_TRAIN)
        s1, s0 = (jnp.sqrt(x)[:, None, None, None] for x in (alphas_cumprod[t], 1 - alphas_cumprod[t]))
        noisy, target = s1 * latents + s0 * noise, s1 * noise - s0 * latents  # v-prediction

        def loss_fn(params):
            pred = model.apply({"params": params}, noisy, t, batch["clip_embeddings"], train=True).sample
            return jnp.mean((target - pred) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                "step": state["step"] + 1}, loss

    state_sh, repl = jax.tree.map(lambda s: s.sharding, state), NamedSharding(mesh, P())
    step = jax.jit(train_step, in_shardings=(state_sh, {k: data for k in batch}, repl),
                   out_shardings=(state_sh, repl), donate_argnums=(0,))
    kernel_name = kwargs.get("attention_kernel", "dot_product")
    out = {**versions(), "program": "maxdiffusion_sd2_unet", "tiny": a.tiny, "topology": target.name,
           "topology_name": target.topology_name, "chips": n, "slices": target.slices,
           "chip": dataclasses.asdict(target.chip), "per_chip_batch": b, "global_batch": n * b,
           "resolution": side * 8, "vae_in_step": False, "cached_latents": True, "text_in_step": False,
           "remat": "none (their linen U-Net has no remat)", "attention": kernel_name,
           "attention_resolved": f"{kernel_name}: Pallas splash (jax.experimental.pallas.ops.tpu.splash_attention) "
                                 f"for self-attention of >= {min_seq} tokens, XLA dot products for the rest and all "
                                 "cross-attention", "splash_min_tokens": min_seq,
           "dtype": f"activations bfloat16, weights and AdamW state {a.weights_dtype}", "mesh": dict(zip(axes, shape)),
           "dcn": {}, "fsdp": False, "fsdp_gather": None, "prediction": "v_prediction",
           "optimizer": "clip_by_global_norm + AdamW, their yml's numbers", "unet_config": arch,
           "unet_kwargs_dropped": sorted(set(wanted) - set(kwargs)), "stubbed_modules": stubbed,
           "maxdiffusion_path": os.path.abspath(a.maxdiffusion), "maxdiffusion_commit": git_commit(a.maxdiffusion),
           "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", ""), "their_flags_set": a.their_flags,
           "their_flags_libtpu_refused": a.flags_dropped, "libtpu_flags_in_their_scripts": THEIR_FLAGS,
           "xla_flags": os.environ.get("XLA_FLAGS", "")}
    print(f"compiling MaxDiffusion's SD2 U-Net train step{' (tiny)' if a.tiny else ''} for {target.name} ({n} chips, "
          f"{b} per chip) on this host", file=sys.stderr)
    start = time.time()
    try:
        with mesh, nn.logical_axis_rules(rules):
            compiled = step.lower(state, batch, rng).compile()
    except Exception as e:
        if not search.is_oom(e):
            raise
        out.update(fits=False, compile_error=str(e)[:2000], compile_seconds=time.time() - start)
        print(f"DOES NOT FIT: {str(e)[:500]}")
        if a.json:
            _write_json(out, a.json)
        return 1
    seconds = time.time() - start
    ucfg = UNetConfig.from_diffusers(arch)
    analytic = flops.train_step_flops(flops.unet_forward_flops(ucfg, b, side, side, TOKENS))
    kernel = flops.kernel_attention_flops(ucfg, b, side, side, min_seq, recompute=False)
    if kernel["calls"] and kernel_name == "flash":
        scale = (1 + SPLASH_BACKWARD) / kernel["passes"]  # ours counts a fused backward; theirs is not
        kernel = {**kernel, "step": kernel["step"] * scale, "step_padded": kernel["step_padded"] * scale,
                  "passes": 1 + SPLASH_BACKWARD, "min_tokens": min_seq, "recompute": False,
                  "note": f"their splash kernels ({kernel['calls']} self-attention calls of >= {min_seq} tokens, "
                          f"{1 + SPLASH_BACKWARD:g} passes, head dim padded to 128 lanes as theirs pads it) at bf16 "
                          "peak, our count: XLA counts none"}
    else:
        kernel = None
    r = report(compiled, target.chip, analytic, kernel, n, b)
    params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state["params"]))
    out.update(r, fits=r["memory"].get("fits"), compile_seconds=seconds, trainable_parameters=params,
               mesh_axes=dict(mesh.shape))
    print("\n".join(summary_lines(out)))
    if a.json:
        _write_json(out, a.json)
        print(a.json)
    return 0 if out["fits"] is not False else 1


if __name__ == "__main__":
    main()
