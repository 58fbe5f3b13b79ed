"""The demo: a tiny SD-shaped U-Net trained from scratch in pixel space on the bundled
synthetic shapes set: 1800 steps of batch 16 at 32 px, about 13 minutes on 2 CPU cores
(`make demo` runs it, then inpaints held-out scenes; 14 minutes in all):

    python -m smartbrush_jax.train --config=configs/cpu_demo.py --workdir=runs/demo

Measured on the 2-core machine: loss 0.177 (first 10% of steps) -> 0.052 (last 10%),
held-out predicted-mask IoU 0.720 (step 500) -> 0.765 (step 1800); the samples show the
prompted shape and colour inside the mask (docs/demo_samples.png). Sample grids land in runs/demo/samples/.
"""

from smartbrush_jax.config import base_config


def get_config():
    c = base_config()
    c.model.init_from = ""
    c.model.autoencoder = "identity"  # pixels are the "latents": 3 channels + the mask
    c.model.unet.block_out_channels = (32, 64, 64)
    c.model.unet.layers_per_block = 1
    # text cross-attention at 8x8 and in the middle block only: XLA's CPU attention and
    # convolutions are slow, and this keeps a step near 0.35 s on 2 cores
    c.model.unet.down_block_types = ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D")
    c.model.unet.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    c.model.unet.cross_attention_dim = 64
    c.model.unet.attention_head_dim = 4
    c.model.unet.norm_num_groups = 16
    c.model.text.hidden_size = 64
    c.model.text.intermediate_size = 128
    c.model.text.num_hidden_layers = 2
    c.model.text.num_attention_heads = 4

    c.data.synthetic_scenes = 3000
    c.data.synthetic_size = 40
    c.data.resolution = 32
    c.data.read_threads = 2

    # the background of x_t is the clean image: it holds no noise to predict, so the noise
    # MSE is taken inside the (degraded) mask only (PAPER.md leaves the region open)
    c.loss.eps_region = "mask"
    # the paper's 0.01 leaves the demo's mask head copying its input mask within 2000 steps
    # (held-out IoU flat at 0.72); 0.1 makes it find the object (0.765 and rising)
    c.loss.dice_weight = 0.1

    c.optim.lr = 2e-3
    c.optim.warmup_steps = 100
    c.optim.schedule = "cosine"
    c.optim.ema_decay = 0.99

    c.train.steps = 1800
    c.train.batch_size = 16
    c.train.log_every = 50
    c.train.sample_every = 500
    c.train.sample_steps = 20
    c.train.checkpoint_every = 250
    c.train.num_sample_examples = 6
    c.train.keep_every = 0
    return c
