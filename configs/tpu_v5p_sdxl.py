"""SmartBrush on SDXL base 1.0 at 1024 px on a Cloud TPU v5p-128 slice (64 chips, 95 GiB HBM
each): both text encoders (CLIP-L + OpenCLIP bigG, projected), each crop's micro-conditioning
from the data pipeline, the SDXL VAE, AdamW lr 1e-5, EMA:

    python -m smartbrush_jax.cli.latents --prepared /data/coco_openimages --out /data/sdxl_latents \\
        --vae /models/stable-diffusion-xl-base-1.0 --resolution 1024        # once: the VAE at 1024 px is costly
    python -m smartbrush_jax.train --config=configs/tpu_v5p_sdxl.py --workdir=gs://bucket/runs/sbxl --distributed \\
        --config.model.init_from=gs://bucket/models/stable-diffusion-xl-base-1.0 \\
        --config.data.prepared_dirs='("/mnt/gcs/bucket/data/sdxl_latents",)'

FSDP: the fp32 state of the 2.6B-parameter U-Net (weights, AdamW, EMA: 41 GiB) is split
over the slice, and the weights are gathered once a step in bf16. Compiled for v5p-128 on a
CPU host (`python -m smartbrush_jax.aot --config=configs/tpu_v5p_sdxl.py --topology=v5p-128
--cached-latents`; `bash bench/tpu_search.sh sdxl`, bench/results/search/v5p-128_sdxl_*.json):
at the paper's global batch of 1024 (16 per chip), with splash attention for the 4096- and
1024-token levels and remat keeping the dense layers' outputs (recomputing convolutions,
norms and attention), the step takes 63.9 GiB per chip (a 31.2 GiB margin). The package's
one estimate (planning/estimate.py) is 1449 ms raw (ops 1174 + splash kernels 236 +
collectives 39), 11.0 images/s per chip raw, MFU 0.49, and 10.7 calibrated (MLPerf v4.1's SD2
step, x1.032 at 16 per chip: a U-Net, not SDXL's, measured)
(search/v5p-128_sdxl_splash_dots_with_no_batch_dims_saveable_b16_gather-once.json).
Full remat at the same batch: 23.7 GiB, 1591 ms raw, 10.1 images/s per chip raw; at 4 per
chip: 11.3 GiB, 511 ms raw, 7.8 raw. The collectives are 11.1 GiB of bf16
all-reduces per chip per step: about twice the bf16 weights (gather and reduce-scatter).
"""

import importlib.util
import os


def get_config():
    spec = importlib.util.spec_from_file_location("tpu_v4", os.path.join(os.path.dirname(__file__), "tpu_v4.py"))
    v4 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(v4)
    from smartbrush_jax.interop.families import ARCHITECTURES

    c = v4.get_config()  # the same run and data mix; the model, its size and the slice differ
    c.model.family = "sdxl"
    c.model.init_from = "/models/stable-diffusion-xl-base-1.0"
    for part, fields in ARCHITECTURES["sdxl"].items():  # the shapes an ahead-of-time compile uses
        c.model[part] = fields
    c.data.resolution = 1024
    c.train.batch_size = 1024  # 16 per chip on v5p-128: the paper's global batch
    c.train.steps = 100_000
    c.mesh.shape = {"data": 1, "fsdp": -1, "tensor": 1}
    c.mesh.fsdp = True
    c.model.attention = "splash"
    c.model.remat = "dots_with_no_batch_dims_saveable"
    return c
