"""Helpers of `bench/unet_step.py`: the environment record, OOM detection, the search for
the largest batch that fits, and the last table."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Dict, List

# bench/ runs as a script: make `smartbrush_jax` importable without installing it
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def environment() -> Dict[str, object]:
    """Date, machine and versions for the JSON record. Touches no device: a parent process
    that initialised JAX's GPU backend would hold 75% of the memory while its children run."""
    env = dict(date=time.strftime("%Y-%m-%d %H:%M"), machine=platform.machine(), cpus=os.cpu_count(),
               python=sys.version.split()[0])
    for name in ("jax", "jaxlib", "flax", "optax", "torch", "diffusers"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # not installed: that side cannot run
            env[name] = None
    return env


def model_flops(cfg, batch, latent):
    from smartbrush_jax.models import UNetConfig
    from smartbrush_jax.planning import flops

    fwd = flops.unet_forward_flops(UNetConfig.from_diffusers(cfg["unet"]), batch, latent, latent, cfg["tokens"])
    return flops.train_step_flops(fwd)


def speed(cfg, batch, latent, step_s, peak):
    """images/s, model TFLOP/s and MFU of one device."""
    f = model_flops(cfg, batch, latent)
    return dict(step_s=step_s, images_per_s=batch / step_s, model_flops_per_step=f,
                tflops_per_s=f / step_s / 1e12, mfu=f / step_s / peak if peak else None, peak_flops=peak)


class Named:  # what flops.peak_flops_per_device reads from a device
    def __init__(self, name):
        self.device_kind, self.platform = name, "gpu"


def write_json(path, obj):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)


def print_table(rows: List[Dict[str, object]]) -> None:
    """One row per side: name, params, step s, images/s, compile s, TFLOP/s, MFU, peak GiB."""
    print(f"\n{'':22s}{'params':>12s}{'step s':>10s}{'images/s':>10s}{'compile s':>11s}"
          f"{'TFLOP/s':>9s}{'MFU':>7s}{'peak GiB':>10s}")
    for r in rows:
        fmt = lambda k, f: "-" if r.get(k) is None else f.format(r[k])  # noqa: E731
        print(f"{r['name']:22s}{r['params']:>12,d}{r['step_s']:>10.3f}{r['images_per_s']:>10.2f}"
              f"{fmt('compile_s', '{:.1f}'):>11s}{fmt('tflops_per_s', '{:.1f}'):>9s}{fmt('mfu', '{:.3f}'):>7s}"
              f"{'-' if not r.get('peak_bytes') else format(r['peak_bytes'] / 2**30, '.2f'):>10s}")
