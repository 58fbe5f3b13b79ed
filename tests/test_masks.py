"""The precision degrader and DICE against closed forms and float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartbrush_jax.masks import bounding_box, degrade_mask, dice_loss, dilate, mask_iou

S = 10
degrade = jax.jit(degrade_mask, static_argnums=(2,), static_argnames=("sigma_scale", "truncate", "threshold"))


def _bbox_np(m):
    out = np.zeros_like(m)
    ys, xs = np.nonzero(m)
    if len(ys):
        out[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = 1
    return out


@st.composite
def shapes(draw):
    """A union of 1-3 random ellipses and rectangles on a random canvas."""
    h, w = draw(st.integers(8, 48)), draw(st.integers(8, 48))
    yy, xx = np.mgrid[:h, :w]
    m = np.zeros((h, w), np.float32)
    for _ in range(draw(st.integers(1, 3))):
        cy, cx = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        ry, rx = draw(st.integers(1, h)), draw(st.integers(1, w))
        if draw(st.booleans()):
            m[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
        else:
            m[max(cy - ry // 2, 0):cy + ry // 2 + 1, max(cx - rx // 2, 0):cx + rx // 2 + 1] = 1
    return m


@settings(max_examples=60, deadline=None)
@given(shapes())
def test_masks_only_grow_with_the_level(m):
    levels = np.arange(S + 1)
    out = np.asarray(degrade(np.repeat(m[None], S + 1, 0), levels, S))
    box = _bbox_np(m)
    np.testing.assert_array_equal(out[0], m)  # level 0: identity
    np.testing.assert_array_equal(out[S], box)  # level S: bounding box
    assert set(np.unique(out)) <= {0.0, 1.0}
    for s in range(S + 1):
        assert (out[s] >= m).all(), f"level {s} lost part of the mask"
        assert (out[s] <= box).all(), f"level {s} left the bounding box"
    for s in range(S):
        assert (out[s + 1] >= out[s]).all(), f"level {s + 1} is not a superset of level {s}"


def test_each_example_gets_its_own_level():
    rng = np.random.default_rng(0)
    m = (rng.uniform(size=(4, 24, 24)) > 0.8).astype(np.float32)
    levels = np.array([0, 3, 7, 10])
    batched = np.asarray(degrade(m, levels, S))
    for i in range(4):
        np.testing.assert_array_equal(batched[i], np.asarray(degrade(m[i:i + 1], levels[i:i + 1], S))[0])


def test_empty_and_full_masks():
    m = np.stack([np.zeros((16, 16)), np.ones((16, 16))]).astype(np.float32)
    for s in range(S + 1):
        out = np.asarray(degrade(m, np.array([s, s]), S))
        assert np.isfinite(out).all()
        np.testing.assert_array_equal(out[0], 0.0)
        np.testing.assert_array_equal(out[1], 1.0)


def _blur_reference(m, sigma, truncate):
    """Float64 separable Gaussian blur, truncated at `truncate` sigmas, each output pixel
    normalised by the kernel weight that falls inside the image."""
    def matrix(n):
        d = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :]).astype(np.float64)
        k = np.where(d <= np.ceil(truncate * sigma), np.exp(-0.5 * (d / sigma) ** 2), 0.0)
        return k / k.sum(1, keepdims=True)
    return matrix(m.shape[0]) @ m.astype(np.float64) @ matrix(m.shape[1]).T


@pytest.mark.parametrize("level,threshold", [(4, 0.5), (7, 0.3), (2, 0.0)])
def test_blur_matches_float64_reference(level, threshold):
    m = np.zeros((40, 40), np.float32)
    m[10:25, 12:20] = 1
    m[18:22, 8:30] = 1
    size = 22.0  # longer side of the bounding box: columns 8..29
    sigma = level / S * 0.15 * size
    ref = _blur_reference(m, sigma, 2.0)
    expected = np.maximum((ref > threshold) * _bbox_np(m), m)
    out = np.asarray(degrade(m[None], np.array([level]), S, threshold=threshold))[0]
    # pixels within 1e-6 of the threshold could go either way in float32
    decided = np.abs(ref - threshold) > 1e-6
    np.testing.assert_array_equal(out[decided], expected[decided])


def test_bounding_box_and_size():
    m = np.zeros((2, 10, 12), np.float32)
    m[0, 2:5, 3:9] = 1
    box, size = bounding_box(jnp.asarray(m))
    np.testing.assert_array_equal(np.asarray(box)[0], _bbox_np(m[0]))
    np.testing.assert_array_equal(np.asarray(size), [6.0, 0.0])


def test_dice_closed_form():
    rng = np.random.default_rng(1)
    p = rng.uniform(size=(3, 8, 8)).astype(np.float32)
    t = (rng.uniform(size=(3, 8, 8)) > 0.5).astype(np.float32)
    per, mean = dice_loss(jnp.asarray(p), jnp.asarray(t), eps=0.0)
    p64, t64 = p.astype(np.float64).reshape(3, -1), t.astype(np.float64).reshape(3, -1)
    ref = 1 - 2 * (p64 * t64).sum(1) / (p64.sum(1) + t64.sum(1))
    np.testing.assert_allclose(np.asarray(per), ref, rtol=1e-6)
    assert float(mean) == pytest.approx(ref.mean(), rel=1e-6)


def test_dice_is_zero_for_identical_and_for_empty_masks():
    t = np.zeros((2, 8, 8), np.float32)
    t[0, 2:5, 2:6] = 1
    per, _ = dice_loss(jnp.asarray(t), jnp.asarray(t))
    np.testing.assert_array_equal(np.asarray(per), [0.0, 0.0])


def test_dice_gradient_is_soft():
    # thresholding would give a zero gradient; the soft form must not
    t = jnp.zeros((1, 8, 8)).at[0, 2:6, 2:6].set(1.0)
    logits = jnp.linspace(-2, 2, 64).reshape(1, 8, 8)
    g = jax.grad(lambda z: dice_loss(jax.nn.sigmoid(z), t)[1])(logits)
    assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) > 1e-4


def test_iou_and_dilate():
    a = np.zeros((1, 6, 6), np.float32)
    a[0, 1:3, 1:3] = 1  # 4 pixels
    b = np.zeros((1, 6, 6), np.float32)
    b[0, 2:4, 2:4] = 1  # 4 pixels, 1 shared
    assert float(mask_iou(jnp.asarray(a), jnp.asarray(b))[0]) == pytest.approx(1 / 7)
    d = np.asarray(dilate(jnp.asarray(a), 1))[0]
    np.testing.assert_array_equal(d, np.pad(np.ones((4, 4)), ((0, 2), (0, 2))))
