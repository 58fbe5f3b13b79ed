"""The tables of bench/SCALING.md and the README from the ahead-of-time compiles
(bench/results/tpu_aot_*.json, written by `bash bench/tpu_aot.sh`).

    python bench/aot_table.py [bench/results/tpu_aot_*.json]

Every figure is read from a compile for the target TPU (XLA's memory analysis, the
collectives of its optimized HLO, its cost analysis); the step time is recomputed here
with `xla.estimate` from the stored counts, so that every row is estimated by
the same rule (a roofline lower bound unless XLA's own estimate is plausible).
"""

from __future__ import annotations

import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from smartbrush_jax.planning import xla  # noqa: E402

GIB = 2**30


def load(paths):
    rows = []
    for p in sorted(paths):
        r = json.load(open(p))
        best = r.get("report") if "max_per_chip_batch" in r else r
        if not best:
            continue
        rows.append((os.path.basename(p), r, best))
    return rows


def row(name: str, search: dict, r: dict) -> str:
    chip = r["chip"]
    m = r["memory"]
    peak = chip["bf16_tflops"] * 1e12
    est = xla.estimate(r["xla_costs"], peak, chip["hbm_gbps"] * 1e9, r["flops"]["analytic"])
    kernel = r.get("kernel_flops")
    if kernel:  # the splash kernels, which XLA's counts leave out (train/aot.py)
        est = xla.add_kernel_time(est, kernel["step_padded"], peak, "splash kernels")
    if not est.get("seconds"):
        return (f"| {r['topology']} | {r['attention']} attention, remat {r['remat']} | - | {r['per_chip_batch']} | "
                f"{m['total'] / GIB:.1f} ({m['temp'] / GIB:.1f}) | {m['margin'] / GIB:+.1f} | - | - | "
                f"none: {est['method'].split(';')[0]} | - | - | {name} |")
    mfu = r["flops"]["analytic"] / (est["seconds"] * peak)
    coll = ", ".join(f"{k} {v['bytes'] / GIB:.1f}" for k, v in r["collectives"].items() if v["bytes"] >= GIB / 100)
    from smartbrush_jax.planning.search import Probe, memory_line

    one = {r["per_chip_batch"]: Probe(True, m["total"], m["temp"])}
    line = memory_line(one, chip["hbm_gib"] * GIB) if r.get("fits") else None
    largest = f"line: {int(line)}" if line else "-"
    if "max_per_chip_batch" in search:
        largest = f"{search['max_per_chip_batch']} compiled"
        if search.get("first_failure"):
            largest += f", {search['first_failure']} does not fit"
        if search.get("predicted_max_per_chip_batch"):
            largest += f"; line: {search['predicted_max_per_chip_batch']}"
    inputs = "VAE in step" if r["vae_in_step"] else "cached latents"
    mesh = f"FSDP gather {r.get('fsdp_gather') or 'per_use'}" if r["fsdp"] else "DP"
    how = "XLA optimal_seconds" if est["method"].startswith("XLA") else \
        f"roofline ({'HBM' if 'HBM bandwidth-bound' in est['method'] else 'compute'})"
    if kernel:
        how += f" + {est['kernel_seconds'] * 1e3:.0f} ms kernels at peak"
    side = [f"{k.split('_')[0]} {est[k] * 1e3:.0f}" for k in ("optimal_seconds", "roofline_seconds")
            if est.get(k) and est[k] > 0]
    how += f" ({', '.join(side)} ms before kernels)" if kernel and side else f" ({', '.join(side)} ms)" if side else ""
    attn = r["attention"] + (f" >= {r['splash_min_tokens']} tokens" if r["attention"] in ("splash", "auto")
                             and r.get("splash_min_tokens") else "")
    if "unfused" in name:
        attn += " (unfused backward)"
    return (f"| {r['topology']} | {mesh}, {attn} attention, remat {r['remat']} | {inputs} | "
            f"{r['per_chip_batch']} ({r['global_batch']}) | {m['total'] / GIB:.1f} ({m['temp'] / GIB:.1f}) | "
            f"{m['margin'] / GIB:+.1f} | {largest} | {coll} | {est['seconds'] * 1e3:.0f} ms, {how} | "
            f"{mfu:.2f} | {r['per_chip_batch'] / est['seconds']:.1f} | {name} |")


def main(argv=None) -> int:
    here = os.path.join(os.path.dirname(__file__), "results")
    paths = (argv or sys.argv[1:]) or (glob.glob(os.path.join(here, "tpu_aot_*.json")) +
                                       glob.glob(os.path.join(here, "search", "*.json")))
    print("| Slice | Step | Inputs | Per chip (global) | GiB per chip (temporaries) | Margin GiB | Largest per-chip "
          "batch | Collectives GiB per chip per step | Step time estimate | MFU it implies | Images/s per chip | "
          "File |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, search, r in load(paths):
        print(row(name, search, r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
