"""No command destroys or loses a user's data, whatever it is given: one test (or a few)
per case found by feeding the commands hostile input.

1. malformed prepared records (written elsewhere, or damaged) are skipped and counted
   `corrupt_record`, in the training pipeline, the trainer and the latent cache;
2. output folders: an export into (or around) its own run, a file, a symlink, somebody
   else's `.partial`, a prepared folder or a cache written over; a source that fails
   late keeps what was read before it;
3. webdataset read by webdataset's rules, members bounded in size, samples without a
   caption counted;
4. every bad input named below is one `error: ...` line and exit code 2, before any long
   work; only our own error types become exit 2;
5. counts that say the right thing: one bad line of a captions side-file, a decompression
   bomb.
"""

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from data_fixtures import png_bytes, png_header_only, rgb
from train_helpers import ROOT, copy_run, env, state, steps_on_disk, train

from smartbrush_jax.data.records import MAGIC, pack_record, unpack_record
from smartbrush_jax.data.validate import SKIP_REASONS
from smartbrush_jax.errors import InputError, run_command

# ---------------------------------------------------------------------- 1. malformed records

def _raw(header, body=b""):
    head = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + body


def _malformed_records(good: bytes) -> dict:
    """One record of each malformed kind, built from a good seg record."""
    rec = unpack_record(good)
    no_mask = {k: v for k, v in rec.items() if k not in ("mask", "box")}
    no_image = {k: v for k, v in rec.items() if k != "image"}
    return {
        "corrupt mask PNG": pack_record({**rec, "mask": b"\x89PNG not really"}),
        "seg record without a mask": pack_record(no_mask),
        "seg record without an image": pack_record(no_image),
        "header is a list": _raw([1, 2, 3]),
        "field spec is an int": _raw({"id": 5, "image": {"offset": 0, "length": 3}}, b"abc"),
        "field spec lacks length": _raw({"id": {"value": "x"}, "image": {"offset": 0}}, b"abc"),
        "header length past the end": MAGIC + struct.pack("<I", 10_000) + b"{}",
        "bad magic": b"NOPE" + good[4:],
    }


def _add_bad_shard(prepared: str, records) -> int:
    """Append a shard of `records` to the `seg` component of a prepared folder."""
    from array_record.python.array_record_module import ArrayRecordWriter

    name = "seg-planted-bad.array_record"
    w = ArrayRecordWriter(os.path.join(prepared, name), "group_size:1")
    for r in records:
        w.write(r)
    w.close()
    meta_path = os.path.join(prepared, "metadata.json")
    meta = json.load(open(meta_path))
    meta["components"]["seg"]["files"].append(name)
    meta["components"]["seg"]["count"] += len(records)
    json.dump(meta, open(meta_path, "w"))
    return len(records)


@pytest.fixture
def bad_prepared(tmp_path, tiny_run):
    """The micro run's prepared synthetic set plus one shard of malformed records."""
    import grain

    prepared = str(tmp_path / "prepared")
    shutil.copytree(os.path.join(tiny_run, "data", "prepared"), prepared)
    meta = json.load(open(os.path.join(prepared, "metadata.json")))
    good = grain.sources.ArrayRecordDataSource([os.path.join(prepared, meta["components"]["seg"]["files"][0])])[0]
    bad = _malformed_records(good)
    _add_bad_shard(prepared, list(bad.values()))
    return prepared, bad


def test_every_malformed_record_is_a_counted_skip(bad_prepared, tiny_run):
    from smartbrush_jax.data.pipeline import ExampleTransform
    from smartbrush_jax.settings import DataConfig

    _, bad = bad_prepared
    transform = ExampleTransform(DataConfig(tokenizer_dir=os.path.join(tiny_run, "tokenizer"), resolution=16))
    for kind, data in bad.items():
        out = transform(data, np.random.default_rng(0))
        assert out.get("skip") == "corrupt_record", kind


