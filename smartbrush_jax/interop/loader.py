"""Load Stable Diffusion from the files users have: a diffusers folder or a single file.

    sd = load_diffusers_folder("/models/stable-diffusion-v1-2")
    sd = load_single_file("/models/sd-v1-2.ckpt", tokenizer_dir="/models/clip-tokenizer")
    sd = to_smartbrush(sd, num_levels=10)        # 5-in/5-out U-Net + precision embedding

Paths are local; nothing is downloaded. Pickled files are read with
`torch.load(weights_only=True)` (see `weights.read_state_dict`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from smartbrush_jax.compositing import downsampling_factor
from smartbrush_jax.interop import checks, ldm_keys
from smartbrush_jax.interop.file_hashes import verify_export
from smartbrush_jax.interop.weights import WeightsError, channel_surgery, read_state_dict, torch_key, torch_to_flax
from smartbrush_jax.models import (
    AutoencoderKL,
    CLIPTextConfig,
    CLIPTextModel,
    UNet2DConditionModel,
    UNetConfig,
    VAEConfig,
)
from smartbrush_jax.models.tokenizer import load_tokenizer

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")  # SDXL's second text encoder (OpenCLIP bigG, projected)
_WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model", ),
    "vae": ("diffusion_pytorch_model", ),
    "text_encoder": ("model", "pytorch_model"),
    "text_encoder_2": ("model", "pytorch_model"),
}
# Buffers that PyTorch state dicts carry but that are not parameters.
_IGNORED_KEYS = (r"position_ids$",)


@dataclasses.dataclass
class StableDiffusion:
    """Configs and Flax parameters of the SD components that were loaded (others are None)."""

    unet_config: Optional[UNetConfig] = None
    unet_params: Any = None
    vae_config: Optional[VAEConfig] = None
    vae_params: Any = None
    text_config: Optional[CLIPTextConfig] = None
    text_params: Any = None
    tokenizer: Any = None
    scheduler_config: Optional[dict] = None
    text2_config: Optional[CLIPTextConfig] = None  # SDXL: text_encoder_2 / tokenizer_2
    text2_params: Any = None
    tokenizer_2: Any = None

    def unet(self, dtype=jnp.float32, **kw) -> UNet2DConditionModel:
        return UNet2DConditionModel(self.unet_config, dtype=dtype, **kw)

    def vae(self, dtype=jnp.float32) -> AutoencoderKL:
        return AutoencoderKL(self.vae_config, dtype=dtype)

    def text_encoder(self, dtype=jnp.float32, **kw) -> CLIPTextModel:
        return CLIPTextModel(self.text_config, dtype=dtype, **kw)

    def text_encoder_2(self, dtype=jnp.float32, **kw) -> Optional[CLIPTextModel]:
        return None if self.text2_config is None else CLIPTextModel(self.text2_config, dtype=dtype, **kw)


# ---------------------------------------------------------------------------- shapes
def abstract_params(module) -> Dict[str, Any]:
    """The parameter tree of `module` as `ShapeDtypeStruct`s (nothing is allocated)."""
    return jax.eval_shape(lambda: init_params(module, jax.random.PRNGKey(0)))


def logical_axes(module) -> Dict[str, Any]:
    """The logical axis names of every parameter of `module` (a tree of `PartitionSpec`s
    over names such as "in_features"/"out_features"; see `models.layers`)."""
    import flax.linen as nn

    boxed = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *example_inputs(module)))
    return nn.get_partition_spec(boxed)["params"]


def init_params(module, rng: jax.Array) -> Dict[str, Any]:
    """Randomly initialised parameters of one of our models (unboxed: plain arrays)."""
    from flax.core import meta

    return meta.unbox(module.init(rng, *example_inputs(module))["params"])


def example_inputs(module, batch: int = 1):
    """Smallest inputs that trace every parameter of `module`."""
    if isinstance(module, UNet2DConditionModel):
        cfg = module.config
        size = downsampling_factor(cfg.block_out_channels)
        labels = jnp.zeros((batch,), jnp.int32) if cfg.num_class_embeddings is not None else None
        args = (jnp.zeros((batch, size, size, cfg.in_channels)), jnp.zeros((batch,), jnp.int32),
                jnp.zeros((batch, 1, cfg.cross_attention_dim)), labels)
        if cfg.micro_conditioning:  # SDXL: the pooled text embedding and the six size / crop numbers
            args += (jnp.zeros((batch, cfg.pooled_text_dim)), jnp.zeros((batch, 6)))
        return args
    if isinstance(module, AutoencoderKL):
        size = downsampling_factor(module.config.block_out_channels)
        return (jnp.zeros((batch, size, size, module.config.in_channels)),)
    if isinstance(module, CLIPTextModel):
        return (jnp.zeros((batch, 1), jnp.int32),)
    raise TypeError(f"unknown model type {type(module).__name__}")


# ---------------------------------------------------------------------------- any model path
def load_model(path: str, *, tokenizer_dir: Optional[str] = None, ema="auto",
               components: Optional[Sequence[str]] = None, ignore_extra_keys: bool = False) -> StableDiffusion:
    """The one place that decides what kind of model `path` is:

    - a training workdir (model.json + checkpoints/): its newest checkpoint that restores,
      EMA U-Net weights, with the text encoder (and VAE) the run trained with;
    - a diffusers folder (model_index.json): Stable Diffusion, a SmartBrush export, a
      converted release; the `components` asked for, by default those its
      model_index.json names (an export of a pixel-space run has no vae/);
    - a single file (.ckpt / .safetensors, CompVis key names; `tokenizer_dir` for a
      tokenizer, `ema` for a -full-ema release, `ignore_extra_keys`: see `load_single_file`).

    Each may be a `gs://` URL (a folder or file is read from a local copy).
    """
    from smartbrush_jax import storage

    if storage.isfile(storage.join(path, "model.json")):
        step, sd = load_workdir(path)
        print(f"loaded {path} at step {step} (EMA weights)", file=sys.stderr)
        return sd
    path = storage.local_copy(path) if storage.is_remote(path) else path
    if os.path.isdir(path):
        return load_diffusers_folder(path, components=components or folder_components(path))
    if os.path.isfile(path):
        return load_single_file(path, tokenizer_dir=tokenizer_dir, ema=ema, ignore_extra_keys=ignore_extra_keys)
    raise WeightsError(f"{path}: no such file or folder")


def trained_resolution(path: str) -> Optional[int]:
    """The image size a model was trained at, where its folder records it: a training
    workdir's model.json or an export's smartbrush.json; None for anything else."""
    from smartbrush_jax import storage

    for name in ("model.json", "smartbrush.json"):
        f = storage.join(path, name)
        if storage.isfile(f):
            try:
                value = json.loads(storage.read_text(f)).get("resolution")
            except (ValueError, AttributeError):
                return None
            return int(value) if isinstance(value, int) and value >= 8 else None
    return None


def load_workdir(workdir: str, step: Optional[int] = None, ema: bool = True):
    """A training run as a `StableDiffusion` bundle for inpainting and export: the U-Net
    from the checkpoint (EMA weights by default), the text encoder (and VAE) it trained with."""
    from smartbrush_jax import storage
    from smartbrush_jax.checkpoints import read_model_config, restore_params

    cfg = read_model_config(workdir)
    step, unet_params = restore_params(workdir, step, ema)
    sd = StableDiffusion(unet_config=UNetConfig.from_diffusers(cfg["unet"]), unet_params=_as_jax(unet_params),
                         tokenizer=load_tokenizer(storage.local_copy(storage.join(workdir, "tokenizer"))))
    if cfg.get("init_from"):  # the frozen text encoder and VAE the run started from
        parts = ("vae", "text_encoder") + (SDXL_COMPONENTS if cfg.get("text2") else ())
        base = load_model(cfg["init_from"], components=parts, ema=False)
        sd.text_config, sd.text_params = base.text_config, base.text_params
        sd.text2_config, sd.text2_params, sd.tokenizer_2 = base.text2_config, base.text2_params, base.tokenizer_2
        sd.vae_config, sd.vae_params, sd.scheduler_config = base.vae_config, base.vae_params, base.scheduler_config
    else:
        sd.text_config = CLIPTextConfig.from_transformers(cfg["text"])
        state = read_state_dict(storage.local_copy(storage.join(workdir, "frozen_text.safetensors")))
        sd.text_params = _as_jax(torch_to_flax(state, abstract_params(CLIPTextModel(sd.text_config))))
    if cfg.get("autoencoder") == "identity":
        sd.vae_config, sd.vae_params = None, None
    check_fits(sd.unet(), sd.unet_params, f"{workdir} step {step}")
    return step, sd


def check_fits(module, params, source: str) -> None:
    """WeightsError unless `params` has exactly the arrays (and shapes) `module` needs: a
    checkpoint whose model.json was changed afterwards, named in one line."""
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(abstract_params(module))}
    have = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    bad = [f"{k}: checkpoint {have.get(k)} vs model.json {s}" for k, s in want.items() if have.get(k) != s]
    extra = sorted(set(have) - set(want))
    if bad or extra:
        detail = "; ".join((bad + extra)[:5])
        raise WeightsError(f"{source}: the checkpoint does not match model.json (the U-Net weights do not fit "
                           f"its architecture: {len(bad)} mismatched/missing, {len(extra)} unexpected: {detail})")


def _as_jax(tree):
    return jax.tree_util.tree_map(jnp.asarray, tree)


def folder_components(path: str) -> tuple:
    """The components a diffusers folder holds, from its model_index.json."""
    index = os.path.join(path, "model_index.json")
    listed = _read_json(index) if os.path.isfile(index) else {}
    present = tuple(c for c in COMPONENTS if listed.get(c, ["?"]) not in ([None, None], None))
    return present + tuple(c for c in SDXL_COMPONENTS if listed.get(c) not in ([None, None], None))


def as_smartbrush(sd: StableDiffusion, num_levels: int) -> StableDiffusion:
    """A plain SD U-Net gets SmartBrush's channels and `num_levels` precision levels (zero:
    untrained); a SmartBrush U-Net is returned as it is; a 9-channel inpainting U-Net is
    refused (`families.refuse_inpainting_unet`)."""
    from smartbrush_jax.interop.families import refuse_inpainting_unet

    refuse_inpainting_unet(sd.unet_config, "the U-Net")
    if sd.unet_config.in_channels == 4 and sd.unet_config.num_class_embeddings is None:
        return to_smartbrush(sd, num_levels)
    return sd


# ---------------------------------------------------------------------------- diffusers folder
def load_diffusers_folder(path: str, components: Sequence[str] = COMPONENTS, variant: Optional[str] = None,
                          param_dtype=jnp.float32) -> StableDiffusion:
    """Load the named components of a local diffusers Stable Diffusion folder.

    Expects `model_index.json` and one subfolder per component (`unet/`, `vae/`,
    `text_encoder/`, `tokenizer/`; SDXL's `text_encoder_2/`, `tokenizer_2/` too), each
    with its config and `.safetensors` (preferred) or
    `.bin` weights; `variant="fp16"` picks `*.fp16.*` files. Raises `WeightsError` naming
    the missing file or the offending key, field or tensor (`checks`), or an export's file whose
    sha256 differs from its smartbrush.json's (`file_hashes`); FamilyError for another family's VAE.
    """
    unknown = set(components) - set(COMPONENTS + SDXL_COMPONENTS)
    if unknown:
        raise ValueError(f"unknown component(s) {sorted(unknown)}; choose from {COMPONENTS + SDXL_COMPONENTS}")
    if not os.path.isdir(path):
        raise WeightsError(f"{path}: not a directory (expected a diffusers Stable Diffusion folder)")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise WeightsError(f"{path}: no model_index.json: not a diffusers pipeline folder")
    verify_export(path, components, WeightsError)
    sd = StableDiffusion()
    for name in components:
        sub = os.path.join(path, name)
        if not os.path.isdir(sub):
            raise WeightsError(f"{path}: component folder {name}/ is missing")
        if name in ("tokenizer", "tokenizer_2"):
            setattr(sd, name, load_tokenizer(sub))
            continue
        config_path = os.path.join(sub, "config.json")
        config = _read_json(config_path)
        state = _read_component_weights(sub, _WEIGHT_FILES[name], variant)
        source = f"{sub}/"
        checks.check_tensors(state, source)
        if name == "unet":
            sd.unet_config = checks.parse_config(UNetConfig.from_diffusers, config, config_path, checks.UNET_FIELDS)
            sd.unet_params = _convert(UNet2DConditionModel(sd.unet_config, param_dtype=param_dtype), state, source)
        elif name == "vae":
            sd.vae_config = checks.parse_config(VAEConfig.from_diffusers, config, config_path, checks.VAE_FIELDS)
            state = _legacy_vae_keys(state)
            sd.vae_params = _convert(AutoencoderKL(sd.vae_config, param_dtype=param_dtype), state, source)
        else:
            cfg = checks.parse_config(CLIPTextConfig.from_transformers, config, config_path, checks.TEXT_FIELDS)
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
            params = _convert(CLIPTextModel(cfg, param_dtype=param_dtype), state, source)
            if name == "text_encoder":
                sd.text_config, sd.text_params = cfg, params
            else:
                sd.text2_config, sd.text2_params = cfg, params
    sched = os.path.join(path, "scheduler", "scheduler_config.json")
    if os.path.isfile(sched):
        sd.scheduler_config = _read_json(sched)
        checks.check_schedule(sd.scheduler_config, sched)
    checks.check_folder_vae(sd, path, _read_json(os.path.join(path, "model_index.json")))
    return sd


def read_configs(path: str) -> Dict[str, Any]:
    """The U-Net, VAE and text-encoder configs of a diffusers folder (SDXL's second encoder
    too), as `load_single_file`'s keyword arguments (for a single file of another size than
    its family's release)."""
    if not os.path.isdir(path):
        raise WeightsError(f"{path}: not a directory (expected a diffusers folder to take the configs from)")
    parts = {"unet_config": ("unet", UNetConfig.from_diffusers, checks.UNET_FIELDS),
             "vae_config": ("vae", VAEConfig.from_diffusers, checks.VAE_FIELDS),
             "text_config": ("text_encoder", CLIPTextConfig.from_transformers, checks.TEXT_FIELDS)}
    if os.path.isdir(os.path.join(path, "text_encoder_2")):  # SDXL
        parts["text2_config"] = ("text_encoder_2", CLIPTextConfig.from_transformers, checks.TEXT_FIELDS)
    return {key: checks.parse_config(parse, _read_json(os.path.join(path, sub, "config.json")),
                                     os.path.join(path, sub, "config.json"), fields)
            for key, (sub, parse, fields) in parts.items()}


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: missing")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: invalid JSON ({e})") from e


