"""What the U-Net is conditioned on, for every base-model family, in one place: the
trainer's step, its held-out grids and the inpainter all go through here.

    enc = TextEncoders(text, text2, eos, pad2)     # text2...: SDXL's second encoder
    context = enc(params, tokens, micro)           # params: {"text": ..., "text2": ...}
    out = unet_apply(unet, unet_params, x, t, context, levels)

SD v1 and 2.x: `context` is the text encoder's last hidden state [B, 77, D] (an array).
SDXL: a dict, as diffusers' SDXL pipeline conditions its U-Net:
    hidden  [B, 77, D1 + D2]  both encoders' penultimate hidden states, concatenated
    pooled  [B, P]            the second encoder's projected pooled output
    micro   [B, 6]            original size (h, w), crop top-left (y, x), target size (h, w)
Either way a pytree whose leaves have the batch first, so the sampler joins conditional and
unconditional contexts leaf by leaf.

Tokens: SDXL's two tokenizers share one vocabulary and differ in their padding (the first
pads with EOS, the second with "!"): the batch carries the first's ids and the second's
are those with everything after the first EOS replaced by its pad id (`repad`), exactly
what the second tokenizer gives (checked at load: `check_same_vocabulary`).

Micro-conditioning from a training crop (`crop_micro`): the pipeline takes a square
(x0, y0, side) from an image of h x w and resizes it to r; that is the image scaled by
r / side with an r x r window cut at (y0, x0) * r / side, so the crop top-left is recorded
in that scaled frame (as SDXL's training scripts record theirs, after their resize), the
original size is the source image's (h, w) and the target size (r, r). At inference
(`plain_micro`) original = target = the working size and the crop is (0, 0), diffusers'
defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

MICRO = 6  # numbers of SDXL's micro-conditioning


def crop_micro(h: int, w: int, x0: int, y0: int, side: int, r: int) -> np.ndarray:
    """[6] int32: (h, w, crop top, crop left, r, r) for a square crop resized to r."""
    scale = r / side
    return np.array([h, w, round(y0 * scale), round(x0 * scale), r, r], np.int32)


def plain_micro(h: int, w: int) -> np.ndarray:
    """[6] int32 for generating at h x w: no crop, original size = target size."""
    return np.array([h, w, 0, 0, h, w], np.int32)


def repad(tokens: jax.Array, eos_id: int, pad_id: int) -> jax.Array:
    """Token ids [B, T] with every position after the first EOS set to `pad_id`."""
    first = jnp.argmax(tokens == eos_id, axis=-1)[:, None]
    return jnp.where(jnp.arange(tokens.shape[-1])[None] > first, pad_id, tokens)


def check_same_vocabulary(tokenizer, tokenizer_2, where: str) -> None:
    """SDXL's second tokenizer must be the first with another pad token (see module doc)."""
    from smartbrush_jax.errors import InputError

    if tokenizer.get_vocab() != tokenizer_2.get_vocab():
        raise InputError(f"{where}: tokenizer_2's vocabulary differs from tokenizer's; SmartBrush tokenizes once "
                         "and re-pads for the second encoder, as SDXL's two CLIP tokenizers allow")


@dataclasses.dataclass(frozen=True)
class TextEncoders:
    """The frozen text side of a family: one CLIP encoder (SD v1/2.x) or two (SDXL)."""

    text: Any  # models.CLIPTextModel
    text2: Any = None  # SDXL's projected second encoder
    eos: Optional[int] = None  # the tokenizer's EOS id (configs may say the legacy 2)
    pad2: Optional[int] = None  # the second tokenizer's pad id

    @property
    def micro_conditioning(self) -> bool:
        return self.text2 is not None

    def __call__(self, params, tokens: jax.Array, micro: Optional[jax.Array] = None):
        if self.text2 is None:
            return self.text.apply({"params": params["text"]}, tokens)[0]
        if micro is None:
            raise ValueError("SDXL conditioning needs the micro-conditioning numbers [B, 6]")
        _, _, h1 = self.text.apply({"params": params["text"]}, tokens, penultimate=True)
        tokens2 = repad(tokens, self.eos, self.pad2)
        _, pooled, h2 = self.text2.apply({"params": params["text2"]}, tokens2, penultimate=True)
        return {"hidden": jnp.concatenate([h1, h2.astype(h1.dtype)], axis=-1), "pooled": pooled,
                "micro": jnp.broadcast_to(jnp.asarray(micro, jnp.float32), (tokens.shape[0], MICRO))}


def text_encoders(sd, where: str, dtype=jnp.float32, attention_impl=None) -> TextEncoders:
    """The text encoders of a loaded model (`interop.loader.StableDiffusion`): SDXL's two
    when its U-Net takes micro-conditioning, or an InputError saying what is missing."""
    from smartbrush_jax.errors import InputError
    from smartbrush_jax.models.clip_text import CLIPTextModel

    text = CLIPTextModel(sd.text_config, dtype=dtype, attention_impl=attention_impl)
    if not sd.unet_config.micro_conditioning:
        return TextEncoders(text)
    if sd.text2_config is None or sd.tokenizer_2 is None or sd.tokenizer is None:
        raise InputError(f"{where}: an SDXL U-Net (micro-conditioning) needs both text encoders and tokenizers "
                         "(text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/ of a diffusers SDXL folder)")
    check_same_vocabulary(sd.tokenizer, sd.tokenizer_2, where)
    width = sd.text_config.hidden_size + sd.text2_config.hidden_size
    if width != sd.unet_config.cross_attention_dim or not sd.text2_config.projection_dim:
        raise InputError(f"{where}: the text encoders ({sd.text_config.hidden_size} + {sd.text2_config.hidden_size} "
                         f"wide, projection {sd.text2_config.projection_dim}) do not fit the SDXL U-Net's "
                         f"{sd.unet_config.cross_attention_dim}-wide context")
    return TextEncoders(text, CLIPTextModel(sd.text2_config, dtype=dtype, attention_impl=attention_impl),
                        int(sd.tokenizer.eos_token_id), int(sd.tokenizer_2.pad_token_id))


def unet_apply(unet, params, x, t, context, levels):
    """The U-Net on a context from `TextEncoders` (an array, or SDXL's dict)."""
    if isinstance(context, dict):
        return unet.apply({"params": params}, x, t, context["hidden"], levels, context["pooled"], context["micro"])
    return unet.apply({"params": params}, x, t, context, levels)
