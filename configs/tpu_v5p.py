"""SmartBrush on a Cloud TPU v5p-128 slice (64 chips, 95 GiB HBM each), from SD v1.2 weights
at 512 px, the paper's global batch 1024 (16 images per chip), AdamW lr 1e-5 with warm-up,
EMA, data 0.8 / 0.2 with BLIP/label captions:

    python -m smartbrush_jax.train --config=configs/tpu_v5p.py --workdir=gs://bucket/runs/sb --distributed \\
        --config.model.init_from=gs://bucket/models/stable-diffusion-v1-2 \\
        --config.data.prepared_dirs='("/mnt/gcs/bucket/data/coco_openimages", "/mnt/gcs/bucket/data/laion")'

Check the fit before booking: python -m smartbrush_jax.aot --config=configs/tpu_v5p.py --topology=v5p-128
"""

import importlib.util
import os


def get_config():
    spec = importlib.util.spec_from_file_location("tpu_v4", os.path.join(os.path.dirname(__file__), "tpu_v4.py"))
    v4 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(v4)
    c = v4.get_config()  # the same run; only the slice and its batch per chip differ
    c.train.batch_size = 1024  # 16 per chip on v5p-128
    return c
