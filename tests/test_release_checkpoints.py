"""Single-file checkpoints shaped like the Stable Diffusion v1 releases: PyTorch Lightning
pickles with a callback class as a dict key and numpy scalars in the metadata, the
`-full-ema` layout (raw U-Net under `model.diffusion_model.*`, EMA under `model_ema.*`),
`state_dict` nested by other tools; read with `torch.load(weights_only=True)` and no
pytorch_lightning installed; converted once to a stock diffusers folder."""

import contextlib
import os
import pickle
import sys
import types

import jax
import numpy as np
import pytest
import torch
from sd_fixtures import state_dict_numpy, torch_unet

from smartbrush_jax.interop import ldm_keys
from smartbrush_jax.interop.loader import ema_key, load_diffusers_folder, load_single_file, read_configs
from smartbrush_jax.interop.weights import WeightsError, flax_to_torch, read_state_dict
from smartbrush_jax.models import UNetConfig, VAEConfig

LIGHTNING = "pytorch_lightning.callbacks.model_checkpoint"


class _NumpyCoreScalar:
    """Marks `numpy.core.multiarray.scalar`, the name numpy 1.x (the releases') pickles use."""


class _ReleasePickler(pickle._Pickler):
    """Pickles numpy scalars as the releases do: GLOBAL numpy.core.multiarray.scalar (numpy 2
    would write numpy._core...), their dtype as numpy.dtype and their bytes through
    _codecs.encode (protocol 2)."""

    def reducer_override(self, obj):
        if isinstance(obj, np.generic):
            return _NumpyCoreScalar, (obj.dtype, obj.tobytes())
        return NotImplemented

    def save_global(self, obj, name=None):
        if obj is _NumpyCoreScalar:
            self.write(b"cnumpy.core.multiarray\nscalar\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


@contextlib.contextmanager
def _lightning_stand_in():
    """A `ModelCheckpoint` class importable under Lightning's module path while the file is
    written, and gone afterwards (pytorch_lightning is not installed)."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", LIGHTNING]
    assert not any(n in sys.modules for n in names)
    cls = type("ModelCheckpoint", (), {"__module__": LIGHTNING})
    for n in names:
        sys.modules[n] = types.ModuleType(n)
    sys.modules[LIGHTNING].ModelCheckpoint = cls
    try:
        yield cls
    finally:
        for n in names:
            del sys.modules[n]


def _write_release(path, tensors, nest=1):
    """`tensors` in a Lightning checkpoint like sd-v1-*.ckpt; `nest` levels of state_dict."""
    state = dict(tensors)
    for _ in range(nest):
        state = {"state_dict": state}
    with _lightning_stand_in() as callback:
        state.update({"epoch": 6, "global_step": np.int64(470000), "pytorch-lightning_version": "1.4.2",
                      "callbacks": {callback: {"monitor": None, "best_model_score": np.float64(0.25),
                                               "kth_value": np.float32(1.5), "dirpath": "/logs/checkpoints"}}})
        torch.save(state, path, pickle_module=types.SimpleNamespace(__name__="release_pickle", Pickler=_ReleasePickler))
    return path


def _ldm_state(models):
    unet = models["unet"]
    return ldm_keys.diffusers_to_ldm(
        state_dict_numpy(unet), state_dict_numpy(models["vae"]), state_dict_numpy(models["text_encoder"]),
        UNetConfig.from_diffusers(dict(unet.config)), VAEConfig.from_diffusers(dict(models["vae"].config)))


def _tensors(state):
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


@pytest.fixture(scope="module")
def release(sd_folder, tmp_path_factory):
    """A -full-ema release of the tiny SD: EMA U-Net = the folder's, raw U-Net = another."""
    path, models = sd_folder
    ema_state = _ldm_state(models)
    raw_state = _ldm_state({**models, "unet": torch_unet(seed=7)})
    tensors = {k: v for k, v in raw_state.items()}
    for k in ema_state:
        if k.startswith(ldm_keys.UNET_PREFIX):
            tensors[ema_key(k)] = ema_state[k]
    tensors["model_ema.decay"] = np.array(0.9999, np.float32)
    tensors["model_ema.num_updates"] = np.array(470000, np.int32)
    root = tmp_path_factory.mktemp("release")
    full = _write_release(str(root / "sd-tiny-full-ema.ckpt"), _tensors(tensors))
    ema_only = _write_release(str(root / "sd-tiny.ckpt"), _tensors(ema_state), nest=2)
    return {"folder": path, "full": full, "ema_only": ema_only, "tokenizer": os.path.join(path, "tokenizer"),
            "ema_unet": models["unet"], "raw_state": raw_state}


def _flat_torch(params):
    return flax_to_torch(jax.device_get(params))


def test_the_file_holds_what_the_releases_hold(release):
    import zipfile

    with zipfile.ZipFile(release["full"]) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    for name in (b"pytorch_lightning.callbacks.model_checkpoint\nModelCheckpoint", b"numpy.core.multiarray\nscalar",
                 b"numpy\ndtype", b"_codecs\nencode"):
        assert name in data, name
    with pytest.raises(Exception, match="Unsupported global"):  # what a plain weights_only load says
        torch.load(release["full"], weights_only=True)
    assert "pytorch_lightning" not in sys.modules


@pytest.mark.parametrize("ema,expected", [("auto", "ema"), (True, "ema"), (False, "raw")])
def test_release_loads_with_the_chosen_unet_weights(release, ema, expected, capsys):
    cfgs = read_configs(release["folder"])
    sd = load_single_file(release["full"], tokenizer_dir=release["tokenizer"], ema=ema, **cfgs)
    got = _flat_torch(sd.unet_params)
    if expected == "ema":
        ref = state_dict_numpy(release["ema_unet"])
    else:
        ref = state_dict_numpy(torch_unet(seed=7))
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    folder = load_diffusers_folder(release["folder"], components=("vae", "text_encoder"))
    for a, b in ((sd.vae_params, folder.vae_params), (sd.text_params, folder.text_params)):
        fa, fb = _flat_torch(a), _flat_torch(b)
        assert all(np.array_equal(fa[k], fb[k]) for k in fb)
    said = capsys.readouterr().err
    assert (f"using the {'EMA' if expected == 'ema' else 'raw (non-EMA)'} U-Net weights") in said


def test_nested_state_dict_and_a_file_without_ema(release):
    cfgs = read_configs(release["folder"])
    sd = load_single_file(release["ema_only"], tokenizer_dir=release["tokenizer"], **cfgs)
    ref = state_dict_numpy(release["ema_unet"])
    got = _flat_torch(sd.unet_params)
    assert all(np.array_equal(got[k], ref[k]) for k in ref)
    with pytest.raises(WeightsError, match="EMA weights asked for, but the file has no model_ema"):
        load_single_file(release["ema_only"], ema=True, **cfgs)
    assert set(read_state_dict(release["ema_only"])) == set(_ldm_state({"unet": release["ema_unet"],
                                                                        **_models_of(release)}))


def _models_of(release):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    return {"vae": AutoencoderKL.from_pretrained(os.path.join(release["folder"], "vae")),
            "text_encoder": CLIPTextModel.from_pretrained(os.path.join(release["folder"], "text_encoder"))}


def test_a_pickle_that_would_run_code_is_still_refused(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = str(tmp_path / "evil.ckpt")
    with _lightning_stand_in() as callback:
        torch.save({"state_dict": {"w": torch.zeros(2)}, "callbacks": {callback: {}}, "x": Payload()}, path)
    with pytest.raises(WeightsError, match="refused to load: the pickle holds posix.system"):
        read_state_dict(path)
    assert not marker.exists()

    class NotANumber:  # a dtype stand-in only rebuilds numeric dtypes
        def __reduce__(self):
            return (np.dtype, ("O", False, True))

    torch.save({"state_dict": {"w": torch.zeros(2)}, "d": NotANumber()}, str(tmp_path / "obj.ckpt"))
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        read_state_dict(str(tmp_path / "obj.ckpt"))


def test_convert_writes_a_folder_stock_diffusers_loads(release, tmp_path):
    from diffusers import StableDiffusionPipeline

    from smartbrush_jax.cli.convert import main

    out = str(tmp_path / "sd-tiny")
    args = ["--ckpt", release["full"], "--tokenizer", release["tokenizer"], "--out", out, "--configs-from",
            release["folder"]]
    assert main(args) == 0
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True, safety_checker=None)
    assert sorted(os.listdir(out)) == ["converted_from.json", "model_index.json", "scheduler", "text_encoder",
                                       "tokenizer", "unet", "vae"]
    assert not any(f.endswith((".bin", ".ckpt", ".pt")) for _, _, fs in os.walk(out) for f in fs)

    ours = load_single_file(release["full"], tokenizer_dir=release["tokenizer"], **read_configs(release["folder"]))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, 32)).astype(np.float32)
    t = np.array([10, 900])
    mine = np.asarray(ours.unet().apply({"params": ours.unet_params}, x, t, ctx))
    with torch.no_grad():
        theirs = pipe.unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                           torch.from_numpy(ctx)).sample.permute(0, 2, 3, 1).numpy()
    assert np.abs(theirs - mine).max() <= 1e-5 * np.abs(mine).max()
    ids = pipe.tokenizer(["the cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0].numpy()
    ref = np.asarray(ours.text_encoder().apply({"params": ours.text_params}, ids.numpy())[0])
    assert np.abs(text - ref).max() <= 1e-5 * np.abs(ref).max()

    # our loader reads the converted folder back to the same trees, and so does training's init_from
    back = load_diffusers_folder(out)
    for a, b in ((back.unet_params, ours.unet_params), (back.vae_params, ours.vae_params)):
        fa, fb = _flat_torch(a), _flat_torch(b)
        assert all(np.array_equal(fa[k], fb[k]) for k in fb)

    # the same output-folder rules as the export
    assert main(args) == 2
    assert main([*args[:4], "--out", release["folder"]]) == 2  # not a folder this command wrote
    assert main([*args, "--overwrite"]) == 0


def test_convert_bad_input_exits_2(release, tmp_path, capsys):
    from smartbrush_jax.cli.convert import main

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(os.urandom(256))
    for args, message in [(["--ckpt", str(tmp_path / "none.ckpt"), "--tokenizer", release["tokenizer"]],
                           "no such file"),
                          (["--ckpt", release["full"], "--tokenizer", str(tmp_path)], "no vocab.json"),
                          (["--ckpt", str(garbage), "--tokenizer", release["tokenizer"]], "not a PyTorch checkpoint")]:
        assert main([*args, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], err
    assert not (tmp_path / "o").exists()
