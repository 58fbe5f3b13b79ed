"""The Grain pipeline: batch contents, 80/20 mixing, process sharding, exact resume
(also through Orbax), bad records dropped and counted, too many bad records stop."""

import os

import grain
import numpy as np
import pytest
from absl import flags
from array_record.python.array_record_module import ArrayRecordWriter
from sd_fixtures import write_tokenizer

from smartbrush_jax.cli.prepare import main as prepare_main
from smartbrush_jax.data.pipeline import DataError, make_dataset, object_crop, skip_totals
from smartbrush_jax.data.records import pack_record
from smartbrush_jax.data.synthetic import write_dataset
from smartbrush_jax.data.validate import SKIP_REASONS
from smartbrush_jax.settings import DataConfig

flags.FLAGS.mark_as_parsed()  # grain reads absl flags; tests run outside an absl app


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    raw = write_dataset(str(root / "raw"), num_scenes=60, size=48, seed=1, num_text_pairs=20)
    out = str(root / "prepared")
    assert prepare_main(["--out", out, "--coco-annotations", raw["annotations"], "--coco-images", raw["images"],
                         "--captions", raw["captions"], "--webdataset", raw["image_text"], "--shard-size", "25"]) == 0
    tok = str(root / "tok")
    write_tokenizer(tok)
    return out, tok


def _cfg(prepared, **kw):
    out, tok = prepared
    return DataConfig(**{"prepared_dirs": [out], "tokenizer_dir": tok, "resolution": 32, "latent_factor": 4,
                         "batch_size": 8, **kw})


def _take(ds_or_it, n):
    it = ds_or_it if hasattr(ds_or_it, "get_state") else iter(ds_or_it)
    return [next(it) for _ in range(n)]


def test_batch_contents(prepared):
    (b,) = _take(make_dataset(_cfg(prepared)), 1)
    assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.uint8
    assert b["mask"].shape == (8, 32, 32) and b["latent_mask"].shape == (8, 8, 8)
    assert b["tokens"].shape == (8, 77) and b["tokens"].dtype == np.int32
    for i in range(8):
        m = b["mask"][i].astype(np.float32)
        np.testing.assert_allclose(b["latent_mask"][i], m.reshape(8, 4, 8, 4).mean(axis=(1, 3)))
        if b["is_t2i"][i]:
            assert m.all() and b["source"][i] == "laion"
        else:
            assert 0 < m.sum() < m.size and b["source"][i] == "coco"
    assert b["skips"].shape == (8, len(SKIP_REASONS))


def test_mixing_share_over_10000_examples(prepared):
    it = iter(make_dataset(_cfg(prepared, resolution=8, latent_factor=1, batch_size=100)))
    share = np.mean([next(it)["is_t2i"].mean() for _ in range(100)])
    assert abs(share - 0.2) <= 0.02, share


def test_processes_see_disjoint_examples(prepared):
    ids = []
    for p in range(2):
        batches = _take(make_dataset(_cfg(prepared, weights={"seg": 1.0}, batch_size=5), p, 2), 6)
        ids.append({i for b in batches for i in b["id"]})
    assert len(ids[0]) == 30 and len(ids[1]) == 30
    assert not ids[0] & ids[1]


def test_resume_mid_epoch_gives_the_same_batches(prepared):
    ds = make_dataset(_cfg(prepared))
    it = iter(ds)
    _take(it, 5)
    state = it.get_state()
    expected = _take(it, 4)
    again = iter(ds)
    again.set_state(state)
    for a, b in zip(expected, _take(again, 4)):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_resume_through_orbax(prepared, tmp_path):
    import orbax.checkpoint as ocp

    ds = make_dataset(_cfg(prepared))
    it = iter(ds)
    _take(it, 3)
    ckpt = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
    ckpt.save(tmp_path / "it", args=grain.checkpoint.CheckpointSave(it))
    expected = _take(it, 3)
    restored = iter(ds)
    ckpt.restore(tmp_path / "it", args=grain.checkpoint.CheckpointRestore(restored))
    for a, b in zip(expected, _take(restored, 3)):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["id"], b["id"])


@pytest.mark.timeout(300)  # it hung once (Grain workers waiting on each other): fail in minutes, with tracebacks
def test_worker_processes(prepared):
    ds = make_dataset(_cfg(prepared, num_workers=2))
    it = iter(ds)
    again = None
    try:
        _take(it, 2)
        state = it.get_state()
        expected = _take(it, 2)
        again = iter(ds)
        again.set_state(state)
        got = _take(again, 2)
        for a, b in zip(expected, got):
            np.testing.assert_array_equal(a["id"], b["id"])
    finally:  # the worker processes end with the test, passed or not
        it.close()
        if again is not None:
            again.close()


def _planted(prepared, tmp_path, n_bad):
    """A copy of the prepared seg shards plus one shard of bad records."""
    import json
    import shutil

    out = tmp_path / "with_bad"
    shutil.copytree(prepared[0], out)
    good = {"id": "x", "source": "coco", "kind": "seg", "label": "cat", "caption": ""}
    bad = [b"garbage, not a record",  # corrupt_record
           pack_record({**good, "id": "bad:image", "image": b"\x89PNG broken", "mask": b""}),  # corrupt_image
           pack_record({**good, "id": "bad:caption", "kind": "t2i", "image": _png(), "caption": b"\xff\xfe"})]
    bad = (bad * n_bad)[:n_bad]
    w = ArrayRecordWriter(str(out / "bad-00000-of-00001.array_record"), "group_size:1")
    for r in bad:
        w.write(r)
    w.close()
    meta = json.loads((out / "metadata.json").read_text())
    meta["components"]["seg"]["files"].append("bad-00000-of-00001.array_record")
    (out / "metadata.json").write_text(json.dumps(meta))
    return str(out), meta["components"]["seg"]["count"], bad