def _read_component_weights(folder: str, stems: Sequence[str], variant: Optional[str]) -> Dict[str, np.ndarray]:
    """Pick the weight file of a component: safetensors before .bin, single or sharded."""
    suffix = f".{variant}" if variant else ""
    for ext in (".safetensors", ".bin"):
        for stem in stems:
            single = os.path.join(folder, f"{stem}{suffix}{ext}")
            if os.path.isfile(single):
                return read_state_dict(single)
            index = os.path.join(folder, f"{stem}{suffix}{ext}.index.json")
            if os.path.isfile(index):
                shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
                state = {}
                for shard in shards:
                    state.update(read_state_dict(os.path.join(folder, shard)))
                return state
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*")))
    raise WeightsError(f"{folder}: no weights file ({'/'.join(stems)}{suffix}.safetensors or .bin); found {found}")


def _legacy_vae_keys(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Older diffusers VAE files name the mid-block attention query/key/value/proj_attn."""
    table = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    out = {}
    for k, v in state.items():
        if ".attentions." in k:
            for old, new in table.items():
                k = k.replace(old, new)
        out[k] = v
    return out


def _convert(module, state: Dict[str, np.ndarray], source: str):
    return jax.tree_util.tree_map(jnp.asarray, torch_to_flax(state, abstract_params(module), source, _IGNORED_KEYS))


# ---------------------------------------------------------------------------- single file
SD_V1_UNET = UNetConfig()
SD_V1_VAE = VAEConfig()
SD_V1_TEXT = CLIPTextConfig()


def load_single_file(path: str, tokenizer_dir: Optional[str] = None, unet_config: Optional[UNetConfig] = None,
                     vae_config: Optional[VAEConfig] = None, text_config: Optional[CLIPTextConfig] = None,
                     text2_config: Optional[CLIPTextConfig] = None, param_dtype=jnp.float32, ema="auto",
                     prediction_type: Optional[str] = None, ignore_extra_keys: bool = False) -> StableDiffusion:
    """Load an original single-file SD v1, SD 2.x or SDXL checkpoint (`.ckpt` or
    `.safetensors`, CompVis / Stability key names; `ldm_keys` says which layout is which,
    `ldm_keys.layout_family` tells them apart). The file holds no configs (each family's
    published ones are the defaults: SD v1's, `families.ARCHITECTURES`) and no tokenizer:
    pass `tokenizer_dir` (a folder with vocab.json and merges.txt) to get one; the OpenCLIP
    encoders' tokenizer is that one padding with "!" (as SD 2.x's and SDXL's tokenizer_2 do).
    SD 2.x's file does not say whether it predicts v (768-v) or epsilon (base):
    `prediction_type` must.

    `ema`: the `-full-ema` releases hold the raw U-Net under `model.diffusion_model.*` and
    its EMA under `model_ema.<the same key without dots>`. "auto" takes the EMA weights when
    the file has them (diffusers' rule: more than 100 `model_ema.*` keys) and says which it
    used; True requires them; False takes the raw weights.

    Refused (`checks`): keys of two families, keys of no component (a LoRA's: dropped, and said,
    with `ignore_extra_keys`), tensors that are not float or not finite."""
    from smartbrush_jax.interop.families import release_scheduler

    state = read_state_dict(path)
    if not any(k.startswith(ldm_keys.UNET_PREFIX) for k in state):
        raise WeightsError(f"{path}: no '{ldm_keys.UNET_PREFIX}*' keys: not a single-file Stable Diffusion checkpoint")
    state = checks.single_file_components(state, path, ignore_extra_keys)
    checks.check_tensors(state, path)
    state = select_unet_weights(state, path, ema)
    family = ldm_keys.layout_family(state)
    if family == "sd2" and prediction_type not in ("epsilon", "v_prediction"):
        raise WeightsError(f"{path} is an SD 2.x checkpoint, whose file does not say what it predicts: convert it "
                           "with `python -m smartbrush_jax.cli.convert --prediction-type v_prediction` (2.x 768-v) "
                           "or `--prediction-type epsilon` (2.x base), then use the folder")
    arch = release_configs(family)
    unet_config, vae_config = unet_config or arch["unet"], vae_config or arch["vae"]
    text_config, text2_config = text_config or arch["text"], text2_config or arch["text2"]
    sd = StableDiffusion(unet_config=unet_config, vae_config=vae_config, text_config=text_config)
    n_vae = len(vae_config.block_out_channels)
    unet_name = lambda k: ldm_keys.unet_key(k, unet_config.layers_per_block, unet_config.up_block_types)
    sd.unet_params = _convert_ldm(UNet2DConditionModel(unet_config, param_dtype=param_dtype), state,
                                  ldm_keys.UNET_PREFIX, path, unet_name)
    sd.vae_params = _convert_ldm(AutoencoderKL(vae_config, param_dtype=param_dtype), state, ldm_keys.VAE_PREFIX, path,
                                 lambda k: ldm_keys.vae_key(k, n_vae))
    if family == "sd2":
        sd.text_params = _convert_openclip(text_config, state, ldm_keys.SD2_TEXT_PREFIX, path, param_dtype)
    else:
        first = {"sdxl": ldm_keys.SDXL_TEXT_PREFIX, "sd1": ldm_keys.TEXT_PREFIX if any(
            k.startswith(ldm_keys.TEXT_PREFIX) for k in state) else ldm_keys.TEXT_PREFIX_OLD}[family]
        sd.text_params = _convert_ldm(CLIPTextModel(text_config, param_dtype=param_dtype), state, first, path,
                                      lambda k: k)
    if family == "sdxl":
        sd.text2_config = text2_config
        sd.text2_params = _convert_openclip(text2_config, state, ldm_keys.SDXL_TEXT2_PREFIX, path, param_dtype)
    if family != "sd1":
        sd.scheduler_config = release_scheduler(family, prediction_type or "epsilon")
    elif prediction_type:  # SD v1's schedule (NoiseSchedule's defaults), in the parameterisation asked for
        sd.scheduler_config = {"prediction_type": prediction_type}
    if tokenizer_dir is not None:
        sd.tokenizer = load_tokenizer(tokenizer_dir)
        if family != "sd1":  # OpenCLIP's tokenizer: CLIP's vocabulary, padded with "!"
            openclip = load_tokenizer(tokenizer_dir)
            openclip.pad_token = "!"
            if family == "sd2":
                sd.tokenizer = openclip
            else:
                sd.tokenizer_2 = openclip
    return sd


def release_configs(family: str) -> Dict[str, Any]:
    """The published component configs of a family's release (`families.ARCHITECTURES`)."""
    from smartbrush_jax.interop.families import ARCHITECTURES, VAE_SCALING

    if family == "sd1":
        return {"unet": SD_V1_UNET, "vae": SD_V1_VAE, "text": SD_V1_TEXT, "text2": None}
    arch = ARCHITECTURES[family]
    return {"unet": UNetConfig.from_diffusers(arch["unet"]),
            "vae": dataclasses.replace(SD_V1_VAE, scaling_factor=VAE_SCALING[family]),
            "text": CLIPTextConfig.from_transformers(arch["text"]),
            "text2": CLIPTextConfig.from_transformers(arch["text2"]) if arch["text2"] else None}


def _convert_openclip(config: CLIPTextConfig, state, prefix: str, path: str, param_dtype):
    """A text encoder out of open_clip's names (SD 2.x's, SDXL's second)."""
    text, unused = ldm_keys.openclip_to_transformers(state, prefix, config.num_hidden_layers,
                                                     projection=bool(config.projection_dim))
    if unused:
        raise WeightsError(f"{path}: {len(unused)} key(s) the text encoder does not have, e.g. {sorted(unused)[:3]}: "
                           "the checkpoint is not of the configured architecture")
    return _convert(CLIPTextModel(config, param_dtype=param_dtype), text, f"{path} ({prefix}*)")


EMA_PREFIX = "model_ema."
_EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")


def ema_key(ldm_key: str) -> str:
    """`model.diffusion_model.input_blocks.0.0.weight` -> `model_ema.diffusion_modelinput_blocks00weight`."""
    return EMA_PREFIX + ldm_key[len("model."):].replace(".", "")


def select_unet_weights(state: Dict[str, np.ndarray], path: str, ema="auto") -> Dict[str, np.ndarray]:
    """The state with the U-Net weights chosen by `ema` ("auto", True, False; see
    `load_single_file`) under the `model.diffusion_model.*` keys, and no `model_ema.*` key."""
    import logging

    if ema not in ("auto", True, False):
        raise ValueError(f"ema must be 'auto', True or False, got {ema!r}")
    ema_names = [k for k in state if k.startswith(EMA_PREFIX) and k not in _EMA_BOOKKEEPING]
    use = len(ema_names) > 100 if ema == "auto" else ema
    if use and not ema_names:
        raise WeightsError(f"{path}: EMA weights asked for, but the file has no {EMA_PREFIX}* keys "
                           "(a release without '-full-ema' holds the EMA weights as its only weights)")
    out = {k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)}
    if use:
        unet_keys = [k for k in out if k.startswith(ldm_keys.UNET_PREFIX)]
        missing = [k for k in unet_keys if ema_key(k) not in state]
        if missing:
            raise WeightsError(f"{path}: {len(missing)} U-Net weight(s) have no EMA copy, e.g. {ema_key(missing[0])}")
        out.update({k: state[ema_key(k)] for k in unet_keys})
    if not ema_names:
        said = f"its only U-Net weights (no {EMA_PREFIX}* copy in the file)"
    else:
        said = (f"the {'EMA' if use else 'raw (non-EMA)'} U-Net weights (the file holds both; "
                f"{len(ema_names)} {EMA_PREFIX}* tensors)")
    logging.getLogger("smartbrush_jax").info("%s: using %s", path, said)
    print(f"{path}: using {said}", file=sys.stderr)
    return out


def ema_choice(value: str):
    """A user's `auto` / `ema` / `raw` (config, command line) -> load_single_file's ema."""
    choices = {"auto": "auto", "ema": True, "raw": False}
    if value not in choices:
        raise WeightsError(f"the EMA choice must be one of {sorted(choices)}, got {value!r}")
    return choices[value]


def _convert_ldm(module, state, prefix: str, path: str, ldm_name):
    """Read one component out of an LDM checkpoint: each parameter under its LDM key."""
    params = torch_to_flax(state, abstract_params(module), path, _IGNORED_KEYS,
                           key_fn=lambda p: prefix + ldm_name(torch_key(p)), scope=prefix)
    return jax.tree_util.tree_map(jnp.asarray, params)


# ---------------------------------------------------------------------------- SmartBrush
def to_smartbrush(sd: StableDiffusion, num_levels: int = 10) -> StableDiffusion:
    """Channel surgery on the loaded U-Net (see `weights.channel_surgery`)."""
    cfg, params = channel_surgery(sd.unet_config, sd.unet_params, num_levels)
    return dataclasses.replace(sd, unet_config=cfg, unet_params=params)
