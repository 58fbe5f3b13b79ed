"""`inpaint` and the app against a careless or hostile user (issue 24's rows, one test
each, named after the row): the output folder, the model's size and memory, 16-bit and
huge images, a run whose model.json changed, and numbers that are not numbers."""

import json
import os
import shutil

import numpy as np
import pytest
from data_fixtures import rgb
from PIL import Image

from smartbrush_jax.cli.inpaint import main


@pytest.fixture
def photo(tmp_path):
    """A 64x48 photo and the arguments that inpaint it with the micro run (trained at 16 px)."""
    Image.fromarray(rgb(48, 64, 1)).save(tmp_path / "photo.png")
    return str(tmp_path / "photo.png")


def _args(run, image, out, *extra):
    return ["--checkpoint", run, "--image", image, "--box", "10,10,40,30", "--prompt", "a red circle", "--steps",
            "2", "--out", str(out), *extra]


def _run(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err


def test_inpaint_runs_at_the_trained_resolution_and_refuses_what_memory_cannot_hold(tiny_run, photo, tmp_path,
                                                                                    capsys, monkeypatch):
    """Row: `inpaint` a 640x480 photo with the demo run at the default resolution (512,
    whatever the model was trained at) was killed for memory. The default is now the size
    the run trained at (model.json), and a size that XLA says needs more memory than is
    free is refused with both figures before sampling, nothing written."""
    out = tmp_path / "out"
    code, err = _run(capsys, _args(tiny_run, photo, out))
    assert code == 0, err
    assert "at 16x12" in err  # the micro run's 16 px, the photo's aspect
    assert json.loads((out / "inpaint.json").read_text())["resolution"] == 16

    import smartbrush_jax.sampling.runner as runner

    monkeypatch.setattr(runner, "free_memory", lambda device: 64 * 2**20)  # a machine with 64 MiB free
    code, err = _run(capsys, _args(tiny_run, photo, tmp_path / "big", "--resolution", "64"))
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: sampling 1 image(s) at 64x48 needs about") and "GiB free" in last
    assert "trained at 16" in last and not (tmp_path / "big").exists()


def test_inpaint_an_8000x8000_image_works_or_is_one_line(tiny_run, tmp_path, capsys):
    """Row: `inpaint` an 8000x8000 image ended in a traceback. At the trained size it works:
    the background is the input's, byte for byte."""
    y, x = np.mgrid[0:8000, 0:8000]
    big = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)
    Image.fromarray(big).save(tmp_path / "big.png")
    code, err = _run(capsys, ["--checkpoint", tiny_run, "--image", str(tmp_path / "big.png"), "--box",
                              "1000,1000,3000,3000", "--prompt", "a red circle", "--steps", "2", "--out",
                              str(tmp_path / "out")])
    assert code == 0, err
    result = np.asarray(Image.open(tmp_path / "out" / "result.png"))
    assert result.shape == big.shape
    np.testing.assert_array_equal(result[:1000], big[:1000])
    assert np.asarray(Image.open(tmp_path / "out" / "grid.png")).shape == (2048, 3 * 2048, 3)  # a preview


def test_inpaint_out_never_replaces_a_users_files_or_follows_a_symlink(tiny_run, photo, tmp_path, capsys):
    """Row: `inpaint --out DIR` where DIR is a user's folder holding result.png / grid.png,
    or where grid.png is a symlink to a file elsewhere, overwrote them (through the link, a
    file outside --out). Now the rules of every other command's output."""
    users = tmp_path / "users"
    users.mkdir()
    (users / "result.png").write_bytes(b"my holiday photo")
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_bytes(b"not yours")
    os.symlink(elsewhere, users / "grid.png")
    for extra in ((), ("--overwrite",)):
        code, err = _run(capsys, _args(tiny_run, photo, users, *extra))
        assert code == 2 and "loaded" not in err, err
    assert (users / "result.png").read_bytes() == b"my holiday photo" and elsewhere.read_bytes() == b"not yours"
    link = tmp_path / "link"
    os.symlink(users, link)
    code, err = _run(capsys, _args(tiny_run, photo, link))
    assert code == 2 and "symbolic link" in err

    ours = tmp_path / "ours"
    assert _run(capsys, _args(tiny_run, photo, ours))[0] == 0
    code, err = _run(capsys, _args(tiny_run, photo, ours))
    assert code == 2 and "--overwrite" in err  # its own output: replaced only when asked
    first = (ours / "result.png").read_bytes()
    code, err = _run(capsys, _args(tiny_run, photo, ours, "--overwrite", "--seed", "5"))
    assert code == 0, err
    assert (ours / "result.png").read_bytes() != first and not os.path.exists(str(ours) + ".partial")


