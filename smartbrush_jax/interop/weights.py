"""PyTorch/diffusers <-> Flax parameter trees: import Stable Diffusion, export back.

The mapping between a Flax parameter path and a diffusers/transformers state-dict key is
defined once (`torch_key`) and used in both directions:

    ("down_blocks_0", "attentions_1", "transformer_blocks_0", "attn1", "to_out_0", "kernel")
    <-> "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight"

Tensors change layout on the way (`Linear [out,in]` <-> Dense `[in,out]`, `Conv2d
[out,in,kh,kw]` <-> Conv `[kh,kw,in,out]`). Readers never unpickle arbitrary objects:
safetensors, or `torch.load(weights_only=True)`. Every error names the file and the key.

Public API:
    read_state_dict(path)                      -> {key: np.ndarray}
    torch_to_flax(state_dict, shapes, source)  -> Flax params (checked against `shapes`)
    flax_to_torch(params)                      -> {key: np.ndarray} with diffusers key names
    channel_surgery(config, params, levels)    -> SmartBrush 5-in/5-out U-Net at step 0
    (the loaders of whole models, `load_model` and friends, are in `pretrained.py`)
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from smartbrush_jax.errors import InputError

Params = Dict[str, Any]

# Flax modules created in a loop are named `<list>_<index>`; these are the diffusers /
# transformers ModuleList attribute names, so only they turn into `<list>.<index>`.
_LIST_NAMES = ("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
               "downsamplers", "upsamplers", "layers", "to_out", "net")
_LIST_RE = re.compile(r"^(%s)_(\d+)$" % "|".join(_LIST_NAMES))
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


class WeightsError(InputError, ValueError):
    """A checkpoint cannot be read or does not fit the model; the message names file and key."""


# ---------------------------------------------------------------------------- mapping
def torch_key(path: Tuple[str, ...]) -> str:
    """Flax parameter path -> diffusers/transformers state-dict key."""
    *modules, leaf = path
    parts = [_LIST_RE.sub(r"\1.\2", m) for m in modules]
    return ".".join(parts + [_LEAF_TO_TORCH[leaf]])


def to_flax_layout(array: np.ndarray, leaf: str, target_shape: Tuple[int, ...]) -> np.ndarray:
    """One PyTorch tensor -> the Flax layout of `target_shape`.

    Linear [out,in] -> [in,out]; Conv2d [out,in,kh,kw] -> [kh,kw,in,out]. A 1x1 conv stored
    where a Linear is expected (CompVis VAE attention) is squeezed, and the reverse.
    """
    if leaf == "kernel":
        if array.ndim == 4 and len(target_shape) == 2 and array.shape[2:] == (1, 1):
            array = array[:, :, 0, 0]
        if array.ndim == 2 and len(target_shape) == 4 and target_shape[:2] == (1, 1):
            array = array[:, :, None, None]
        array = array.T if array.ndim == 2 else np.transpose(array, (2, 3, 1, 0))
    return array


def to_torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """One Flax array -> the PyTorch layout (inverse of `to_flax_layout`)."""
    if leaf == "kernel":
        array = array.T if array.ndim == 2 else np.transpose(array, (3, 2, 0, 1))
    return np.ascontiguousarray(array)


def torch_to_flax(state_dict: Mapping[str, np.ndarray], shapes: Params, source: str = "<state dict>",
                  ignore: Tuple[str, ...] = (), key_fn: Callable[[Tuple[str, ...]], str] = torch_key,
                  scope: str = "") -> Params:
    """Convert a diffusers/transformers state dict to the Flax tree described by `shapes`
    (a tree of arrays or `ShapeDtypeStruct`s, e.g. from `jax.eval_shape(model.init, ...)`).
    `key_fn` names the source key of each Flax path (diffusers names by default; the
    single-file loader passes the LDM names); only keys starting with `scope` are checked
    for being unused, so one component can be read out of a whole-pipeline file.

    Missing keys, keys of the wrong shape and keys the model does not have raise
    `WeightsError` naming `source` and the key; keys matching a regex in `ignore` (buffers
    such as `position_ids`) are dropped silently.
    """
    flat_shapes = traverse_util.flatten_dict(_unbox(shapes))
    out, used, missing = {}, set(), []
    for path, spec in flat_shapes.items():
        key = key_fn(path)
        if key not in state_dict:
            missing.append(key)
            continue
        array = to_flax_layout(np.asarray(state_dict[key]), path[-1], tuple(spec.shape))
        if tuple(array.shape) != tuple(spec.shape):
            raise WeightsError(
                f"{source}: key {key!r} has shape {tuple(np.asarray(state_dict[key]).shape)}, which does not fit "
                f"the model (expects {_torch_shape(path[-1], spec.shape)}): is the config right for this checkpoint?"
            )
        out[path] = array.astype(spec.dtype)
        used.add(key)
    if missing:
        raise WeightsError(f"{source}: {len(missing)} parameter(s) missing, e.g. {missing[:3]}: "
                           "the checkpoint is not of the configured architecture")
    extra = [k for k in state_dict
             if k.startswith(scope) and k not in used and not any(re.search(p, k) for p in ignore)]
    if extra:
        raise WeightsError(f"{source}: {len(extra)} key(s) the model does not have, e.g. {sorted(extra)[:3]}: "
                           "the checkpoint is not of the configured architecture")
    return traverse_util.unflatten_dict(out)


def flax_to_torch(params: Params) -> Dict[str, np.ndarray]:
    """Flax params -> state dict with diffusers/transformers key names and PyTorch layouts."""
    flat = traverse_util.flatten_dict(_unbox(params))
    return {torch_key(path): to_torch_layout(np.asarray(jax.device_get(v)), path[-1]) for path, v in flat.items()}


def _torch_shape(leaf: str, shape) -> Tuple[int, ...]:
    return tuple(to_torch_layout(np.empty(shape, np.int8), leaf).shape)


def _unbox(tree):
    from flax.core import meta

    return meta.unbox(tree)


# ---------------------------------------------------------------------------- reading files
def read_state_dict(path: str) -> Dict[str, np.ndarray]:
    """Read a `.safetensors` file, or a pickled PyTorch file (`.bin`/`.ckpt`/`.pt`/`.pth`)
    with `torch.load(weights_only=True)`, which refuses anything but tensors, plain
    containers and the inert stand-ins of `pickle_allowlist` (the metadata of the original
    SD releases, which are PyTorch Lightning checkpoints). Tensors under `state_dict` (at
    any depth: some tools nest it) are unwrapped; other entries (epoch, callbacks) are
    dropped. Returns numpy float32/16 arrays (bf16 becomes float32)."""
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file")
    if path.lower().endswith(".safetensors"):  # X.SAFETENSORS too: the name's case says nothing
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                return {k: _to_numpy(f.get_tensor(k)) for k in f.keys()}
        except Exception as e:  # safetensors raises several types for a bad header
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e
    import torch

    if not _looks_like_torch_file(path):
        raise WeightsError(f"{path}: not a PyTorch checkpoint (neither torch.save's zip archive nor a pickle)")
    from smartbrush_jax.interop.pickle_allowlist import safe_globals

    try:
        with safe_globals():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        refused = re.search(r"GLOBAL (\S+)", str(e))
        if refused:
            raise WeightsError(
                f"{path}: refused to load: the pickle holds {refused.group(1)}, an object other than tensors, and "
                "untrusted checkpoints are never unpickled (convert it to .safetensors with a tool you trust)"
            ) from e
        detail = " ".join(line for line in str(e).splitlines() if "rror" in line or "Unsupported" in line)
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                           f"{detail or str(e).splitlines()[0]})") from e
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[k] = _to_numpy(v)
    return out


def _looks_like_torch_file(path: str) -> bool:
    """torch.save writes a zip archive (PyTorch >= 1.6) or, before, a pickle (protocol byte 0x80)."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(2)
    return zipfile.is_zipfile(path) or head[:1] == b"\x80"