def test_training_on_malformed_records_counts_them(bad_prepared, tiny_run, tmp_path):
    prepared, bad = bad_prepared
    w = str(tmp_path / "run")
    args = ["--config.data.synthetic_scenes=0", f"--config.data.prepared_dirs=('{prepared}',)",
            f"--config.model.tokenizer={os.path.join(tiny_run, 'tokenizer')}", "--config.train.steps=30",
            "--config.train.log_every=30", "--config.data.weights.t2i=0.0", "--config.data.weights.seg=1.0"]
    proc = train(w, *args, "--config.data.max_bad_fraction=0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stderr.splitlines() if "data_skipped/corrupt_record=" in ln][-1]
    counts = {k.split("/")[1]: float(v) for k, v in (kv.split("=") for kv in line.split("] ", 1)[1].split(", "))
              if k.startswith("data_skipped/")}
    assert counts["corrupt_record"] >= len(bad)  # 30 steps x 8 = 240 draws from 88 + 8 records: each bad one seen
    assert all(v == 0 for k, v in counts.items() if k != "corrupt_record")

    # the default 5% limit: too many bad records stop the run with exit 2, the steps before saved
    w2 = str(tmp_path / "strict")
    proc = train(w2, *args, "--config.train.checkpoint_every=1000")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "records are bad (more than 5%)" in proc.stderr and "checkpoint at step" in proc.stderr
    assert len(steps_on_disk(w2)) == 1 and state(w2)[0] > 0


def test_latent_cache_counts_malformed_records(bad_prepared, sd_folder, tmp_path):
    from smartbrush_jax.cli.latents import main

    prepared, bad = bad_prepared
    out = str(tmp_path / "cache")
    assert main(["--prepared", prepared, "--out", out, "--vae", sd_folder[0], "--resolution", "16"]) == 0
    meta = json.load(open(os.path.join(out, "metadata.json")))
    assert meta["skipped"]["seg"] == {"corrupt_record": len(bad)}


# ---------------------------------------------------------------------- 2. output folders

def test_export_never_writes_into_or_around_its_run(tiny_run, tmp_path, capsys):
    from smartbrush_jax.cli.export import main

    run = copy_run(tiny_run, tmp_path / "runs" / "x")
    before = steps_on_disk(run)
    for out in (run, str(tmp_path / "runs"), os.path.join(run, "export")):
        assert main(["--workdir", run, "--out", out, "--overwrite"]) == 2
        assert "the input" in capsys.readouterr().err
    assert steps_on_disk(run) == before and state(run)[0] == 4

    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    assert main(["--workdir", run, "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "mine"
    assert not os.path.exists(str(a_file) + ".partial")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    assert main(["--workdir", run, "--out", str(link)]) == 2
    assert "symbolic link" in capsys.readouterr().err

    theirs = tmp_path / "model.partial"  # somebody's folder that happens to have our temporary name
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    assert main(["--workdir", run, "--out", str(tmp_path / "model")]) == 2
    assert "was not left by this command" in capsys.readouterr().err
    assert (theirs / "notes.txt").read_text() == "keep me"

    other = tmp_path / "not_an_export"
    other.mkdir()
    (other / "photo.jpg").write_bytes(b"x")
    assert main(["--workdir", run, "--out", str(other), "--overwrite"]) == 2
    assert "not a SmartBrush export" in capsys.readouterr().err and (other / "photo.jpg").exists()


def test_export_replaces_only_its_own_export_and_its_own_leftovers(demo_run, tmp_path):
    from smartbrush_jax.cli.export import main
    from smartbrush_jax.outputs import PARTIAL_MARKER

    out = str(tmp_path / "model")
    os.makedirs(out + ".partial")
    open(os.path.join(out + ".partial", PARTIAL_MARKER), "w").close()  # an export killed half-way
    assert main(["--workdir", demo_run, "--out", out]) == 0
    assert not os.path.exists(out + ".partial") and not os.path.exists(os.path.join(out, PARTIAL_MARKER))
    assert main(["--workdir", demo_run, "--out", out]) == 2  # exists: refused without --overwrite
    assert main(["--workdir", demo_run, "--out", out, "--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["model"]  # nothing left beside it


def _synthetic(tmp_path, n=6):
    from smartbrush_jax.data.synthetic import write_dataset

    return write_dataset(str(tmp_path / "raw"), n, 24, seed=3)


def _prepare(*args):
    from smartbrush_jax.cli.prepare import main

    return main([str(a) for a in args])


def test_prepare_and_latents_never_write_over_another_folder(tmp_path, sd_folder, capsys):
    raw = _synthetic(tmp_path)
    out = tmp_path / "prepared"
    coco = ["--coco-annotations", raw["annotations"], "--coco-images", raw["images"]]
    assert _prepare("--out", out, *coco) == 0
    meta = (out / "metadata.json").read_text()
    shards = sorted(os.listdir(out))
    assert _prepare("--out", out, *coco, "--webdataset", raw["image_text"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "metadata.json").read_text() == meta and sorted(os.listdir(out)) == shards
    assert _prepare("--out", out, *coco, "--webdataset", raw["image_text"], "--overwrite") == 0
    assert json.loads((out / "metadata.json").read_text())["components"]["t2i"]["count"] > 0
    assert not os.path.exists(str(out) + ".partial")

    from smartbrush_jax.cli.latents import main as latents

    other = tmp_path / "other_prepared"
    assert _prepare("--out", other, *coco) == 0
    before = sorted(os.listdir(other))
    assert latents(["--prepared", str(out), "--out", str(other), "--vae", sd_folder[0], "--resolution", "16",
                    "--overwrite"]) == 2
    assert "not a latent cache this command wrote" in capsys.readouterr().err
    assert sorted(os.listdir(other)) == before
    assert latents(["--prepared", str(out), "--out", str(out / "cache"), "--vae", sd_folder[0],
                    "--resolution", "16"]) == 2
    assert "lies inside the input" in capsys.readouterr().err


def _truncated(path, keep=0.6):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:int(len(data) * keep)])


def _wds_tar(path, samples, gz=False):
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _pairs(n, start=0, size=(24, 32)):
    out = []
    for i in range(start, start + n):
        out += [(f"{i:05d}.jpg", png_bytes(rgb(*size, i), format="JPEG")), (f"{i:05d}.txt", f"pair {i}".encode())]
    return out


@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
def test_a_truncated_second_shard_keeps_the_first_and_is_counted(tmp_path, gz):
    ext = ".tar.gz" if gz else ".tar"
    first = _wds_tar(str(tmp_path / f"a{ext}"), _pairs(4), gz)
    second = _wds_tar(str(tmp_path / f"b{ext}"), _pairs(40, 4, size=(64, 64)), gz)
    _truncated(second)
    out = tmp_path / "prepared"
    assert _prepare("--out", out, "--webdataset", first, second) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["skipped"]["webdataset"] == {"corrupt_shard": 1}
    captions = {unpack_record(r)["caption"] for r in _records(out, meta["components"]["t2i"]["files"])}
    assert {f"pair {i}" for i in range(4)} <= captions  # the first shard whole; what the second gave before the cut
    assert len(captions) < 44


def _records(folder, files):
    import grain

    src = grain.sources.ArrayRecordDataSource([os.path.join(folder, f) for f in files])
    return [src[i] for i in range(len(src))]


def test_a_source_that_fails_late_is_counted_and_the_rest_prepared(tmp_path, monkeypatch, capsys):
    """A reader that raises mid-way through a work unit (a file that vanished, a reader's
    bug): what the unit gave is kept, `unreadable_source` counted, the other units and
    sources read, exit 0."""
    from smartbrush_jax.data.sources import CocoSource

    raw = _synthetic(tmp_path)
    real = CocoSource.read

    def failing(self, unit, counts):
        for i, ex in enumerate(real(self, unit, counts)):
            if unit[0] == 0 and i == 3:
                raise OSError("the network filesystem went away")
            yield ex

    out = tmp_path / "prepared"
    args = ["--coco-annotations", raw["annotations"], "--coco-images", raw["images"], "--unit-images", "3"]
    assert _prepare("--out", tmp_path / "whole", *args, "--workers", "1") == 0
    whole = json.loads((tmp_path / "whole" / "metadata.json").read_text())["components"]["seg"]["count"]
    monkeypatch.setattr(CocoSource, "read", failing)
    assert _prepare("--out", out, *args, "--webdataset", raw["image_text"], "--workers", "1") == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["skipped"]["coco"] == {"unreadable_source": 1}
    first_unit = sum(1 for ann in json.load(open(raw["annotations"]))["annotations"] if ann["image_id"] in
                     sorted({a["image_id"] for a in json.load(open(raw["annotations"]))["annotations"]})[:3])
    assert first_unit > 3 and meta["components"]["seg"]["count"] == whole - (first_unit - 3)
    assert meta["components"]["t2i"]["count"] > 0
    assert "reading stopped after 3 examples" in capsys.readouterr().err


def test_openimages_csv_without_its_columns_is_refused_before_any_work(tmp_path, capsys):
    raw = _synthetic(tmp_path)
    csv_path, classes = tmp_path / "seg.csv", tmp_path / "classes.csv"
    csv_path.write_text("MaskPath,LabelName\nx.png,/m/01\n")
    classes.write_text("/m/01,Cat\n")
    out = tmp_path / "prepared"
    assert _prepare("--out", out, "--coco-annotations", raw["annotations"], "--coco-images", raw["images"],
                    "--openimages-csv", csv_path, "--openimages-masks", tmp_path, "--openimages-images", tmp_path,
                    "--openimages-classes", classes) == 2
    assert "no column ImageID" in capsys.readouterr().err
    assert not out.exists() and not os.path.exists(str(out) + ".partial")


# ---------------------------------------------------------------------- 3. webdataset rules

def test_webdataset_keys_directories_captions_and_member_sizes(tmp_path):
    import tracemalloc

    from smartbrush_jax.data.sources import read_webdataset
    from smartbrush_jax.data.validate import Counter

    img = png_bytes(rgb(24, 32, 1), format="JPEG")
    path = str(tmp_path / "shard.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        d = tarfile.TarInfo("./")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        big = tarfile.TarInfo("./00003.jpg")
        big.size = 200 * 2**20  # 200 MiB of zeros: a few hundred KiB compressed
        for name, data in [("./00001.jpg", img), ("./00001.txt", b"dotted path"),
                           ("shard.v2/00001.jpg", img), ("shard.v2/00001.json", b'{"caption": "dotted folder"}'),
                           ("shard.v2/00001.npy", b"\x93NUMPY ignored"), ("00002.jpg", img)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.addfile(big, io.BytesIO(bytes(big.size)))
        cap = tarfile.TarInfo("./00003.txt")
        cap.size = 3
        tar.addfile(cap, io.BytesIO(b"big"))
    counts = Counter()
    tracemalloc.start()
    got = {ex.id.split(":", 2)[2]: ex.caption for ex in read_webdataset([path], counts)}
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got == {"00001": "dotted path", "shard.v2/00001": "dotted folder"}
    assert dict(counts) == {"no_caption": 1, "oversized_file": 1}
    assert peak < 32 * 2**20  # the 200 MiB member was never read


# ---------------------------------------------------------------------- 4. exit 2 for bad input

def _cli(module, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env())


def test_train_config_files_that_cannot_work(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n")
    cases = [(tmp_path / "missing.py", "no such file"), (tmp_path / "notes.txt", "not a Python config file"),
             (bad, "cannot be loaded (SyntaxError")]
    (tmp_path / "notes.txt").write_text("x")
    for path, message in cases:
        p = _cli("smartbrush_jax.train", f"--config={path}", f"--workdir={tmp_path / 'w'}")
        assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: --config"), p.stderr
        assert message in p.stderr and "Traceback" not in p.stderr


def test_train_data_error_is_exit_2(tmp_path, tiny_run):
    p = _cli("smartbrush_jax.train", f"--config={ROOT}/tests/configs/tiny_train.py", f"--workdir={tmp_path / 'w'}",
             "--config.data.synthetic_scenes=0", f"--config.data.prepared_dirs=('{tmp_path}',)",
             f"--config.model.tokenizer={os.path.join(tiny_run, 'tokenizer')}", timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "error: " in p.stderr and "not a prepared folder" in p.stderr and "Traceback" not in p.stderr


def test_only_our_error_types_become_exit_2(monkeypatch, capsys):
    def bug():
        raise ValueError("a bug, not bad input")

    with pytest.raises(ValueError, match="a bug"):
        run_command(bug)
    assert run_command(lambda: (_ for _ in ()).throw(InputError("bad input"))) == 2
    assert capsys.readouterr().err == "error: bad input\n"

    from absl import flags

    from smartbrush_jax.cli import train as command
    from smartbrush_jax.train import loop as trainer

    flags.FLAGS(["train", f"--config={ROOT}/tests/configs/tiny_train.py", "--workdir=/nonexistent"])
    monkeypatch.setattr(trainer, "run", lambda *a, **k: bug())
    with pytest.raises(ValueError, match="a bug"):  # its traceback is kept, not turned into exit 2
        command.main([])


def test_prepare_inputs_checked_before_any_work(tmp_path, capsys):
    raw = _synthetic(tmp_path)
    empty, not_json = tmp_path / "empty.json", tmp_path / "not.json"
    empty.write_text("")
    not_json.write_text("<html>")
    out = tmp_path / "prepared"
    images = ["--coco-images", raw["images"]]
    for args, message in [(["--coco-annotations", empty, *images], "not JSON"),
                          (["--coco-annotations", not_json, *images], "not JSON"),
                          (["--coco-annotations", raw["annotations"], *images, "--captions", tmp_path / "no.jsonl"],
                           "no such file"),
                          (["--coco-annotations", raw["annotations"], *images, "--shard-size", "0"], "--shard-size")]:
        assert _prepare("--out", out, *args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
        assert not out.exists()


def test_eval_with_corrupt_safetensors_is_exit_2(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_fid", os.path.join(ROOT, "eval", "fid.py"))
    fid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fid)
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "m.png")
    (tmp_path / "set.csv").write_text("image,mask,prompt\na.png,m.png,a cat\n")
    bad = tmp_path / "inception.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{truncated")
    assert fid.main(["--model", str(tmp_path), "--data", str(tmp_path / "set.csv"), "--inception", str(bad),
                     "--clip", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


def test_inpaint_refuses_a_decompression_bomb_and_a_file_as_out(tmp_path, capsys):
    from smartbrush_jax.cli.inpaint import main

    bomb = str(tmp_path / "bomb.png")
    png_header_only(bomb, 13500, 13500)  # 182 megapixels
    base = ["--checkpoint", str(tmp_path / "none"), "--box", "1,1,5,5", "--prompt", "a cat"]
    assert main([*base, "--image", bomb]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --image") and "too large to decode safely" in err
    a_file = tmp_path / "out.png"
    a_file.write_bytes(b"mine")
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(rgb(16, 16, 0)).save(tmp_path / "ok.png")
    assert main([*base, "--image", str(tmp_path / "ok.png"), "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_bytes() == b"mine"


def test_garbage_and_pickles_with_code_are_told_apart(tmp_path):
    import torch

    from smartbrush_jax.interop.weights import WeightsError, read_state_dict

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(512))
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint"):
        read_state_dict(str(garbage))

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    evil = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "x": Payload()}, str(evil))
    with pytest.raises(WeightsError, match="refused to load: the pickle holds posix.system"):
        read_state_dict(str(evil))
    assert not (tmp_path / "ran").exists()


# ---------------------------------------------------------------------- 5. counts

def test_one_bad_caption_line_and_a_decompression_bomb_are_counted(tmp_path):
    raw = _synthetic(tmp_path)
    lines = open(raw["captions"], "rb").read().splitlines()
    lines.insert(1, b'{"annotation_id": 999, "caption": "caf\xe9 written in latin-1"}')
    open(raw["captions"], "wb").write(b"\n".join(lines) + b"\n")
    coco = json.load(open(raw["annotations"]))
    png_header_only(os.path.join(raw["images"], "bomb.png"), 20000, 20000)
    coco["images"].append({"id": 9999, "file_name": "bomb.png", "height": 20000, "width": 20000})
    coco["annotations"].append({"id": 99999, "image_id": 9999, "category_id": 1, "iscrowd": 0,
                                "segmentation": [[10, 10, 100, 10, 100, 100]]})
    json.dump(coco, open(raw["annotations"], "w"))
    out = tmp_path / "prepared"
    assert _prepare("--out", out, "--coco-annotations", raw["annotations"], "--coco-images", raw["images"],
                    "--captions", raw["captions"]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["skipped"] == {"captions": {"bad_caption": 1}, "coco": {"too_many_pixels": 1}}
    n_objects = len(coco["annotations"]) - 1
    assert meta["components"]["seg"]["count"] == n_objects
    recs = [unpack_record(r) for r in _records(out, meta["components"]["seg"]["files"])]
    assert all(r["caption"] for r in recs)  # the other captions were all read
    assert set(SKIP_REASONS) >= {"too_many_pixels", "bad_caption"}


REAL = os.path.join(os.path.dirname(ROOT), "shared", "fixtures", "real", "webdataset")
TXT_CAPTION = "A wine bottle outfitted with two forks in its cork and a duck head on top."


@pytest.mark.skipif(not os.path.isdir(REAL), reason=f"third-party shards not found at {REAL}")
def test_third_party_webdataset_shards(tmp_path):
    """Shards nobody on this project wrote (../shared/fixtures/real/README.md says where
    each is from): a LAION-style pair whose caption has no trailing newline; a gzip shard of
    PNG + .cls (no caption); a directory member and per-member gzip (`.txt.gz`, no image);
    images without captions."""
    from smartbrush_jax.data.sources import read_webdataset
    from smartbrush_jax.data.validate import Counter

    def read(name):
        counts = Counter()
        got = {ex.id.split(":", 2)[2]: (ex.caption, ex.image.shape) for ex in
               read_webdataset([os.path.join(REAL, name)], counts)}
        return got, dict(counts)

    got, counts = read("nemo_curator/00000.tar")
    assert list(got) == ["0"] and got["0"][1] == (800, 639, 3) and counts == {}
    assert got["0"][0] == TXT_CAPTION  # the .txt caption, whole (no trailing newline in the file)
    assert read("webdataset_testdata/sample.tgz") == ({}, {"no_caption": 90})
    assert read("webdataset_testdata/compressed.tar") == ({}, {"missing_file": 3})  # keys compressed/0001...: no image
    assert read("clip_retrieval/image1.tar") == ({}, {"no_caption": 4})
