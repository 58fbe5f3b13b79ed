"""What the trainer trains: the models from the config, the train state, the step.

`TrainState` (a flax struct: Orbax, jit and the shardings see a plain tree of arrays)
holds `step`, `params` (the U-Net, fp32 master weights), `opt_state`, `ema`, `rng` and
the non-finite counters. The frozen text encoder and VAE live in `frozen`
(`{"text": ..., "vae": ...}`), outside the optimizer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.core import meta

from smartbrush_jax.config import ConfigError
from smartbrush_jax.diffusion import NoiseSchedule, smartbrush_loss
from smartbrush_jax.interop.families import check_family, check_vae, family_of
from smartbrush_jax.interop.loader import StableDiffusion, as_smartbrush, ema_choice, example_inputs, load_model
from smartbrush_jax.models import CLIPTextConfig, CLIPTextModel, UNet2DConditionModel, UNetConfig, attention
from smartbrush_jax.models.autoencoder import Identity, make_autoencoder
from smartbrush_jax.models.conditioning import MICRO, TextEncoders, text_encoders, unet_apply
from smartbrush_jax.settings import LossConfig, from_section
from smartbrush_jax.train import sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []: updates applied or skipped
    params: Any  # the U-Net's weights (fp32)
    opt_state: Any
    ema: Any  # exponential moving average of params: what export and inpainting use
    rng: jax.Array
    nonfinite_streak: jax.Array  # int32 []: skipped (non-finite) updates in a row
    nonfinite_total: jax.Array  # int32 []

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, rng: jax.Array) -> "TrainState":
        zero = jnp.zeros((), jnp.int32)
        return cls(step=zero, params=params, opt_state=tx.init(params), ema=jax.tree_util.tree_map(jnp.copy, params),
                   rng=rng, nonfinite_streak=zero, nonfinite_total=zero)


@dataclasses.dataclass
class Models:
    """The modules and where their weights come from."""

    unet: UNet2DConditionModel
    text: CLIPTextModel
    autoencoder: Any  # autoencoder.VAE or autoencoder.Identity (pixel space)
    pretrained: Optional[StableDiffusion]  # SD weights to start from (None: from scratch)
    schedule: NoiseSchedule
    text2: Optional[CLIPTextModel] = None  # SDXL's second (projected) text encoder
    token_ids: tuple = (None, None)  # SDXL: the tokenizer's EOS id and the second tokenizer's pad id

    @property
    def latent_factor(self) -> int:
        return self.autoencoder.factor

    @property
    def encoders(self) -> TextEncoders:
        return TextEncoders(self.text, self.text2, *self.token_ids)

    def model_config(self) -> dict:
        """What `inpaint`/`export` need to rebuild the models from a workdir."""
        ae = self.autoencoder
        return {"family": family_of(self.unet.config) if self.pretrained is not None else None,
                "unet": self.unet.config.to_diffusers(), "text": self.text.config.to_transformers(),
                **({"text2": self.text2.config.to_transformers()} if self.text2 is not None else {}),
                "vae": None if ae.config is None else ae.config.to_diffusers(), "autoencoder": ae.kind}


CLIP_VOCAB = 49408  # SD v1's CLIP tokenizer


def build_models(config, tokenizer_vocab_size: Optional[int] = None, weights: bool = True) -> Models:
    """The models of the config. `weights=False`: the architecture only (nothing is read or
    initialised), for compiling ahead of time: a run from SD weights gets SD v1's shapes
    (the config's `model.unet` and `model.text` are SD v1's by default, SD's VAE, CLIP's
    vocabulary); the values of the weights do not change a compile."""
    dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
    unet_kw = dict(dtype=dtype, attention_impl=config.model.attention, remat=config.model.remat)
    attn = text_attention(config.model.attention)
    levels = config.model.num_levels
    if not weights and tokenizer_vocab_size is None:
        tokenizer_vocab_size = CLIP_VOCAB
    if config.model.init_from and not weights:
        from smartbrush_jax.models.vae import VAEConfig

        ae = Identity() if config.model.autoencoder == "identity" else make_autoencoder(VAEConfig(), dtype)
        vocab = tokenizer_vocab_size or CLIP_VOCAB
        unet_cfg = UNetConfig.from_diffusers({**config.model.unet.to_dict(), "in_channels": ae.channels + 1,
                                              "out_channels": ae.channels + 1, "num_class_embeds": levels + 1})
        ids = {"vocab_size": vocab, "eos_token_id": vocab - 1, "bos_token_id": vocab - 2, "pad_token_id": vocab - 1}
        text_cfg = CLIPTextConfig.from_transformers({**config.model.text.to_dict(), **ids})
        text2 = None
        if config.model.text2:  # SDXL's second encoder (its tokenizer pads with id 0, "!")
            text2 = CLIPTextModel(CLIPTextConfig.from_transformers({**config.model.text2.to_dict(), **ids}),
                                  dtype=dtype, attention_impl=attn)
        check_text_fits(unet_cfg, text_cfg, text2 and text2.config)
        return Models(UNet2DConditionModel(unet_cfg, **unet_kw), CLIPTextModel(text_cfg, dtype=dtype,
                                                                               attention_impl=attn),
                      ae, None, NoiseSchedule(), text2, (vocab - 1, 0) if text2 is not None else (None, None))
    if config.model.init_from:
        path = config.model.init_from
        sd = load_model(path, tokenizer_dir=config.model.tokenizer or None, ema=ema_choice(config.model.init_ema))
        family = family_of(sd.unet_config)
        check_family(config.model.family, family, path)
        if config.model.autoencoder != "identity":
            check_vae(family, sd.vae_config, sd.unet_config, path)
        sd = as_smartbrush(sd, levels)
        if sd.unet_config.num_class_embeddings != levels + 1:
            raise ConfigError(f"{path}: the U-Net has {sd.unet_config.num_class_embeddings} precision levels, "
                              f"config.model.num_levels={levels} needs {levels + 1}")
        ae = Identity() if config.model.autoencoder == "identity" else make_autoencoder(sd.vae_config, dtype)
        enc = text_encoders(sd, path, dtype, attn)
        return Models(UNet2DConditionModel(sd.unet_config, **unet_kw), enc.text, ae, sd,
                      _schedule(sd.scheduler_config, path), enc.text2, (enc.eos, enc.pad2))
    ae = Identity()  # from scratch: pixel space
    unet_cfg = UNetConfig.from_diffusers({**config.model.unet.to_dict(), "in_channels": ae.channels + 1,
                                          "out_channels": ae.channels + 1, "num_class_embeds": levels + 1})
    text_cfg = CLIPTextConfig.from_transformers({
        **config.model.text.to_dict(), "vocab_size": tokenizer_vocab_size,
        "eos_token_id": tokenizer_vocab_size - 1, "bos_token_id": tokenizer_vocab_size - 2,
        "pad_token_id": tokenizer_vocab_size - 1})
    if text_cfg.hidden_size != unet_cfg.cross_attention_dim:
        raise ConfigError(f"config.model.text.hidden_size {text_cfg.hidden_size} must equal "
                          f"config.model.unet.cross_attention_dim {unet_cfg.cross_attention_dim}")
    return Models(UNet2DConditionModel(unet_cfg, **unet_kw),
                  CLIPTextModel(text_cfg, dtype=dtype, attention_impl=attn), ae, None, NoiseSchedule())


def check_text_fits(unet_cfg: UNetConfig, text_cfg: CLIPTextConfig, text2_cfg: Optional[CLIPTextConfig]) -> None:
    """The architecture fields of a config compiled without weights must fit together: one
    encoder as wide as the U-Net's context, or (SDXL's `text_time` U-Net) two whose widths sum
    to it, the second's projection as wide as the pooled embedding the U-Net takes."""
    width = text_cfg.hidden_size + (text2_cfg.hidden_size if text2_cfg else 0)
    pooled_ok = text2_cfg is None or text2_cfg.projection_dim == unet_cfg.pooled_text_dim
    if (text2_cfg is not None) != unet_cfg.micro_conditioning or width != unet_cfg.cross_attention_dim or not pooled_ok:
        kind = f"SDXL text_time, pooled {unet_cfg.pooled_text_dim}" if unet_cfg.micro_conditioning else "no text_time"
        raise ConfigError(
            f"config.model.text{' + text2' if text2_cfg else ''} ({width} wide"
            f"{f', projection {text2_cfg.projection_dim}' if text2_cfg else ''}) does not fit config.model.unet "
            f"(cross_attention_dim {unet_cfg.cross_attention_dim}, {kind}): an SDXL U-Net takes two encoders "
            "whose widths sum to its context (model.text2 set, with architectures [CLIPTextModelWithProjection]), "
            "any other U-Net one as wide as its context")


