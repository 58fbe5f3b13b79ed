"""The one bounding-box type of the project: pixels, ends exclusive, in the order of
COCO's and PIL's boxes (x before y). Numpy only."""

from __future__ import annotations

from typing import NamedTuple, Tuple

import numpy as np


class Box(NamedTuple):
    x0: int
    y0: int
    x1: int  # exclusive
    y1: int  # exclusive

    @classmethod
    def of_mask(cls, mask) -> "Box":
        """The box of a mask's nonzero pixels; ValueError for an empty mask."""
        m = np.asarray(mask).astype(bool)
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        if rows.size == 0:
            raise ValueError("empty mask: it has no bounding box")
        return cls(int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def slices(self) -> Tuple[slice, slice]:
        """(rows, columns) to index an [H, W, ...] array with."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    def mask(self, shape) -> np.ndarray:
        """A bool [H, W] mask that is True over the box."""
        out = np.zeros(shape[:2], bool)
        out[self.slices()] = True
        return out
