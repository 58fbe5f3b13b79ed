"""Latent caching (`smartbrush_jax.data.latents`): the stored moments are our VAE's on the
pipeline's own crops, the cached pipeline gives the same masks, `encode` gives the same
latents from the cache as from the images, bad inputs exit 2, caches don't mix."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from array_record.python.array_record_module import ArrayRecordWriter

from smartbrush_jax.cli.latents import main
from smartbrush_jax.cli.prepare import main as prepare_main
from smartbrush_jax.data.latents import crop_rng
from smartbrush_jax.data.pipeline import DataError, ExampleTransform, make_dataset
from smartbrush_jax.data.records import decode_mask, pack_record, unpack_record
from smartbrush_jax.data.synthetic import write_dataset
from smartbrush_jax.settings import DataConfig

flags.FLAGS.mark_as_parsed()  # grain reads absl flags; tests run outside an absl app

R, F, K = 16, 2, 2  # resolution, the tiny VAE's factor, crops per record
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(folder, files):
    import grain

    from smartbrush_jax.data.records import RecordError

    def read(data):
        try:
            return unpack_record(data)
        except RecordError:
            return {}

    src = grain.sources.ArrayRecordDataSource([os.path.join(folder, f) for f in files])
    return [read(src[i]) for i in range(len(src))]


@pytest.fixture(scope="module")
def cached(tmp_path_factory, sd_folder):
    root = tmp_path_factory.mktemp("latents")
    raw = write_dataset(str(root / "raw"), num_scenes=6, size=24, seed=3, num_text_pairs=4)
    prepared = str(root / "prepared")
    assert prepare_main(["--out", prepared, "--coco-annotations", raw["annotations"], "--coco-images", raw["images"],
                         "--captions", raw["captions"], "--webdataset", raw["image_text"]]) == 0
    # planted bad records in an extra seg shard: skipped and counted by the cache
    bad_dir = str(root / "prepared_bad")
    shutil.copytree(prepared, bad_dir)
    w = ArrayRecordWriter(os.path.join(bad_dir, "bad-00000-of-00001.array_record"), "group_size:1")
    w.write(b"garbage, not a record")
    w.write(pack_record({"id": "bad:image", "source": "coco", "kind": "seg", "label": "cat", "caption": "",
                         "image": b"\x89PNG broken", "mask": b""}))
    w.close()
    meta = json.loads(open(os.path.join(bad_dir, "metadata.json")).read())
    meta["components"]["seg"]["files"].append("bad-00000-of-00001.array_record")
    with open(os.path.join(bad_dir, "metadata.json"), "w") as f:
        json.dump(meta, f)
    out = str(root / "cache")
    assert main(["--prepared", bad_dir, "--out", out, "--vae", sd_folder[0], "--resolution", str(R),
                 "--crops", str(K), "--batch", "3", "--seed", "5", "--shard-size", "7"]) == 0
    return {"prepared": bad_dir, "clean": prepared, "out": out, "sd": sd_folder[0],
            "tok": os.path.join(sd_folder[0], "tokenizer")}


def _vae(sd_path):
    from smartbrush_jax.interop.loader import load_diffusers_folder

    sd = load_diffusers_folder(sd_path, components=("vae",))
    return sd.vae(), sd.vae_params, sd.vae_config.scaling_factor


def _source_records(prepared):
    meta = json.loads(open(os.path.join(prepared, "metadata.json")).read())
    return {name: _records(prepared, c["files"]) for name, c in meta["components"].items()}


def _uncached_crop(cached, rec_id, k):
    """The crop the cache made for crop k of record `rec_id`, recomputed from the prepared folder."""
    for name, recs in _source_records(cached["prepared"]).items():
        for i, data in enumerate(recs):
            if data.get("id") == rec_id:
                t = ExampleTransform(DataConfig(resolution=R, latent_factor=F))
                return t.crop(data, crop_rng(5, name, i, k))
    raise KeyError(rec_id)


def test_cache_holds_the_vae_moments_of_the_pipeline_crops(cached):
    meta = json.loads(open(os.path.join(cached["out"], "metadata.json")).read())
    src_meta = json.loads(open(os.path.join(cached["prepared"], "metadata.json")).read())
    lat = meta["latents"]
    assert lat["resolution"] == R and lat["latent_factor"] == F and lat["channels"] == 4 and lat["crops"] == K
    assert lat["vae"] == os.path.abspath(cached["sd"]) and lat["format_version"] == 2
    assert lat["prepared"] == os.path.abspath(cached["prepared"])
    n_seg, n_t2i = src_meta["components"]["seg"]["count"], src_meta["components"]["t2i"]["count"]
    assert meta["components"]["seg"]["count"] == K * n_seg and meta["components"]["t2i"]["count"] == K * n_t2i
    assert meta["skipped"]["seg"] == {"corrupt_record": 1, "corrupt_image": 1}
    assert meta["source_records"]["seg"] == n_seg + 2
    vae, params, _ = _vae(cached["sd"])
    enc = jax.jit(lambda x: vae.apply({"params": params}, x, method=vae.encode))
    recs = [r for c in meta["components"].values() for r in _records(cached["out"], c["files"])]
    assert sorted({(r["id"], r["crop"]) for r in recs}) == sorted((r["id"], r["crop"]) for r in recs)
    for rec in recs[:: max(1, len(recs) // 8)] + recs[-2:]:  # a spread of both components
        crop = _uncached_crop(cached, rec["id"], rec["crop"])
        assert rec["latent_shape"] == [R // F, R // F, 4] and rec["latent_dtype"] == "float16"
        mean, logvar = enc(jnp.asarray(crop["image"][None], jnp.float32) / 127.5 - 1.0)
        got_mean = np.frombuffer(rec["latent_mean"], np.float16).reshape(R // F, R // F, 4)
        got_logvar = np.frombuffer(rec["latent_logvar"], np.float16).reshape(R // F, R // F, 4)
        np.testing.assert_allclose(got_mean, np.asarray(mean[0]), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(got_logvar, np.asarray(logvar[0]), rtol=2e-3, atol=2e-3)
        np.testing.assert_array_equal(decode_mask(rec["mask"]), crop["mask"] > 0)
        assert list(rec["box"]) == list(crop["box"])
    # the K crops of an object differ (seeded per crop; recomputing them above gave the same crops)
    seg = [r for r in recs if r["kind"] == "seg"]
    assert any(a["box"] != b["box"] for a, b in zip(seg[0::K], seg[1::K]))


def test_cached_pipeline_batches(cached):
    cfg = DataConfig(prepared_dirs=[cached["out"]], tokenizer_dir=cached["tok"], resolution=R, latent_factor=F,
                     batch_size=4)
    it = iter(make_dataset(cfg))
    for _ in range(2):
        b = next(it)
        assert "image" not in b
        assert b["latent_mean"].shape == (4, R // F, R // F, 4) and b["latent_mean"].dtype == np.float32
        assert b["latent_logvar"].shape == (4, R // F, R // F, 4) and b["latent_logvar"].dtype == np.float32
        assert b["mask"].shape == (4, R, R) and b["latent_mask"].shape == (4, R // F, R // F)
        assert b["tokens"].shape == (4, 77) and b["tokens"].dtype == np.int32
        for i in range(4):
            m = b["mask"][i].astype(np.float32)
            np.testing.assert_allclose(b["latent_mask"][i], m.reshape(R // F, F, R // F, F).mean(axis=(1, 3)))
            # the mask is the uncached pipeline's mask of one of the K crops
            masks = [_uncached_crop(cached, str(b["id"][i]), k)["mask"] for k in range(K)]
            assert any(np.array_equal(b["mask"][i], mk) for mk in masks)
            assert m.all() if b["is_t2i"][i] else 0 < m.sum() < m.size


def test_encode_from_cache_equals_encode_from_images(cached):
    from smartbrush_jax.models.autoencoder import VAE, Identity
    from smartbrush_jax.train.step import Models, encode

    vae, params, scale = _vae(cached["sd"])
    models = Models(unet=None, text=None, autoencoder=VAE(vae), pretrained=None, schedule=None)
    assert models.latent_factor == F and models.autoencoder.scaling_factor == scale
    meta = json.loads(open(os.path.join(cached["out"], "metadata.json")).read())
    recs = {(r["id"], r["crop"]): r for c in meta["components"].values() for r in _records(cached["out"], c["files"])}
    ids = [k for k in sorted(recs) if k[1] == 1][:3]
    t = ExampleTransform(DataConfig(resolution=R, latent_factor=F, tokenizer_dir=cached["tok"]))
    crops = [_uncached_crop(cached, i, k) for i, k in ids]
    moments = [t.cached_example(recs[key], np.random.default_rng(0)) for key in ids]
    latent_mask = jnp.asarray(np.stack([c["latent_mask"] for c in crops]))
    from_images = {"image": jnp.asarray(np.stack([c["image"] for c in crops])), "latent_mask": latent_mask}
    from_cache = {"latent_mean": jnp.asarray(np.stack([m["latent_mean"] for m in moments])),
                  "latent_logvar": jnp.asarray(np.stack([m["latent_logvar"] for m in moments])),
                  "latent_mask": jnp.asarray(np.stack([m["latent_mask"] for m in moments]))}
    rng = jax.random.PRNGKey(7)
    z_img, m_img = encode(models, {"vae": params}, from_images, rng)
    z_lat, m_lat = encode(models, {"vae": params}, from_cache, rng)
    assert z_img.shape == z_lat.shape == (3, R // F, R // F, 4)
    np.testing.assert_allclose(np.asarray(z_lat), np.asarray(z_img), rtol=5e-3, atol=5e-3 * scale)
    np.testing.assert_array_equal(np.asarray(m_lat), np.asarray(m_img))
    models_px = Models(None, None, Identity(), None, None)
    with pytest.raises(ValueError, match="needs a VAE"):
        encode(models_px, {}, from_cache, rng)


def test_bad_inputs_exit_2(cached, tmp_path, capsys):
    base = ["--out", str(tmp_path / "o"), "--resolution", str(R)]
    assert main(["--prepared", str(tmp_path / "nope"), "--vae", cached["sd"], *base]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["--prepared", cached["clean"], "--vae", str(tmp_path), *base]) == 2
    assert "no vae/config.json" in capsys.readouterr().err
    assert main(["--prepared", cached["clean"], "--vae", cached["sd"], "--out", str(tmp_path / "o"),
                 "--resolution", "15"]) == 2
    assert "not a multiple of the VAE's factor 2" in capsys.readouterr().err
    assert main(["--prepared", cached["out"], "--vae", cached["sd"], *base]) == 2
    assert "already a latent cache" in capsys.readouterr().err
    assert main(["--prepared", cached["clean"], "--vae", cached["sd"], *base, "--crops", "0"]) == 2
    assert not os.path.exists(tmp_path / "o")


def test_cached_and_uncached_do_not_mix(cached):
    cfg = DataConfig(prepared_dirs=[cached["out"], cached["clean"]], tokenizer_dir=cached["tok"], resolution=R,
                     latent_factor=F)
    with pytest.raises(DataError, match="mixes latent caches"):
        make_dataset(cfg)
    with pytest.raises(DataError, match=r"holds 16 px crops .* trains at 32 px"):
        make_dataset(DataConfig(prepared_dirs=[cached["out"]], tokenizer_dir=cached["tok"], resolution=32,
                                latent_factor=F))


@pytest.mark.slow  # compiles the step and the sampler: ~80 s on 2 shared cores
def test_two_training_steps_on_the_cache(cached, tmp_path):
    """The trainer in latent space (the tiny SD folder) on the cache, with held-out samples
    from the cache's source folder (images)."""
    work = str(tmp_path / "run")
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-m", "smartbrush_jax.train", f"--config={ROOT}/tests/configs/tiny_train.py",
         f"--workdir={work}", f"--config.model.init_from={cached['sd']}", "--config.model.autoencoder=vae",
         "--config.data.synthetic_scenes=0", f"--config.data.prepared_dirs=('{cached['out']}',)",
         f"--config.data.resolution={R}", "--config.train.steps=2", "--config.train.batch_size=4",
         "--config.train.sample_every=2", "--config.train.sample_steps=2", "--config.train.num_sample_examples=2",
         "--config.train.checkpoint_every=2", "--config.train.log_every=1"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(open(os.path.join(work, "summary.json")).read())
    assert summary["steps"] == 2 and all(np.isfinite(h["loss"]) for h in summary["history"] if "loss" in h)
    assert os.path.isfile(os.path.join(work, "samples", "step_0000002.png"))


