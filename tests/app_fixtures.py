"""The web app served in this test process on a free port, on the tiny random SD folder
(tests/sd_fixtures.py), with a spy on the `Inpainter` that records the region each request
handed to the model (what the browser drew reaches the server only as layers)."""

import contextlib
import os
import socket

import numpy as np
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network from tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Spy:
    """Wraps an Inpainter: each call's image and mask are kept in `calls`."""

    def __init__(self, inpainter):
        self.inner, self.calls = inpainter, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, image, mask, *args, **kwargs):
        self.calls.append((np.array(image), np.array(mask)))
        return self.inner(image, mask, *args, **kwargs)


@contextlib.contextmanager
def serve(sd_path: str, steps: int = 3):
    from smartbrush_jax.app.page import InpaintService, build_page
    from smartbrush_jax.sampling.runner import Inpainter
    from smartbrush_jax.settings import SamplerConfig

    spy = Spy(Inpainter.load(sd_path))
    service = InpaintService(spy, SamplerConfig(num_steps=steps), resolution=64)
    page = build_page(service)
    page.queue(default_concurrency_limit=1)
    port = free_port()
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                max_file_size="8mb")
    try:
        yield f"http://127.0.0.1:{port}/", spy
    finally:
        page.close()


def scene(path, h: int = 48, w: int = 64) -> np.ndarray:
    """A random RGB image saved as PNG at `path`."""
    img = (np.random.default_rng(0).uniform(size=(h, w, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(path)
    return img


def layer(path, region: np.ndarray) -> None:
    """A brush layer as the editor sends it: RGBA, opaque magenta where painted."""
    rgba = np.zeros(region.shape + (4,), np.uint8)
    rgba[region] = (255, 0, 255, 255)
    Image.fromarray(rgba).save(path)
