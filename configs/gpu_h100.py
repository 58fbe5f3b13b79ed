"""SmartBrush on one 8xH100 (80 GB) node, from SD v1.2 weights at 512 px, bf16 compute:

    python -m smartbrush_jax.train --config=configs/gpu_h100.py --workdir=/runs/sb \\
        --config.model.init_from=/models/stable-diffusion-v1-2 \\
        --config.data.prepared_dirs='("/data/coco_prepared", "/data/laion_prepared")'

What fits, compiled for an 8xH100 node on a CPU host (`make .venv-gpu-aot`, then
`.venv-gpu-aot/bin/python -m smartbrush_jax.aot --config=configs/gpu_h100.py --target=h100
--cached-latents`, bench/results/gpu_aot_h100_cached.json; XLA's default kernels, no
autotuning, Triton GEMMs off): 32 images per GPU (global 256) take 49.75 GiB per GPU (13.3
of replicated state, 36.5 of temporaries) of the 59.3 GiB JAX's allocator gives by default
(75% of 79.1): FITS, 9.6 GiB margin; with XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 the margin is
21.4 GiB. The 4096- and 1024-token self-attention runs in cuDNN's flash kernel (10 calls
forward, 10 backward in the compiled program); the 160-wide heads of the deeper levels and
cross-attention stay on XLA. The same step for an H200 (gpu_aot_h200_cached.json) takes
49.87 GiB of its 105.7 (the memory line puts 64 per GPU at ~86 GiB: a prediction, not compiled). No step time: a deviceless XLA:GPU compile gives
no cost analysis (the U-Net's FLOPs at the bf16 peak would take 78 ms a step, a bound).
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