def text_attention(choice: str) -> str:
    """The text encoder's attention: causal and 77 tokens, so never splash; XLA's under
    "auto" and "splash" (the chunked attention pays only at thousands of tokens)."""
    return "xla" if choice in ("auto", "splash") else choice


def _schedule(scheduler_config, path: str) -> NoiseSchedule:
    try:
        return NoiseSchedule.from_diffusers(scheduler_config)
    except ValueError as e:  # a scheduler this sampler does not implement
        raise ConfigError(f"{path}: {e}") from None


def loss_config(config) -> LossConfig:
    return from_section(LossConfig, config.loss, num_levels=config.model.num_levels)


def lr_schedule(config) -> optax.Schedule:
    """Linear warm-up to `optim.lr`, then constant or cosine decay to 0 at `train.steps`."""
    o = config.optim
    warm = max(int(o.warmup_steps), 1)
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, o.lr, warm, max(int(config.train.steps), warm + 1))
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warm), optax.constant_schedule(o.lr)], [warm])


def make_optimizer(config) -> optax.GradientTransformation:
    o = config.optim
    return optax.chain(optax.clip_by_global_norm(o.clip_norm),
                       optax.adamw(lr_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))


def init_state_fn(models: Models, tx, seed: int):
    """A function () -> TrainState with *boxed* (logically annotated) params, for eval_shape
    and for a sharded jit init from scratch."""
    def init():
        rng = jax.random.PRNGKey(seed)
        params = models.unet.init(jax.random.fold_in(rng, 1), *example_inputs(models.unet))["params"]
        return TrainState.create(params, tx, jax.random.fold_in(rng, 2))
    return init


