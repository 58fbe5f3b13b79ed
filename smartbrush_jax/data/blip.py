"""BLIP captions of object crops, from a local model folder.

The paper alternates class labels with BLIP captions of the object. This runs
transformers' `BlipForConditionalGeneration` (with its `BlipProcessor`) from a folder on
disk over crops around each object's box, in batches of `batch_size`, on a CPU or a GPU
(`device="cuda:1"`, half precision there by default). `captioning.py` runs one of these
per GPU in its own process, fed by `prepare`'s workers.
"""

from __future__ import annotations

import os
from typing import List, Sequence

import numpy as np

from smartbrush_jax.errors import InputError


class BlipCaptioner:
    def __init__(self, model_dir: str, batch_size: int = 16, max_new_tokens: int = 30, margin: float = 0.1,
                 device: str = "cpu", dtype: str = "auto"):
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor

        if not os.path.isdir(model_dir):
            raise InputError(f"--blip-model {model_dir}: not a folder")
        self.device = torch.device(device)
        if dtype == "auto":
            dtype = "float16" if self.device.type == "cuda" else "float32"
        self.dtype = getattr(torch, dtype)
        try:
            self.processor = BlipProcessor.from_pretrained(model_dir, local_files_only=True)
            self.model = BlipForConditionalGeneration.from_pretrained(model_dir, local_files_only=True).eval()
        except (OSError, ValueError) as e:
            raise InputError(f"--blip-model {model_dir}: cannot load a BLIP captioning model ({e})") from None
        self.model.to(device=self.device, dtype=self.dtype)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.margin = margin

    def crop(self, image: np.ndarray, box: Sequence[float]) -> np.ndarray:
        return caption_crop(image, box, self.margin)

    def caption(self, crops: List[np.ndarray]) -> List[str]:
        import torch

        out = []
        for i in range(0, len(crops), self.batch_size):
            inputs = self.processor(images=list(crops[i:i + self.batch_size]), return_tensors="pt")
            inputs = {k: v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device)
                      for k, v in inputs.items()}
            with torch.inference_mode():
                ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
            out.extend(t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True))
        return out


def caption_crop(image: np.ndarray, box: Sequence[float], margin: float = 0.1) -> np.ndarray:
    """The object's box grown by `margin` of its size on each side, clipped to the image:
    what BLIP is shown."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = box
    mx, my = (x1 - x0) * margin, (y1 - y0) * margin
    x0, y0 = int(max(0, x0 - mx)), int(max(0, y0 - my))
    x1, y1 = int(min(w, x1 + mx + 0.999)), int(min(h, y1 + my + 0.999))
    return image[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
