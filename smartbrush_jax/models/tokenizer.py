"""CLIP tokenizers: loading one from a local folder, and writing a small CLIP-format BPE
tokenizer for a closed vocabulary (the synthetic set's words).

CLIP's own vocabulary (49,408 tokens) ships with Stable Diffusion; a model trained from
scratch on the shapes set needs none of it. This writes `vocab.json` + `merges.txt` that
transformers' `CLIPTokenizer` loads: every byte, plus one token per word built by a chain
of merges, so each known word is one token and anything else still tokenizes.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, List

from transformers import CLIPTokenizer  # at import time: lazy imports from worker threads race


def load_tokenizer(path: str):
    """transformers' `CLIPTokenizer` from a local folder: vocab.json + merges.txt (what SD
    releases ship), or the tokenizer.json that transformers >= 5 alone writes."""
    from smartbrush_jax.errors import InputError

    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        for f in ("vocab.json", "merges.txt"):
            if not os.path.isfile(os.path.join(path, f)):
                raise InputError(f"{path}: tokenizer file {f} is missing (and there is no tokenizer.json)")
    return CLIPTokenizer.from_pretrained(path, local_files_only=True)


def byte_alphabet() -> List[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_word_tokenizer(folder: str, texts: Iterable[str], max_length: int = 77) -> int:
    """Write the tokenizer files; returns the vocabulary size."""
    os.makedirs(folder, exist_ok=True)
    chars = byte_alphabet()
    tokens = chars + [c + "</w>" for c in chars]
    known = set(tokens)
    merges = []
    words = sorted({w for t in texts for w in t.lower().split() if w.isascii() and w.isalpha()})
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merged = left + right
            if merged not in known:
                merges.append(f"{left} {right}")
                tokens.append(merged)
                known.add(merged)
            left = merged
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": max_length, "tokenizer_class": "CLIPTokenizer",
                   "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, f)
    return len(tokens)
