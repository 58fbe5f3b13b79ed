"""SmartBrush on SD 2.1 (768 px, v-prediction, OpenCLIP ViT-H) on a Cloud TPU v5p-128 slice
(64 chips, 95 GiB HBM each), AdamW lr 1e-5, EMA, data 0.8 / 0.2 as for SD v1:

    python -m smartbrush_jax.train --config=configs/tpu_v5p_sd2.py --workdir=gs://bucket/runs/sb2 --distributed \\
        --config.model.init_from=gs://bucket/models/stable-diffusion-2-1 \\
        --config.data.prepared_dirs='("/mnt/gcs/bucket/data/coco_openimages", "/mnt/gcs/bucket/data/laion")'

The loss takes v as its target (the scheduler config of the weights says v_prediction; SD
2.x base at 512 px says epsilon, and --config.data.resolution=512 trains it the same way).
Compiled for v5p-128 on a CPU host (`python -m smartbrush_jax.aot --config=configs/tpu_v5p_sd2.py
--topology=v5p-128 --cached-latents`; `bash bench/tpu_search.sh sd2`,
bench/results/search/v5p-128_sd2_splash_none_b16.json): 16 per chip (global 1024) at 768 px,
with splash attention for the 9216- and 2304-token levels, no remat, and data parallelism. The
step takes 52.2 GiB per chip (a 42.8 GiB margin). The package's one estimate
(planning/estimate.py) is 469.0 ms raw (ops 314.1 + splash kernels 149.2 + collectives 5.7),
34.1 images/s per chip raw, MFU 0.48; calibrated on MLPerf v4.1's measured SD2 step at 16 per
chip (x1.032, bench/results/calibration.json), 33.1. The one collective is the gradients'
all-reduce (1.6 GiB per chip per step). MLPerf's own SD2 runs are at 512 px, where our step
compiles to 197.9 ms raw against MaxDiffusion's 195.3 (bench/results/calibration/).
"""

import importlib.util
import os


def get_config():
    spec = importlib.util.spec_from_file_location("tpu_v5p", os.path.join(os.path.dirname(__file__), "tpu_v5p.py"))
    v5p = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(v5p)
    from smartbrush_jax.interop.families import ARCHITECTURES

    c = v5p.get_config()  # SD v1's v5p run: splash, no remat, data parallel; the model and its size differ
    c.model.family = "sd2"
    c.model.init_from = "/models/stable-diffusion-2-1"
    for part, fields in ARCHITECTURES["sd2"].items():  # the shapes an ahead-of-time compile uses
        c.model[part] = fields
    c.data.resolution = 768
    return c
