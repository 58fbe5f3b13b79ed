"""Orbax checkpoints of a training run: the train state and the Grain iterator together,
plus `model.json` (what rebuilds the models) and the tokenizer, in the workdir.

    workdir/checkpoints/<step>/{state,data}   async, keep-last-N plus keep-every-K
    workdir/model.json                        U-Net/text/VAE configs, autoencoder kind
    workdir/tokenizer/                        the tokenizer the run used
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

import grain
import orbax.checkpoint as ocp


def manager(workdir: str, keep_last: int, keep_every: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(keep_last, 1), keep_period=keep_every or None, create=True,
        enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options,
                                 item_names=("state", "data"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter: Any, force: bool = False) -> bool:
    return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=grain.checkpoint.CheckpointSave(data_iter)), force=force)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any, data_iter: Optional[Any] = None):
    """Restore `state` into the shardings of `abstract_state` (and the iterator in place)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    return mngr.restore(step, args=ocp.args.Composite(**items))["state"]


def restore_params(workdir: str, step: Optional[int] = None, ema: bool = True):
    """The U-Net params (EMA by default) of a run, on the host, for inpainting and export."""
    ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{workdir}: no checkpoints/ folder: not a training workdir, or nothing saved yet")
    import jax

    mngr = ocp.CheckpointManager(ckpt_dir, item_names=("state", "data"),
                                 item_handlers={"state": ocp.StandardCheckpointHandler()})
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir}: no finished checkpoint")
    # The run may have used another topology (8 devices, a pod): restore every array whole
    # onto this process's first device, from the shapes the checkpoint records.
    meta = mngr.item_metadata(step)["state"]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    return step, state["ema" if ema else "params"]


def write_run_files(workdir: str, model_config: dict, tokenizer_dir: str, frozen=None) -> None:
    """model.json, the tokenizer and, for a run from scratch, the frozen (random) text
    encoder as `frozen_text.safetensors` (a run from SD weights names `init_from`)."""
    os.makedirs(workdir, exist_ok=True)
    if frozen is not None:
        import jax
        from safetensors.numpy import save_file

        from smartbrush_jax.weights import flax_to_torch

        save_file(flax_to_torch(jax.device_get(frozen["text"])), os.path.join(workdir, "frozen_text.safetensors"))
    with open(os.path.join(workdir, "model.json"), "w") as f:
        json.dump(model_config, f, indent=2)
    dst = os.path.join(workdir, "tokenizer")
    if os.path.abspath(tokenizer_dir) != os.path.abspath(dst):
        shutil.copytree(tokenizer_dir, dst, dirs_exist_ok=True)


def load_workdir(workdir: str, step: Optional[int] = None, ema: bool = True):
    """A training run as a `StableDiffusion` bundle for inpainting and export: the U-Net
    from the checkpoint (EMA weights by default), the text encoder (and VAE) it trained with."""
    from smartbrush_jax.models import CLIPTextConfig, CLIPTextModel, UNetConfig
    from smartbrush_jax.pretrained import (
        StableDiffusion,
        abstract_params,
        load_diffusers_folder,
        load_single_file,
        load_tokenizer,
    )
    from smartbrush_jax.weights import read_state_dict, torch_to_flax

    cfg = read_model_config(workdir)
    step, unet_params = restore_params(workdir, step, ema)
    sd = StableDiffusion(unet_config=UNetConfig.from_diffusers(cfg["unet"]),
                         unet_params=_as_jax(unet_params), tokenizer=load_tokenizer(
                             os.path.join(workdir, "tokenizer")))
    if cfg.get("init_from"):
        path = cfg["init_from"]
        base = load_diffusers_folder(path, components=("vae", "text_encoder")) if os.path.isdir(path) else \
            load_single_file(path)
        sd.text_config, sd.text_params = base.text_config, base.text_params
        sd.vae_config, sd.vae_params, sd.scheduler_config = base.vae_config, base.vae_params, base.scheduler_config
    else:
        sd.text_config = CLIPTextConfig.from_transformers(cfg["text"])
        state = read_state_dict(os.path.join(workdir, "frozen_text.safetensors"))
        sd.text_params = _as_jax(torch_to_flax(state, abstract_params(CLIPTextModel(sd.text_config))))
    if cfg.get("autoencoder") == "identity":
        sd.vae_config, sd.vae_params = None, None
    return step, sd


def _as_jax(tree):
    import jax
    import jax.numpy as jnp

    return jax.tree_util.tree_map(jnp.asarray, tree)


def read_model_config(workdir: str) -> dict:
    path = os.path.join(workdir, "model.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir}: no model.json: not a training workdir")
    with open(path) as f:
        return json.load(f)
