"""Probes of the data side (issue 36), each a row of the README's fault table:

1. a latent cache records the VAE that encoded it (family, scaling_factor, shift_factor),
   and a training run of another VAE is refused at start-up by name; a cache written
   before the record warns once that it cannot be fully checked;
2. COCO files with entries of the wrong type (an image id that is a list, `categories` a
   number, a category id that is an object, ...) are counted `bad_coco_entry` and the rest
   prepared (each was a TypeError traceback); an unusable top level is one line, exit 2.

The COCO file is a real third-party one (../shared/fixtures/real/coco/labelbox: 10 COCO
val2017 images, 62 polygons, 80 categories), each test changing one entry of it.
"""

import copy
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELBOX = os.path.join(os.path.dirname(ROOT), "shared", "fixtures", "real", "coco", "labelbox")
real_coco = pytest.mark.skipif(not os.path.isdir(LABELBOX), reason=f"third-party COCO files not found at {LABELBOX}")


# ------------------------------------------------------------------ 1. a latent cache's VAE

R = 16  # crop size; both tiny VAEs halve it


@pytest.fixture(scope="module")
def caches(tmp_path_factory, sd_folder):
    """A prepared folder cached by `smartbrush-latents` twice: with the tiny SD v1 folder's VAE
    and with the tiny SDXL folder's (the same architecture, SDXL's latent scale 0.13025)."""
    from absl import flags
    from sd_fixtures import write_sdxl_folder

    from smartbrush_jax.cli.latents import main as latents
    from smartbrush_jax.cli.prepare import main as prepare
    from smartbrush_jax.data.synthetic import write_dataset

    flags.FLAGS.mark_as_parsed()  # grain reads absl flags; tests run outside an absl app
    root = tmp_path_factory.mktemp("caches")
    raw = write_dataset(str(root / "raw"), num_scenes=3, size=24, seed=3, num_text_pairs=2)
    prepared = str(root / "prepared")
    assert prepare(["--out", prepared, "--coco-annotations", raw["annotations"], "--coco-images", raw["images"],
                    "--webdataset", raw["image_text"], "--workers", "1", "--quiet"]) == 0
    sdxl = str(root / "sdxl-base")
    write_sdxl_folder(sdxl)
    out = {"sd": sd_folder[0], "sdxl": sdxl, "root": root}
    for name, vae in (("sd1", sd_folder[0]), ("sdxl", sdxl)):
        out[name + "_cache"] = str(root / f"cache_{name}")
        assert latents(["--prepared", prepared, "--out", out[name + "_cache"], "--vae", vae, "--resolution", str(R),
                        "--batch", "4"]) == 0
    return out


def _latents_meta(cache):
    return json.loads(open(os.path.join(cache, "metadata.json")).read())["latents"]


def test_a_latent_cache_records_the_vae_that_encoded_it(caches):
    """metadata.json's `latents` names the VAE's family (what the folder's U-Net and
    model_index.json say), its scaling_factor and its shift_factor (none: SD's VAEs have none)."""
    sd1, sdxl = _latents_meta(caches["sd1_cache"]), _latents_meta(caches["sdxl_cache"])
    assert (sd1["family"], sd1["scaling_factor"], sd1["shift_factor"]) == ("sd1", 0.18215, None)
    assert (sdxl["family"], sdxl["scaling_factor"], sdxl["shift_factor"]) == ("sdxl", 0.13025, None)


