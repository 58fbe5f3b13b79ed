"""The inpainting web page (Gradio): upload an image, paint the region (or let its bounding
box be the region), type the object, choose how closely it follows the shape, run, and see
the result, the mask the model predicted and the region as it was understood.

    from smartbrush_jax.app.page import InpaintService, build_page
    page = build_page(InpaintService(Inpainter.load("runs/demo")))
    page.queue(default_concurrency_limit=1).launch(server_name="127.0.0.1")

`InpaintService.run` is the one request: it reads the editor's layers itself (with the
`inpaint` command's reader and size limit, `images.py`: the header first, nothing decoded
over the limit), runs the `Inpainter` the CLI runs
(its sampler compiled once per working size and reused), and turns every bad input into
an `InputError` whose message the page shows; the server goes on. The command is
`cli/app.py` (`python -m smartbrush_jax.app`).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
from typing import Callable, List, Optional, Sequence

import numpy as np
from PIL import Image

from smartbrush_jax import images
from smartbrush_jax.box import Box
from smartbrush_jax.compositing import outline, outlined
from smartbrush_jax.errors import InputError
from smartbrush_jax.settings import SamplerConfig

REGIONS = ("as drawn", "box around the drawing")


@dataclasses.dataclass
class Outputs:
    results: List[np.ndarray]  # [H, W, 3] uint8 each, the input's size
    predicted: np.ndarray  # the first result with the predicted mask tinted over it
    region: np.ndarray  # the input with the region the model was given outlined in red


def _header(path: Optional[str], what: str) -> Image.Image:
    """The upload at `path`, opened but not decoded (`images.open_checked`: the `inpaint`
    command's reader and limit), so its size is checked before any pixel is decoded."""
    if not path:
        raise InputError(f"no {what}: upload an image first")
    return images.open_checked(path, f"the {what}")


def _open(path: Optional[str], what: str) -> Image.Image:
    """The upload at `path`, decoded and upright (after `_header`'s checks)."""
    if not path:
        raise InputError(f"no {what}: upload an image first")
    return images.decoded(path, f"the {what}")


def _path(v) -> Optional[str]:
    """A file path from what Gradio passes for an image (a path, or a FileData-like dict)."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, dict):
        return v.get("path")
    return getattr(v, "path", None)


def read_editor(value) -> tuple[np.ndarray, np.ndarray]:
    """(image [H,W,3] uint8, mask [H,W] bool) from an ImageEditor value with file paths:
    the background is the image, every painted pixel of any layer is the region."""
    if not value or not _path(value.get("background")):
        raise InputError("no image: upload an image first")
    image = images.to_rgb(_open(_path(value["background"]), "image"))  # 16-bit scaled, as the CLI reads it
    mask = np.zeros(image.shape[:2], bool)
    for layer in value.get("layers") or []:
        im = _open(_path(layer), "mask layer")
        if im.size != (image.shape[1], image.shape[0]):
            im = im.resize((image.shape[1], image.shape[0]), Image.NEAREST)
        alpha = np.asarray(im.convert("RGBA"))[..., 3]
        mask |= alpha > 0
    return image, mask


class InpaintService:
    """Requests against one loaded model, one at a time (the page's queue runs one; the lock
    keeps it so for any other caller)."""

    def __init__(self, inpainter, sampler: SamplerConfig = SamplerConfig(), resolution: Optional[int] = None,
                 examples: Sequence[dict] = ()):
        self.inpainter = inpainter
        self.sampler = sampler
        self.resolution = resolution or getattr(inpainter, "resolution", 512)  # default: the trained size
        self.examples = list(examples)
        self._lock = threading.Lock()

    @property
    def num_levels(self) -> int:
        return self.inpainter.num_levels

    def run(self, editor, prompt: str, negative_prompt: str = "", precision: float = 0, region: str = REGIONS[0],
            steps: float = 0, guidance: float = 0, seed: float = 0, num_samples: float = 1,
            progress: Optional[Callable[[int, int], None]] = None) -> Outputs:
        image, mask = read_editor(editor)
        if not mask.any():
            raise InputError("no region: paint over the part of the image to fill (the brush), then run")
        if region not in REGIONS:
            raise InputError(f"region must be one of {REGIONS}, got {region!r}")
        if region == REGIONS[1]:
            mask = Box.of_mask(mask).mask(mask.shape)
        if not (prompt or "").strip():
            raise InputError("no prompt: type the object to paint, e.g. \"a flamingo\"")
        precision, steps, seed, n = _integer(precision, "precision"), _integer(steps or self.sampler.num_steps,
                                                                                "steps"), \
            _integer(seed, "seed"), _integer(num_samples, "number of samples")
        if not 0 <= precision <= self.num_levels:
            raise InputError(f"precision must be between 0 (exact shape) and {self.num_levels} (box only) for "
                             f"this model, got {precision}")
        from smartbrush_jax.sampling.runner import MAX_SEED

        if not 0 <= seed <= MAX_SEED:
            raise InputError(f"seed must be in [0, {MAX_SEED}], got {seed}")
        top = getattr(self.inpainter, "num_train_timesteps", 1000)  # the model's schedule has that many
        if not 1 <= steps <= top or not 1 <= n <= 8:
            raise InputError(f"steps must be in [1, {top}] and samples in [1, 8], got {steps} and {n}")
        try:
            sampler = dataclasses.replace(self.sampler, num_steps=steps,
                                          guidance_scale=float(guidance or self.sampler.guidance_scale))
        except ValueError as e:
            raise InputError(str(e)) from None
        with self._lock:
            result = self.inpainter(image, mask, prompt.strip(), (negative_prompt or "").strip(), precision, seed, n,
                                    sampler, min(self.resolution, max(image.shape[:2])),
                                    progress=None if progress is None else (lambda i: progress(i + 1, steps)))
        return Outputs(list(result.images), tint(result.images[0], result.predicted_masks[0]),
                       outlined(image, mask))


def _integer(v, name: str) -> int:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {v!r}") from None
    if not np.isfinite(f) or f != int(f):
        raise InputError(f"{name} must be a whole number, got {v!r}")
    return int(f)


def tint(image: np.ndarray, mask: np.ndarray, colour=(0, 200, 255)) -> np.ndarray:
    """The predicted mask as a translucent colour over the image, its border solid."""
    out = image.astype(np.float32)
    out[mask] = 0.5 * out[mask] + 0.5 * np.asarray(colour, np.float32)
    out = out.astype(np.uint8)
    out[outline(mask, 1)] = colour
    return out


PRECISION_HELP = ("**Shape precision** s: how closely the object follows the region's shape. "
                  "0 = exactly the painted shape; higher = the shape is only a rough hint; "
                  "the top level = the region is just a box, any shape inside it. The model also predicts the "
                  "object's own mask (shown below); pixels outside your region are never changed.")


def _checked(preprocess):
    """The editor's own preprocessing (Gradio decodes every upload and writes it as PNG)
    behind our checks: each file's header is read first, nothing decoded (the size limit
    before any pixel is), and any failure becomes a message on the page instead of
    Gradio's generic one. `read_editor` then decodes what Gradio wrote, once."""
    import gradio as gr

    def run(payload):
        if payload is not None:
            files = [payload.background, payload.composite, *(payload.layers or [])]
            try:
                for f in files:
                    if _path(f):
                        _header(_path(f), "image").close()
                        images.check_complete(_path(f), "the image")  # Gradio's decoder fills what is missing
            except InputError as e:
                raise gr.Error(str(e), print_exception=False) from None
        try:
            return preprocess(payload)
        except Exception as e:  # noqa: BLE001 - anything the decoder raises is a bad upload
            raise gr.Error(f"cannot read the image ({type(e).__name__}): upload a PNG, JPEG or WEBP image",
                           print_exception=False) from None

    return run


