"""A few-second training config for the trainer's tests: a micro U-Net in pixel space on
a small synthetic set at 16 px."""

from smartbrush_jax.config import base_config


def get_config():
    c = base_config()
    c.model.autoencoder = "identity"
    c.model.unet.block_out_channels = (16, 16)
    c.model.unet.layers_per_block = 1
    c.model.unet.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D")
    c.model.unet.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D")
    c.model.unet.cross_attention_dim = 16
    c.model.unet.attention_head_dim = 2
    c.model.unet.norm_num_groups = 8
    c.model.text.hidden_size = 16
    c.model.text.intermediate_size = 32
    c.model.text.num_hidden_layers = 1
    c.model.text.num_attention_heads = 2
    c.data.synthetic_scenes = 40
    c.data.synthetic_size = 24
    c.data.resolution = 16
    c.data.read_threads = 1
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 2
    c.optim.ema_decay = 0.9
    c.train.steps = 8
    c.train.batch_size = 8
    c.train.log_every = 2
    c.train.sample_every = 0
    c.train.checkpoint_every = 2
    c.train.keep_last = 10
    c.train.keep_every = 0
    c.train.max_nonfinite_in_a_row = 3
    return c
