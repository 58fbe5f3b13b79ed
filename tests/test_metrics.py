"""Evaluation metrics: FID against closed forms and torchmetrics, Local-FID crop geometry, the FID
Inception's layout and loading, CLIP score against a direct computation with a tiny random CLIP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from metrics_fixtures import random_inception_state, write_tiny_clip

from smartbrush_jax.metrics import (
    WEIGHTS_NAME,
    ClipScorer,
    FIDInceptionV3,
    MetricsError,
    bbox_mask,
    feature_stats,
    fid_from_features,
    frechet_distance,
    inception_features,
    load_inception,
    local_crop,
    local_crop_box,
    mask_bbox,
    preprocess,
)

# ---------------------------------------------------------------------------------------------- FID


def closed_form(mu1, a, mu2, b):
    """FID of N(mu1, Q diag(a) Q^T) and N(mu2, Q diag(b) Q^T): commuting covariances."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))


def test_frechet_distance_closed_form_and_samples():
    rng = np.random.default_rng(0)
    mu1, mu2 = np.array([0.0, 1.0, -1.0, 2.0]), np.array([0.5, 1.0, 0.0, 1.0])
    a, b = np.array([1.0, 4.0, 0.25, 2.0]), np.array([2.0, 1.0, 0.25, 9.0])
    expected = closed_form(mu1, a, mu2, b)  # 2.25 + (1-√2)²+(2-1)²+0+(√2-3)² by hand
    assert expected == pytest.approx(2.25 + (1 - 2**0.5) ** 2 + 1 + (2**0.5 - 3) ** 2, rel=1e-12)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))  # same eigenvectors, rotated: still commuting
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    x = rng.multivariate_normal(mu1, s1, size=40000)
    y = rng.multivariate_normal(mu2, s2, size=40000)
    assert fid_from_features(x, y) == pytest.approx(expected, rel=0.03)
    mu, sigma = feature_stats(x)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (4, 4)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-12)


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
    assert abs(fid_from_features(x, x)) < 1e-6
    with pytest.raises(MetricsError, match="at least 2"):
        feature_stats(x[:1])
    with pytest.raises(MetricsError, match="differ"):
        fid_from_features(x, x[:, :8])


class GivenFeatures(torch.nn.Module):
    """A torchmetrics feature extractor that returns its input: the features are fed as 'images'."""

    num_features = 24

    def forward(self, x):
        return x


@pytest.mark.parametrize("n", [400, 20])  # 20 < 24 features: singular covariances
def test_fid_equals_torchmetrics(n):
    from torchmetrics.image.fid import FrechetInceptionDistance

    rng = np.random.default_rng(2)
    x = rng.normal(size=(n, 24)) @ rng.normal(size=(24, 24))
    y = 0.5 + rng.normal(size=(n + 7, 24)) @ rng.normal(size=(24, 24)) * 0.8
    metric = FrechetInceptionDistance(feature=GivenFeatures())
    metric.update(torch.from_numpy(x), real=True)
    metric.update(torch.from_numpy(y), real=False)
    reference = float(metric.compute())
    assert fid_from_features(x, y) == pytest.approx(reference, rel=1e-6)
    # the n < D path (an n x n eigenproblem) equals the full one on the fitted Gaussians
    assert fid_from_features(x, y) == pytest.approx(frechet_distance(*feature_stats(x), *feature_stats(y)), rel=1e-8)


# ------------------------------------------------------------------------------------------- crops


