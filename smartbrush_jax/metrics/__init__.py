"""Evaluation metrics for SmartBrush (PyTorch + NumPy + SciPy; no JAX).

FID over whole images, Local-FID over square crops around each mask's bounding box, and
CLIP score between a crop and its prompt. Weights are read from local files only:
the FID Inception from `pt_inception-2015-12-05-6726825d.pth`, CLIP from a transformers folder.
"""

from .clip_score import ClipScorer
from .crops import bbox_mask, local_crop, local_crop_box, mask_bbox, resize_uint8
from .errors import MetricsError
from .evalset import EvalItem, EvalSet
from .fid import feature_stats, fid_from_features, frechet_distance
from .inception import (
    FEATURE_DIM,
    INPUT_SIZE,
    WEIGHTS_NAME,
    FIDInceptionV3,
    inception_features,
    load_inception,
    preprocess,
)

__all__ = [
    "ClipScorer", "EvalItem", "EvalSet", "FEATURE_DIM", "FIDInceptionV3", "INPUT_SIZE", "MetricsError",
    "WEIGHTS_NAME", "bbox_mask",
    "feature_stats", "fid_from_features", "frechet_distance", "inception_features", "load_inception",
    "local_crop", "local_crop_box", "mask_bbox", "preprocess", "resize_uint8",
]
