"""SmartBrush on a Cloud TPU v5p-128 slice (64 chips, 95 GiB HBM each), from SD v1.2 weights
at 512 px, the paper's global batch 1024 (16 images per chip), AdamW lr 1e-5 with warm-up,
EMA, data 0.8 / 0.2 with BLIP/label captions:

    python -m smartbrush_jax.train --config=configs/tpu_v5p.py --workdir=gs://bucket/runs/sb --distributed \\
        --config.model.init_from=gs://bucket/models/stable-diffusion-v1-2 \\
        --config.data.prepared_dirs='("/mnt/gcs/bucket/data/coco_openimages", "/mnt/gcs/bucket/data/laion")'

What fits, compiled for v5p-128 on a CPU host (`python -m smartbrush_jax.cli.aot
--config=configs/tpu_v5p.py --topology=v5p-128`, bench/results/tpu_aot_v5p-128_*.json):
with the VAE encode in the step, 30.5 GiB per chip (13.4 of replicated state, 16.1 of
temporaries), a 64.5 GiB margin; the memory line puts the largest batch at ~79 per chip
(the paper's batch would also fit a v5p-64 at 32 per chip). Step time estimate 0.43 s
(XLA's own estimate). Data parallel, not FSDP: a chip holds the replicated state with
room to spare, and the only collective is one all-reduce of the gradients (1.6 GiB per
chip per step: XLA reduces them in bf16), where FSDP on v4-32 moves ~48 GiB per chip per
step. XLA's attention, not the chunked one (whose query loop costs gathers); remat stays:
without it 16 images take 89.8 GiB with cached latents, a 5.2 GiB margin
(tpu_aot_v5p-128_cached_no_remat.json), and the VAE in the step would not fit.
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
    c.model.attention = "xla"  # remat stays "full" (from tpu_v4.py)
    return c
