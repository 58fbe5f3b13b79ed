"""`inpaint` and the app against hostile-input probes (issue 36), one test per defect, named
after it: what the user sees is exit 2 and one line `error: ...` naming the flag (no
traceback), or an answer in bounded time. The model is the tiny random SD folder
(`sd_folder`, a plain SD U-Net given SmartBrush's channels), run at 32 px."""

import json
import os
import resource
import shutil
import threading
import time

import numpy as np
import pytest
from data_fixtures import rgb
from PIL import Image

from smartbrush_jax.cli.inpaint import main


@pytest.fixture
def photo(tmp_path):
    Image.fromarray(rgb(48, 64, 1)).save(tmp_path / "photo.png")
    return str(tmp_path / "photo.png")


def _args(model, image, out, *extra):
    return ["--checkpoint", model, "--image", image, "--box", "10,10,40,30", "--prompt", "a red circle", "--steps",
            "2", "--resolution", "32", "--out", str(out), *extra]


def _run(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    return code, capsys.readouterr().err


def _one_line_error(err: str) -> str:
    """The last line of stderr, checked to be the command's one `error: ` line, no traceback."""
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err[-3000:]
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1, err[-3000:]
    return last


def _truncated_png(path, cut_zlib: bool = False):
    """A 64x48 PNG whose header is whole and whose pixel data stops half-way: its IDAT holds
    a complete zlib stream of only the first 24 rows (or, `cut_zlib`, all the rows' stream
    cut in half), every chunk's CRC correct (PIL decoded the first without a word)."""
    import struct
    import zlib

    img = rgb(48, 64, 3)
    rows = b"".join(b"\x00" + img[i].tobytes() for i in range(48 if cut_zlib else 24))
    data = zlib.compress(rows)
    data = data[:len(data) // 2] if cut_zlib else data

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 48, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return str(path)


def _in_thread(fn, fifo, seconds=30):
    """`fn()` run in a thread; a reader blocked on `fifo` is released (a writer opens and
    closes it) if it has not returned in `seconds`. (result, finished in time)."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    hung = t.is_alive()
    if hung:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(30)
    if "error" in box:
        raise box["error"]
    return box.get("value"), not hung


# ---------------------------------------------------------------------------- 1. FIFOs
@pytest.mark.timeout(120)
@pytest.mark.parametrize("flag", ["--image", "--mask"])
def test_fifo_as_image_or_mask_is_refused_not_waited_on(photo, tmp_path, capsys, flag):
    """Probe: `inpaint --image FIFO` (or `--mask`) waited for a writer for ever. Now exit 2,
    one line naming the flag, before the model loads (no checkpoint is even needed)."""
    fifo = str(tmp_path / "pipe.png")
    os.mkfifo(fifo)
    argv = ["--checkpoint", str(tmp_path / "no_model"), "--prompt", "a cat", "--out", str(tmp_path / "out")]
    argv += ["--image", fifo, "--box", "1,1,5,5"] if flag == "--image" else ["--image", photo, "--mask", fifo]
    (code, err), in_time = _in_thread(lambda: _run(capsys, argv), fifo)
    assert in_time, "inpaint blocked reading the FIFO"
    assert code == 2
    line = _one_line_error(err)
    assert f"{flag} {fifo}" in line and "named pipe" in line and not (tmp_path / "out").exists()


@pytest.mark.timeout(120)
def test_fifo_in_the_apps_editor_value_is_a_message_not_a_hang(photo, tmp_path):
    """The app reads the paths of an editor value itself (`read_editor`): a FIFO there is
    the page's message, not a request that never ends."""
    from smartbrush_jax.app.page import read_editor
    from smartbrush_jax.errors import InputError

    fifo = str(tmp_path / "layer.png")
    os.mkfifo(fifo)
    for value in ({"background": fifo, "layers": []}, {"background": photo, "layers": [fifo]}):
        def call(value=value):
            with pytest.raises(InputError, match="named pipe") as e:
                read_editor(value)
            return str(e.value)
        _, in_time = _in_thread(call, fifo)
        assert in_time, "the app blocked reading the FIFO"


# ---------------------------------------------------------------------------- 2. --mask-dilate
@pytest.mark.timeout(300)
def test_mask_dilate_a_billion_finishes_quickly_as_the_whole_region(sd_folder, photo, tmp_path, capsys):
    """Probe: `--mask-dilate 1000000000` never finished after loading (a 2e9-wide window).
    More than the latent's longest side reaches every cell, so it is that side, with a
    warning saying so; it finishes in the time of any other run."""
    start = time.time()
    code, err = _run(capsys, _args(sd_folder[0], photo, tmp_path / "out", "--mask-dilate", "1000000000"))
    assert code == 0, err[-3000:]
    assert time.time() - start < 120
    assert "warning: --mask-dilate 1000000000 is more than the latent's longest side (16 cells" in err
    assert (tmp_path / "out" / "result.png").exists()


# ---------------------------------------------------------------------------- 3. --steps
@pytest.mark.timeout(300)
@pytest.mark.parametrize("steps", ["1001", "1000000"])
def test_steps_past_the_schedule_is_one_line_naming_its_timesteps(sd_folder, photo, tmp_path, capsys, steps):
    """Probe: `--steps 1001` (more than the schedule's 1000 training timesteps) ended in a
    JAX traceback, exit 1. Now exit 2, one line naming --steps and the schedule's length."""
    code, err = _run(capsys, _args(sd_folder[0], photo, tmp_path / "out", "--steps", steps))
    assert code == 2
    line = _one_line_error(err)
    assert "--steps must be in [1, 1000]" in line and "num_train_timesteps=1000" in line and steps in line
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(300)
def test_steps_past_a_short_schedule_reads_its_length_from_the_scheduler_config(sd_folder, photo, tmp_path,
                                                                                 capsys):
    """Probe: a diffusers folder whose scheduler has num_train_timesteps=10, asked for 50
    steps (the default), tracebacked. The limit is the loaded model's own schedule."""
    model = tmp_path / "short_schedule"
    shutil.copytree(sd_folder[0], model)
    cfg_path = model / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_train_timesteps"] = 10
    cfg_path.write_text(json.dumps(cfg))
    code, err = _run(capsys, _args(str(model), photo, tmp_path / "out", "--steps", "50"))
    assert code == 2
    line = _one_line_error(err)
    assert "--steps must be in [1, 10]" in line and "num_train_timesteps=10" in line and "got 50" in line


@pytest.mark.timeout(120)
@pytest.mark.parametrize("steps", ["0", "-3"])
def test_steps_zero_or_negative_is_refused_before_the_model_loads(photo, tmp_path, capsys, steps):
    code, err = _run(capsys, _args(str(tmp_path / "no_model"), photo, tmp_path / "out", "--steps", steps))
    assert code == 2 and "--steps must be >= 1" in _one_line_error(err)


# ---------------------------------------------------------------------------- 4. --seed
@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [str(2**64), str(2**32), "-1"])
def test_seed_outside_32_bits_is_one_line(photo, tmp_path, capsys, seed):
    """Probe: `--seed 18446744073709551616` ended in an OverflowError traceback (after the
    model loaded). Seeds are 32-bit: outside [0, 2**32 - 1] is refused before loading."""
    code, err = _run(capsys, _args(str(tmp_path / "no_model"), photo, tmp_path / "out", "--seed", seed))
    assert code == 2
    line = _one_line_error(err)
    assert f"--seed must be in [0, {2**32 - 1}]" in line and seed in line


# ---------------------------------------------------------------------------- 5. --num-samples
@pytest.mark.timeout(300)
def test_a_million_samples_is_the_memory_message_before_anything_is_allocated(sd_folder, tmp_path, capsys,
                                                                            monkeypatch):
    """Probe: `--num-samples 1000000` allocated the repeated text context (19.7 GB) before the
    memory check: RESOURCE_EXHAUSTED traceback. The check now counts every input of the
    sampler (context included) and runs before any is made. The process may map no more than
    4 GiB beyond what it holds while the command runs (a machine with little memory), and the
    check is told there are 8 GiB free: the message, quickly."""
    Image.fromarray(rgb(16, 16, 1)).save(tmp_path / "small.png")
    import smartbrush_jax.sampling.runner as runner

    monkeypatch.setattr(runner, "free_memory", lambda device: 8 * 2**30)
    argv = ["--checkpoint", sd_folder[0], "--image", str(tmp_path / "small.png"), "--box", "2,2,10,10", "--prompt",
            "a cat", "--steps", "2", "--resolution", "16", "--num-samples", "1000000", "--out", str(tmp_path / "o")]
    with open("/proc/self/status") as f:
        data = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    before = resource.getrlimit(resource.RLIMIT_DATA)
    start = time.time()
    resource.setrlimit(resource.RLIMIT_DATA, (data + 4 * 2**30, before[1]))
    try:
        code, err = _run(capsys, argv)
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, before)
    assert code == 2
    line = _one_line_error(err)
    assert line.startswith("error: sampling 1000000 image(s) at 16x16 needs about") and "GiB free" in line
    assert float(line.split("needs about ")[1].split(" GiB")[0]) > 19  # the context alone is 19.7 GB
    assert time.time() - start < 120 and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- 6. --box -5,...