def frozen_init_fn(models: Models, seed: int):
    """() -> frozen params {"text": ..., "vae": ...} (boxed), random; replaced by SD weights
    when the run starts from them. A pixel-space model has no "vae"."""
    def init():
        rng = jax.random.PRNGKey(seed + 17)
        out = {"text": models.text.init(rng, *example_inputs(models.text))["params"]}
        if models.text2 is not None:
            out["text2"] = models.text2.init(rng, *example_inputs(models.text2))["params"]
        if models.autoencoder.config is not None:
            vae = models.autoencoder.module
            out["vae"] = vae.init(rng, *example_inputs(vae))["params"]
        return out
    return init


def build_step(config, models, mesh, empty_tokens, corrupt_grads=None, materialize: bool = True):
    """(state, frozen, step_fn): the sharded train state and frozen models, and the step
    jitted with their shardings and the batch's (donating the state). With
    `materialize=False` the state and frozen models are abstract (`ShapeDtypeStruct`s with
    their shardings: nothing is allocated), for compiling ahead of time for other hardware."""

    tx = make_optimizer(config)
    state, frozen, state_shardings, frozen_shardings = init_state(models, config, tx, mesh, materialize)
    train_step = make_train_step(models, config, tx, empty_tokens, corrupt_grads,
                                 param_shardings=state_shardings.params)

    def on_mesh(*args):  # traced with the mesh in scope: splash attention shards over it
        with attention.mesh_scope(mesh, config.model.splash_min_tokens):
            return train_step(*args)

    step_fn = jax.jit(on_mesh,
                      in_shardings=(state_shardings, frozen_shardings, sharding.batch_sharding(mesh)),
                      out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    return state, frozen, step_fn


def abstract(tree):
    """`ShapeDtypeStruct`s with the shardings of a tree of arrays (what Orbax restores into)."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def abstract_batch(config, models, mesh, cached: bool = False, cached_text: bool = False) -> dict:
    """The global batch the step takes, as sharded `ShapeDtypeStruct`s: images, or with
    `cached` the VAE moments a latent cache gives instead; with `cached_text` the text
    encoder's output [B, 77, width] in the compute dtype instead of the tokens (what MLPerf's
    SD runs read)."""

    b, r, h = config.train.batch_size, config.data.resolution, config.data.resolution // models.latent_factor
    spec = {"image": ((b, r, r, 3), np.uint8), "mask": ((b, r, r), np.uint8), "latent_mask": ((b, h, h), np.float32),
            "tokens": ((b, 77), np.int32)}
    if models.text2 is not None:
        spec["micro"] = ((b, MICRO), np.int32)
    if cached:
        del spec["image"]
        c = models.autoencoder.channels
        spec.update(latent_mean=((b, h, h, c), np.float32), latent_logvar=((b, h, h, c), np.float32))
    if cached_text:
        if models.text2 is not None:
            raise ConfigError("cached text states are for one-encoder families (SD v1, SD 2.x), not SDXL")
        del spec["tokens"]
        spec["text_states"] = ((b, 77, models.text.config.hidden_size), jnp.dtype(config.model.dtype))
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh))
            for k, (shape, dtype) in spec.items()}


def init_state(models, config, tx, mesh, materialize: bool = True):
    """Sharded train state and frozen params. From scratch: initialised by a jit with
    out_shardings from `eval_shape`, so nothing is materialised unsharded. From SD: the
    converted host arrays are placed straight into their shardings."""
    rules = sharding.rules_from_config(config.mesh.fsdp)
    init = init_state_fn(models, tx, config.train.seed)
    boxed = jax.eval_shape(init)
    state_shardings = sharding.param_shardings(mesh, nn.get_partition_spec(boxed), rules, meta.unbox(boxed))
    finit = frozen_init_fn(models, config.train.seed)
    fboxed = jax.eval_shape(finit)
    frozen_shardings = sharding.param_shardings(mesh, nn.get_partition_spec(fboxed), rules, meta.unbox(fboxed))
    if not materialize:
        shaped = lambda t, s: jax.tree_util.tree_map(  # noqa: E731
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), meta.unbox(t), s)
        return shaped(boxed, state_shardings), shaped(fboxed, frozen_shardings), state_shardings, frozen_shardings
    if models.pretrained is None:
        state = jax.jit(lambda: meta.unbox(init()), out_shardings=state_shardings)()
        frozen = jax.jit(lambda: meta.unbox(finit()), out_shardings=frozen_shardings)()
        return state, frozen, state_shardings, frozen_shardings
    params = jax.device_put(models.pretrained.unet_params, state_shardings.params)
    frozen = jax.device_put(pretrained_frozen(models), frozen_shardings)
    rng = jax.random.fold_in(jax.random.PRNGKey(config.train.seed), 2)
    state = jax.jit(lambda p: TrainState.create(p, tx, rng), out_shardings=state_shardings)(params)
    return state, frozen, state_shardings, frozen_shardings


def _gathered(x, shard, whole):
    return jax.lax.with_sharding_constraint(x, whole)


def _gathered_fwd(x, shard, whole):
    return jax.lax.with_sharding_constraint(x, whole), None


def _gathered_bwd(shard, whole, _, ct):
    # the cotangent of the whole weight is each chip's partial sum: summed into the weight's
    # own shards (a reduce-scatter), not summed whole on every chip as the transpose of the
    # constraint would (an all-reduce, twice the bytes)
    return (jax.lax.with_sharding_constraint(ct, shard),)


_gathered = jax.custom_vjp(_gathered, nondiff_argnums=(1, 2))
_gathered.defvjp(_gathered_fwd, _gathered_bwd)


def gather_once(params, shardings, dtype):
    """FSDP's weights gathered whole, once, for the step (`mesh.fsdp_gather = "once"`): every
    float32 weight is gathered and cast to the compute dtype (XLA casts before it gathers),
    so the forward, the recompute of `remat` and the backward read one gathered copy (XLA
    otherwise gathers a weight at each use: three times a step under remat), and the
    gradients are reduce-scattered in float32 into the weights' shards."""
    def one(p, shard):
        if not jnp.issubdtype(p.dtype, jnp.floating):
            return p
        return _gathered(p, shard, sharding.replicated(shard.mesh)).astype(dtype)

    return jax.tree_util.tree_map(one, params, shardings)


