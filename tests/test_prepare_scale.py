"""`prepare` at scale: parallel equals serial, a killed run resumes without redoing finished
units, per-unit BLIP captions are reused, and the prepared folder is a TFDS dataset whose
data source gives our reader's records with TensorFlow blocked."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from data_fixtures import write_coco, write_openimages, write_webdataset
from train_helpers import ROOT, env

from smartbrush_jax.cli.prepare import main
from smartbrush_jax.data.records import decode_mask, unpack_record
from smartbrush_jax.data.synthetic import write_dataset


def _records(folder):
    """Every record of a prepared folder, in our pipeline's order (its metadata's components)."""
    import grain

    meta = json.loads(open(os.path.join(folder, "metadata.json")).read())
    files = [os.path.join(folder, f) for k in ("seg", "t2i") for f in meta["components"][k]["files"]]
    src = grain.sources.ArrayRecordDataSource(files)
    return [unpack_record(src[i]) for i in range(len(src))]


def _meta(folder):
    meta = json.loads(open(os.path.join(folder, "metadata.json")).read())
    meta.pop("created")
    return meta


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """The synthetic set and the planted-bad-records fixtures of every format."""
    root = tmp_path_factory.mktemp("raw")
    syn = write_dataset(str(root / "synthetic"), num_scenes=24, size=32, seed=4, num_text_pairs=10)
    coco, _, _, _ = write_coco(str(root / "coco"))
    oi, _, _ = write_openimages(str(root / "oi"))
    write_webdataset(str(root / "wds"))
    return {
        "synthetic": ["--coco-annotations", syn["annotations"], "--coco-images", syn["images"],
                      "--captions", syn["captions"], "--webdataset", syn["image_text"]],
        "planted": ["--coco-annotations", coco["annotations"], "--coco-images", coco["images"],
                    "--openimages-csv", oi["csv"], "--openimages-masks", oi["masks"], "--openimages-images",
                    oi["images"], "--openimages-classes", oi["classes"], "--webdataset", str(root / "wds" / "*.tar"),
                    "--max-pixels", str(coco["max_pixels"])],
    }


@pytest.mark.parametrize("which", ["synthetic", "planted"])
def test_parallel_prepare_writes_the_records_and_counts_of_a_serial_one(raw, which, tmp_path):
    serial, parallel = str(tmp_path / "serial"), str(tmp_path / "parallel")
    args = [*raw[which], "--unit-images", "2", "--shard-size", "5", "--quiet"]
    assert main(["--out", serial, "--workers", "1", *args]) == 0
    assert main(["--out", parallel, "--workers", "2", *args]) == 0
    m1, m2 = _meta(serial), _meta(parallel)
    assert m1["skipped"] == m2["skipped"] and m1["other_counts"] == m2["other_counts"]
    assert m1["components"] == m2["components"] and m1["classes"] == m2["classes"]
    assert sum(m1["components"][k]["count"] for k in ("seg", "t2i")) > 10
    if which == "planted":  # the fixture's bad records are there to be counted
        assert sum(sum(s.values()) for s in m1["skipped"].values()) >= 10
    r1, r2 = _records(serial), _records(parallel)
    assert len({r["id"] for r in r1}) == len(r1)  # ids are unique ...
    assert [r["id"] for r in r1] == [r["id"] for r in r2]  # ... and come out in the plan's order
    for a, b in zip(r1, r2):
        assert a == b  # every field: image bytes, mask PNG, box, label, caption
        if a["kind"] == "seg":
            assert decode_mask(a["mask"]).sum() > 0
    for f in sorted(os.listdir(serial)):  # in fact the very same files
        if "array_record" in f:
            assert open(os.path.join(serial, f), "rb").read() == open(os.path.join(parallel, f), "rb").read(), f


_NO_TF = '''
import importlib.abc, importlib.machinery, sys
class _NoTF(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ImportError(spec.name + " is blocked in this test")
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, _NoTF())
'''

_READ_WITH_TFDS = _NO_TF + '''
import json, numpy as np, tensorflow_datasets as tfds
builder = tfds.builder_from_directory(sys.argv[1])
source = builder.as_data_source("train")
out = {"features": sorted(builder.info.features.keys()), "n": builder.info.splits["train"].num_examples,
       "len": len(source), "examples": []}
for i in range(len(source)):
    ex = source[i]
    np.save(sys.argv[2] + f"/image{i}.npy", ex["image"])
    mask = np.zeros(0, bool)
    if ex["mask"]:
        import io
        from PIL import Image
        mask = np.asarray(Image.open(io.BytesIO(ex["mask"]))) > 0
    np.save(sys.argv[2] + f"/mask{i}.npy", mask)
    out["examples"].append({k: ex[k].decode() for k in ("id", "source", "kind", "label", "caption")} |
                           {"box": ex["box"].tolist()})
out["tensorflow_imported"] = "tensorflow" in sys.modules
print(json.dumps(out))
'''


def test_prepared_folder_is_a_tfds_dataset_read_without_tensorflow(raw, tmp_path):
    from smartbrush_jax.data.validate import decode_image

    out = str(tmp_path / "prepared")
    assert main(["--out", out, *raw["planted"], "--unit-images", "2", "--shard-size", "5", "--quiet"]) == 0
    dump = tmp_path / "dump"
    dump.mkdir()
    proc = subprocess.run([sys.executable, "-c", _READ_WITH_TFDS, out, str(dump)], capture_output=True, text=True,
                          env=env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["tensorflow_imported"] is False
    assert got["features"] == ["box", "caption", "id", "image", "kind", "label", "mask", "source"]
    ours = _records(out)
    assert got["n"] == got["len"] == len(ours) > 10
    kinds = set()
    for i, rec in enumerate(ours):  # record i of our pipeline (seg shards, then t2i) is TFDS's example i
        ex = got["examples"][i]
        image = decode_image(rec["image"])  # our decoder: EXIF rotation, CMYK, 16 bit, alpha handled
        np.testing.assert_array_equal(np.load(dump / f"image{i}.npy"), image, err_msg=rec["id"])
        h, w = image.shape[:2]
        if rec["kind"] == "seg":
            np.testing.assert_array_equal(np.load(dump / f"mask{i}.npy"), decode_mask(rec["mask"]))
        else:
            assert np.load(dump / f"mask{i}.npy").size == 0 and ex["box"] == [0, 0, w, h]
        assert ex["box"] == rec["box"]
        assert {k: ex[k] for k in ("id", "source", "kind", "label", "caption")} == \
            {k: rec[k] for k in ("id", "source", "kind", "label", "caption")}
        kinds.add(rec["kind"])
    assert kinds == {"seg", "t2i"}
    meta = json.loads(open(os.path.join(out, "metadata.json")).read())
    assert meta["other_counts"]["coco"].get("converted_png", 0) + \
        meta["other_counts"]["webdataset"].get("converted_png", 0) > 0  # the fixture's odd images were re-encoded


def _units_done(partial):
    units = os.path.join(partial, "units")
    return sorted(f for f in os.listdir(units) if f.endswith(".json")) if os.path.isdir(units) else []


def test_killed_prepare_resumes_without_redoing_finished_units(tmp_path):
    syn = write_dataset(str(tmp_path / "raw"), num_scenes=240, size=48, seed=2, num_text_pairs=6)
    args = ["--coco-annotations", syn["annotations"], "--coco-images", syn["images"], "--captions",
            syn["captions"], "--webdataset", syn["image_text"], "--unit-images", "1", "--shard-size", "4"]
    out = str(tmp_path / "prepared")
    partial = out + ".partial"
    cmd = [sys.executable, "-m", "smartbrush_jax.cli.prepare", "--out", out, "--workers", "2", *args]
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while len(_units_done(partial)) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the main process and its workers, mid-way
    proc.wait()
    assert not os.path.exists(out), "the run finished before it could be killed: give it more work"
    finished = _units_done(partial)
    assert 5 <= len(finished) < 240
    # the shards of the finished units, by inode: a resumed run links them, it does not rewrite them
    kept = {os.stat(os.path.join(partial, "units", f)).st_ino
            for f in os.listdir(os.path.join(partial, "units")) if f.endswith(".array_record")
            and any(f.startswith(u[:-5] + ".") for u in finished)}
    assert kept

    # other inputs or options are refused, the interrupted run is left as it was
    assert main(["--out", out, *args, "--min-mask-area", "0.05"]) == 2
    assert _units_done(partial) == finished

    assert main(["--out", out, "--workers", "2", *args]) == 0
    final = {os.stat(os.path.join(out, f)).st_ino for f in os.listdir(out) if "array_record" in f}
    assert kept <= final
    assert not os.path.exists(partial) and not os.path.exists(os.path.join(out, "units"))

    fresh = str(tmp_path / "uninterrupted")
    assert main(["--out", fresh, "--workers", "1", *args, "--quiet"]) == 0
    assert _meta(out) == _meta(fresh)
    assert sorted(os.listdir(out)) == sorted(os.listdir(fresh))
    for f in os.listdir(out):
        if "array_record" in f:
            assert open(os.path.join(out, f), "rb").read() == open(os.path.join(fresh, f), "rb").read(), f


def test_restart_discards_an_interrupted_run(tmp_path, capsys):
    syn = write_dataset(str(tmp_path / "raw"), num_scenes=4, size=32, seed=2, num_text_pairs=2)
    args = ["--coco-annotations", syn["annotations"], "--coco-images", syn["images"], "--unit-images", "1",
            "--quiet"]
    out = str(tmp_path / "prepared")
    os.makedirs(out + ".partial/units")
    open(out + ".partial/.smartbrush-partial", "w").close()
    with open(out + ".partial/manifest.json", "w") as f:
        json.dump({"fingerprint": {"unit_images": 99}}, f)
    assert main(["--out", out, *args]) == 2
    assert "differ in: " in capsys.readouterr().err
    assert main(["--out", out, *args, "--restart"]) == 0
    assert _meta(out)["components"]["seg"]["count"] > 0


class _CountingCaptioner:
    def __init__(self):
        self.calls = []

    def caption(self, crops):
        self.calls.append(len(crops))
        return [f"caption {len(c)}" for c in crops]


def test_blip_captions_of_a_unit_are_reused_by_a_rerun(tmp_path):
    from smartbrush_jax.data.sources import CocoSource
    from smartbrush_jax.data.units import _captioned
    from smartbrush_jax.data.validate import Counter

    syn = write_dataset(str(tmp_path / "raw"), num_scenes=3, size=32, seed=1, num_text_pairs=1)
    examples = list(CocoSource(syn["annotations"], syn["images"]).read((0, 3), Counter()))
    assert len(examples) >= 3 and not any(ex.caption for ex in examples)
    blip = _CountingCaptioner()
    first = [ex.caption for ex in _captioned(examples, str(tmp_path), "coco-000000", blip)]
    assert blip.calls == [len(examples)] and all(first)
    lines = (tmp_path / "coco-000000.blip.jsonl").read_text().splitlines()
    assert len(lines) == len(examples)
    # a crash cut the file short: only the lost captions are computed again
    (tmp_path / "coco-000000.blip.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:7])
    again = list(CocoSource(syn["annotations"], syn["images"]).read((0, 3), Counter()))
    second = [ex.caption for ex in _captioned(again, str(tmp_path), "coco-000000", blip)]
    assert blip.calls == [len(examples), 1] and second == first
