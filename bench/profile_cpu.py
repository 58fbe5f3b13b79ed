"""Where the time of the `tiny` U-Net train step goes on CPU, ours (JAX/XLA) against
PyTorch (diffusers), component by component, in one run (bench/CPU_PROFILE.md).

    python bench/profile_cpu.py                          # all parts, default attention
    python bench/profile_cpu.py --attention chunked      # whole step with our chunked attention
    python bench/profile_cpu.py --parts step,trace --reps 3

Parts (`--parts`, comma separated):
  step       whole train step (forward, MSE, backward, AdamW), ours and PyTorch interleaved
  attention  attention core at the tiny config's shapes, fwd and fwd+bwd: XLA default,
             our "chunked", torch SDPA
  conv       3x3 conv at each resolution, fwd+bwd: XLA NHWC, XLA NCHW, torch NCHW, torch channels_last
  norm       GroupNorm(32) at each resolution, fwd+bwd
  adamw      the AdamW update over the U-Net's parameters: optax vs torch.optim.AdamW
  trace      jax.profiler trace of one whole step, per-HLO-op time grouped by model part

Every timing is the minimum over `--reps` repetitions, ours and PyTorch alternating, so
load from other processes hits both sides alike. XLA_FLAGS in the environment applies
(recorded in the JSON). Writes a table to stdout and bench/results/cpu_tiny_profile.json.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from _torch_step import torch_step  # bench/ is sys.path[0] when this runs as a script
from unet_step import CONFIGS, make_batch

ROWS = []


def _block(x):
    return jax.block_until_ready(x)


def interleaved(fns, reps):
    """{name: min seconds} for each callable, calls alternating, after one warm-up each."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}, {k: float(np.median(v)) for k, v in times.items()}


def record(part, case, res):
    best, med = res
    ROWS.append(dict(part=part, case=case, **{f"{k}_s": v for k, v in best.items()},
                     **{f"{k}_median_s": v for k, v in med.items()}))
    cells = "  ".join(f"{k} {v * 1e3:8.1f} ms" for k, v in best.items())
    print(f"{part:10s} {case:34s} {cells}", flush=True)


# ---------------------------------------------------------------------------- whole step

def jax_step(cfg, batch, attention):
    from smartbrush_jax.interop.loader import init_params
    from smartbrush_jax.models import UNet2DConditionModel, UNetConfig

    model = UNet2DConditionModel(UNetConfig.from_diffusers(cfg["unet"]), attention_impl=attention)
    params = init_params(model, jax.random.PRNGKey(0))
    opt = optax.adamw(1e-4, weight_decay=1e-2)
    state = [params, opt.init(params)]
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}

    def loss_fn(p, b):
        out = model.apply({"params": p}, b["x"], b["t"], b["ctx"], b["s"])
        return jnp.mean((out - b["target"]) ** 2)

    def train_step(p, o, b):
        loss, grads = jax.value_and_grad(loss_fn)(p, b)
        updates, o = opt.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(state[0], state[1], arrays).compile()

    def run():
        state[0], state[1], loss = compiled(state[0], state[1], arrays)
        return float(loss)

    return run, compiled, state, arrays


TORCH_WORKER = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[3])
from _torch_step import torch_step  # no JAX in this process
step, _ = torch_step({"unet": json.loads(sys.argv[1])}, dict(np.load(sys.argv[2])))
print("ready", flush=True)
for line in sys.stdin:
    t0 = time.perf_counter(); step(); print(time.perf_counter() - t0, flush=True)