def _png():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_records_are_dropped_and_counted_exactly(prepared, tmp_path):
    out, n_good, bad = _planted(prepared, tmp_path, 3)
    # no shuffle: the bad shard comes last, so one epoch = all good records, then the bad ones
    cfg = DataConfig(prepared_dirs=[out], tokenizer_dir=prepared[1], resolution=16, latent_factor=1, batch_size=1,
                     weights={"seg": 1.0}, shuffle=False)
    it = iter(make_dataset(cfg))
    batches = _take(it, n_good + 1)  # the first good record of epoch 2 carries the bad ones' counts
    totals = {}
    for b in batches:
        for r, c in skip_totals(b).items():
            totals[r] = totals.get(r, 0) + c
    assert {r: c for r, c in totals.items() if c} == {"corrupt_record": 1, "corrupt_image": 1, "bad_caption": 1}
    assert batches[-1]["id"][0] == batches[0]["id"][0]


def test_too_many_bad_records_stop_with_examples_named(prepared, tmp_path):
    out, n_good, _ = _planted(prepared, tmp_path, 60)
    cfg = DataConfig(prepared_dirs=[out], tokenizer_dir=prepared[1], resolution=16, latent_factor=1, batch_size=4,
                     weights={"seg": 1.0}, max_bad_fraction=0.2, min_examples_for_check=50)
    with pytest.raises(DataError, match=r"of \d+ records are bad \(more than 20%\); e\.g\. .*bad:"):
        _take(make_dataset(cfg), 100)


def test_object_crop_keeps_the_object_inside():
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = rng.integers(20, 200, 2)
        x0, y0 = rng.integers(0, w - 5), rng.integers(0, h - 5)
        box = (x0, y0, rng.integers(x0 + 1, min(w, x0 + 40) + 1), rng.integers(y0 + 1, min(h, y0 + 40) + 1))
        cx, cy, side = object_crop(box, w, h, rng)
        assert 0 <= cx and cx + side <= w and 0 <= cy and cy + side <= h
        if max(box[2] - box[0], box[3] - box[1]) * 1.2 <= min(w, h):
            assert cx <= box[0] and box[2] <= cx + side and cy <= box[1] and box[3] <= cy + side


def test_config_errors(prepared, tmp_path):
    with pytest.raises(ValueError, match="not a multiple of latent_factor"):
        DataConfig(resolution=30, latent_factor=8)
    with pytest.raises(DataError, match="no metadata.json"):
        make_dataset(DataConfig(prepared_dirs=[str(tmp_path)]))
    os.makedirs(tmp_path / "x", exist_ok=True)
    with pytest.raises(DataError, match="component .extra. has weight"):
        make_dataset(_cfg(prepared, weights={"seg": 0.5, "extra": 0.5}))


def test_micro_conditioning_locates_the_crop_in_the_scaled_source():
    """SDXL's micro-conditioning of a training crop: the source image's (h, w), the crop's
    top-left in the source scaled by R / side (SDXL's scripts record it after their resize),
    and (R, R). The recorded offsets must point at the crop: cutting an R x R window there from
    the scaled source matches the pipeline's crop better than any window up to 3 px off."""
    import io

    from PIL import Image

    from smartbrush_jax.data.pipeline import ExampleTransform

    h, w, r = 90, 130, 32
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.stack([128 + 100 * np.sin(xx / 6.0), 128 + 100 * np.cos(yy / 5.0),
                      128 + 90 * np.sin((xx + yy) / 7.0)], -1).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[30:60, 50:80] = 255

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    rec = {"id": "t:1", "source": "test", "kind": "seg", "label": "box", "image": png(image), "mask": png(mask),
           "box": [50, 30, 80, 60]}
    transform = ExampleTransform(DataConfig(resolution=r, latent_factor=4))
    rng = np.random.default_rng(3)
    for _ in range(5):
        ex = transform.crop(rec, rng)
        x0, y0, side = ex["box"]
        micro = ex["micro"]
        assert micro.dtype == np.int32 and micro.shape == (6,)
        assert tuple(micro[:2]) == (h, w) and tuple(micro[4:]) == (r, r)
        scale = r / side
        # the source at exactly R / side (a rounded output size would stretch it by up to half a
        # pixel), edge-padded so every window lies inside
        big_w, big_h = int(np.ceil(w * scale)) + r, int(np.ceil(h * scale)) + r
        padded = np.pad(image, ((0, 2 * side), (0, 2 * side), (0, 0)), mode="edge")
        scaled = np.asarray(Image.fromarray(padded).resize((big_w, big_h), Image.Resampling.BICUBIC,
                                                           box=(0, 0, big_w / scale, big_h / scale)), np.float32)
        top, left = int(micro[2]), int(micro[3])
        assert (top, left) == (round(y0 * scale), round(x0 * scale))

        def err(dy, dx):
            win = scaled[top + dy:top + dy + r, left + dx:left + dx + r]
            return np.abs(win - ex["image"].astype(np.float32)).mean() if win.shape[:2] == (r, r) else np.inf

        errs = {(dy, dx): err(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)}
        assert min(errs, key=errs.get) == (0, 0), errs
