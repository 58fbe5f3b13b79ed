"""The tables of bench/SCALING.md and the README from the ahead-of-time compiles
(bench/results/tpu_aot_*.json, written by `bash bench/tpu_aot.sh`).

    python bench/aot_table.py [bench/results/tpu_aot_*.json]

Every figure is read from a compile for the target TPU (XLA's memory analysis, the
collectives of its optimized HLO, its cost analysis); the step time is recomputed here
from the stored counts by the package's one estimate (`planning/estimate.py`: ops +
kernels + collectives, raw), beside it the calibrated figure (bench/results/calibration.json;
"v5p's" where a v4 row borrows v5p's ratio), so every row is estimated by the same rule.
"""

from __future__ import annotations

import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from smartbrush_jax.planning import estimate  # noqa: E402

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
    m = r["memory"]
    e = estimate.from_report(r)
    est = e["estimate"]
    if not est.get("seconds"):
        return (f"| {r['topology']} | {r['attention']} attention, remat {r['remat']} | - | {r['per_chip_batch']} | "
                f"{m['total'] / GIB:.1f} ({m['temp'] / GIB:.1f}) | {m['margin'] / GIB:+.1f} | - | - | "
                f"none: {est['method'].split(';')[0]} | - | - | - | {name} |")
    coll = ", ".join(f"{k} {v['bytes'] / GIB:.1f}" for k, v in r["collectives"].items() if v["bytes"] >= GIB / 100)
    from smartbrush_jax.planning.search import Probe, memory_line

    one = {r["per_chip_batch"]: Probe(True, m["total"], m["temp"])}
    line = memory_line(one, r["chip"]["hbm_gib"] * GIB) if r.get("fits") else None
    largest = f"line: {int(line)}" if line else "-"
    if "max_per_chip_batch" in search:
        largest = f"{search['max_per_chip_batch']} compiled"
        if search.get("first_failure"):
            largest += f", {search['first_failure']} does not fit"
        if search.get("predicted_max_per_chip_batch"):
            largest += f"; line: {search['predicted_max_per_chip_batch']}"
    inputs = "VAE in step" if r["vae_in_step"] else "cached latents"
    if not r.get("text_in_step", True):
        inputs += " and text"
    mesh = f"FSDP gather {r.get('fsdp_gather') or 'per_use'}" if r["fsdp"] else "DP"
    terms = " + ".join(f"{k} {v * 1e3:.0f}" for k, v in est["terms"].items())
    attn = r["attention"] + (f" >= {r['splash_min_tokens']} tokens" if r["attention"] in ("splash", "auto")
                             and r.get("splash_min_tokens") else "")
    if "unfused" in name:
        attn += " (unfused backward)"
    cal = e["calibrated_images_per_s_per_chip"]
    cal = "-" if cal is None else f"{cal:.1f}" + (" (v5p's)" if e["calibration"]["borrowed"] else "")
    return (f"| {r['topology']} | {mesh}, {attn} attention, remat {r['remat']} | {inputs} | "
            f"{r['per_chip_batch']} ({r['global_batch']}) | {m['total'] / GIB:.1f} ({m['temp'] / GIB:.1f}) | "
            f"{m['margin'] / GIB:+.1f} | {largest} | {coll} | {est['seconds'] * 1e3:.0f} ms ({terms}) | "
            f"{e['mfu']:.2f} | {e['images_per_s_per_chip']:.1f} | {cal} | {name} |")


def main(argv=None) -> int:
    here = os.path.join(os.path.dirname(__file__), "results")
    paths = (argv or sys.argv[1:]) or (glob.glob(os.path.join(here, "tpu_aot_*.json")) +
                                       glob.glob(os.path.join(here, "search", "*.json")))
    print("| Slice | Step | Inputs | Per chip (global) | GiB per chip (temporaries) | Margin GiB | Largest per-chip "
          "batch | Collectives GiB per chip per step | Raw step estimate (terms, ms) | MFU at raw | Images/s per chip, "
          "raw | Images/s per chip, calibrated | File |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, search, r in load(paths):
        print(row(name, search, r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
