"""Tiny random evaluation models saved in their real on-disk formats."""

import torch


def write_tiny_clip(folder: str, words=("a red star", "the blue cat", "green square")):
    """A random transformers CLIPModel (32-px images) with tokenizer and image processor."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from smartbrush_jax.models.tokenizer import write_word_tokenizer

    vocab = write_word_tokenizer(folder, list(words))
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=dict(vocab_size=vocab, max_position_embeddings=77, bos_token_id=vocab - 2,
                                         eos_token_id=vocab - 1, pad_token_id=vocab - 1, **layers),
                        vision_config=dict(image_size=32, patch_size=8, **layers), projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return model


def random_inception_state(seed: int = 0):
    """Random FID-Inception weights in the standard layout, scaled (He) so activations
    neither vanish nor explode through the 94 conv layers."""
    import numpy as np

    from smartbrush_jax.metrics import FIDInceptionV3

    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in FIDInceptionV3().state_dict().items():
        shape = tuple(value.shape)
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith(("running_mean", "bn.bias")):
            state[key] = 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("bn.weight"):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[key] = torch.randn(shape, generator=g) * (2.0 / int(np.prod(shape[1:]))) ** 0.5
    return state
