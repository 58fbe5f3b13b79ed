"""SmartBrush on a Cloud TPU v5p-128 slice (64 chips, 95 GiB HBM each), from SD v1.2 weights
at 512 px, the paper's global batch 1024 (16 images per chip), AdamW lr 1e-5 with warm-up,
EMA, data 0.8 / 0.2 with BLIP/label captions:

    python -m smartbrush_jax.train --config=configs/tpu_v5p.py --workdir=gs://bucket/runs/sb --distributed \\
        --config.model.init_from=gs://bucket/models/stable-diffusion-v1-2 \\
        --config.data.prepared_dirs='("/mnt/gcs/bucket/data/coco_openimages", "/mnt/gcs/bucket/data/laion")'

What fits, compiled for v5p-128 on a CPU host (`python -m smartbrush_jax.aot
--config=configs/tpu_v5p.py --topology=v5p-128 --cached-latents`; bench/results/search/,
bench/results/levers/, bench/SCALING.md): splash attention (Pallas, fused backward) for the
4096- and 1024-token self-attention, XLA for the rest, and no remat, which splash makes
affordable (XLA's attention without remat took 89.8 GiB of 95). Step times are the
package's one estimate (planning/estimate.py: ops + splash kernels + collectives, raw) and
that estimate calibrated on MLPerf Training v4.1's measured SD2 step (x1.032 at 16 per chip,
bench/results/calibration.json); no TPU ran this program.
- With a latent cache (levers/v5p-128_sd1_b16_cached.json): 30.4 GiB per chip, 208.8 ms raw
  (ops 158.6 + kernels 44.5 + collectives 5.6), 76.6 images/s per chip raw, 74.3
  calibrated. Like for like, MaxDiffusion measured 79.4 on the same slice and batch (SD2,
  text pre-encoded; MLPerf v4.1, Google's cloud-tpu-v5p-128-maxdiffusion): 0.94x of it.
- With the VAE encode in the step (the paper's setting; search/v5p-128_splash_none_b16_vae.json):
  30.6 GiB, 257.8 ms raw, 62.1 images/s per chip raw, 60.2 calibrated.
The per-chip batch is the global batch over the slice: on a v5p-64 it is 32 per chip
(search/v5p-128_splash_none_b32.json, compiled on v5p-128 at 32: 46.9 GiB, 368.2 ms raw, 86.9
images/s raw, 81.7 calibrated with MLPerf's 32-per-chip point, x1.064: 0.94x the 86.6
MaxDiffusion measured at 32 per chip on 8 chips), and on a v5p-32 64 per chip
(search/v5p-32_splash_none_b64.json: 79.0 GiB, a 17% margin, 683.2 ms raw, 93.7 images/s raw,
89.4 calibrated with the mean ratio: nobody measured 64 per chip), the paper's batch on a
quarter of the chips.
Data parallel, not FSDP: a chip holds the replicated state (13.3 GiB) with room to
spare, and the only collective is one all-reduce of the gradients (1.6 GiB per chip per
step: XLA reduces them in bf16).
"""

import importlib.util
import os


def get_config():
    spec = importlib.util.spec_from_file_location("tpu_v4", os.path.join(os.path.dirname(__file__), "tpu_v4.py"))
    v4 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(v4)
    c = v4.get_config()  # the same run; the slice, its batch per chip and the mesh differ
    c.train.batch_size = 1024  # 16 per chip on v5p-128: the paper's batch
    c.train.steps = 25_000
    c.mesh.shape = {"data": -1, "fsdp": 1, "tensor": 1}
    c.mesh.fsdp = False
    c.model.attention = "splash"
    c.model.remat = "none"
    return c
