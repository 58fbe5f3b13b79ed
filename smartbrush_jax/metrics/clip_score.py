"""CLIP score between images (e.g. Local-FID crops) and their prompts.

    score = 100 * max(cos(E_image, E_text), 0)

per image/prompt pair: the formula of torchmetrics' `CLIPScore` docs (torchmetrics itself clamps the
mean over a batch rather than each pair; per-pair scores here can be averaged by the caller).
Embeddings are CLIP's projected image and text embeddings from a transformers `CLIPModel`,
read from a local folder only (never a hub). Images go through the folder's image processor
(the PIL backend, so numbers do not depend on whether torchvision is installed); prompts
longer than the text model's context are truncated.
"""

from __future__ import annotations

import json
import os
from typing import List, Sequence, Union

import numpy as np
import torch

from .errors import MetricsError

HINT = ("pass --clip DIR, a local folder holding a transformers CLIP model "
        "(config.json, model weights, tokenizer files and preprocessor_config.json)")


def _embeds(out) -> torch.Tensor:
    """`get_*_features` returns a tensor in transformers 4 and a ModelOutput (pooler_output) in 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    """CLIP scores of image/prompt pairs with the CLIP model in `folder` (loaded on `device`, float32)."""

    def __init__(self, folder: str, device: Union[str, torch.device] = "cpu", batch_size: int = 32):
        if not folder or not os.path.isdir(folder):
            raise MetricsError(f"CLIP model folder not found{f': {folder}' if folder else ''}; {HINT}")
        config_path = os.path.join(folder, "config.json")
        try:
            with open(config_path) as f:
                model_type = json.load(f).get("model_type")
        except (OSError, ValueError) as e:
            raise MetricsError(f"{folder} has no readable config.json ({e}); {HINT}") from e
        if model_type != "clip":
            raise MetricsError(f"{folder} holds a {model_type!r} model, not a CLIP model; {HINT}")
        import transformers
        from transformers import CLIPModel, CLIPTokenizer

        processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
            self.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
            self.image_processor = processor_cls.from_pretrained(folder, local_files_only=True)
        except Exception as e:  # missing weights / tokenizer / preprocessor files, corrupt files
            raise MetricsError(f"cannot load the CLIP model in {folder}: {e}; {HINT}") from e
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Unit-norm projected image embeddings [N,P] of uint8 RGB [H,W,3] images."""
        pixels = self.image_processor(images=list(images), return_tensors="pt",
                                      input_data_format="channels_last")["pixel_values"]
        emb = _embeds(self.model.get_image_features(pixel_values=pixels.to(self.device, torch.float32)))
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm projected text embeddings [N,P] of prompts (truncated to the model's context)."""
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        emb = _embeds(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                   attention_mask=tok["attention_mask"].to(self.device)))
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    def cosine(self, images, prompts: Sequence[str]) -> np.ndarray:
        """Cosine similarity [N] (float64) of each image with its prompt, unclamped."""
        imgs = _image_list(images)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(imgs) != len(prompts):
            raise MetricsError(f"{len(imgs)} images but {len(prompts)} prompts")
        out = [np.zeros(0)]
        for s in range(0, len(imgs), self.batch_size):
            e_img = self.image_embeddings(imgs[s:s + self.batch_size])
            e_txt = self.text_embeddings(prompts[s:s + self.batch_size])
            out.append((e_img * e_txt).sum(-1).double().cpu().numpy())
        return np.concatenate(out)

    def __call__(self, images, prompts: Sequence[str]) -> np.ndarray:
        """CLIP scores [N] (float64): 100 * max(cosine, 0) for each image/prompt pair."""
        return 100.0 * np.maximum(self.cosine(images, prompts), 0.0)


def _image_list(images) -> List[np.ndarray]:
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = images[None]
    imgs = [np.asarray(img) for img in images]
    for img in imgs:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
            raise MetricsError(f"images must be uint8 [H,W,3] RGB, got {img.dtype} {img.shape}")
    return imgs