def gather_frozen(frozen, mesh, dtype):
    """The frozen text encoder's and VAE's weights gathered whole in the compute dtype (with
    `gather_once`): without it XLA keeps them split and gathers their activations instead,
    the text encoder's [batch, 77, 3072] at every layer (3 GiB a step for SD v1 on v4-32)."""
    rep = sharding.replicated(mesh)
    return jax.tree_util.tree_map(
        lambda p: jax.lax.with_sharding_constraint(p.astype(dtype), rep) if jnp.issubdtype(p.dtype, jnp.floating)
        else p, frozen)  # cast, then gather: half the bytes in bf16


def make_train_step(models: Models, config, tx, empty_tokens: np.ndarray,
                    corrupt_grads: Optional[Callable[[Any, jax.Array], Any]] = None, param_shardings=None):
    """(state, frozen, batch) -> (state, metrics). Pure; jit it with shardings and donation.
    `corrupt_grads(grads, step) -> grads`: fault injection for tests (a non-finite gradient).
    `param_shardings`: the U-Net parameters' shardings, for `mesh.fsdp_gather = "once"`."""
    once = param_shardings is not None and config.mesh.fsdp and config.mesh.fsdp_gather == "once"
    mesh = jax.tree_util.tree_leaves(param_shardings)[0].mesh if once else None
    compute_dtype = jnp.dtype(config.model.dtype)
    loss_cfg = loss_config(config)
    acp = jnp.asarray(models.schedule.alphas_cumprod())
    decay = config.optim.ema_decay
    empty = jnp.asarray(empty_tokens, jnp.int32)
    schedule = lr_schedule(config)

    def step_fn(state: TrainState, frozen, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        k_drop, k_enc, k_loss = jax.random.split(rng, 3)
        if once:
            frozen = gather_frozen(frozen, mesh, compute_dtype)
        context = jax.lax.stop_gradient(text_context(models, frozen, batch, empty, k_drop, loss_cfg.text_dropout))
        if once:  # split over the batch like everything else (not over the text encoder's features)
            context = jax.tree_util.tree_map(
                lambda c: jax.lax.with_sharding_constraint(c, sharding.batch_sharding(mesh)), context)
        latents, masks = encode(models, frozen, batch, k_enc)

        def loss_fn(params):
            if once:
                params = gather_once(params, param_shardings, compute_dtype)
            apply = lambda p, x, t, c, s: unet_apply(models.unet, p, x, t, c, s)  # noqa: E731
            return smartbrush_loss(apply, params, {"latents": latents, "masks": masks, "context": context},
                                   k_loss, acp, loss_cfg, models.schedule.prediction_type)

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        if corrupt_grads is not None:
            grads = corrupt_grads(grads, state.step)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa
        params = keep(params, state.params)
        ema = keep(jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params), state.ema)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=keep(opt_state, state.opt_state),
                                  ema=ema, nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
                                  nonfinite_total=state.nonfinite_total + jnp.where(finite, 0, 1))
        metrics = {"loss": loss, "mse": parts["mse"], "dice": parts["dice"], "iou": parts["iou"],
                   "grad_norm": grad_norm, "param_norm": optax.global_norm(params),
                   "update_norm": optax.global_norm(updates), "lr": schedule(state.step),
                   "nonfinite_streak": new_state.nonfinite_streak, "nonfinite_total": new_state.nonfinite_total}
        return new_state, metrics

    return step_fn


