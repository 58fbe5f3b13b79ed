"""`prepare`: raw formats -> ArrayRecord shards + metadata, BLIP captions, CLI errors."""

import json
import os

import numpy as np
import pytest
from data_fixtures import write_blip, write_coco, write_openimages, write_webdataset

from smartbrush_jax.cli.prepare import main
from smartbrush_jax.data.records import RecordError, decode_mask, pack_record, unpack_record


def _records(folder, files):
    import grain

    src = grain.sources.ArrayRecordDataSource([os.path.join(folder, f) for f in files])
    return [unpack_record(src[i]) for i in range(len(src))]


def test_prepare_all_formats(tmp_path, capsys):
    coco, coco_expected, coco_skips, _ = write_coco(str(tmp_path / "coco"))
    oi, oi_expected, oi_skips = write_openimages(str(tmp_path / "oi"))
    wds, wds_expected, wds_skips = write_webdataset(str(tmp_path / "wds"))
    captions = tmp_path / "caps.jsonl"
    captions.write_text('{"annotation_id": 2, "caption": "a brown dog lying down"}\n')
    out = tmp_path / "prepared"
    code = main(["--out", str(out), "--coco-annotations", coco["annotations"], "--coco-images", coco["images"],
                 "--openimages-csv", oi["csv"], "--openimages-masks", oi["masks"], "--openimages-images",
                 oi["images"], "--openimages-classes", oi["classes"], "--webdataset", str(tmp_path / "wds" / "*.tar"),
                 "--captions", str(captions), "--max-pixels", str(coco["max_pixels"]), "--shard-size", "4"])
    assert code == 0
    meta = json.loads((out / "metadata.json").read_text())
    n_seg = len(coco_expected) + len(oi_expected)
    assert meta["components"]["seg"]["count"] == n_seg
    assert meta["components"]["seg"]["sources"] == {"coco": len(coco_expected), "openimages": len(oi_expected)}
    assert meta["components"]["t2i"]["count"] == len(wds_expected)
    assert len(meta["components"]["seg"]["files"]) == -(-n_seg // 4)
    assert meta["skipped"] == {"coco": coco_skips, "openimages": oi_skips, "webdataset": wds_skips}
    assert {"cat", "dog", "Cat", "Dog"} <= set(meta["classes"])
    recs = {r["id"]: r for r in _records(out, meta["components"]["seg"]["files"])}
    for ann_id, (_, mask, label) in coco_expected.items():
        r = recs[f"coco:{ann_id}"]
        np.testing.assert_array_equal(decode_mask(r["mask"]), mask)
        assert r["label"] == label
    assert recs["coco:2"]["caption"] == "a brown dog lying down"
    for key, (_, mask, label) in oi_expected.items():
        np.testing.assert_array_equal(decode_mask(recs[f"openimages:{key}"]["mask"]), mask)
    t2i = _records(out, meta["components"]["t2i"]["files"])
    assert sorted(r["caption"] for r in t2i) == sorted(wds_expected.values())
    assert "metadata.json" in capsys.readouterr().out


def test_record_format_round_trip_and_corruption():
    import struct

    rec = {"id": "x:1", "source": "coco", "kind": "seg", "label": "cat", "caption": "a cat", "image": b"\x00\x01",
           "mask": b"abc", "box": [1, 2, 3, 4]}
    assert unpack_record(pack_record(rec)) == rec
    # every field of the schema is written (TFDS expects all features in every record)
    assert unpack_record(pack_record({"id": "l:1", "kind": "t2i", "image": b"x"})) == {
        "id": "l:1", "source": "", "kind": "t2i", "label": "", "caption": "", "image": b"x", "mask": b"",
        "box": [0, 0, 0, 0]}
    with pytest.raises(ValueError, match="not in the record schema"):
        pack_record({"id": "x", "pixels": b""})
    with pytest.raises(ValueError, match="expected 4"):
        pack_record({"id": "x", "box": [1, 2]})
    for bad in (b"PK\x03\x04 zip", pack_record(rec)[:-2], b"", b"\xff" * 10):
        with pytest.raises(RecordError, match="not a SmartBrush record"):
            unpack_record(bad)
    # version 1 (folders prepared before the TFDS layout) is still read
    header = json.dumps({"id": {"value": "coco:7"}, "mask": {"offset": 0, "length": 3}}).encode()
    v1 = b"SBR1" + struct.pack("<I", len(header)) + header + b"png"
    assert unpack_record(v1) == {"id": "coco:7", "mask": b"png"}
    with pytest.raises(RecordError, match="truncated"):
        unpack_record(v1[:-1])


def test_prepare_cli_errors(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "o")]) == 2
    assert "nothing to prepare" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "o"), "--coco-annotations", str(tmp_path / "none.json"),
                 "--coco-images", str(tmp_path)]) == 2
    assert "none.json: no such file" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "o"), "--coco-images", str(tmp_path)]) == 2
    assert "--coco-annotations is required" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "o"), "--webdataset", str(tmp_path / "nope.tar")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "o"), "--webdataset", str(tmp_path / "x.tar"),
                 "--blip-model", str(tmp_path / "noblip")]) == 2


def test_blip_captions_objects_without_a_caption(tmp_path):
    coco, expected, _, _ = write_coco(str(tmp_path / "coco"))
    write_blip(str(tmp_path / "blip"))
    captions = tmp_path / "caps.jsonl"
    captions.write_text('{"annotation_id": 1, "caption": "given caption"}\n')
    out = tmp_path / "prepared"
    assert main(["--out", str(out), "--coco-annotations", coco["annotations"], "--coco-images", coco["images"],
                 "--max-pixels", str(coco["max_pixels"]), "--captions", str(captions),
                 "--blip-model", str(tmp_path / "blip"), "--blip-batch", "3"]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    recs = {r["id"]: r for r in _records(out, meta["components"]["seg"]["files"])}
    assert recs["coco:1"]["caption"] == "given caption"
    generated = [json.loads(line) for line in (out / "blip_captions.jsonl").read_text().splitlines()]
    assert len(generated) == len(expected) - 1  # all but the one with a given caption
    vocab = {"a", "red", "star", "cat", "dog", "on", "the", "blue", "[unk]", ""}
    for g in generated:
        assert recs[f"coco:{g['annotation_id']}"]["caption"] == g["caption"]
        assert set(g["caption"].lower().split()) <= vocab


def test_blip_device_that_is_not_there_is_refused_before_any_work(tmp_path, capsys):
    coco, _, _, _ = write_coco(str(tmp_path / "coco"))
    write_blip(str(tmp_path / "blip"))
    base = ["--coco-annotations", coco["annotations"], "--coco-images", coco["images"], "--blip-model",
            str(tmp_path / "blip")]
    import torch

    if not torch.cuda.is_available():
        assert main(["--out", str(tmp_path / "o"), *base, "--blip-device", "cuda"]) == 2
        assert "torch sees no GPU" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "o"), *base, "--blip-device", "tpu"]) == 2
    assert "use cpu, cuda (every GPU) or cuda:N" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "o.partial")