@pytest.mark.timeout(60)
def test_box_with_a_negative_first_number_says_to_write_box_equals(photo, tmp_path, capsys):
    """Probe: `--box -5,-5,10,10` failed in argparse with "expected one argument" and no
    hint. Now one line saying to write `--box=-5,-5,10,10`, exit 2."""
    argv = ["--checkpoint", str(tmp_path / "m"), "--image", photo, "--box", "-5,-5,10,10", "--prompt", "a cat"]
    code, err = _run(capsys, argv)
    assert code == 2
    assert "write --box=-5,-5,10,10" in _one_line_error(err) and "usage:" not in err


# ---------------------------------------------------------------------------- 7. truncated PNG
@pytest.mark.timeout(120)
@pytest.mark.parametrize("flag", ["--image", "--mask"])
@pytest.mark.parametrize("cut_zlib", [False, True])
def test_truncated_png_is_refused_not_filled(photo, tmp_path, capsys, flag, cut_zlib):
    """Probe: a PNG whose pixel data stops half-way (header and CRCs fine) was inpainted
    without a word, its missing rows black. Now exit 2 before the model loads, for the image
    and the mask, also where a library in the process set PIL's LOAD_TRUNCATED_IMAGES."""
    from PIL import ImageFile

    bad = _truncated_png(tmp_path / "cut.png", cut_zlib)
    argv = ["--checkpoint", str(tmp_path / "no_model"), "--prompt", "a cat", "--out", str(tmp_path / "out")]
    argv += ["--image", bad, "--box", "1,1,5,5"] if flag == "--image" else ["--image", photo, "--mask", bad]
    tolerant = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # as tensorflow_datasets leaves it
    try:
        code, err = _run(capsys, argv)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = tolerant
    assert code == 2
    assert f"{flag} {bad} is truncated or corrupt" in _one_line_error(err)