@pytest.mark.parametrize("where", ["under a file", "under /proc", "read-only folder"])
def test_inpaint_out_under_a_file_proc_or_read_only_is_exit_2_before_the_model_loads(tiny_run, photo, tmp_path,
                                                                                   capsys, where):
    """Row: `inpaint --out` under a file, under /proc, on a read-only folder: a traceback after
    all the sampling. Now exit 2, one line naming the path, before the model loads."""
    if where == "under a file":
        (tmp_path / "a_file").write_bytes(b"x")
        out = tmp_path / "a_file" / "out"
    elif where == "under /proc":
        out = "/proc/smartbrush/out"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        os.chmod(ro, 0o555)
        if os.access(ro, os.W_OK) and os.path.isdir("/sys/kernel"):  # root writes anywhere: sysfs refuses it
            ro = "/sys/kernel"
        out = os.path.join(str(ro), "out")
    code, err = _run(capsys, _args(tiny_run, photo, out))
    assert code == 2, err
    assert "loaded" not in err and "sampling" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --out") and str(out) in lines[0]


def test_a_16_bit_png_reads_as_the_8_bit_image(tmp_path):
    """Row: a 16-bit PNG to `inpaint` or the app was clipped to white. Both read it as the
    data pipeline does (scaled): the same pixels as the 8-bit image it was made from."""
    from smartbrush_jax.app.page import read_editor
    from smartbrush_jax.cli.inpaint import read_image
    from smartbrush_jax.data.validate import decode_image

    gray8 = rgb(20, 30, 2)[..., 0]
    Image.fromarray(gray8).save(tmp_path / "8.png")
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "16.png")  # 0..255 -> 0..65535
    assert Image.open(tmp_path / "16.png").mode.startswith("I")
    want = np.repeat(gray8[..., None], 3, axis=2)
    np.testing.assert_array_equal(read_image(str(tmp_path / "16.png")), want)
    np.testing.assert_array_equal(read_image(str(tmp_path / "8.png")), want)
    np.testing.assert_array_equal(decode_image((tmp_path / "16.png").read_bytes()), want)
    layer = np.zeros((20, 30, 4), np.uint8)
    layer[5:10, 5:10, 3] = 255
    Image.fromarray(layer).save(tmp_path / "layer.png")
    image, mask = read_editor({"background": str(tmp_path / "16.png"), "layers": [str(tmp_path / "layer.png")]})
    np.testing.assert_array_equal(image, want)
    assert mask.sum() == 25


def test_inpaint_on_a_run_whose_model_json_no_longer_matches_is_one_line(tiny_run, photo, tmp_path, capsys):
    """Row: a `ScopeParamShapeError` traceback after "loaded ... at step N"; now exit 2 and
    one line saying the checkpoint does not match model.json."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("data"))
    cfg = json.loads((run / "model.json").read_text())
    cfg["unet"]["block_out_channels"] = [c * 2 for c in cfg["unet"]["block_out_channels"]]
    (run / "model.json").write_text(json.dumps(cfg))
    code, err = _run(capsys, _args(str(run), photo, tmp_path / "out"))
    assert code == 2
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ")
    assert "the checkpoint does not match model.json" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value", [("--guidance", "nan"), ("--guidance", "inf"), ("--guidance", "-1"),
                                        ("--eta", "nan"), ("--eta", "inf"), ("--feather", "nan"),
                                        ("--feather", "-2"), ("--mask-warmup", "nan"), ("--mask-threshold", "nan"),
                                        ("--mask-dilate", "-1")])
def test_inpaint_guidance_nan_and_other_numbers_that_are_not_are_exit_2(tiny_run, photo, tmp_path, capsys, flag,
                                                                         value):
    """Row: `inpaint --guidance nan` exited 0 with the region painted black. Every float
    option that is NaN, infinite or negative where it cannot be: exit 2, one line naming the
    flag, before the model loads."""
    code, err = _run(capsys, _args(tiny_run, photo, tmp_path / "out", flag, value))
    assert code == 2, err
    assert flag in err and "loaded" not in err and not (tmp_path / "out").exists()
