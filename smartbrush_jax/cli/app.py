"""`python -m smartbrush_jax.app` (or `smartbrush-app`, `make app`): the inpainting web app.

    python -m smartbrush_jax.app --checkpoint runs/demo            # http://127.0.0.1:7860
    python -m smartbrush_jax.app --checkpoint /models/smartbrush --port 8080

`--checkpoint` takes what `inpaint` takes (a training workdir, a SmartBrush export, an SD
folder, or a single file with `--tokenizer`); without it, `runs/demo` when `make demo` has
made it. The server listens on 127.0.0.1 only: other machines cannot reach it. `--host
0.0.0.0` opens it to your network and `--share` to the internet through a Gradio tunnel;
anyone who can reach it can run the model and upload images to this machine. Bad input
(a checkpoint that does not load, a port in use) exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from smartbrush_jax.errors import InputError, run_command, warn
from smartbrush_jax.sampling.solvers import SAMPLERS

DEMO_RUN = "runs/demo"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smartbrush-app", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help=f"model to serve (default: {DEMO_RUN}, what `make demo` trains)")
    p.add_argument("--tokenizer", help="tokenizer folder, for a single-file checkpoint")
    p.add_argument("--ema", choices=("auto", "ema", "raw"), default="auto", help="for a -full-ema single file")
    p.add_argument("--levels", type=int, default=10, help="precision levels given to a plain SD checkpoint")
    p.add_argument("--resolution", type=int, default=None,
                   help="longest side the model runs at (default: the size it was trained at, 512 for plain SD)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also publish a public gradio.live link (a tunnel)")
    p.add_argument("--examples", type=int, default=4, help="held-out demo scenes offered as examples")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="ddim, dpm++2m, euler or euler_a (default: the run's, else ddim)")
    p.add_argument("--karras", action="store_true", help="Karras sigmas (dpm++2m and euler)")
    p.add_argument("--steps", type=int, default=None, help="the page's default steps (default: the run's, else 50)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: serve(args))


def load_service(args):
    """The `InpaintService` for `args`; InputError when no model can be had."""
    from smartbrush_jax import storage
    from smartbrush_jax.app.page import InpaintService, heldout_examples
    from smartbrush_jax.checkpoints import read_model_config
    from smartbrush_jax.interop.loader import ema_choice
    from smartbrush_jax.sampling.runner import Inpainter
    from smartbrush_jax.settings import SamplerConfig

    path = args.checkpoint
    if path is None:
        if not os.path.isfile(os.path.join(DEMO_RUN, "model.json")):
            raise InputError(f"no --checkpoint and no {DEMO_RUN}: run `make demo` (trains a small model on "
                             "synthetic shapes in a few minutes) or pass --checkpoint (a training workdir, a "
                             "SmartBrush export or a Stable Diffusion folder)")
        path = DEMO_RUN
    if not storage.exists(path):
        raise InputError(f"--checkpoint {path}: no such file or folder")
    if storage.isfile(path) and args.tokenizer is None:
        raise InputError("a single-file checkpoint holds no tokenizer: pass --tokenizer DIR")
    if (args.resolution is not None and args.resolution < 8) or args.levels < 1:
        raise InputError("--resolution must be >= 8 and --levels >= 1")
    if args.steps is not None and args.steps < 1:  # the page refuses such steps: every request would fail
        raise InputError(f"--steps must be >= 1, got {args.steps}")
    inpainter = Inpainter.load(path, args.tokenizer, args.levels, ema_choice(args.ema), warn=warn)
    run = {}
    if storage.isfile(storage.join(path, "model.json")):  # a training run: its own sampler settings
        run = read_model_config(path).get("sampler", {})
    d = SamplerConfig()
    try:
        sampler = SamplerConfig(sampler=args.sampler or run.get("sampler", d.sampler), karras=args.karras,
                                num_steps=args.steps if args.steps is not None else run.get("num_steps", d.num_steps),
                                guidance_scale=run.get("guidance_scale", d.guidance_scale))
    except ValueError as e:
        raise InputError(f"--sampler/--karras/--steps: {e}") from None
    inpainter.check_sampler(sampler, "--steps")  # no more steps than the model's schedule has
    examples = heldout_examples(path, args.examples, inpainter.num_levels)
    return InpaintService(inpainter, sampler, args.resolution, examples)


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def serve(args) -> int:
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be in 1..65535, got {args.port}")
    if not port_free(args.host, args.port):
        raise InputError(f"--port {args.port}: {args.host}:{args.port} is in use (another app?); pick another port")
    service = load_service(args)
    from smartbrush_jax.app.page import build_page

    page = build_page(service)
    if args.host not in ("127.0.0.1", "localhost", "::1") or args.share:
        print(f"warning: serving beyond this machine ({args.host}{', public share link' if args.share else ''}): "
              "anyone who reaches it can run the model and upload images", file=sys.stderr)
    page.queue(default_concurrency_limit=1, max_size=32)
    page.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size="32mb",
                show_error=True, quiet=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