def _to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.detach().cpu().numpy()


# ---------------------------------------------------------------------------- channel surgery
def channel_surgery(config, params: Params, num_levels: int):
    """Turn a 4-in/4-out SD U-Net into the SmartBrush U-Net.

    Adds the mask input channel to `conv_in` (zero kernel), the mask-logit output channel
    to `conv_out` (zero kernel and bias) and a `num_levels + 1`-row precision embedding
    (zeros), so at step 0 the first four output channels equal the original model's for
    any mask and any level. Returns `(new_config, new_params)`; inputs are not modified.
    """
    from smartbrush_jax.models.unet_config import UNetConfig

    if not isinstance(config, UNetConfig):
        raise TypeError("channel_surgery expects a UNetConfig")
    if config.in_channels != 4 or config.out_channels != 4:
        raise WeightsError(f"channel surgery expects a 4-in/4-out SD U-Net, got {config.in_channels} in / "
                           f"{config.out_channels} out (already converted?)")
    if config.num_class_embeddings is not None:
        raise WeightsError("channel surgery: this U-Net already has class embeddings")
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}")
    params = _unbox(params)
    new = traverse_util.unflatten_dict(traverse_util.flatten_dict(params))  # fresh dicts, shared leaves
    k_in = new["conv_in"]["kernel"]  # [3, 3, 4, C]
    new["conv_in"]["kernel"] = jnp.concatenate([k_in, jnp.zeros(k_in.shape[:2] + (1, k_in.shape[3]), k_in.dtype)],
                                               axis=2)
    k_out, b_out = new["conv_out"]["kernel"], new["conv_out"]["bias"]
    new["conv_out"]["kernel"] = jnp.concatenate([k_out, jnp.zeros(k_out.shape[:3] + (1,), k_out.dtype)], axis=3)
    new["conv_out"]["bias"] = jnp.concatenate([b_out, jnp.zeros((1,), b_out.dtype)])
    temb_dim = new["time_embedding"]["linear_2"]["kernel"].shape[1]
    new["class_embedding"] = {"embedding": jnp.zeros((num_levels + 1, temb_dim), k_in.dtype)}
    new_config = dataclasses.replace(config, in_channels=5, out_channels=5, num_class_embeddings=num_levels + 1)
    return new_config, new