def rect_mask(shape, y0, x0, y1, x1):
    m = np.zeros(shape, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def test_crop_boxes_on_planted_masks():
    box = rect_mask((128, 128), 20, 50, 40, 90)  # 20 x 40: square of 40 centred on it
    assert mask_bbox(box) == (50, 20, 90, 40)
    assert local_crop_box(box) == (50, 10, 90, 50)
    border = rect_mask((128, 128), 0, 0, 10, 60)  # touches the top-left corner: shifted inside
    assert local_crop_box(border) == (0, 0, 60, 60)
    right = rect_mask((128, 128), 60, 120, 70, 128)  # 10 x 8 -> 32 px, pushed left of the right edge
    assert local_crop_box(right) == (96, 49, 128, 81)
    tall = rect_mask((128, 128), 10, 60, 110, 62)  # 100 x 2: square of 100, centred on the column
    assert local_crop_box(tall) == (11, 10, 111, 110)
    wide = rect_mask((64, 128), 10, 10, 50, 110)  # 100 wide in a 64-high image: 64 square, centred in x
    assert local_crop_box(wide) == (28, 0, 92, 64)
    tiny = rect_mask((128, 128), 60, 60, 64, 64)  # 4 x 4 -> min_side 32
    assert local_crop_box(tiny) == (46, 46, 78, 78)
    assert local_crop_box(tiny, min_side=8) == (58, 58, 66, 66)
    odd = np.zeros((128, 128), bool)
    odd[[30, 40], [70, 80]] = True  # two pixels: the box spans both
    assert mask_bbox(odd) == (70, 30, 81, 41) and local_crop_box(odd) == (59, 19, 91, 51)
    assert mask_bbox(box[..., None]) == (50, 20, 90, 40)
    for m in (np.zeros((32, 32), bool), np.zeros((32, 32, 1), np.uint8)):
        with pytest.raises(MetricsError, match="empty mask"):
            local_crop_box(m)


def test_bbox_mask_and_local_crop_pixels():
    ell = rect_mask((64, 80), 10, 10, 40, 20) | rect_mask((64, 80), 30, 10, 40, 50)  # an L shape
    np.testing.assert_array_equal(bbox_mask(ell), rect_mask((64, 80), 10, 10, 40, 50))
    yy, xx = np.mgrid[:64, :80]
    image = np.stack([yy * 3, xx * 3, (yy + xx) % 256], axis=-1).astype(np.uint8)
    x0, y0, x1, y1 = local_crop_box(ell)
    assert (y0, x0, y1, x1) == (5, 10, 45, 50)
    np.testing.assert_array_equal(local_crop(image, ell, size=40), image[5:45, 10:50])  # no resize at size = side
    big = local_crop(image, ell)
    assert big.shape == (299, 299, 3) and big.dtype == np.uint8
    flat = np.full((64, 80, 3), 77, np.uint8)
    assert (local_crop(flat, ell, size=17) == 77).all()  # shrinking keeps a flat colour
    with pytest.raises(MetricsError, match="sizes differ"):
        local_crop(image, ell[:32])


# --------------------------------------------------------------------------------------- Inception

# Conv shapes (out, in, kh, kw) of pt_inception-2015-12-05-6726825d.pth, written from torch-fidelity's
# FeatureExtractorInceptionV3 (an independent implementation). Each conv has a BatchNorm of `out`.
STANDARD_CONVS = """
Conv2d_1a_3x3 -:32,3,3,3
Conv2d_2a_3x3 -:32,32,3,3
Conv2d_2b_3x3 -:64,32,3,3
Conv2d_3b_1x1 -:80,64,1,1
Conv2d_4a_3x3 -:192,80,3,3
Mixed_5b branch1x1:64,192,1,1 branch5x5_1:48,192,1,1 branch5x5_2:64,48,5,5 branch3x3dbl_1:64,192,1,1
  branch3x3dbl_2:96,64,3,3 branch3x3dbl_3:96,96,3,3 branch_pool:32,192,1,1
Mixed_5c branch1x1:64,256,1,1 branch5x5_1:48,256,1,1 branch5x5_2:64,48,5,5 branch3x3dbl_1:64,256,1,1
  branch3x3dbl_2:96,64,3,3 branch3x3dbl_3:96,96,3,3 branch_pool:64,256,1,1
Mixed_5d branch1x1:64,288,1,1 branch5x5_1:48,288,1,1 branch5x5_2:64,48,5,5 branch3x3dbl_1:64,288,1,1
  branch3x3dbl_2:96,64,3,3 branch3x3dbl_3:96,96,3,3 branch_pool:64,288,1,1
Mixed_6a branch3x3:384,288,3,3 branch3x3dbl_1:64,288,1,1 branch3x3dbl_2:96,64,3,3 branch3x3dbl_3:96,96,3,3
Mixed_6b branch1x1:192,768,1,1 branch7x7_1:128,768,1,1 branch7x7_2:128,128,1,7 branch7x7_3:192,128,7,1
  branch7x7dbl_1:128,768,1,1 branch7x7dbl_2:128,128,7,1 branch7x7dbl_3:128,128,1,7 branch7x7dbl_4:128,128,7,1
  branch7x7dbl_5:192,128,1,7 branch_pool:192,768,1,1
Mixed_6c branch1x1:192,768,1,1 branch7x7_1:160,768,1,1 branch7x7_2:160,160,1,7 branch7x7_3:192,160,7,1
  branch7x7dbl_1:160,768,1,1 branch7x7dbl_2:160,160,7,1 branch7x7dbl_3:160,160,1,7 branch7x7dbl_4:160,160,7,1
  branch7x7dbl_5:192,160,1,7 branch_pool:192,768,1,1
Mixed_6d branch1x1:192,768,1,1 branch7x7_1:160,768,1,1 branch7x7_2:160,160,1,7 branch7x7_3:192,160,7,1
  branch7x7dbl_1:160,768,1,1 branch7x7dbl_2:160,160,7,1 branch7x7dbl_3:160,160,1,7 branch7x7dbl_4:160,160,7,1
  branch7x7dbl_5:192,160,1,7 branch_pool:192,768,1,1
Mixed_6e branch1x1:192,768,1,1 branch7x7_1:192,768,1,1 branch7x7_2:192,192,1,7 branch7x7_3:192,192,7,1
  branch7x7dbl_1:192,768,1,1 branch7x7dbl_2:192,192,7,1 branch7x7dbl_3:192,192,1,7 branch7x7dbl_4:192,192,7,1
  branch7x7dbl_5:192,192,1,7 branch_pool:192,768,1,1
Mixed_7a branch3x3_1:192,768,1,1 branch3x3_2:320,192,3,3 branch7x7x3_1:192,768,1,1 branch7x7x3_2:192,192,1,7
  branch7x7x3_3:192,192,7,1 branch7x7x3_4:192,192,3,3
Mixed_7b branch1x1:320,1280,1,1 branch3x3_1:384,1280,1,1 branch3x3_2a:384,384,1,3 branch3x3_2b:384,384,3,1
  branch3x3dbl_1:448,1280,1,1 branch3x3dbl_2:384,448,3,3 branch3x3dbl_3a:384,384,1,3 branch3x3dbl_3b:384,384,3,1
  branch_pool:192,1280,1,1
Mixed_7c branch1x1:320,2048,1,1 branch3x3_1:384,2048,1,1 branch3x3_2a:384,384,1,3 branch3x3_2b:384,384,3,1
  branch3x3dbl_1:448,2048,1,1 branch3x3dbl_2:384,448,3,3 branch3x3dbl_3a:384,384,1,3 branch3x3dbl_3b:384,384,3,1
  branch_pool:192,2048,1,1
"""


def standard_shapes():
    shapes, block = {}, None
    for line in STANDARD_CONVS.strip().splitlines():
        words = line.split()
        if not line.startswith(" "):
            block, words = words[0], words[1:]
        for word in words:
            name, dims = word.split(":")
            o, i, kh, kw = map(int, dims.split(","))
            prefix = block if name == "-" else f"{block}.{name}"
            shapes[f"{prefix}.conv.weight"] = (o, i, kh, kw)
            shapes.update({f"{prefix}.bn.{p}": (o,) for p in ("weight", "bias", "running_mean", "running_var")})
    shapes.update({"fc.weight": (1008, 2048), "fc.bias": (1008,)})
    return shapes


def test_inception_layout_is_the_standard_file():
    expected = standard_shapes()
    assert len(expected) == 94 * 5 + 2 == 472
    ours = {k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items() if "num_batches_tracked" not in k}
    assert ours == expected
    assert expected["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert expected["Mixed_7b.branch3x3_2a.conv.weight"] == (384, 384, 1, 3)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("inception") / WEIGHTS_NAME)
    state = random_inception_state()
    torch.save(state, path)
    return path, state


def test_inception_features_shape_and_batch_invariance(inception_file):
    path, state = inception_file
    model = load_inception(path)
    assert not model.training
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    images = np.random.default_rng(3).integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)
    whole = inception_features(model, images, batch_size=2)
    assert whole.shape == (2, 2048) and whole.dtype == np.float64
    assert np.isfinite(whole).all() and whole.std() > 1e-3
    alone = inception_features(model, [images[1]], batch_size=1)  # a list; the second image on its own
    np.testing.assert_allclose(alone[0], whole[1], rtol=1e-5, atol=1e-6)


def test_preprocess_scales_and_resizes():
    u8 = np.random.default_rng(4).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
    x = preprocess(u8)
    assert x.shape == (2, 3, 299, 299)
    np.testing.assert_allclose(x.numpy(), 2 * u8.transpose(0, 3, 1, 2).astype(np.float64) / 255.0 - 1, atol=1e-6)
    flat = preprocess([np.full((17, 30, 3), 51, np.uint8)])
    np.testing.assert_allclose(flat.numpy(), 2 * 51 / 255.0 - 1, atol=1e-6)
    with pytest.raises(MetricsError, match="uint8"):
        preprocess(u8.astype(np.float32))


def test_load_inception_errors(inception_file, tmp_path):
    path, state = inception_file
    with pytest.raises(MetricsError, match=f"--inception PATH to {WEIGHTS_NAME}"):
        load_inception(str(tmp_path / "nowhere.pth"))
    bad = dict(state)
    bad["Mixed_6b.branch7x7_2.conv.weight"] = torch.zeros(128, 128, 7, 1)
    del bad["fc.bias"]
    bad["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(MetricsError) as err:
        load_inception(str(tmp_path / "bad.pth"))
    message = str(err.value)
    assert "Mixed_6b.branch7x7_2.conv.weight (128, 128, 7, 1) (expected (128, 128, 1, 7))" in message
    assert "1 missing: fc.bias" in message and "1 unexpected: AuxLogits.fc.weight" in message
    torch.save({"a": 1}, tmp_path / "junk.pth")
    with pytest.raises(MetricsError, match="not a state dict of tensors"):
        load_inception(str(tmp_path / "junk.pth"))


def test_load_inception_safetensors(inception_file, tmp_path):
    from safetensors.torch import save_file

    _, state = inception_file
    save_file(state, str(tmp_path / "inception.safetensors"))
    loaded = load_inception(str(tmp_path / "inception.safetensors")).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_inception_matches_torch_fidelity(inception_file):
    """Runs where torch-fidelity imports (it needs a torchvision built for this torch; the CPU torch here has none)."""
    tfid = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    path, _ = inception_file
    theirs = tfid.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)
    u8 = torch.from_numpy(np.random.default_rng(5).integers(0, 256, (2, 3, 299, 299), dtype=np.uint8))
    (reference,) = theirs(u8)  # 299x299 input: their resize is the identity, then (x - 128) / 128
    with torch.no_grad():
        ours = load_inception(path)((u8.float() - 128) / 128)
    assert float((ours - reference).norm() / reference.norm()) < 1e-5


def test_metrics_import_without_jax():
    code = "import sys, smartbrush_jax.metrics; assert 'jax' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


# -------------------------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("clip"))
    return folder, write_tiny_clip(folder)


def test_clip_score_equals_direct_computation(clip_folder):
    folder, model = clip_folder
    scorer = ClipScorer(folder, batch_size=4)
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    prompts = ["a red star", "the blue cat", "green square", "a cat", "red", "the star"]
    # Reference: the full model's forward on hand-made inputs (32x32 = the crop size: no resize).
    ip = scorer.image_processor
    mean, std = torch.tensor(ip.image_mean).view(1, 3, 1, 1), torch.tensor(ip.image_std).view(1, 3, 1, 1)
    pixels = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    tokens = scorer.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    cosine = (out.image_embeds * out.text_embeds).sum(-1).double().numpy()
    assert (cosine > 0).any() and (cosine < 0).any()  # both sides of the clamp
    np.testing.assert_allclose(scorer.cosine(images, prompts), cosine, atol=1e-5)
    scores = scorer(list(images), prompts)
    np.testing.assert_allclose(scores, 100 * np.maximum(cosine, 0), atol=1e-4)
    np.testing.assert_allclose(scorer(images[2], prompts[2]), scores[2:3], atol=1e-4)
    with pytest.raises(MetricsError, match="6 images but 5 prompts"):
        scorer(images, prompts[:5])


def test_clip_scorer_folder_errors(tmp_path):
    with pytest.raises(MetricsError, match="--clip DIR"):
        ClipScorer(str(tmp_path / "missing"))
    with pytest.raises(MetricsError, match="no readable config.json"):
        ClipScorer(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(MetricsError, match="not a CLIP model"):
        ClipScorer(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(MetricsError, match="cannot load the CLIP model"):
        ClipScorer(str(tmp_path))