_TFDS_READ = '''
import json, sys
import tensorflow_datasets as tfds
b = tfds.builder_from_directory(sys.argv[1])
ds = b.as_data_source("train")
print(json.dumps({"n": len(ds), "features": sorted(b.info.features.keys()),
                  "ids": [ds[i]["id"].decode() for i in range(len(ds))]}))
'''


def test_two_processes_write_the_cache_one_process_writes(cached, tmp_path):
    """`--coordinator-address/--num-processes/--process-id` (what `--distributed` finds on a
    cluster): each process encodes its share of the shards into one folder, process 0 writes
    the metadata; the result is the single-process cache, file for file."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "cache2")
    args = ["--prepared", cached["prepared"], "--out", out, "--vae", cached["sd"], "--resolution", str(R),
            "--crops", str(K), "--batch", "3", "--seed", "5", "--shard-size", "7",
            "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    procs = [subprocess.Popen([sys.executable, "-m", "smartbrush_jax.cli.latents", *args, "--process-id", str(i)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "latents: 3 of 6 shards" in logs[0] and "latents: 3 of 6 shards" in logs[1]  # each did its share
    one, two = (json.loads(open(os.path.join(d, "metadata.json")).read()) for d in (cached["out"], out))
    for m in (one, two):
        m.pop("created")
    assert one == two
    assert sorted(os.listdir(out)) == sorted(os.listdir(cached["out"]))
    for f in os.listdir(out):
        if "array_record" in f:
            assert open(os.path.join(out, f), "rb").read() == open(os.path.join(cached["out"], f), "rb").read()
    # and the cache is a TFDS dataset: its split holds every crop, in the metadata's order
    proc = subprocess.run([sys.executable, "-c", _TFDS_READ, out], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["features"] == ["box", "caption", "crop", "id", "kind", "label", "latent_dtype", "latent_logvar",
                               "latent_mean", "latent_shape", "mask", "micro", "source"]
    ours = [r.get("id") for k in ("seg", "t2i") for r in _records(out, two["components"][k]["files"])]
    assert got["n"] == len(ours) == two["components"]["seg"]["count"] + two["components"]["t2i"]["count"]
    assert got["ids"] == ours


def test_sdxl_refuses_a_cache_without_micro_conditioning(cached, tmp_path):
    """A cache holds each crop's source size and offsets (SDXL's micro-conditioning, in its
    records and flagged in metadata.json); one written before that was recorded is refused
    for an SDXL run, by name, before any step."""
    from smartbrush_jax.config import ConfigError
    from smartbrush_jax.train.loop import check_micro_recorded

    check_micro_recorded([cached["out"], cached["clean"]])  # a new cache and a prepared folder: fine
    meta = json.loads(open(os.path.join(cached["out"], "metadata.json")).read())
    assert meta["latents"]["micro"] is True
    old = tmp_path / "old_cache"
    old.mkdir()
    del meta["latents"]["micro"]
    (old / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"old_cache does not record the crops' original size .* rebuild it"):
        check_micro_recorded([cached["out"], str(old)])
    # the records carry it: each crop's micro equals the pipeline's for the same crop box
    cfg = DataConfig(prepared_dirs=[cached["out"]], tokenizer_dir=cached["tok"], resolution=R, latent_factor=F)
    transform = ExampleTransform(cfg)
    recs = [r for r in _records(cached["out"], meta["components"]["seg"]["files"]) if r]
    assert recs and all(len(r["micro"]) == 6 and r["micro"][4:] == [R, R] for r in recs)
    for rec in recs[:4]:
        ex = transform.cached_example(rec, np.random.default_rng(0))
        assert ex["micro"].tolist() == rec["micro"]
