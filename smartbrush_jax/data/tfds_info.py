"""A prepared folder (or a latent cache) as a TFDS dataset: shard names TFDS understands
and its `dataset_info.json` + `features.json`, so that

    builder = tfds.builder_from_directory(folder)
    builder.info.features, builder.info.splits["train"].num_examples
    builder.as_data_source("train")[i]      # decoded with NumPy/PIL, no TensorFlow

work. The records are the `tf.train.Example`s of `records.py`; one split, `train`: the
folder's `seg` shards, then its `t2i` shards (`metadata.json` lists which files are which).
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

DATASET_NAME = {"prepared": "smartbrush_prepared", "cached": "smartbrush_latents"}
SPLIT = "train"
VERSION = "2.0.0"  # the record encoding (records.py version 2)
DESCRIPTION = {
    "prepared": "SmartBrush prepared examples: object-mask (kind 'seg') and image-text (kind 't2i') records, "
                "written by smartbrush_jax.data.prepare. The split 'train' holds the seg shards, then the t2i "
                "shards (metadata.json names them).",
    "cached": "SmartBrush latent cache: VAE moments of object-centred crops, written by "
              "smartbrush_jax.data.latents.",
}


def shard_name(kind: str, index: int, total: int) -> str:
    """The file name of shard `index` of `total` of the split, as TFDS names them."""
    return f"{DATASET_NAME[kind]}-{SPLIT}.array_record-{index:05d}-of-{total:05d}"


def features(kind: str):
    """The FeaturesDict of a prepared folder (`kind="prepared"`) or latent cache ("cached")."""
    import numpy as np
    import tensorflow_datasets as tfds

    F = tfds.features
    text = {
        "id": F.Text(doc="source:annotation id (stable across runs and worker counts)"),
        "source": F.Text(doc="coco, openimages, laion, ..."),
        "kind": F.Text(doc="seg (an object and its mask) or t2i (an image and its caption)"),
        "label": F.Text(doc="the object's class name (seg)"),
        "caption": F.Text(doc="a caption of the object (seg, BLIP or a side-file) or of the image (t2i)"),
    }
    if kind == "prepared":
        return F.FeaturesDict({
            **text,
            "image": F.Image(shape=(None, None, 3), doc="RGB; JPEG/PNG/WEBP as found, re-encoded as PNG when the "
                                                        "file needed a conversion (EXIF rotation, CMYK, 16 bit, ...)"),
            "mask": F.Tensor(shape=(), dtype=np.object_, doc="PNG of the object's mask at the image's size "
                                                             "(nonzero = object); empty for t2i"),
            "box": F.Tensor(shape=(4,), dtype=np.int64, doc="x0, y0, x1, y1 of the mask (t2i: the whole image)"),
        })
    return F.FeaturesDict({
        **text,
        "mask": F.Tensor(shape=(), dtype=np.object_, doc="PNG of the mask at the crop's resolution"),
        "latent_mean": F.Tensor(shape=(), dtype=np.object_, doc="float16 bytes of latent_shape"),
        "latent_logvar": F.Tensor(shape=(), dtype=np.object_, doc="float16 bytes of latent_shape"),
        "latent_shape": F.Tensor(shape=(3,), dtype=np.int64, doc="h, w, channels"),
        "latent_dtype": F.Text(doc="float16"),
        "crop": F.Tensor(shape=(), dtype=np.int64, doc="which of the record's crops"),
        "box": F.Tensor(shape=(3,), dtype=np.int64, doc="x0, y0, side of the crop in the source image"),
        "micro": F.Tensor(shape=(6,), dtype=np.int64, doc="SDXL's micro-conditioning of the crop: source (h, w), "
                                                          "crop top-left (y, x) in the resized frame, (R, R)"),
    })


def write_info(folder: str, kind: str, files: Sequence[str], shard_lengths: Sequence[int],
               num_bytes: int = 0) -> None:
    """dataset_info.json + features.json for the split `train` made of `files` (in order;
    named by `shard_name`) holding `shard_lengths` records."""
    import tensorflow_datasets as tfds
    from etils import epath

    expected = [shard_name(kind, i, len(files)) for i in range(len(files))]
    if [os.path.basename(f) for f in files] != expected:
        raise ValueError(f"shards must be named {expected[:2]}..., got {list(files)[:2]}...")
    template = tfds.core.ShardedFileTemplate(data_dir=epath.Path(folder), dataset_name=DATASET_NAME[kind],
                                             split=SPLIT, filetype_suffix="array_record")
    split = tfds.core.SplitInfo(name=SPLIT, shard_lengths=[int(n) for n in shard_lengths], num_bytes=int(num_bytes),
                                filename_template=template)
    tfds.folder_dataset.write_metadata(data_dir=folder, features=features(kind), split_infos=[split],
                                       version=VERSION, filename_template=template.template, check_data=False,
                                       description=DESCRIPTION[kind])


def split_order(components: Dict[str, dict]) -> List[str]:
    """The components in the order the split holds them: seg, t2i, then any other."""
    return sorted(components, key=lambda k: ({"seg": 0, "t2i": 1}.get(k, 2), k))