def test_a_cache_of_another_vae_is_refused_by_name(caches):
    """Row: an SDXL run (its VAE's scaling_factor 0.13025) on a cache encoded by SD v1's VAE
    (0.18215), and the other way: refused with both named. The same VAE passes in silence;
    SD 2.x shares SD v1's VAE, so its run takes an sd1 cache."""
    from smartbrush_jax.data.latents import check_cache_vae
    from smartbrush_jax.data.pipeline import DataError

    cache, other = caches["sd1_cache"], caches["sdxl_cache"]
    with pytest.raises(DataError) as e:
        check_cache_vae([cache], "sdxl", 0.13025, None, 4, vae="/models/sdxl")
    assert str(e.value) == (f"the latent cache {cache} was encoded by the sd1 VAE (scaling_factor 0.18215), this "
                            "run's VAE is sdxl (0.13025): rebuild the cache with `python -m smartbrush_jax.cli.latents "
                            "--vae /models/sdxl`, or train with the VAE it was encoded with")
    with pytest.raises(DataError, match=r"encoded by the sdxl VAE \(scaling_factor 0.13025\), this run's VAE is sd1 "):
        check_cache_vae([other], "sd1", 0.18215, None, 4)
    check_cache_vae([cache], "sd1", 0.18215, None, 4)
    check_cache_vae([cache], "sd2", 0.18215, None, 4)
    check_cache_vae([other], "sdxl", 0.13025, None, 4)


def _old_cache(caches, name, drop):
    """A copy of the sd1 cache whose metadata lacks `drop` (as caches before this record)."""
    import shutil

    old = str(caches["root"] / name)
    if not os.path.isdir(old):
        shutil.copytree(caches["sd1_cache"], old)
        meta = json.loads(open(os.path.join(old, "metadata.json")).read())
        for key in drop:
            del meta["latents"][key]
        with open(os.path.join(old, "metadata.json"), "w") as f:
            json.dump(meta, f)
    return old


def test_a_cache_from_before_the_record_warns_once_and_is_still_checked_by_its_scale(caches, capsys):
    """Row: a cache written before the VAE was recorded (no `family`, no `shift_factor`) is
    still trained on, with one warning line that its VAE cannot be fully checked; its
    scaling_factor (recorded from the first version on) still refuses another family's run.
    One without even that warns that it cannot be checked at all."""
    from smartbrush_jax.data.latents import check_cache_vae
    from smartbrush_jax.data.pipeline import DataError

    old = _old_cache(caches, "old_cache", ["family", "shift_factor"])
    capsys.readouterr()
    check_cache_vae([old], "sd1", 0.18215, None, 4)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: the latent cache {old} was written before caches "
                                               "recorded their VAE's family: only its scaling_factor 0.18215")
    with pytest.raises(DataError, match=r"encoded by the sd1/sd2 VAE \(scaling_factor 0.18215\), this run's VAE "
                                        r"is sdxl \(0.13025\)"):
        check_cache_vae([old], "sdxl", 0.13025, None, 4)
    older = _old_cache(caches, "older_cache", ["family", "shift_factor", "scaling_factor"])
    capsys.readouterr()
    check_cache_vae([older], "sdxl", 0.13025, None, 4)
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: the latent cache {older} does not record the VAE that encoded it (written by an older "
                   "version): it cannot be checked against this run's VAE, sdxl (0.13025); rebuild the cache with "
                   "`python -m smartbrush_jax.cli.latents --vae <the run's model.init_from>` to be sure"]


def _train(work, *overrides):
    from train_helpers import train

    return train(work, "--config.model.autoencoder=vae", "--config.data.synthetic_scenes=0",
                 f"--config.data.resolution={R}", "--config.train.batch_size=2", "--config.train.steps=1",
                 *overrides, timeout=420)


@pytest.mark.slow  # a trainer start-up (JAX, the tiny SDXL weights): ~30 s on 2 shared cores
def test_an_sdxl_run_on_a_cache_of_sd_v1s_vae_is_refused_at_start_up(caches, tmp_path):
    """Row, end to end: `train` with the tiny SDXL folder as init_from and the cache SD v1's
    VAE encoded in data.prepared_dirs exits 2 with the one line, before any step."""
    cache = caches["sd1_cache"]
    proc = _train(str(tmp_path / "run"), f"--config.model.init_from={caches['sdxl']}", "--config.model.family=sdxl",
                  f"--config.data.prepared_dirs=('{cache}',)")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: the latent cache {cache} was encoded by the sd1 VAE (scaling_factor 0.18215), this "
                      f"run's VAE is sdxl (0.13025): rebuild the cache with `python -m smartbrush_jax.cli.latents "
                      f"--vae {caches['sdxl']}`, or train with the VAE it was encoded with"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not os.path.isdir(tmp_path / "run" / "checkpoints" / "1")


