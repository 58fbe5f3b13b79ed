"""SmartBrush on one 8xH100 (80 GB) node, from SD v1.2 weights at 512 px, bf16 compute:

    python -m smartbrush_jax.train --config=configs/gpu_h100.py --workdir=/runs/sb \\
        --config.model.init_from=/models/stable-diffusion-v1-2 \\
        --config.data.prepared_dirs='("/data/coco_prepared", "/data/laion_prepared")'

Per-device batch 32 (global 256 on 8 GPUs) fits 80 GB with fp32 master weights and Adam
state (~14 GB) plus bf16 activations at 64x64 latents.
"""

from smartbrush_jax.config import base_config


def get_config():
    c = base_config()
    c.model.init_from = "/models/stable-diffusion-v1-2"
    c.model.autoencoder = "vae"
    c.model.dtype = "bfloat16"
    c.model.attention = "cudnn"
    c.data.resolution = 512
    c.data.read_threads = 16
    c.data.num_workers = 8
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 500
    c.train.batch_size = 256
    c.train.steps = 100_000
    c.mesh.shape = {"data": -1, "fsdp": 1, "tensor": 1}
    return c
