"""The FID Inception-v3 network (TensorFlow's 2015-12-05 graph) and a feature extractor on top of it.

This is the network that FID numbers are quoted with (pytorch-fid, torchmetrics, torch-fidelity).
It differs from the ImageNet Inception-v3 of torchvision in three places, all kept here:
the average-pool branches do not count padding (TensorFlow's pooling), the last mixed block
pools its pool branch with a 3x3 max (stride 1, padding 1), and the classifier has 1008 outputs.

The parameter names and shapes are those of `pt_inception-2015-12-05-6726825d.pth` (the
pytorch-fid release file), so that file loads as it is. Blocks are built from tables below
rather than written out by hand: each branch is an optional pool followed by a chain of
conv+BN+ReLU units, the E blocks ending in two parallel units whose outputs are concatenated.

Features: uint8 RGB [N,H,W,3] -> [0,1] -> bilinear resize to 299x299 (align_corners=False,
no antialiasing) -> [-1,1] -> the 2048-d average-pooled output of the last mixed block.
This is pytorch-fid's input pipeline; torch-fidelity and torchmetrics resize with a
TensorFlow-1-style bilinear and scale as (x-128)/128, which gives slightly different features
for images that are not already 299x299.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import MetricsError

INPUT_SIZE = 299
FEATURE_DIM = 2048
WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"

Kernel = Union[int, Tuple[int, int]]
# A unit: (attribute name, output channels, kernel, stride). Mixed blocks pad stride-1 units to keep
# the size ("same") and leave stride-2 units unpadded ("valid").
Unit = Tuple[str, int, Kernel, int]


class ConvBN(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, as in the TF graph), ReLU."""

    def __init__(self, cin: int, cout: int, kernel: Kernel, stride: int = 1, padding: Kernel = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class Branch:
    """One branch of a mixed block: `pool` ("avg", "max", "max2" or None), a chain of units, a final fork."""

    def __init__(self, pool: Optional[str], units: Sequence[Unit], fork: Sequence[Unit] = ()):
        self.pool, self.units, self.fork = pool, list(units), list(fork)


def _pool(kind: str, x: torch.Tensor) -> torch.Tensor:
    if kind == "avg":  # TensorFlow's average pool ignores the padding
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    if kind == "max2":
        return F.max_pool2d(x, 3, stride=2)
    raise ValueError(kind)


class Mixed(nn.Module):
    """A mixed (Inception) block: branches run on the same input, outputs concatenated on channels."""

    def __init__(self, cin: int, branches: Sequence[Branch]):
        super().__init__()
        self.branches = list(branches)
        self.out_channels = 0
        for branch in self.branches:
            c = cin
            for unit in branch.units:
                self._add(unit, c)
                c = unit[1]
            for unit in branch.fork:  # parallel units on the chain's output
                self._add(unit, c)
            self.out_channels += sum(u[1] for u in branch.fork) if branch.fork else c

    def _add(self, unit: Unit, cin: int) -> None:
        name, cout, kernel, stride = unit
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.add_module(name, ConvBN(cin, cout, (kh, kw), stride, (kh // 2, kw // 2) if stride == 1 else 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs: List[torch.Tensor] = []
        for branch in self.branches:
            y = _pool(branch.pool, x) if branch.pool else x
            for name, *_ in branch.units:
                y = getattr(self, name)(y)
            if branch.fork:
                outs.extend(getattr(self, name)(y) for name, *_ in branch.fork)
            else:
                outs.append(y)
        return torch.cat(outs, 1)


def block_a(pool_features: int) -> List[Branch]:
    return [Branch(None, [("branch1x1", 64, 1, 1)]),
            Branch(None, [("branch5x5_1", 48, 1, 1), ("branch5x5_2", 64, 5, 1)]),
            Branch(None, [("branch3x3dbl_1", 64, 1, 1), ("branch3x3dbl_2", 96, 3, 1), ("branch3x3dbl_3", 96, 3, 1)]),
            Branch("avg", [("branch_pool", pool_features, 1, 1)])]


def block_b() -> List[Branch]:
    return [Branch(None, [("branch3x3", 384, 3, 2)]),
            Branch(None, [("branch3x3dbl_1", 64, 1, 1), ("branch3x3dbl_2", 96, 3, 1), ("branch3x3dbl_3", 96, 3, 2)]),
            Branch("max2", [])]


def block_c(c7: int) -> List[Branch]:
    row, col = (1, 7), (7, 1)
    return [Branch(None, [("branch1x1", 192, 1, 1)]),
            Branch(None, [("branch7x7_1", c7, 1, 1), ("branch7x7_2", c7, row, 1), ("branch7x7_3", 192, col, 1)]),
            Branch(None, [("branch7x7dbl_1", c7, 1, 1), ("branch7x7dbl_2", c7, col, 1), ("branch7x7dbl_3", c7, row, 1),
                          ("branch7x7dbl_4", c7, col, 1), ("branch7x7dbl_5", 192, row, 1)]),
            Branch("avg", [("branch_pool", 192, 1, 1)])]


def block_d() -> List[Branch]:
    return [Branch(None, [("branch3x3_1", 192, 1, 1), ("branch3x3_2", 320, 3, 2)]),
            Branch(None, [("branch7x7x3_1", 192, 1, 1), ("branch7x7x3_2", 192, (1, 7), 1),
                          ("branch7x7x3_3", 192, (7, 1), 1), ("branch7x7x3_4", 192, 3, 2)]),
            Branch("max2", [])]


def block_e(pool: str) -> List[Branch]:
    return [Branch(None, [("branch1x1", 320, 1, 1)]),
            Branch(None, [("branch3x3_1", 384, 1, 1)], fork=[("branch3x3_2a", 384, (1, 3), 1),
                                                            ("branch3x3_2b", 384, (3, 1), 1)]),
            Branch(None, [("branch3x3dbl_1", 448, 1, 1), ("branch3x3dbl_2", 384, 3, 1)],
                   fork=[("branch3x3dbl_3a", 384, (1, 3), 1), ("branch3x3dbl_3b", 384, (3, 1), 1)]),
            Branch(pool, [("branch_pool", 192, 1, 1)])]


class FIDInceptionV3(nn.Module):
    """FID Inception-v3. `forward` takes [N,3,299,299] floats in [-1,1] and returns [N,2048] pool features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        c = 192
        plan = [("Mixed_5b", block_a(32)), ("Mixed_5c", block_a(64)), ("Mixed_5d", block_a(64)),
                ("Mixed_6a", block_b()), ("Mixed_6b", block_c(128)), ("Mixed_6c", block_c(160)),
                ("Mixed_6d", block_c(160)), ("Mixed_6e", block_c(192)),
                ("Mixed_7a", block_d()), ("Mixed_7b", block_e("avg")), ("Mixed_7c", block_e("max"))]
        self.mixed_names = [name for name, _ in plan]
        for name, branches in plan:
            block = Mixed(c, branches)
            self.add_module(name, block)
            c = block.out_channels
        assert c == FEATURE_DIM
        self.fc = nn.Linear(FEATURE_DIM, 1008)  # unused for features; kept so the weight file loads whole

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in self.mixed_names:
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))


def _read_state_dict(path: str) -> dict:
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as e:  # SafetensorError, a truncated header, ...
            raise MetricsError(f"cannot read Inception weights {path}: not a readable safetensors file ({e})") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-tensor objects
        raise MetricsError(f"cannot read Inception weights {path}: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MetricsError(f"{path} is not a state dict of tensors (expected the FID Inception file {WEIGHTS_NAME})")
    return state


def _listing(names: Sequence[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_inception(path: Optional[str], device: Union[str, torch.device] = "cpu") -> FIDInceptionV3:
    """The FID Inception from `path` (.pth via torch.load(weights_only=True), or .safetensors), in eval mode.

    Every parameter and buffer must be present with its exact shape (BatchNorm's
    `num_batches_tracked` may be absent); any missing, unexpected or mis-shaped key is a MetricsError.
    """
    hint = f"pass --inception PATH to {WEIGHTS_NAME} (the FID Inception-v3 weights of pytorch-fid)"
    if not path or not os.path.isfile(path):
        raise MetricsError(f"Inception weights not found{f' at {path}' if path else ''}: {hint}")
    state = _read_state_dict(path)
    model = FIDInceptionV3()
    expected = {k: v.shape for k, v in model.state_dict().items()}
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})"
              for k in expected if k in state and state[k].shape != expected[k]]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing: {_listing(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected: {_listing(unexpected)}" if unexpected else "",
                 f"{len(shapes)} mis-shaped: {_listing(shapes)}" if shapes else ""]
        raise MetricsError(f"{path} does not hold the FID Inception-v3 weights ({'; '.join(p for p in parts if p)}); "
                           f"{hint}")
    model.load_state_dict(state, strict=False)
    return model.to(device).eval().requires_grad_(False)


Images = Union[np.ndarray, Sequence[np.ndarray]]


def preprocess(images: Images, size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 RGB images ([N,H,W,3] array or a list of [H,W,3], sizes may differ) -> [N,3,size,size] in [-1,1]."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        groups = [images]
    else:
        groups = [img[None] for img in images]
    out = []
    for group in groups:
        if group.dtype != np.uint8 or group.ndim != 4 or group.shape[-1] != 3:
            raise MetricsError(f"images must be uint8 [N,H,W,3] RGB, got {group.dtype} {group.shape}")
        x = torch.from_numpy(np.ascontiguousarray(group)).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        out.append(2.0 * x - 1.0)
    if not out:
        return torch.zeros((0, 3, size, size))
    return torch.cat(out)


@torch.no_grad()
def inception_features(model: FIDInceptionV3, images: Images, batch_size: int = 50) -> np.ndarray:
    """2048-d FID features (float64 [N,2048]) of uint8 RGB images, computed `batch_size` at a time."""
    if batch_size < 1:
        raise MetricsError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    device = next(model.parameters()).device
    n = len(images)
    feats = [np.zeros((0, FEATURE_DIM))]
    for start in range(0, n, batch_size):
        x = preprocess(images[start:start + batch_size]).to(device)
        feats.append(model(x).double().cpu().numpy())
    return np.concatenate(feats)