def text_context(models: Models, frozen, batch, empty: jax.Array, rng, dropout: float):
    """The U-Net's text context, with `dropout` of the texts replaced by the empty text's.
    From `tokens` through the frozen encoder(s), or from `text_states` (the encoder's output
    read from a cache, as MLPerf's SD runs pre-encode text): then only the empty text is
    encoded in the step (one row), for the dropped ones."""
    n = batch["tokens" if "tokens" in batch else "text_states"].shape[0]
    drop = jax.random.uniform(rng, (n,)) < dropout
    if "text_states" not in batch:
        return models.encoders(frozen, jnp.where(drop[:, None], empty[None], batch["tokens"]), batch.get("micro"))
    if models.text2 is not None:
        raise ValueError("cached text states are for one-encoder families (SD v1, SD 2.x), not SDXL")
    none = models.encoders(frozen, empty[None]).astype(batch["text_states"].dtype)
    return jnp.where(drop[:, None, None], none, batch["text_states"])


def infinite_grads_at(steps) -> Callable[[Any, jax.Array], Any]:
    """A `corrupt_grads` for tests: every gradient is inf at these (0-based) steps, the loss
    stays finite, so only the gradient guard can catch it."""
    steps = jnp.asarray(tuple(int(s) for s in steps), jnp.int32)
    return lambda grads, step: jax.tree_util.tree_map(lambda g: jnp.where(jnp.isin(step, steps), jnp.inf, g), grads)


def encode(models: Models, frozen, batch, rng):
    """Batch images/masks -> (latents [B,h,w,C] float32, masks [B,h,w] float32 in {0,1}).
    A batch from a latent cache carries the VAE's `latent_mean`/`latent_logvar` instead of
    `image`: the encoder is skipped, z is drawn the same way."""
    ae = models.autoencoder
    if "latent_mean" in batch:
        z = ae.draw(batch["latent_mean"].astype(jnp.float32), batch["latent_logvar"].astype(jnp.float32), rng)
    else:
        z = ae.sample(frozen.get("vae"), batch["image"].astype(jnp.float32) / 127.5 - 1.0, rng)
    frac = batch["latent_mask"]
    # a latent cell is the object's when most of it is; tiny objects keep their best cells
    masks = jnp.where(frac.max(axis=(1, 2), keepdims=True) > 0.5, frac > 0.5, frac > 0).astype(jnp.float32)
    return jax.lax.stop_gradient(z), masks


def pretrained_frozen(models: Models) -> Optional[Dict[str, Any]]:
    if models.pretrained is None:
        return None
    out = {"text": models.pretrained.text_params}
    if models.text2 is not None:
        out["text2"] = models.pretrained.text2_params
    if models.autoencoder.config is not None:
        out["vae"] = models.pretrained.vae_params
    return out
