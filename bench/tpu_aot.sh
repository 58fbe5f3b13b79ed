#!/usr/bin/env bash
# The SmartBrush step compiled ahead of time for TPU slices on this host (libtpu wheel; no
# TPU needed): memory per chip, collectives, the largest per-chip batch, step-time estimate.
# Writes bench/results/tpu_aot_<slice>_<inputs>.json; `python bench/aot_table.py` makes the
# table of bench/SCALING.md from them. Each compile of the full SD step takes ~10-12 minutes
# and up to ~20 GB of host memory on a 2-core, 24 GB host; the set takes about an hour.
#   bash bench/tpu_aot.sh [v4-32 v5p-128 ...]
# MAX_COMPILES (default 1): compiles per largest-batch search. With 1 the largest batch is
# the memory line's prediction from one compile (labelled so); on our 24 GB host a second
# compile of the VAE-in-step program at the predicted batch (~30 per chip) was killed for
# host memory (22.6 GB), so searches of 2+ compiles need a bigger host.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results}
run() {  # name, then flags
  local name=$1; shift
  echo "== $name: $*" >&2
  "$PY" -m smartbrush_jax.cli.aot "$@" --json "$OUT/tpu_aot_$name.json" || echo "($name exited $?)" >&2
}
# attention at 4096 tokens: XLA's, against the chunked attention of configs/tpu_v4.py below
run v4-32_cached_xla_attention --config=configs/tpu_v4.py --topology=v4-32 --cached_latents --per_chip_batch=16 \
  --config.model.attention=xla
# remat on v5p: none (everything kept) against the config's full remat
run v5p-128_cached_no_remat --config=configs/tpu_v5p.py --topology=v5p-128 --cached_latents --per_chip_batch=16 \
  --config.model.remat=none
for topo in ${*:-v4-32 v5p-128}; do
  cfg=configs/tpu_v4.py; [[ $topo == *v5p* ]] && cfg=configs/tpu_v5p.py
  run "${topo}_cached" --config=$cfg --topology=$topo --cached_latents --per_chip_batch=16
  # the paper's setting (VAE encode in the step) at 16 per chip, and the largest batch
  # (tpu_v4.py runs 32 per chip on v4-32: bench/results/search/v4-32_chunked_full_b32_gather-once_vae.json)
  run "${topo}_vae" --config=$cfg --topology=$topo --per_chip_batch=16 --find_max_batch \
    --max_compiles=${MAX_COMPILES:-1}
done