def _number(preprocess, name: str):
    """A Number's preprocessing with a message for what it cannot round: its API takes the
    JSON tokens NaN and Infinity, on which Gradio's own rounding raised a bare ValueError
    (the client got `{"error": null}`)."""
    import gradio as gr

    def run(payload):
        try:
            return preprocess(payload)
        except (ValueError, TypeError, OverflowError):
            raise gr.Error(f"{name} must be a whole number, got {payload!r}", print_exception=False) from None

    return run


def build_page(service: InpaintService, title: str = "SmartBrush inpainting"):
    """The Gradio Blocks page; its one endpoint is `/inpaint` (also for gradio_client)."""
    import gradio as gr

    d = service.sampler

    def handle(editor, prompt, negative, precision, region, steps, guidance, seed, samples,
               progress=gr.Progress()):
        progress(0, desc="encoding")
        try:
            out = service.run(editor, prompt, negative, precision, region, steps, guidance, seed, samples,
                              progress=lambda i, n: progress((i, n), desc="sampling", unit="steps"))
        except InputError as e:
            raise gr.Error(str(e), print_exception=False) from None
        return out.results, out.predicted, out.region

    with gr.Blocks(title=title) as page:
        gr.Markdown(f"# {title}\nUpload an image, paint the region to fill, describe the object, and run.")
        with gr.Row():
            with gr.Column():
                editor = gr.ImageEditor(label="image and region (paint with the brush)", type="filepath",
                                        sources=("upload", "clipboard"), layers=False, elem_id="editor",
                                        brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed", default_size=24),
                                        transforms=(), format="png")
                region = gr.Radio(list(REGIONS), value=REGIONS[0], label="region",
                                  info="the painted pixels, or the box around them (draw a stroke along the "
                                       "diagonal of the box you want)", elem_id="region")
                prompt = gr.Textbox(label="prompt", placeholder="a flamingo", elem_id="prompt")
                negative = gr.Textbox(label="negative prompt", placeholder="what to steer away from")
                precision = gr.Slider(0, service.num_levels, value=0, step=1, label="shape precision",
                                      info=f"0 = exact shape ... {service.num_levels} = box only",
                                      elem_id="precision")
                gr.Markdown(PRECISION_HELP)
                with gr.Accordion("advanced", open=False):
                    steps = gr.Slider(1, 200, value=d.num_steps, step=1,
                                      label=f"{d.sampler}{' Karras' if d.karras else ''} steps")
                    guidance = gr.Slider(0, 20, value=d.guidance_scale, step=0.5, label="guidance scale")
                    seed = gr.Number(value=0, precision=0, label="seed")
                    samples = gr.Slider(1, 8, value=1, step=1, label="number of samples")
                run = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column():
                results = gr.Gallery(label="result (download: PNG)", format="png", elem_id="results",
                                     columns=2, object_fit="contain")
                with gr.Row():
                    predicted = gr.Image(label="predicted object mask over the result", format="png",
                                         elem_id="predicted", height=240)
                    shown = gr.Image(label="your region (red outline)", format="png", elem_id="region_view",
                                     height=240)
        editor.preprocess = _checked(editor.preprocess)
        seed.preprocess = _number(seed.preprocess, "seed")
        inputs = [editor, prompt, negative, precision, region, steps, guidance, seed, samples]
        run.click(handle, inputs, [results, predicted, shown], api_name="inpaint")
        if service.examples:
            gr.Examples([[e["editor"], e["prompt"], e["precision"]] for e in service.examples],
                        [editor, prompt, precision], label="held-out demo scenes")
    return page


def heldout_examples(workdir: str, n: int, num_levels: int) -> list:
    """Up to `n` held-out scenes of a demo run as editor values (image + painted object),
    prompts asking for another colour, at a few precision levels; written to a new
    temporary folder of ours. Empty for anything else."""
    from smartbrush_jax.data.synthetic import has_heldout, heldout_scenes

    if n <= 0 or not has_heldout(workdir):
        return []
    out = tempfile.mkdtemp(prefix="smartbrush_app_examples_")
    levels = [0, num_levels // 2, num_levels]
    examples = []
    for k, (src, exact, prompt) in enumerate(heldout_scenes(workdir, n)):
        layer = np.zeros(exact.shape + (4,), np.uint8)
        layer[exact] = (255, 0, 255, 255)
        image_path, layer_path = os.path.join(out, f"scene{k}.png"), os.path.join(out, f"scene{k}_region.png")
        Image.open(src).convert("RGB").save(image_path)
        Image.fromarray(layer).save(layer_path)
        examples.append({"editor": {"background": image_path, "layers": [layer_path], "composite": None},
                         "prompt": prompt, "precision": levels[k % len(levels)]})
    return examples
