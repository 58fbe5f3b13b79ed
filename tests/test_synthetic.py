"""The bundled synthetic shapes set: deterministic, exact masks, consistent texts."""

import hashlib
import json
import os
import tarfile

import numpy as np
from PIL import Image
from pycocotools import mask as mu

from smartbrush_jax.cli.synthetic import main
from smartbrush_jax.data.synthetic import COLOURS, SHAPES, render_scene, write_dataset


def _digest(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            with open(os.path.join(root, f), "rb") as fh:
                h.update(f.encode() + fh.read())
    return h.hexdigest()


def test_deterministic_from_the_seed(tmp_path):
    write_dataset(str(tmp_path / "a"), 12, 32, seed=4)
    write_dataset(str(tmp_path / "b"), 12, 32, seed=4)
    write_dataset(str(tmp_path / "c"), 12, 32, seed=5)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")


def test_masks_are_the_visible_pixels_of_each_shape():
    rng = np.random.default_rng(0)
    for _ in range(20):
        img, objects, _ = render_scene(rng, 48)
        union = np.zeros((48, 48), bool)
        for o in objects:
            assert not (union & o["mask"]).any()  # instance masks do not overlap (occlusion)
            union |= o["mask"]
            # every visible pixel of the object is its colour, or its outline's black
            painted = img[o["mask"]]
            colour = np.all(painted == COLOURS[o["colour"]], axis=1)
            black = np.all(painted == 0, axis=1) if o["outline"] else np.zeros(len(painted), bool)
            assert (colour | black).all()
            assert colour.any()


def test_coco_files_match_the_rendering(tmp_path):
    paths = write_dataset(str(tmp_path), 10, 40, seed=2, num_text_pairs=3)
    coco = json.load(open(paths["annotations"]))
    captions = {json.loads(line)["annotation_id"]: json.loads(line)["caption"] for line in open(paths["captions"])}
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    rng = np.random.default_rng(2)
    by_image = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for im in coco["images"]:
        img, objects, _ = render_scene(rng, 40)
        np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(paths["images"], im["file_name"]))), img)
        anns = by_image[im["id"]]
        assert len(anns) == len(objects)
        for a, o in zip(anns, objects):
            rle = dict(a["segmentation"], counts=a["segmentation"]["counts"].encode())
            np.testing.assert_array_equal(mu.decode(rle).astype(bool), o["mask"])
            assert cats[a["category_id"]] == f"{o['colour']} {o['shape']}"
            assert f"{o['colour']} {o['shape']}" in captions[a["id"]]
            assert o["shape"] in SHAPES
    with tarfile.open(paths["image_text"]) as tar:
        names = sorted(m.name for m in tar)
    assert names == ["000000.jpg", "000000.txt", "000001.jpg", "000001.txt", "000002.jpg", "000002.txt"]


def test_cli(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "s"), "--num-scenes", "3", "--size", "32"]) == 0
    assert "annotations.json" in capsys.readouterr().out
    assert main(["--out", str(tmp_path / "s"), "--num-scenes", "0"]) == 2