# ---------------------------------------------------------------------------- 8. app --steps
@pytest.mark.timeout(300)
@pytest.mark.parametrize("steps,says", [("0", "--steps must be >= 1, got 0"),
                                        ("1001", "--steps must be in [1, 1000] for this model")])
def test_app_steps_zero_or_past_the_schedule_is_refused_at_start(sd_folder, tmp_path, capsys, monkeypatch, steps,
                                                                 says):
    """Probe: `smartbrush-app --steps 0` started serving (and the page's default was not what
    was asked). Refused at start, exit 2, one line; the server never starts."""
    import gradio as gr

    from smartbrush_jax.cli.app import main as app_main

    def launch(*args, **kwargs):
        raise AssertionError("the app started serving")

    monkeypatch.setattr(gr.Blocks, "launch", launch)
    code = app_main(["--checkpoint", sd_folder[0], "--steps", steps, "--port", str(_free_port()),
                     "--examples", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert says in _one_line_error(err)


def _free_port() -> int:
    from app_fixtures import free_port

    return free_port()


# ---------------------------------------------------------------------------- 7, 9: the app's API
@pytest.fixture(scope="module")
def app(sd_folder, tmp_path_factory):
    pytest.importorskip("gradio_client")
    from app_fixtures import layer, scene, serve

    d = tmp_path_factory.mktemp("probe_app")
    img = scene(d / "img.png")
    region = np.zeros(img.shape[:2], bool)
    region[10:30, 20:50] = True
    layer(d / "region.png", region)
    with serve(sd_folder[0]) as (url, spy):
        yield url, spy, d


def _post_raw(url, d, values: dict):
    """The /inpaint endpoint called with a JSON body written by hand, so that it can hold
    the tokens NaN and Infinity (Gradio's parser takes them; httpx and gradio_client refuse
    to send them). Returns (status, the answer's JSON)."""
    import httpx

    with open(d / "img.png", "rb") as a, open(d / "region.png", "rb") as b:
        up = httpx.post(url + "gradio_api/upload", files=[("files", a), ("files", b)], timeout=60).json()
    fd = lambda p: {"path": p, "meta": {"_type": "gradio.FileData"}}  # noqa: E731
    data = [json.dumps({"background": fd(up[0]), "layers": [fd(up[1])], "composite": None}), '"a cat"', '""', "3",
            '"as drawn"', "3", "5.0", "7", "1"]
    for i, v in values.items():
        data[i] = v
    r = httpx.post(url + "gradio_api/run/inpaint", content='{"data": [%s]}' % ", ".join(data),
                   headers={"content-type": "application/json"}, timeout=120)
    return r.status_code, r.json()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("field,value,says", [(6, "NaN", "guidance_scale must be finite and >= 0, got nan"),
                                              (7, "NaN", "seed must be a whole number, got nan"),
                                              (7, "Infinity", "seed must be a whole number, got inf"),
                                              (7, str(2**64), f"seed must be in [0, {2**32 - 1}]")])
def test_app_api_nan_guidance_or_seed_is_the_pages_one_line_message(app, field, value, says):
    """Probe: NaN through the app's HTTP API came back as a raw ValueError. (From
    gradio_client that is the client refusing to encode NaN: nothing reaches the server.)
    Sent as the JSON token NaN, guidance is the page's one-line message; a NaN or infinite
    seed answered `{"error": null}` (Gradio's rounding raised) and now says what is wrong, as
    does a seed past 32 bits. No request reaches the model."""
    url, spy, d = app
    calls = len(spy.calls)
    status, answer = _post_raw(url, d, {field: value})
    assert status != 200 and says in (answer.get("error") or ""), answer
    assert "\n" not in answer["error"] and "Traceback" not in answer["error"]
    assert len(spy.calls) == calls


@pytest.mark.timeout(300)
def test_app_refuses_a_truncated_png_upload_with_its_message(app):
    """Probe 7 in the app: Gradio decodes every upload itself (filling what is missing) and
    hands over its own whole PNG; the upload is checked first, the page says it is cut."""
    url, spy, d = app
    _truncated_png(d / "cut.png")
    import httpx

    with open(d / "cut.png", "rb") as a:
        up = httpx.post(url + "gradio_api/upload", files=[("files", a)], timeout=60).json()
    calls = len(spy.calls)
    status, answer = _post_raw(url, d, {0: json.dumps({"background": {"path": up[0], "meta": {
        "_type": "gradio.FileData"}}, "layers": [], "composite": None})})
    assert status != 200 and "is truncated or corrupt" in (answer.get("error") or ""), answer
    assert len(spy.calls) == calls
