#!/usr/bin/env bash
# The one command for a lent GPU (shared BENCH.md, "On a lent GPU"), from the repo root:
#
#   device run:  bash bench/gpu.sh          carry: [".whl"]        timeout_s: 600
#
# 1. check     our U-Net against diffusers on the GPU (fp32 and our bf16 settings), rel. error
# 2. step      bench/unet_step.py --config sd_v1: ours vs diffusers PyTorch (bf16 autocast,
#              SDPA, torch.compile), batch ${BATCH:-8}, images/s, TFLOP/s, MFU, peak memory
# 3. blip      bench/prepare.py: BLIP-base-shaped random captioner on cuda, fp16, batch 64, captions/s
# 4. variants ours at 32 images (configs/gpu_h100.py's per-GPU batch), attention cudnn, remat none
#              and attention_saveable (models/unet.py), 10 steps each: the choices of issue 25
# 5. maxbatch  the largest batch that fits: ours with remat none and full, PyTorch without and
#              with gradient checkpointing (doubling then bisection, multiples of 8)
# `bash bench/gpu.sh step` (or check, blip, variants, maxbatch) runs one part; "all" (the default) gives the
# max-batch searches whatever is left of GPU_BENCH_SECONDS (540) after parts 1 to 4, and
# reports a bracket where the time ran out. JSON and a log go to ${OUT:-bench/results}.
#
# The GPU image has JAX, flax, optax and PyTorch but not diffusers or transformers, and nothing
# can be downloaded there: carry their wheels, made here once (for the image's Python 3.12):
#   mkdir -p .git/info && echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 transformers==5.24.0 tokenizers==0.23.3 \
#     huggingface-hub==2.4.0 safetensors==0.8.0 regex==2026.11.19
# smartbrush_jax itself needs no install: the repo root goes on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-all}
RES=${OUT:-bench/results}
TOTAL=${GPU_BENCH_SECONDS:-540}
START=$(date +%s)
PY=${PYTHON:-python3}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# one compilation cache for the processes of this call (and the next, on a warm machine)
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/smartbrush_jax_cache}
left() { echo $((TOTAL - $(date +%s) + START)); }
exec > >(tee -a "$RES/gpu_log.txt") 2>&1

