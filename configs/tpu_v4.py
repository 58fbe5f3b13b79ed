"""SmartBrush on a Cloud TPU v4 pod slice, from SD v1.2 weights at 512 px, global batch
1024, AdamW lr 1e-5 with warm-up, EMA, data 0.8 / 0.2 with BLIP/label captions:

    python -m smartbrush_jax.train --config=configs/tpu_v4.py --workdir=gs://bucket/runs/sb --distributed \\
        --config.model.init_from=gs://bucket/models/stable-diffusion-v1-2 \\
        --config.data.prepared_dirs='("/mnt/gcs/bucket/data/coco_openimages", "/mnt/gcs/bucket/data/laion")'

(run on every worker, e.g. through launch/tpu_vm.sh --data-bucket=bucket, which mounts the
data bucket read-only with gcsfuse at /mnt/gcs/bucket: Grain reads shards from local paths;
the workdir is the gs:// URL itself, which every worker writes through the GCS API).
Parameters are FSDP-sharded over the slice; the batch is split over data x fsdp.
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
    c.train.batch_size = 1024
    c.train.steps = 25_000
    c.mesh.shape = {"data": 1, "fsdp": -1, "tensor": 1}
    c.mesh.fsdp = True
    return c
