"""Helpers of `bench/unet_step.py`: the environment record, OOM detection, the search for
the largest batch that fits, and the last table."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Callable, Dict, List, Optional

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
    from smartbrush_jax import flops
    from smartbrush_jax.models import UNetConfig

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


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error of either framework (JAX: RESOURCE_EXHAUSTED; torch:
    OutOfMemoryError), as opposed to a bug that the search must not swallow."""
    text = f"{type(exc).__name__}: {exc}"
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "OutOfMemoryError", "out of memory", "Out of memory"))


class LinearMemory:
    """Peak bytes as a line in the batch size, from the probes so far; predicts the batch
    that fills `capacity` bytes (a guess for the search, which then checks it)."""

    def __init__(self, capacity: Optional[float]):
        self.capacity, self.points = capacity, {}

    def add(self, batch: int, peak_bytes: Optional[float]) -> None:
        if peak_bytes:
            self.points[batch] = float(peak_bytes)

    def predict(self) -> Optional[float]:
        if not self.capacity or len(self.points) < 2:
            return None
        (b1, m1), (b2, m2) = sorted(self.points.items())[-2:]
        slope = (m2 - m1) / (b2 - b1)
        return b2 + (self.capacity - m2) / slope if slope > 0 else None


def largest_fitting(fits: Callable[[int], bool], start: int, limit: int, granularity: int, budget_s: float,
                    predict: Callable[[], Optional[float]] = lambda: None, log=print) -> Dict[str, object]:
    """The largest batch (a multiple of `granularity`, at most `limit`) for which
    `fits(batch)` is True: double from `start` until a failure, then bisect (a memory
    prediction, when there is one, picks the next probe instead of plain doubling or the
    midpoint). Stops when the bracket is one granularity wide, or when the next probe would
    end after `budget_s`: then `exact` is False and the answer is the bracket
    [max_batch, first_failure)."""
    t_end = time.time() + budget_s
    lo, hi, tried, b = 0, None, [], start
    while True:
        t0 = time.time()
        ok = fits(b)
        dt = time.time() - t0
        tried.append({"batch": b, "fits": ok, "seconds": round(dt, 1)})
        log(f"[max-batch]   batch {b}: {'fits' if ok else 'out of memory'} ({dt:.0f} s)")
        lo, hi = (b, hi) if ok else (lo, b)
        nxt = _next_probe(lo, hi, granularity, limit, predict())
        if nxt is None or time.time() + dt > t_end:
            break
        b = nxt
    exact = (hi is not None and hi - lo <= granularity) or (hi is None and lo >= limit)
    return {"max_batch": lo or None, "first_failure": hi, "exact": exact, "limit": limit, "tried": tried}


def _next_probe(lo: int, hi: Optional[int], g: int, limit: int, pred: Optional[float]) -> Optional[int]:
    down = lambda x: max(g, int(x) // g * g)  # noqa: E731
    if hi is None:  # still growing
        if lo >= limit:
            return None
        cand = 2 * lo if not pred else down(pred)
        return min(max(cand, lo + g), limit)
    if hi - lo <= g:
        return None
    cand = down(pred) if pred and lo < pred < hi else down(lo + (hi - lo) / 2)
    return min(max(cand, lo + g), hi - g) if hi - g >= lo + g else None


def print_table(rows: List[Dict[str, object]]) -> None:
    """One row per side: name, params, step s, images/s, compile s, TFLOP/s, MFU, peak GiB."""
    print(f"\n{'':22s}{'params':>12s}{'step s':>10s}{'images/s':>10s}{'compile s':>11s}"
          f"{'TFLOP/s':>9s}{'MFU':>7s}{'peak GiB':>10s}")
    for r in rows:
        fmt = lambda k, f: "-" if r.get(k) is None else f.format(r[k])  # noqa: E731
        print(f"{r['name']:22s}{r['params']:>12,d}{r['step_s']:>10.3f}{r['images_per_s']:>10.2f}"
              f"{fmt('compile_s', '{:.1f}'):>11s}{fmt('tflops_per_s', '{:.1f}'):>9s}{fmt('mfu', '{:.3f}'):>7s}"
              f"{'-' if not r.get('peak_bytes') else format(r['peak_bytes'] / 2**30, '.2f'):>10s}")