if ! $PY -c "import diffusers, transformers" 2>/dev/null; then
  ls .whl/diffusers-*.whl >/dev/null 2>&1 || { echo "diffusers is missing and no .whl/ was carried (see the header)"; exit 1; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/smartbrush_site \
    .whl/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/smartbrush_site"  # after the image's own packages
fi
$PY - <<'EOF' || exit 1
import diffusers, flax, jax, optax, torch
print(f"jax {jax.__version__} {jax.devices()} | flax {flax.__version__} | optax {optax.__version__} | "
      f"torch {torch.__version__} {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA'} | "
      f"diffusers {diffusers.__version__}")
EOF

step_args=(--config sd_v1 --batch "${BATCH:-8}" --remat "${REMAT:-none}")
if [[ $PART == all || $PART == check ]]; then
  echo "== check ($(left) s left)"
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 300 $PY bench/unet_step.py --check --json "$RES/gpu_check.json"
fi
if [[ $PART == all || $PART == step ]]; then
  echo "== step ($(left) s left)"
  timeout $(($(left) > 420 ? 420 : $(left))) $PY bench/unet_step.py "${step_args[@]}" --steps 20 --warmup 3 \
    --json "$RES/gpu_sd_v1_unet_step.json"
fi
if [[ $PART == all || $PART == blip ]]; then
  echo "== blip ($(left) s left)"
  timeout 240 $PY bench/prepare.py --blip-only --blip-size base --blip-device cuda --blip-batch 64 \
    --blip-crops 512 --json "$RES/gpu_blip_captions.json"
fi
if [[ $PART == all || $PART == variants ]]; then
  for remat in none attention_saveable; do
    echo "== variant: batch 32, cudnn, remat $remat ($(left) s left)"
    ((${left_s:=$(left)} > 200)) || { echo "too little time left for it"; continue; }
    timeout 150 $PY bench/unet_step.py --config sd_v1 --side ours --batch 32 --remat $remat --attention cudnn \
      --steps 10 --warmup 2 --json "$RES/gpu_sd_v1_b32_$remat.json"
    unset left_s
  done
fi
if [[ $PART == all || $PART == maxbatch ]]; then
  budget=$(($(left) - 40))  # two sides, each its two searches; a probe is not started past its share
  echo "== max batch ($(left) s left; ${budget} s for the searches)"
  if ((budget > 60)); then
    $PY bench/unet_step.py "${step_args[@]}" --find-max-batch --skip-step --time-budget $((budget / 2 - 20)) \
      --json "$RES/gpu_sd_v1_max_batch.json"
  else
    echo "too little time left: run 'bash bench/gpu.sh maxbatch' on its own"
  fi
fi

echo "== summary ($(($(date +%s) - START)) s)"
$PY - "$RES" <<'EOF'
import json, os, sys
res = sys.argv[1]
def load(name):
    p = os.path.join(res, name)
    return json.load(open(p)) if os.path.isfile(p) else None
c = load("gpu_check.json")
if c:
    print(f"check: fp32 rel err {c['fp32_rel_err']:.2e}, bf16 ({c['bf16_attention']}) {c['bf16_rel_err']:.2e}: "
          f"{'OK' if c['ok'] else 'FAILED'}")
s = load("gpu_sd_v1_unet_step.json")
if s:
    print(f"sd_v1 step, batch {s['batch']}, {s['dtype']}, {s.get('ours_device') or s.get('pytorch_device')}, "
          f"jax {s['jax']} torch {s['torch']} diffusers {s['diffusers']}, {s['date']}")
    print(f"{'':10s}{'step s':>9s}{'images/s':>10s}{'TFLOP/s':>9s}{'MFU':>7s}{'peak GiB':>10s}  notes")
    for name, key in (("ours", "ours"), ("PyTorch", "pytorch")):
        r = s.get(key)
        if not r:
            print(f"{name:10s} failed (see the log)")
            continue
        note = f"attention {r['attention']}, remat {r['remat']}" if key == "ours" else \
            f"torch.compile {r['compiled']}"
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.3f}"
        gib = "-" if not r["peak_bytes"] else f"{r['peak_bytes'] / 2**30:.1f}"
        print(f"{name:10s}{r['step_s']:>9.4f}{r['images_per_s']:>10.1f}{r['tflops_per_s']:>9.1f}{mfu:>7s}{gib:>10s}  "
              f"{note}")
    if "ratio" in s:
        print(f"ratio ours/PyTorch images/s: {s['ratio']:.2f}")
b = load("gpu_blip_captions.json")
if b:
    r = b["blip"]
    print(f"BLIP {r['size']} on {r['device']} ({r['dtype']}, batch {r['batch']}): {r['captions_per_s']:.1f} captions/s")
for remat in ("none", "attention_saveable"):
    v = load(f"gpu_sd_v1_b32_{remat}.json")
    r = (v or {}).get("ours")
    if r:
        print(f"variant batch 32, attention {r['attention']}, remat {remat}: {r['images_per_s']:.1f} images/s, "
              f"MFU {r['mfu'] if r['mfu'] is None else round(r['mfu'], 3)}")
m = load("gpu_sd_v1_max_batch.json")
for key in ("ours_max_batch", "pytorch_max_batch"):
    for name, r in ((m or {}).get(key) or {}).items():
        if "max_batch" in r:
            hi = r["first_failure"]
            note = "exact" if r["exact"] else (f"search cut short, fails at {hi}" if hi else "search cut short")
            print(f"largest batch {key.split('_')[0]:8s} {name:28s} {r['max_batch']} ({note})")
EOF