# ------------------------------------------------------------------ 2. COCO entries of the wrong type

def _records(out):
    import grain

    from smartbrush_jax.data.records import unpack_record

    meta = json.loads(open(os.path.join(out, "metadata.json")).read())
    files = [os.path.join(out, f) for f in meta["components"]["seg"]["files"]]
    src = grain.sources.ArrayRecordDataSource(files) if files else []
    return meta, [unpack_record(src[i]) for i in range(len(src))]


def _prepare(tmp_path, name, coco):
    """`smartbrush-prepare` (in this process) on `coco` written as a file, with the real
    images: (exit code, metadata, {annotation id: label} of the prepared records)."""
    from smartbrush_jax.cli.prepare import main

    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(coco))
    out = tmp_path / name
    code = main(["--out", str(out), "--coco-annotations", str(path), "--coco-images",
                 os.path.join(LABELBOX, "images"), "--workers", "1", "--quiet"])
    if code != 0:
        return code, None, None
    meta, records = _records(str(out))
    return code, meta, {int(r["id"].split(":")[1]): r["label"] for r in records}


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """The real file and what prepare makes of it untouched (30 instances kept, 32 tiny)."""
    original = json.loads(open(os.path.join(LABELBOX, "annotations", "instances.json")).read())
    code, meta, labels = _prepare(tmp_path_factory.mktemp("coco"), "original", original)
    assert code == 0 and len(labels) == 30 and meta["skipped"]["coco"] == {"tiny_mask": 32}
    return {"json": original, "labels": labels, "meta": meta}


def _kept_annotation(coco, image=None):
    """An annotation the untouched file prepares (on `image`, when given)."""
    return next(a for a in coco["json"]["annotations"] if a["id"] in coco["labels"]
                and (image is None or a["image_id"] == image))


@real_coco
def test_an_image_id_that_is_a_list_is_counted_and_the_rest_prepared(tmp_path, coco):
    """Row: a COCO image whose `id` is a list (`[458755]`): prepare ended in `TypeError:
    unhashable type: 'list'`. Now that image is one `bad_coco_entry`, its annotations name
    an image the file does not have (`missing_file`), every other image is prepared, exit 0."""
    data = copy.deepcopy(coco["json"])
    image = next(im for im in data["images"] if any(a["image_id"] == im["id"] and a["id"] in coco["labels"]
                                                    for a in data["annotations"]))
    on_it = [a["id"] for a in data["annotations"] if a["image_id"] == image["id"]]
    image["id"] = [image["id"]]
    code, meta, labels = _prepare(tmp_path, "image_id_list", data)
    assert code == 0
    assert meta["skipped"]["coco"]["bad_coco_entry"] == 1
    assert meta["skipped"]["coco"]["missing_file"] == len(on_it)
    assert labels == {k: v for k, v in coco["labels"].items() if k not in on_it}


@real_coco
def test_categories_that_is_a_number_is_counted_and_the_instances_prepared_without_labels(tmp_path, coco):
    """Row: `"categories": 80` (a count where the list belongs): `TypeError: 'int' object
    is not iterable`. Now it is one `bad_coco_entry`, every instance is prepared as before,
    without a label (no category names), exit 0."""
    data = copy.deepcopy(coco["json"])
    data["categories"] = 80
    code, meta, labels = _prepare(tmp_path, "categories_number", data)
    assert code == 0
    assert meta["skipped"]["coco"] == {"bad_coco_entry": 1, "tiny_mask": 32}
    assert labels == {k: "" for k in coco["labels"]} and meta["classes"] == []


