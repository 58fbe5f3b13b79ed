"""What the loaders check before converting anything: that the tensors are weights (floating
point and finite), that a single file holds one family's components and nothing else, that
a folder's configs have values of the right types, and that its VAE belongs with its U-Net.

    check_tensors(state, source)                     -> WeightsError naming the key
    single_file_components(state, path, ignore_extra) -> the state without stray keys
    parse_config(parse, config, path, fields)        -> the parsed config, or WeightsError
    check_folder_vae(sd, folder)                     -> FamilyError for another family's VAE

Each error is one line naming the file and the key or field (`errors.InputError`: exit 2).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np

from smartbrush_jax.errors import warn
from smartbrush_jax.interop import ldm_keys
from smartbrush_jax.interop.weights import WeightsError

# ---------------------------------------------------------------------------- tensors
# Tensors of real releases that are not weights: CLIP's int64 `position_ids` buffer (SD v1's
# cond_stage_model, SDXL's first embedder, older transformers' text encoders) and the EMA's
# update counter; open_clip's causal `attn_mask` holds -inf by design (no encoder reads it).
INTEGER_OK = re.compile(r"(^|\.)position_ids$|^model_ema\.num_updates$")
NONFINITE_OK = re.compile(r"(^|\.)attn_mask$")


def check_tensors(state: Mapping[str, np.ndarray], source: str) -> None:
    """WeightsError for the first tensor that is not floating point (a weight cast to int64
    loses everything after the point, silently) or holds NaN/inf (a model that samples noise)."""
    for key, value in state.items():
        value = np.asarray(value)
        if value.dtype.kind != "f":
            if INTEGER_OK.search(key):
                continue
            raise WeightsError(f"{source}: key {key!r} is {value.dtype}, not floating point: weights are float16, "
                               "bfloat16 or float32 (was the file written with a cast?)")
        if not NONFINITE_OK.search(key) and not np.isfinite(value).all():
            bad = int(value.size - np.isfinite(value).sum())
            raise WeightsError(f"{source}: key {key!r} holds {bad} non-finite value(s) (NaN or inf) of {value.size}: "
                               "the weights are damaged (a diverged training run, or a broken file)")


# ---------------------------------------------------------------------------- single files
# The text encoders say which family a file is; a key under another family's says it mixes two.
FAMILY_PREFIXES = {"sd1": (ldm_keys.TEXT_PREFIX_OLD,), "sd2": (ldm_keys.SD2_TEXT_PREFIX,),
                   "sdxl": ("conditioner.",)}
# What each family's components are read from (the EMA copy is chosen before: `select_unet_weights`).
COMPONENT_PREFIXES = {
    "sd1": (ldm_keys.UNET_PREFIX, ldm_keys.VAE_PREFIX, ldm_keys.TEXT_PREFIX_OLD),
    "sd2": (ldm_keys.UNET_PREFIX, ldm_keys.VAE_PREFIX, ldm_keys.SD2_TEXT_PREFIX),
    "sdxl": (ldm_keys.UNET_PREFIX, ldm_keys.VAE_PREFIX, ldm_keys.SDXL_TEXT_PREFIX, ldm_keys.SDXL_TEXT2_PREFIX),
}
# Tensors the releases carry beside the components: the LDM trainer's noise-schedule buffers
# (sd-v1-*.ckpt, v2-1_*.ckpt), SDXL trainer's sigmas, the EMA's bookkeeping.
RELEASE_EXTRAS = frozenset((
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "denoiser.sigmas", "model_ema.decay", "model_ema.num_updates"))
_EMA = "model_ema."


def families_in(state: Mapping[str, Any]) -> Dict[str, str]:
    """Each family whose text-encoder keys the state holds -> an example key of it."""
    found = {}
    for key in sorted(state):
        for family, prefixes in FAMILY_PREFIXES.items():
            if family not in found and key.startswith(prefixes):
                found[family] = key
    return found


def single_file_components(state: Dict[str, np.ndarray], path: str, ignore_extra_keys: bool = False):
    """`state` without the tensors a release carries beside its components; refused when it
    mixes two families' keys, or holds keys of no component (a LoRA's, another model's)
    unless `ignore_extra_keys`, which drops them and says which."""
    found = families_in(state)
    if len(found) > 1:
        said = ", ".join(f"{f} (e.g. {k!r})" for f, k in found.items())
        raise WeightsError(f"{path}: keys of more than one Stable Diffusion family: {said}: the file mixes two "
                           "releases' text encoders (a merge gone wrong?); convert each release's own file")
    family = ldm_keys.layout_family(state)
    prefixes = COMPONENT_PREFIXES[family] + (_EMA,)
    stray = sorted(k for k in state if not k.startswith(prefixes) and k not in RELEASE_EXTRAS)
    if not stray:
        return state
    what = f"{len(stray)} key(s) outside every component of an {family} release, e.g. {stray[:3]}"
    if not ignore_extra_keys:
        raise WeightsError(f"{path}: {what} (the components are {', '.join(p + '*' for p in prefixes[:-1])}): a "
                           "LoRA or another model's weights in the file? Pass --ignore-extra-keys "
                           "(ignore_extra_keys=True) to drop them")
    warn(f"{path}: dropped {what}")
    return {k: v for k, v in state.items() if k not in set(stray)}


# ---------------------------------------------------------------------------- configs
def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _ints(v):
    return isinstance(v, list) and len(v) > 0 and all(_int(x) for x in v)


def _number(v):
    return (isinstance(v, (int, float)) and not isinstance(v, bool))


def _strs(v):
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


_KINDS = {"int": (_int, "an integer"), "ints": (_ints, "a list of integers"),
          "int|ints": (lambda v: _int(v) or _ints(v), "an integer or a list of integers"),
          "number": (_number, "a number"), "bool": (lambda v: isinstance(v, bool), "true or false"),
          "str": (lambda v: isinstance(v, str), "a string"), "strs": (_strs, "a list of strings")}
UNET_FIELDS = {
    "in_channels": "int", "out_channels": "int", "layers_per_block": "int|ints", "cross_attention_dim": "int|ints",
    "norm_num_groups": "int", "sample_size": "int|ints", "freq_shift": "int", "num_class_embeds": "int",
    "addition_time_embed_dim": "int", "projection_class_embeddings_input_dim": "int", "block_out_channels": "ints",
    "attention_head_dim": "int|ints", "num_attention_heads": "int|ints", "transformer_layers_per_block": "int|ints",
    "down_block_types": "strs", "up_block_types": "strs", "norm_eps": "number", "use_linear_projection": "bool",
    "flip_sin_to_cos": "bool", "upcast_attention": "bool", "addition_embed_type": "str"}
VAE_FIELDS = {
    "in_channels": "int", "out_channels": "int", "layers_per_block": "int", "latent_channels": "int",
    "norm_num_groups": "int", "sample_size": "int|ints", "block_out_channels": "ints", "scaling_factor": "number",
    "down_block_types": "strs", "up_block_types": "strs"}
TEXT_FIELDS = {
    "vocab_size": "int", "hidden_size": "int", "intermediate_size": "int", "num_hidden_layers": "int",
    "num_attention_heads": "int", "max_position_embeddings": "int", "eos_token_id": "int", "bos_token_id": "int",
    "pad_token_id": "int", "projection_dim": "int", "hidden_act": "str", "layer_norm_eps": "number",
    "architectures": "strs"}


def parse_config(parse: Callable[[dict], Any], config: Any, path: str, fields: Mapping[str, str]):
    """`parse(config)` (a models' `from_diffusers` / `from_transformers`) after checking the
    types of `fields` (null is left to the parser's default); any error it raises becomes a
    WeightsError naming `path`."""
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: a JSON object expected, found {type(config).__name__}")
    nested = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    for name, kind in fields.items():
        value = nested.get(name)
        ok, said = _KINDS[kind]
        if value is not None and not ok(value):
            raise WeightsError(f"{path}: field {name!r} must be {said}, got {json_repr(value)}")
    try:
        return parse(config)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise WeightsError(f"{path}: {e}") from None


def json_repr(value) -> str:
    import json

    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_schedule(config: Optional[dict], path: str) -> None:
    """A scheduler config our samplers run (`diffusion.NoiseSchedule`), or WeightsError naming it."""
    from smartbrush_jax.diffusion import NoiseSchedule

    parse_config(lambda c: NoiseSchedule.from_diffusers(c).betas(), config, path,
                 {"num_train_timesteps": "int", "beta_start": "number", "beta_end": "number",
                  "beta_schedule": "str", "steps_offset": "int", "set_alpha_to_one": "bool",
                  "prediction_type": "str", "timestep_spacing": "str"})


# ---------------------------------------------------------------------------- VAE beside U-Net
def check_folder_vae(sd, folder: str, model_index: Optional[dict]) -> None:
    """A folder's VAE must make the latents its U-Net was trained on (`families.check_vae`):
    SDXL's (0.13025) beside an SDXL U-Net, SD v1/2.x's (0.18215) beside theirs."""
    from smartbrush_jax.interop.families import check_vae, family_of

    if sd.unet_config is None or sd.vae_config is None:
        return
    check_vae(family_of(sd.unet_config, model_index), sd.vae_config, sd.unet_config, folder)
