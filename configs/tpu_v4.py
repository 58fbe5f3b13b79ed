"""SmartBrush on a Cloud TPU v4-32 slice (16 chips, 32 GiB HBM each), from SD v1.2 weights at
512 px, 16 images per chip (global 256), AdamW lr 1e-5 with warm-up, EMA, data 0.8 / 0.2
with BLIP/label captions:

    python -m smartbrush_jax.train --config=configs/tpu_v4.py --workdir=gs://bucket/runs/sb --distributed \\
        --config.model.init_from=gs://bucket/models/stable-diffusion-v1-2 \\
        --config.data.prepared_dirs='("/mnt/gcs/bucket/data/coco_openimages", "/mnt/gcs/bucket/data/laion")'

(run on every worker, e.g. through launch/tpu_vm.sh --data-bucket=bucket, which mounts the
data bucket read-only with gcsfuse at /mnt/gcs/bucket: Grain reads shards from local paths;
the workdir is the gs:// URL itself, which every worker writes through the GCS API).
Parameters are FSDP-sharded over the slice; the batch is split over data x fsdp.

What fits, compiled for v4-32 on a CPU host (`python -m smartbrush_jax.cli.aot
--config=configs/tpu_v4.py --topology=v4-32`, bench/results/tpu_aot_v4-32_vae.json and _cached.json): with
the VAE encode in the step, 22.3 GiB per chip (0.9 of state, 21.1 of temporaries), a 9.7
GiB margin; with a latent cache 18.2 GiB. The memory line puts the largest batch at ~23
per chip. That needs remat ("full") and the chunked attention: XLA's attention at the
4096-token level takes 28.9 GiB of temporaries at the same batch (1.9 GiB margin with a
latent cache, no room for the VAE). FSDP because data parallel replicates 13.4 GiB of
fp32 state (params, AdamW, EMA) on every chip. Step time estimate: >= 0.64 s (roofline,
HBM-bound; XLA moves ~48 GiB of collectives per chip per step besides, see
bench/SCALING.md). The paper's global batch 1024 is 16 per chip on a v4-128:
--config.train.batch_size=1024 there (the per-chip program is this one).
"""

from smartbrush_jax.config import base_config


def get_config():
    c = base_config()
    c.model.init_from = "/models/stable-diffusion-v1-2"
    c.model.autoencoder = "vae"
    c.model.dtype = "bfloat16"
    c.data.resolution = 512
    c.data.weights = {"seg": 0.8, "t2i": 0.2}
    c.data.caption_mix = 0.5
    c.data.read_threads = 16
    c.data.num_workers = 8
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 1000
    c.optim.ema_decay = 0.9999
    c.train.batch_size = 256  # 16 per chip on v4-32
    c.train.steps = 100_000  # the paper's 25k steps at 1024 images, in images seen
    c.mesh.shape = {"data": 1, "fsdp": -1, "tensor": 1}
    c.mesh.fsdp = True
    c.model.remat = "full"
    c.model.attention = "chunked"
    return c