@real_coco
def test_a_category_id_that_is_an_object_is_counted_and_the_rest_labelled(tmp_path, coco):
    """Row: a category whose `id` is an object (`{"id": 1}`): `TypeError: unhashable type:
    'dict'`. Now that category is one `bad_coco_entry`; its instances are prepared without a
    label, every other instance keeps its own, exit 0."""
    data = copy.deepcopy(coco["json"])
    person = next(c for c in data["categories"] if c["name"] == "person")
    person["id"] = {"id": person["id"]}
    assert "person" in coco["labels"].values()
    code, meta, labels = _prepare(tmp_path, "category_id_object", data)
    assert code == 0
    assert meta["skipped"]["coco"] == {"bad_coco_entry": 1, "tiny_mask": 32}
    assert labels == {k: ("" if v == "person" else v) for k, v in coco["labels"].items()}
    assert "person" not in meta["classes"] and meta["classes"] == sorted(set(coco["meta"]["classes"]) - {"person"})


PROBES = {  # an annotation's field -> (its wrong value, the reason it is counted under)
    "image_id a string that names no image": ("image_id", "000000458755.jpg", "missing_file"),
    "image_id a list": ("image_id", [458755], "bad_coco_entry"),
    "id an object": ("id", {"id": 1}, "bad_coco_entry"),
    "category_id an object": ("category_id", {"id": 1}, "bad_coco_entry"),
    "bbox a string": ("bbox", "10, 20, 30, 40", "bad_coco_entry"),
    "bbox of three numbers": ("bbox", [10, 20, 30], "bad_coco_entry"),
    "iscrowd a list": ("iscrowd", [1], "bad_coco_entry"),
    "iscrowd an empty list": ("iscrowd", [], "bad_coco_entry"),
    "segmentation a number": ("segmentation", 5, "bad_coco_entry"),
    "segmentation a string": ("segmentation", "polygon", "bad_coco_entry"),
}


@real_coco
@pytest.mark.parametrize("probe", sorted(PROBES))
def test_an_annotation_field_of_the_wrong_type_is_counted_not_a_crash(tmp_path, coco, probe):
    """Row: one annotation of the real file with a field of the wrong type: that annotation
    is counted under its reason (it was `corrupt_record`, `crowd` or `empty_mask` by
    accident, or trained: an `iscrowd` of `[]` read as 0), every other one is prepared."""
    key, value, reason = PROBES[probe]
    data = copy.deepcopy(coco["json"])
    target = _kept_annotation(coco)
    ann = next(a for a in data["annotations"] if a["id"] == target["id"])
    ann[key] = value
    code, meta, labels = _prepare(tmp_path, "probe", data)
    assert code == 0
    expected = dict(coco["meta"]["skipped"]["coco"])
    expected[reason] = expected.get(reason, 0) + 1
    assert meta["skipped"]["coco"] == expected
    assert labels == {k: v for k, v in coco["labels"].items() if k != target["id"]}


@real_coco
def test_a_category_without_a_name_is_counted(tmp_path, coco):
    """A category object without `name` was a KeyError traceback: now a `bad_coco_entry`."""
    data = copy.deepcopy(coco["json"])
    person = next(c for c in data["categories"] if c["name"] == "person")
    del person["name"]
    code, meta, labels = _prepare(tmp_path, "category_no_name", data)
    assert code == 0 and meta["skipped"]["coco"]["bad_coco_entry"] == 1
    assert labels == {k: ("" if v == "person" else v) for k, v in coco["labels"].items()}


@real_coco
@pytest.mark.parametrize("top", ["images an object", "annotations a string", "the file a list"])
def test_a_coco_file_whose_top_level_is_unusable_is_one_line_exit_2(tmp_path, coco, top):
    """Row: a file whose top level cannot be read as COCO instances is refused before any
    work, in one line (a child process: what a user sees)."""
    data = copy.deepcopy(coco["json"])
    if top == "images an object":
        data["images"] = {str(im["id"]): im for im in data["images"]}
    elif top == "annotations a string":
        data["annotations"] = "instances.json"
    else:
        data = [data]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    code = "import sys; from smartbrush_jax.cli.prepare import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "--out", str(tmp_path / "out"), "--coco-annotations",
                           str(path), "--coco-images", os.path.join(LABELBOX, "images"), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert lines == [f"error: --coco-annotations {path}: not a COCO instances file (needs 'images' and "
                     "'annotations' lists)"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
