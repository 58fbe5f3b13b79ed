"""Small data sets in each real on-disk format, with planted bad records of every kind."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image


def png_bytes(arr, mode=None, **kw) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    im.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def png_header_only(path, width, height):
    """A PNG whose header claims width x height and holds almost nothing: readers must refuse
    it from the header, before decoding (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00"))
                + chunk(b"IEND", b""))


def rgb(h, w, seed):
    return (np.random.default_rng(seed).uniform(size=(h, w, 3)) * 255).astype(np.uint8)


def write_coco(root: str):
    """COCO with polygon, compressed-RLE and uncompressed-RLE masks and planted problems.

    Returns (paths, expected): expected maps annotation id -> (image file, exact mask)
    for the good annotations, plus the exact skip counts by reason."""
    from pycocotools import mask as mu

    img_dir = os.path.join(root, "images")
    os.makedirs(img_dir, exist_ok=True)
    H, W = 40, 60
    images, anns, expected = [], [], {}

    def add_image(iid, name, data, h=H, w=W):
        if data is not None:
            with open(os.path.join(img_dir, name), "wb") as f:
                f.write(data)
        images.append({"id": iid, "file_name": name, "height": h, "width": w})

    def rect(y0, y1, x0, x1, h=H, w=W):
        m = np.zeros((h, w), bool)
        m[y0:y1, x0:x1] = True
        return m

    add_image(1, "a.png", png_bytes(rgb(H, W, 1)))
    # 1: polygon (rectangle x 10..30, y 5..25 -> pixels [5:25, 10:30])
    anns.append({"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [10, 5, 20, 20],
                 "segmentation": [[10, 5, 30, 5, 30, 25, 10, 25]]})
    expected[1] = ("a.png", rect(5, 25, 10, 30), "cat")
    # 2: compressed RLE of an L shape
    m2 = rect(2, 30, 35, 40) | rect(25, 30, 35, 55)
    rle = mu.encode(np.asfortranarray(m2.astype(np.uint8)))
    anns.append({"id": 2, "image_id": 1, "category_id": 2, "iscrowd": 0,
                 "segmentation": {"size": [H, W], "counts": rle["counts"].decode()}})
    expected[2] = ("a.png", m2, "dog")
    # 3: uncompressed RLE (column-major run lengths)
    m3 = rect(30, 38, 2, 20)
    flat = m3.flatten(order="F").astype(int)
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    anns.append({"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 0,
                 "segmentation": {"size": [H, W], "counts": runs}})
    expected[3] = ("a.png", m3, "cat")
    # planted: crowd, empty polygon, tiny mask, RLE of another size, box outside
    anns.append({"id": 4, "image_id": 1, "category_id": 1, "iscrowd": 1, "segmentation": [[0, 0, 5, 0, 5, 5]]})
    anns.append({"id": 5, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [[1, 1, 2, 2]]})
    anns.append({"id": 6, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]})
    small = mu.encode(np.asfortranarray(np.ones((10, 10), np.uint8)))
    anns.append({"id": 7, "image_id": 1, "category_id": 1, "iscrowd": 0,
                 "segmentation": {"size": [10, 10], "counts": small["counts"].decode()}})
    anns.append({"id": 8, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [100, 100, 5, 5],
                 "segmentation": [[10, 5, 30, 5, 30, 25, 10, 25]]})
    # images with problems: missing file, truncated, decompression bomb (over the limit)
    add_image(2, "missing.png", None)
    anns.append({"id": 9, "image_id": 2, "category_id": 1, "iscrowd": 0, "segmentation": [[10, 5, 30, 5, 30, 25]]})
    add_image(3, "truncated.png", png_bytes(rgb(H, W, 3))[:200])
    anns.append({"id": 10, "image_id": 3, "category_id": 1, "iscrowd": 0, "segmentation": [[10, 5, 30, 5, 30, 25]]})
    add_image(4, "huge.png", png_bytes(np.zeros((300, 300, 3), np.uint8)), 300, 300)
    anns.append({"id": 11, "image_id": 4, "category_id": 1, "iscrowd": 0,
                 "segmentation": [[10, 5, 200, 5, 200, 250, 10, 250]]})
    # convertible images: grayscale, CMYK (JPEG), RGBA, 16-bit, EXIF-rotated
    conv = [("gray.png", png_bytes(rgb(H, W, 5), "L")),
            ("cmyk.jpg", png_bytes(rgb(H, W, 6), "CMYK", format="JPEG")),
            ("rgba.png", png_bytes(np.dstack([rgb(H, W, 7), np.full((H, W), 128, np.uint8)]))),
            ("deep.png", png_bytes((np.random.default_rng(8).uniform(size=(H, W)) * 65535).astype(np.uint16)))]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the stored image is W x H
    buf = io.BytesIO()
    Image.fromarray(rgb(W, H, 9)).save(buf, format="JPEG", exif=exif.tobytes())
    conv.append(("rotated.jpg", buf.getvalue()))
    for k, (name, data) in enumerate(conv):
        iid = 10 + k
        add_image(iid, name, data)
        anns.append({"id": 100 + k, "image_id": iid, "category_id": 2, "iscrowd": 0,
                     "segmentation": [[10, 5, 30, 5, 30, 25, 10, 25]]})
        expected[100 + k] = (name, rect(5, 25, 10, 30), "dog")
    coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    path = os.path.join(root, "instances.json")
    with open(path, "w") as f:
        json.dump(coco, f)
    skips = {"empty_mask": 1, "tiny_mask": 1, "mask_outside": 2, "missing_file": 1, "corrupt_image": 1,
             "too_many_pixels": 1}
    other = {"crowd": 1, "converted_gray": 1, "converted_cmyk": 1, "converted_alpha": 1, "converted_16bit": 1,
             "converted_exif": 1}
    return {"annotations": path, "images": img_dir, "max_pixels": 200 * 200}, expected, skips, other


