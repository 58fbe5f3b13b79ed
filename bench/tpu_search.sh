#!/usr/bin/env bash
# The search of issue 25: attention x remat x per-chip batch for the SD v1 step at 512 px on
# cached latents, each point compiled for the slice on this host (libtpu; no TPU), one JSON
# per point in bench/results/search/<slice>[_<family>]_<attention>_<remat>_b<batch>.json;
# `python bench/aot_table.py bench/results/search/*.json` tabulates them.
#   bash bench/tpu_search.sh [v5p|v4|sd2|sdxl]  (POINTS="splash:full:32 ..." to choose points;
#                                              v4 and sdxl are FSDP: GATHER=once|per_use, mesh.fsdp_gather;
#                                              sd2: SD 2.1 at 768 px, sdxl: SDXL at 1024 px, both on v5p-128)
# One v5p-128 compile takes ~6-8 minutes and up to ~20 GB of host memory here (v4-32 FSDP
# ~12 minutes); points run one after another.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results/search}
mkdir -p "$OUT"
which=${1:-v5p}
family=""; fsdp=""
if [[ $which == v5p ]]; then
  cfg=configs/tpu_v5p.py; topo=v5p-128
  default="splash:none:16 splash:full:32 splash:attention_saveable:32 splash:dots_and_attention_saveable:32 splash:none:32"
elif [[ $which == sd2 ]]; then
  cfg=configs/tpu_v5p_sd2.py; topo=v5p-128; family=_sd2
  default="splash:none:16 splash:full:16"
elif [[ $which == sdxl ]]; then
  cfg=configs/tpu_v5p_sdxl.py; topo=v5p-128; family=_sdxl; fsdp=1
  default="splash:full:4 splash:full:8"
else
  cfg=configs/tpu_v4.py; topo=v4-32; fsdp=1
  default="splash:full:16 splash:attention_saveable:16 xla:full:16"
fi
for point in ${POINTS:-$default}; do
  IFS=: read -r attn remat batch min <<<"$point"
  gather=""
  [[ -n $fsdp ]] && gather="_gather-${GATHER:-once}"  # mesh.fsdp_gather (FSDP configs only)
  name="${topo}${family}_${attn}_${remat}_b${batch}${min:+_min$min}${gather}"
  [[ -s "$OUT/$name.json" && -z "${AGAIN:-}" ]] && { echo "== $name: have it" >&2; continue; }
  echo "== $name ($(date +%H:%M))" >&2
  "$PY" -m smartbrush_jax.cli.aot --config=$cfg --topology=$topo --cached_latents --per_chip_batch="$batch" \
    --config.model.attention="$attn" --config.model.remat="$remat" ${min:+--config.model.splash_min_tokens=$min} \
    ${gather:+--config.mesh.fsdp_gather=${GATHER:-once}} \
    --json "$OUT/$name.json" 2>&1 | grep -v "^WARNING\|^E0000\|Source Location\|^learning/\|InitGoogle\|host bounds" \
    || echo "($name exited ${PIPESTATUS[0]})" >&2
done
