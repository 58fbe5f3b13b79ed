"""Calibrate the step-time estimate against steps someone measured: each program whose real
step time MLPerf published is compiled on this host for its slice (`bench/calibration_compiles.sh`
for ours, `bench/maxdiffusion_aot.py` for MaxDiffusion's own step), pushed through the package's
one estimate (`planning/estimate.py`, with no calibration), and the ratio measured / estimated
written to bench/results/calibration.json, each point with its source.

    python bench/calibrate.py [--compiles bench/results/calibration] [--out bench/results/calibration.json]

The ratio a chip kind's calibrated figures use: the MaxDiffusion program's, where its compiles
exist (the same program as the measurement: the estimator's own error), else ours at MLPerf's
shapes (which also holds the difference between our step and theirs: said in its name).
A program at a per-chip batch that was measured takes that point's ratio (the estimate's
error grows with the batch: x1.03 at 16 per chip, x1.10 at 32 for ours); any other batch the
geometric mean of the points. Every point stays in the file.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from smartbrush_jax.planning import estimate  # noqa: E402

_RESULTS = "mlcommons/training_results_v4.1 (read from its mirror swsok/training_results_v4.1 @8821c70), Google/results"
# MLPerf Training v4.1, closed division, Google's SD2 U-Net submissions (MaxDiffusion, branch
# mlperf_4.1): the steady training blocks of result_0.txt, between two MLLOG block_stop events.
MEASURED = {
    ("v5p-128", 16): {
        "measured_ms": 100783 / 500, "images_per_s_per_chip": 16 / (100783 / 500) * 1e3,
        "source": {"round": "MLPerf Training v4.1", "submission": "Google, cloud-tpu-v5p-128-maxdiffusion (closed)",
                   "file": f"{_RESULTS}/cloud-tpu-v5p-128-maxdiffusion/stable_diffusion/result_0.txt",
                   "block": "steps 500-1000 (samples 512,000-1,024,000): 100,783 ms for 500 steps of global batch 1024",
                   "run": "LIBTPU_INIT_ARGS of its run.sh, attention=flash, split_head_dim, norm_num_groups=16, "
                          "v_prediction, text and latents pre-encoded (tf_records_512_encoder_state_fp32)"}},
    ("v5p-16", 32): {
        "measured_ms": 369621 / 1000, "images_per_s_per_chip": 32 / (369621 / 1000) * 1e3,
        "source": {"round": "MLPerf Training v4.1", "submission": "Google, cloud-tpu-v5p-16-maxdiffusion (closed)",
                   "file": f"{_RESULTS}/cloud-tpu-v5p-16-maxdiffusion/stable_diffusion/result_0.txt",
                   "block": "steps 2000-3000 (samples 512,000-768,000): 369,621 ms for 1000 steps of global batch 256",
                   "run": "as the v5p-128 run (same run.sh), 32 per chip on 8 chips"}},
}
PROGRAMS = {  # the compile JSON's program -> words; preferred first
    "maxdiffusion_sd2_unet": "MaxDiffusion's SD2 U-Net train step (its Flax model; our compile of it)",
    "ours_sd2_512": "our SmartBrush SD 2.x step at MLPerf's shapes (512 px, latents and text pre-encoded)",
}


def program_of(r: dict) -> str:
    return r.get("program") or "ours_sd2_512"


def points(paths) -> list:
    out = []
    for p in sorted(paths):
        with open(p) as f:
            r = json.load(f)
        key = (r.get("topology"), r.get("per_chip_batch"))
        if key not in MEASURED or "xla_costs" not in r:
            print(f"{p}: no measured step for {key} (or no compile in it): left out", file=sys.stderr)
            continue
        est = estimate.from_report(r, calibration={})["estimate"]
        m = MEASURED[key]
        out.append({"program": program_of(r), "topology": key[0], "per_chip_batch": key[1],
                    "measured_ms": m["measured_ms"], "measured_images_per_s_per_chip": m["images_per_s_per_chip"],
                    "estimated_ms": est["seconds"] * 1e3,
                    "estimated_terms_ms": {k: v * 1e3 for k, v in est["terms"].items()},
                    "ratio": m["measured_ms"] / (est["seconds"] * 1e3), "source": m["source"],
                    "compile": os.path.relpath(p, ROOT), "compiled_with": {k: r.get(k) for k in ("jax", "libtpu")},
                    "libtpu_init_args": r.get("libtpu_init_args", "")})
    return out


def ratios(pts: list) -> dict:
    for program, words in PROGRAMS.items():
        mine = [p for p in pts if p["program"] == program]
        if mine:
            ratio = math.exp(sum(math.log(p["ratio"]) for p in mine) / len(mine))
            where = ", ".join(f"{p['topology']} at {p['per_chip_batch']}/chip x{p['ratio']:.3f}" for p in mine)
            by_batch = {str(p["per_chip_batch"]): p["ratio"] for p in mine}
            return {"v5p": {"ratio": ratio, "measured_on": "v5p", "program": program, "by_per_chip_batch": by_batch,
                            "name": f"MLPerf v4.1 measured / estimated, {words.split(' (')[0]}: {where}",
                            "points": [f"{p['topology']}:{p['per_chip_batch']}" for p in mine]}}
    return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compiles", default=os.path.join(ROOT, "bench", "results", "calibration"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "calibration.json"))
    a = ap.parse_args()
    pts = points(glob.glob(os.path.join(a.compiles, "*.json")))
    if not pts:
        print(f"no compiles with a measured step in {a.compiles}: run bench/calibration_compiles.sh", file=sys.stderr)
        sys.exit(2)
    out = {"date": time.strftime("%Y-%m-%d"), "terms": estimate.TERMS, "points": pts, "ratios": ratios(pts),
           "default_kind": "v5p",
           "note": "calibrated = raw estimate x ratio; a chip kind without its own measured point borrows v5p's "
                   "(said as borrowed wherever it is used)"}
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, a.out)
    for p in pts:
        print(f"{p['program']:22s} {p['topology']:8s} {p['per_chip_batch']:3d}/chip: "
              f"measured {p['measured_ms']:.1f} ms, estimated {p['estimated_ms']:.1f} ms, ratio {p['ratio']:.3f}")
    for kind, r in out["ratios"].items():
        print(f"{kind}: x{r['ratio']:.3f} ({r['name']})")
    print(a.out)


if __name__ == "__main__":
    main()
