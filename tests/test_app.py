"""The web app's one endpoint through `gradio_client`, as a script or another page calls
it: a request as the editor sends it, and every bad input the page must answer with a
message while the server goes on answering."""

import numpy as np
import pytest
from app_fixtures import layer, scene, serve
from data_fixtures import png_header_only
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def app(sd_folder, tmp_path_factory):
    d = tmp_path_factory.mktemp("app_inputs")
    img = scene(d / "img.png")
    region = np.zeros(img.shape[:2], bool)
    region[10:30, 20:50] = True
    layer(d / "region.png", region)
    with serve(sd_folder[0]) as (url, spy):
        yield gradio_client.Client(url, verbose=False), spy, d, img, region


def _editor(d, background="img.png", layers=("region.png",)):
    from gradio_client import handle_file

    return {"background": handle_file(str(d / background)), "layers": [handle_file(str(d / x)) for x in layers],
            "composite": None}


def _call(client, editor, prompt="a cat", precision=3, region="as drawn", samples=1, guidance=5.0):
    return client.predict(editor, prompt, "", precision, region, 3, guidance, 7, samples, api_name="/inpaint")


def _png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_inpaint_request_keeps_the_background(app):
    client, spy, d, img, region = app
    gallery, predicted, shown = _call(client, _editor(d), samples=2)
    assert len(gallery) == 2
    for item in gallery:
        result = _png(item["image"])
        assert result.shape == img.shape
        np.testing.assert_array_equal(result[~region], img[~region])  # byte for byte outside the region
        assert (result[region] != img[region]).mean() > 0.5
    np.testing.assert_array_equal(spy.calls[-1][1], region)  # the painted layer is the region, exactly
    assert _png(predicted).shape == img.shape
    view = _png(shown)
    assert (view[9:31, 19:51] == (255, 0, 0)).all(axis=-1).any()  # the region outlined in red
    assert (view[~region] == img[~region]).all(axis=-1).mean() > 0.95


def test_box_mode_fills_the_bounding_box_of_the_stroke(app):
    client, spy, d, img, _ = app
    stroke = np.zeros(img.shape[:2], bool)
    for i in range(20):  # a diagonal stroke from (8, 10) to (27, 48)
        stroke[8 + i, 10 + 2 * i:12 + 2 * i] = True
    layer(d / "stroke.png", stroke)
    gallery, _, _ = _call(client, _editor(d, layers=("stroke.png",)), region="box around the drawing")
    box = np.zeros_like(stroke)
    box[8:28, 10:50] = True
    np.testing.assert_array_equal(spy.calls[-1][1], box)
    result = _png(gallery[0]["image"])
    np.testing.assert_array_equal(result[~box], img[~box])


def test_bad_inputs_get_a_message_and_the_server_goes_on(app, tmp_path):
    client, spy, d, img, _ = app
    from gradio_client.exceptions import AppError

    Image.fromarray(np.zeros(img.shape[:2] + (4,), np.uint8)).save(d / "empty.png")
    (d / "not_an_image.png").write_bytes(b"this is not a PNG")
    png_header_only(d / "huge.png", 8200, 8200)  # over the one limit (images.MAX_PIXELS), never decoded
    cases = [
        (dict(editor=_editor(d, layers=())), "no region: paint over"),
        (dict(editor=_editor(d, layers=("empty.png",))), "no region: paint over"),
        (dict(editor=_editor(d), prompt="   "), "no prompt"),
        # the slider refuses what is outside its range itself (our check stands behind it)
        (dict(editor=_editor(d), precision=11), "greater than maximum value 10"),
        (dict(editor=_editor(d), precision=-1), "less than minimum value 0"),
        (dict(editor=_editor(d, background="not_an_image.png")), "cannot read the image"),
        (dict(editor=_editor(d, background="huge.png")), "over the limit of 67.1 megapixels"),
        (dict(editor=_editor(d), region="lasso"), "is not in the list of choices"),
    ]
    calls = len(spy.calls)
    for kwargs, says in cases:
        with pytest.raises(AppError) as e:
            _call(client, **kwargs)
        assert says in str(e.value), (kwargs, str(e.value))
        gallery, _, _ = _call(client, _editor(d))  # the next request is answered
        assert _png(gallery[0]["image"]).shape == img.shape
    assert len(spy.calls) == calls + len(cases)  # no bad request reached the model


def _app_cli(*args, cwd):
    import os
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.run([sys.executable, "-m", "smartbrush_jax.app", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_without_a_model_says_how_to_get_one(tmp_path):
    p = _app_cli(cwd=tmp_path)  # no --checkpoint, no runs/demo here
    assert p.returncode == 2, p.stderr[-2000:]
    assert "run `make demo`" in p.stderr and "--checkpoint" in p.stderr
    p = _app_cli("--checkpoint", str(tmp_path / "nothing"), cwd=tmp_path)
    assert p.returncode == 2 and "no such file or folder" in p.stderr


def test_cli_port_in_use_exits_2(sd_folder, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = _app_cli("--checkpoint", sd_folder[0], "--port", str(port), cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"127.0.0.1:{port} is in use" in p.stderr


def test_heldout_demo_scenes_become_examples(demo_run):
    import json
    import os

    from pycocotools import mask as mu

    from smartbrush_jax.app.page import heldout_examples

    examples = heldout_examples(demo_run, 3, 10)
    assert len(examples) == 3 and [e["precision"] for e in examples] == [0, 5, 10]
    raw = os.path.join(demo_run, "data", "raw_heldout")
    coco = json.load(open(os.path.join(raw, "annotations.json")))
    size = {im["id"]: im["height"] * im["width"] for im in coco["images"]}
    first = next(a for a in coco["annotations"] if a["area"] >= 0.06 * size[a["image_id"]])
    exact = mu.decode(dict(first["segmentation"], counts=first["segmentation"]["counts"].encode())).astype(bool)
    painted = np.asarray(Image.open(examples[0]["editor"]["layers"][0]))[..., 3] > 0
    np.testing.assert_array_equal(painted, exact)  # the object's own shape, painted as the brush would
    assert examples[0]["prompt"].startswith("a ") and heldout_examples("/nonexistent", 3, 10) == []


@pytest.mark.parametrize("guidance", [float("nan"), float("inf"), -1.0])
def test_nan_guidance_through_the_api_is_a_message_not_a_black_region(app, guidance):
    """Issue 24: NaN guidance through the app's HTTP API painted the region black. JSON
    clients cannot send NaN (httpx refuses), but Gradio's own parser takes the `NaN` token, so
    the request function itself must refuse it, before the model runs."""
    from smartbrush_jax.app.page import InpaintService
    from smartbrush_jax.errors import InputError

    _, spy, d, _, _ = app
    calls = len(spy.calls)
    service = InpaintService(spy, resolution=64)
    editor = {"background": str(d / "img.png"), "layers": [str(d / "region.png")]}
    with pytest.raises(InputError, match="guidance_scale must be finite and >= 0"):
        service.run(editor, "a cat", guidance=guidance)
    assert len(spy.calls) == calls
