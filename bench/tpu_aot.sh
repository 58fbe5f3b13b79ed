#!/usr/bin/env bash
# The SmartBrush step compiled ahead of time for TPU slices on this host (libtpu wheel; no
# TPU needed): memory per chip, collectives, the largest per-chip batch, step-time estimate.
# Writes bench/results/tpu_aot_<slice>_<inputs>.json. Each compile of the full SD step takes
# 10-15 minutes on a 2-core host; the whole set about 1.5 hours.
#   bash bench/tpu_aot.sh [v4-32 v5p-128 ...]      (MAX_COMPILES=3 for an exact search)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results}
run() {  # name, then flags
  local name=$1; shift
  echo "== $name: $*" >&2
  "$PY" -m smartbrush_jax.aot "$@" --json "$OUT/tpu_aot_$name.json" || echo "($name exited $?)" >&2
}
for topo in ${*:-v4-32 v5p-128}; do
  cfg=configs/tpu_v4.py; [[ $topo == *v5p* ]] && cfg=configs/tpu_v5p.py
  # a latent cache, 16 images per chip: the shipped attention (chunked) against
  # tpu_aot_v4-32_cached_xla_attention.json (XLA's, same batch and remat)
  run "${topo}_cached" --config=$cfg --topology=$topo --cached_latents --per_chip_batch=16
  # the paper's setting (VAE encode in the step): the largest per-chip batch
  run "${topo}_vae" --config=$cfg --topology=$topo --per_chip_batch=16 --find_max_batch \
    --max_compiles=${MAX_COMPILES:-2}
done
