"""SmartBrush on a Cloud TPU v5p-128 slice (64 chips, 95 GiB HBM each), from SD v1.2 weights
at 512 px, the paper's global batch 1024 (16 images per chip), AdamW lr 1e-5 with warm-up,
EMA, data 0.8 / 0.2 with BLIP/label captions:

    python -m smartbrush_jax.train --config=configs/tpu_v5p.py --workdir=gs://bucket/runs/sb --distributed \\
        --config.model.init_from=gs://bucket/models/stable-diffusion-v1-2 \\
        --config.data.prepared_dirs='("/mnt/gcs/bucket/data/coco_openimages", "/mnt/gcs/bucket/data/laion")'

What fits, compiled for v5p-128 on a CPU host (`python -m smartbrush_jax.aot
--config=configs/tpu_v5p.py --topology=v5p-128`; bench/results/search/, bench/SCALING.md):
splash attention (Pallas, fused backward) for the 4096- and 1024-token self-attention, XLA
for the rest, and no remat, which splash makes affordable (XLA's attention without remat
took 89.8 GiB of 95). With the VAE encode in the step (the paper's setting; compiled in
search/v5p-128_splash_none_b16_vae.json): 30.6 GiB per chip, 64.4 GiB margin, estimate
251 ms a step, 63.6 images/s per chip (37.4 before: XLA attention, remat full). With a
latent cache: 30.4 GiB, 203 ms, 78.8 images/s per chip, MFU 0.41. Estimates are XLA's
`optimal_seconds` for the program plus the splash kernels at the bf16 peak (their FLOPs with
the head dim padded to 128 lanes; XLA counts none for a custom call). The per-chip batch
is the global batch over the slice: the same config on a v5p-64 is 32 per chip, 46.9 GiB,
89.3 images/s per chip (search/v5p-128_splash_none_b32.json), and on a v5p-32 64 per chip,
compiled for that slice (search/v5p-32_splash_none_b64.json): 79.0 GiB (a 16.0 GiB, 17%
margin), 664 ms a step, 96.4 images/s per chip, MFU 0.51, 1.11x MLPerf's 86.6. That is
the fastest per chip, and the paper's batch on a quarter of the chips at 3.3x the time
per step (664 ms against 203): `--topology=v5p-32`, nothing else changes.
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
