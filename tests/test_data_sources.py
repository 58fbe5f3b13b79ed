"""Readers on small data sets in each real format with planted bad records: exact skip
counts by reason, good records pixel-exact with the right labels."""

import numpy as np
import pytest
from data_fixtures import write_coco, write_openimages, write_webdataset

from smartbrush_jax.data.sources import read_captions, read_coco, read_openimages, read_webdataset
from smartbrush_jax.data.validate import SKIP_REASONS, Counter
from smartbrush_jax.errors import InputError


def test_coco_polygons_rle_and_planted_problems(tmp_path):
    paths, expected, skips, other = write_coco(str(tmp_path))
    counts = Counter()
    captions = {"1": "a sleeping cat"}
    got = {int(ex.id.split(":")[1]): ex for ex in read_coco(paths["annotations"], paths["images"], counts, 0.01,
                                                            captions, max_pixels=paths["max_pixels"])}
    assert set(got) == set(expected)
    for ann_id, (_, mask, label) in expected.items():
        ex = got[ann_id]
        np.testing.assert_array_equal(ex.mask, mask, err_msg=str(ann_id))
        assert ex.label == label and ex.kind == "seg" and ex.image.shape == (40, 60, 3)
    assert got[1].caption == "a sleeping cat" and got[2].caption == ""
    assert got[1].box == [10, 5, 30, 25]
    assert {r: counts[r] for r in SKIP_REASONS if counts[r]} == skips
    assert {k: v for k, v in counts.items() if k not in SKIP_REASONS} == other
    # conversions give RGB uint8 with the right content
    gray = got[100].image
    assert (gray[..., 0] == gray[..., 1]).all()
    assert got[104].image.shape == (40, 60, 3)  # stored 40 wide x 60 tall; EXIF rotation makes it 60x40


def test_openimages_csv_masks_and_planted_problems(tmp_path):
    paths, expected, skips = write_openimages(str(tmp_path))
    counts = Counter()
    got = {ex.id.split(":")[1]: ex for ex in read_openimages(paths["csv"], paths["masks"], paths["images"],
                                                             paths["classes"], counts, 0.01)}
    assert set(got) == set(expected)
    for key, (image_id, mask, label) in expected.items():
        np.testing.assert_array_equal(got[key].mask, mask)
        assert got[key].label == label
    assert {r: counts[r] for r in SKIP_REASONS if counts[r]} == skips
    assert counts["converted_mask_resize"] == 1


def test_webdataset_pairs_and_planted_problems(tmp_path):
    path, expected, skips = write_webdataset(str(tmp_path))
    counts = Counter()
    got = {ex.id.rsplit(":", 1)[1]: ex for ex in read_webdataset([path], counts)}
    assert {k: ex.caption for k, ex in got.items()} == expected
    assert all(ex.kind == "t2i" and ex.mask is None for ex in got.values())
    assert {r: counts[r] for r in SKIP_REASONS if counts[r]} == skips


def test_captions_side_file(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"annotation_id": 5, "caption": "a  red\\nstar"}\n\n{"annotation_id": "x", "caption": "b"}\n')
    assert read_captions(str(p)) == {"5": "a red star", "x": "b"}
    # a line another tool wrote badly is counted and skipped; a file with no caption line is refused
    p.write_bytes(b'{"annotation_id": 1, "caption": "ok"}\n{"annotation_id": 2, "caption": "caf\xe9"}\n{"id": 5}\n')
    counts = Counter()
    assert read_captions(str(p), counts) == {"1": "ok"} and counts["bad_caption"] == 2
    p.write_text('{"id": 5}\n')
    with pytest.raises(InputError, match="c.jsonl:1"):
        read_captions(str(p))