def write_openimages(root: str):
    """OpenImages v6 segmentation layout with planted problems."""
    imgs = os.path.join(root, "train")
    masks = os.path.join(root, "masks")
    os.makedirs(imgs, exist_ok=True)
    os.makedirs(os.path.join(masks, "train-masks-0"), exist_ok=True)
    os.makedirs(os.path.join(masks, "train-masks-f"), exist_ok=True)
    H, W = 30, 50
    for iid, seed in (("0001", 1), ("f002", 2)):
        with open(os.path.join(imgs, iid + ".jpg"), "wb") as f:
            f.write(png_bytes(rgb(H, W, seed), format="JPEG", quality=95))
    rows, expected = [], {}

    def mask_file(name, m, sub="train-masks-0"):
        Image.fromarray(m).save(os.path.join(masks, sub, name))

    def add(mask_name, image_id, label, box=(0.1, 0.9, 0.1, 0.9)):
        rows.append([mask_name, image_id, label, "b", *map(str, box), "0.9", ""])

    m = np.zeros((H, W), np.uint8)
    m[5:20, 10:40] = 255
    mask_file("0001_m01_a.png", m)
    add("0001_m01_a.png", "0001", "/m/01")
    expected["0001_m01_a"] = ("0001", m > 0, "Cat")
    half = np.zeros((H * 2, W * 2), np.uint8)  # a mask at twice the image size: resized
    half[10:40, 20:80] = 255
    mask_file("f002_m02_b.png", half, "train-masks-f")
    add("f002_m02_b.png", "f002", "/m/02")
    expected["f002_m02_b"] = ("f002", np.asarray(Image.fromarray(half).resize((W, H), Image.Resampling.NEAREST)) > 127,
                              "Dog")
    add("0001_missing.png", "0001", "/m/01")  # missing mask file
    mask_file("9999_m01_c.png", m)
    add("9999_m01_c.png", "9999", "/m/01")  # missing image
    mask_file("0001_empty.png", np.zeros((H, W), np.uint8))
    add("0001_empty.png", "0001", "/m/01")
    tiny = np.zeros((H, W), np.uint8)
    tiny[0, 0] = 255
    mask_file("0001_tiny.png", tiny)
    add("0001_tiny.png", "0001", "/m/01")
    mask_file("0001_outside.png", m)
    add("0001_outside.png", "0001", "/m/01", box=(1.5, 1.9, 0.1, 0.5))
    with open(os.path.join(masks, "train-masks-0", "0001_corrupt.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n broken")
    add("0001_corrupt.png", "0001", "/m/01")
    csv_path = os.path.join(root, "train-annotations-object-segmentation.csv")
    with open(csv_path, "w") as f:
        f.write("MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,PredictedIoU,Clicks\n")
        f.writelines(",".join(r) + "\n" for r in rows)
    classes = os.path.join(root, "oidv6-class-descriptions.csv")
    with open(classes, "w") as f:
        f.write("LabelName,DisplayName\n/m/01,Cat\n/m/02,Dog\n")
    skips = {"missing_file": 2, "empty_mask": 1, "tiny_mask": 1, "mask_outside": 1, "corrupt_image": 1}
    return {"csv": csv_path, "masks": masks, "images": imgs, "classes": classes}, expected, skips


def write_webdataset(root: str):
    """An img2dataset-style tar: .jpg + .txt / .json, with planted problems."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "00000.tar")
    members = [("000.jpg", png_bytes(rgb(32, 48, 1), format="JPEG")), ("000.txt", b"a red bus"),
               ("001.jpg", png_bytes(rgb(32, 48, 2), format="JPEG")),
               ("001.json", json.dumps({"caption": "two cats", "url": "x"}).encode()),
               ("002.jpg", png_bytes(rgb(32, 48, 3), format="JPEG")), ("002.txt", b"caf\xe9 \xff bad"),
               ("003.txt", b"caption without image"),
               ("004.jpg", b"\xff\xd8\xff garbage"), ("004.txt", b"broken jpeg")]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path, {"000": "a red bus", "001": "two cats"}, {"bad_caption": 1, "missing_file": 1, "corrupt_image": 1}


def write_blip(folder: str, size: str = "tiny") -> None:
    """A random BLIP captioner saved as transformers saves one (model + BlipProcessor).
    `tiny`: a 13-word vocabulary, 32 px, one layer each side (tests); `base`: the shapes of
    BLIP base (ViT-B/16 at 384 px, a 12-layer BERT text decoder, 30524 tokens) for timing."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "star", "cat", "dog", "on", "the", "blue"]
    if size == "base":
        words += [f"w{i}" for i in range(30524 - len(words))]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(words) + "\n")
    tok = BertTokenizer(os.path.join(folder, "vocab.txt"), bos_token="[CLS]", eos_token="[SEP]")
    ids = dict(bos_token_id=2, sep_token_id=3, pad_token_id=0, eos_token_id=3)
    if size == "base":
        proc = BlipProcessor(BlipImageProcessor(size={"height": 384, "width": 384}), tok)
        cfg = BlipConfig(vision_config=dict(image_size=384, patch_size=16),
                         text_config=dict(vocab_size=len(words), **ids))
    else:
        proc = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tok)
        cfg = BlipConfig(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=8),
            text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=64, **ids),
            projection_dim=32)
    BlipForConditionalGeneration(cfg).eval().save_pretrained(folder)
    proc.save_pretrained(folder)