"""


def part_step(cfg, batch, args):
    """Whole step. PyTorch runs in its own process (no JAX imported there: with JAX's runtime
    in the same process PyTorch's OpenMP step was up to 2x slower here), one step at a time
    alternating with ours."""
    import subprocess

    ours, *_ = jax_step(cfg, batch, args.attention)
    fd, path = tempfile.mkstemp(suffix=".npz")
    os.close(fd)
    np.savez(path, **batch)
    unet = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg["unet"].items()}
    proc = subprocess.Popen([sys.executable, "-c", TORCH_WORKER, json.dumps(unet), path,
                             os.path.dirname(os.path.abspath(__file__))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"

    def theirs():
        proc.stdin.write("step\n")
        proc.stdin.flush()
        return float(proc.stdout.readline())

    times = {"ours": [], "torch": []}
    ours(), theirs()  # warm-up
    for _ in range(args.reps):
        t0 = time.perf_counter()
        ours()
        times["ours"].append(time.perf_counter() - t0)
        times["torch"].append(theirs())
    proc.stdin.close()
    proc.wait()
    os.unlink(path)
    res = ({k: min(v) for k, v in times.items()}, {k: float(np.median(v)) for k, v in times.items()})
    record("step", f"train step (attention={args.attention or 'default'})", res)
    ratio = res[0]["torch"] / res[0]["ours"]
    print(f"{'':10s} ratio ours/PyTorch images/s (min of {args.reps}): {ratio:.2f}; "
          f"of medians {res[1]['torch'] / res[1]['ours']:.2f}; load {os.getloadavg()}", flush=True)
    return dict(ratio_min=ratio, ratio_median=res[1]["torch"] / res[1]["ours"], ours_s=times["ours"],
                torch_s=times["torch"], load=os.getloadavg())


# ---------------------------------------------------------------------------- attention

def attention_shapes(cfg):
    """(name, B, Tq, Tk, heads, head_dim) of the attention calls in the tiny U-Net."""
    b, lat, heads = cfg["batch"], cfg["latent"], cfg["unet"]["attention_head_dim"]
    out = []
    for i, ch in enumerate(cfg["unet"]["block_out_channels"][:3]):
        t = (lat >> i) ** 2
        out.append((f"self {t}x{t} C={ch}", b, t, t, heads, ch // heads))
        out.append((f"cross {t}x{cfg['tokens']} C={ch}", b, t, cfg["tokens"], heads, ch // heads))
    return out


def part_attention(cfg, args):
    from smartbrush_jax.models.layers import chunked_attention

    rng = np.random.default_rng(0)
    for name, b, tq, tk, n, h in attention_shapes(cfg):
        q = rng.standard_normal((b, tq, n, h)).astype(np.float32)
        k = rng.standard_normal((b, tk, n, h)).astype(np.float32)
        v = rng.standard_normal((b, tk, n, h)).astype(np.float32)
        jq, jk, jv = map(jnp.asarray, (q, k, v))
        tq_, tk_, tv_ = (torch.from_numpy(x.copy()).permute(0, 2, 1, 3).contiguous().requires_grad_()
                         for x in (q, k, v))
        impls = {"xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v),
                 "chunked": lambda q, k, v: chunked_attention(q, k, v)}
        fwd = {f"ours_{i}": (lambda f=jax.jit(f): _block(f(jq, jk, jv))) for i, f in impls.items()}
        grad = {f"ours_{i}": (lambda f=jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) ** 2),
                                                        argnums=(0, 1, 2))): _block(f(jq, jk, jv)))
                for i, f in impls.items()}

        def t_fwd():
            with torch.no_grad():
                torch.nn.functional.scaled_dot_product_attention(tq_, tk_, tv_)

        def t_grad():
            o = torch.nn.functional.scaled_dot_product_attention(tq_, tk_, tv_)
            torch.autograd.grad((o ** 2).sum(), (tq_, tk_, tv_))

        record("attention", f"{name} fwd", interleaved({**fwd, "torch": t_fwd}, args.reps))
        record("attention", f"{name} fwd+bwd", interleaved({**grad, "torch": t_grad}, args.reps))


# ---------------------------------------------------------------------------- conv, norm

def part_conv(cfg, args):
    rng = np.random.default_rng(0)
    b, lat = cfg["batch"], cfg["latent"]
    for i, ch in enumerate(cfg["unet"]["block_out_channels"]):
        s = lat >> i
        x = rng.standard_normal((b, s, s, ch)).astype(np.float32)
        w = (rng.standard_normal((3, 3, ch, ch)) * 0.05).astype(np.float32)

        def conv(x, w, dn):
            return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)

        nhwc = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w, ("NHWC", "HWIO", "NHWC")) ** 2), argnums=(0, 1)))
        nchw = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w, ("NCHW", "OIHW", "NCHW")) ** 2), argnums=(0, 1)))
        jx, jw = jnp.asarray(x), jnp.asarray(w)
        jxc, jwc = jnp.asarray(x.transpose(0, 3, 1, 2)), jnp.asarray(w.transpose(3, 2, 0, 1))
        tconv = torch.nn.Conv2d(ch, ch, 3, padding=1)
        tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
        tconv_cl = torch.nn.Conv2d(ch, ch, 3, padding=1).to(memory_format=torch.channels_last)
        tx_cl = tx.detach().to(memory_format=torch.channels_last).requires_grad_()

        def t_run(m, xx):
            (m(xx) ** 2).sum().backward()

        res = interleaved({"ours_nhwc": lambda: _block(nhwc(jx, jw)), "ours_nchw": lambda: _block(nchw(jxc, jwc)),
                           "torch": lambda: t_run(tconv, tx), "torch_cl": lambda: t_run(tconv_cl, tx_cl)}, args.reps)
        record("conv3x3", f"{s}x{s} C={ch} fwd+bwd", res)


def part_norm(cfg, args):
    from smartbrush_jax.models.layers import group_norm

    rng = np.random.default_rng(0)
    b, lat = cfg["batch"], cfg["latent"]
    for i, ch in enumerate(cfg["unet"]["block_out_channels"]):
        s = lat >> i
        x = rng.standard_normal((b, s, s, ch)).astype(np.float32)
        gn = group_norm(32, 1e-5, "gn", jnp.float32, jnp.float32)
        p = gn.init(jax.random.PRNGKey(0), jnp.asarray(x))
        f = jax.jit(jax.grad(lambda p, x: jnp.sum(gn.apply(p, x) ** 2), argnums=(0, 1)))
        jx = jnp.asarray(x)
        tgn = torch.nn.GroupNorm(32, ch, eps=1e-5)
        tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
        record("groupnorm", f"{s}x{s} C={ch} fwd+bwd",
               interleaved({"ours": lambda: _block(f(p, jx)), "torch": lambda: (tgn(tx) ** 2).sum().backward()},
                           args.reps))


def part_adamw(cfg, args):
    _, model = torch_step(cfg, make_batch(cfg))
    topt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-2)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    params = {str(i): jnp.asarray(p.detach().numpy()) for i, p in enumerate(model.parameters())}
    grads = jax.tree_util.tree_map(lambda x: x * 0.01, params)
    opt = optax.adamw(1e-4, weight_decay=1e-2)
    state = [params, opt.init(params)]

    @jax.jit
    def upd(p, o, g):
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o

    def ours():
        state[0], state[1] = upd(state[0], state[1], grads)
        _block(state[0])

    n = sum(p.numel() for p in model.parameters())
    record("adamw", f"update over {n / 1e6:.1f}M params", interleaved({"ours": ours, "torch": topt.step}, args.reps))


# ---------------------------------------------------------------------------- trace

def categorise(op_name: str) -> str:
    o = op_name.lower()
    side = "bwd" if "transpose(" in o else "fwd"
    if "unet2dconditionmodel" not in o:
        return "optimizer / loss / other"
    if "/attn1/" in o or "/attn2/" in o:
        part = "attention projections" if re.search(r"/to_(q|k|v|out)", o) else "attention core (QK, softmax, PV)"
    elif "/ff/" in o:
        part = "feed-forward (GEGLU)"
    elif "norm" in o:
        part = "group/layer norm"
    elif "conv" in o or "proj_in" in o or "proj_out" in o:
        part = "convolutions (incl. 1x1)"
    else:
        part = "other (elementwise, embeddings, resample)"
    return f"{part} {side}"


def part_trace(cfg, batch, args):
    run, compiled, state, arrays = jax_step(cfg, batch, args.attention)
    run()
    hlo = compiled.as_text()
    meta = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]*)\"", hlo, re.M):
        meta[m.group(1)] = m.group(2)
    d = tempfile.mkdtemp(prefix="jax_trace_")
    jax.profiler.start_trace(d)
    t0 = time.perf_counter()
    run()
    wall = time.perf_counter() - t0
    jax.profiler.stop_trace()
    pd = jax.profiler.ProfileData.from_file(sorted(glob.glob(d + "/**/*.xplane.pb", recursive=True))[-1])
    by_cat, by_kind, total = collections.Counter(), collections.Counter(), 0
    for plane in pd.planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name and "XLA" not in line.name:
                continue
            for ev in line.events:
                if ev.name not in meta or re.match(r"(while|call|conditional)", ev.name):
                    continue  # containers: their body ops are traced themselves
                ms = ev.duration_ns / 1e6
                by_cat[categorise(meta[ev.name])] += ms
                by_kind[re.sub(r"[.\d]+$", "", ev.name)] += ms
                total += ms
    print(f"\ntrace: one step {wall:.2f} s wall; {total / 1e3:.2f} s of per-op time summed over threads", flush=True)
    for k, v in by_cat.most_common():
        print(f"  {k:52s} {v / 1e3:7.2f} s  {100 * v / total:5.1f}%")
    print("  by HLO kind:", ", ".join(f"{k} {v / 1e3:.2f}s" for k, v in by_kind.most_common(8)), flush=True)
    return dict(wall_s=wall, op_time_s=total / 1e3, by_category_s={k: v / 1e3 for k, v in by_cat.items()},
                by_kind_s={k: v / 1e3 for k, v in by_kind.most_common(15)})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="step,attention,conv,norm,adamw,trace")
    ap.add_argument("--attention", default="", help="model.attention_impl for step/trace: '', 'xla', 'chunked'")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "cpu_tiny_profile.json"))
    args = ap.parse_args(argv)
    args.attention = args.attention or None
    cfg = CONFIGS["tiny"]
    batch = make_batch(cfg)
    parts = args.parts.split(",")
    print(f"[profile] tiny config, torch threads {torch.get_num_threads()}, load {os.getloadavg()}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    out = dict(date=time.strftime("%Y-%m-%d %H:%M"), jax=jax.__version__, torch=torch.__version__,
               cpus=os.cpu_count(), xla_flags=os.environ.get("XLA_FLAGS", ""), attention=args.attention or "default",
               reps=args.reps, load_before=os.getloadavg())
    if "step" in parts:
        out["step"] = part_step(cfg, batch, args)
    if "attention" in parts:
        part_attention(cfg, args)
    if "conv" in parts:
        part_conv(cfg, args)
    if "norm" in parts:
        part_norm(cfg, args)
    if "adamw" in parts:
        part_adamw(cfg, args)
    if "trace" in parts:
        out["trace"] = part_trace(cfg, batch, args)
    out["load_after"] = os.getloadavg()
    out["rows"] = ROWS
    if args.json:
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
