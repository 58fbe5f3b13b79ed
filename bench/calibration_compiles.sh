#!/usr/bin/env bash
# The programs whose real step time MLPerf published, compiled on this host for their slices
# (libtpu; no TPU) and written to bench/results/calibration/: our SD 2.x U-Net step at
# MLPerf Training v4.1's shapes (512 px, latents and text states pre-encoded, as MLPerf's
# reference pre-encodes both) at the two measured points, v5p-128 at 16 per chip and
# v5p-16 (8 chips) at 32 per chip. `python bench/calibrate.py` turns them into
# bench/results/calibration.json. Each compile takes ~8-15 minutes and up to ~20 GB here:
# run one at a time.
#   bash bench/calibration_compiles.sh [v5p-128:16 v5p-16:32]
# MaxDiffusion's own step at the same points: bench/maxdiffusion_aot.py (needs a checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results/calibration}
mkdir -p "$OUT"
for point in ${*:-v5p-128:16 v5p-16:32}; do
  topo=${point%%:*}; batch=${point##*:}
  echo "== ours sd2 512 px, $topo at $batch per chip" >&2
  "$PY" -m smartbrush_jax.cli.aot --config=configs/tpu_v5p_sd2.py --config.data.resolution=512 \
    --topology="$topo" --per_chip_batch="$batch" --cached_latents --cached_text \
    --json "$OUT/ours_sd2_512_${topo}_b${batch}.json" || echo "($topo exited $?)" >&2
done
