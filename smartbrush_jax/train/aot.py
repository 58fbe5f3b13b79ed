"""Know before booking a pod: the SmartBrush train step compiled ahead of time for a TPU
slice, on any host (this CPU machine included), through the `libtpu` wheel.

    python -m smartbrush_jax.cli.aot --config=configs/tpu_v4.py --topology=v4-32
    python -m smartbrush_jax.cli.aot --config=configs/tpu_v5p.py --topology=2xv5p-128 --cached-latents
    python -m smartbrush_jax.cli.aot --config=configs/tpu_v4.py --topology=v4-32 --find-max-batch

The state, frozen models and batch are built as abstract arrays with their shardings by the
trainer's own code (`trainer.build_step(materialize=False)`, `trainer.abstract_batch`) on a
mesh of the slice's devices (`sharding.make_mesh`, laid out by the torus), the step is
lowered and compiled for the target, and the report (`xla.py`) gives the memory
per chip against its HBM, XLA's FLOPs against ours, the collectives by kind with their
bytes, and a step-time estimate labelled with how it was obtained. The weights' values do
not matter to a compile, so none are read: a run from SD weights compiles with SD v1's
shapes (`train_state.build_models(weights=False)`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, List, Optional

import jax
import numpy as np

from smartbrush_jax.planning import estimate, search, targets, xla

GIB = 2**30


def per_chip_batch(config, n_devices: int) -> int:
    return config.train.batch_size // n_devices


def with_batch(config, per_chip: int, n_devices: int):
    """A copy of `config` with the global batch `per_chip` x devices."""
    c = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") else config
    c.train.batch_size = per_chip * n_devices
    return c


@dataclasses.dataclass
class Compiled:
    compiled: object  # jax.stages.Compiled
    mesh: object
    models: object
    trainable_parameters: int  # elements of the trained parameters (the U-Net's)
    seconds: float  # to compile


def compile_step(config, devices, cached: bool = False, cached_text: bool = False) -> Compiled:
    """The train step compiled for `devices` (a slice's, or real ones)."""
    from smartbrush_jax.train import sharding
    from smartbrush_jax.train.step import abstract_batch, build_models, build_step

    models = build_models(config, weights=False)
    mesh = sharding.make_mesh(dict(config.mesh.shape), dict(config.mesh.dcn_shape), devices=devices)
    empty_tokens = np.zeros(77, np.int32)  # a constant of the step: its value does not change the program
    state, frozen, step_fn = build_step(config, models, mesh, empty_tokens, materialize=False)
    batch = abstract_batch(config, models, mesh, cached=cached, cached_text=cached_text)
    start = time.time()
    compiled = step_fn.lower(state, frozen, batch).compile()
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    return Compiled(compiled, mesh, models, n_params, time.time() - start)


def report(config, target: targets.Target, cached: bool = False, devices=None, cached_text: bool = False) -> dict:
    """Compile and report (see the module docstring); a compile that runs out of the chip's
    memory is a report with `"fits": False` and XLA's message."""

    devices = devices if devices is not None else target.devices()
    n = len(devices)
    head = {"topology": target.name, "topology_name": target.topology_name, "chips": n, "slices": target.slices,
            "chip": dataclasses.asdict(target.chip), "per_chip_batch": per_chip_batch(config, n),
            "global_batch": config.train.batch_size, "resolution": config.data.resolution,
            "vae_in_step": not cached and config.model.autoencoder != "identity", "cached_latents": cached,
            "text_in_step": not cached_text, "remat": config.model.remat, "attention": config.model.attention,
            "attention_resolved": attention_line(config, target), "splash_min_tokens": config.model.splash_min_tokens,
            "dtype": config.model.dtype, "mesh": dict(config.mesh.shape), "dcn": dict(config.mesh.dcn_shape),
            "fsdp": bool(config.mesh.fsdp), "fsdp_gather": config.mesh.fsdp_gather if config.mesh.fsdp else None,
            "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", "")}
    try:
        c = compile_step(config, devices, cached, cached_text)
    except Exception as e:  # XLA: RESOURCE_EXHAUSTED (out of HBM) is the answer "does not fit"
        if search.is_oom(e):
            return {**head, "fits": False, "compile_error": _first_lines(str(e), 6)}
        raise
    chip = target.chip
    r = compiled_report(c.compiled, config, c.models, estimate.spec_of_chip(chip), n, platform(target),
                        hbm_bytes=chip.hbm_gib * GIB)
    return {**head, **r, "fits": r["memory"].get("fits"), "compile_seconds": c.seconds,
            "trainable_parameters": c.trainable_parameters, "mesh_axes": dict(c.mesh.shape)}


def compiled_report(compiled, config, models, spec, devices: int, on: str, hbm_bytes=None) -> dict:
    """The report of a compiled train step with the package's one estimate: what
    `smartbrush-aot` prints for a slice and the trainer logs at start-up on real chips (the
    same inputs give the same figure). `on`: "tpu" (splash kernels counted) or another
    platform."""
    from smartbrush_jax.planning import flops

    per_chip = per_chip_batch(config, devices)
    latent = config.data.resolution // models.latent_factor
    analytic = flops.train_step_flops(flops.unet_forward_flops(models.unet.config, per_chip, latent, latent, 77))
    kernel = splash_flops(config, models, per_chip, latent) if on == "tpu" else None
    r = xla.step_report(compiled, analytic_flops=analytic, spec=spec, devices=devices, hbm_bytes=hbm_bytes,
                        kernel=kernel, per_chip_batch=per_chip)
    r["flops"]["analytic_note"] = "our count: the U-Net forward + backward (3x forward) only"
    return r


def attention_line(config, target) -> str:
    from smartbrush_jax.models.attention import describe

    return describe(config.model.attention, platform(target), config.model.splash_min_tokens)


def platform(target) -> str:
    return "gpu" if target.chip.topology == "cuda" else "tpu"


def splash_flops(config, models, per_chip: int, latent: int) -> Optional[dict]:
    """The analytic FLOPs of the splash kernels in a TPU step (None when the step has none):
    the attention choice resolved as `models.attention.choose` does on a TPU."""
    from smartbrush_jax.models.unet import KEEPS_ATTENTION
    from smartbrush_jax.planning import flops

    if config.model.attention not in ("auto", "splash"):
        return None
    recompute = config.model.remat not in KEEPS_ATTENTION
    threshold = config.model.splash_min_tokens
    k = flops.kernel_attention_flops(models.unet.config, per_chip, latent, latent, threshold, recompute)
    if not k["calls"]:
        return None
    note = (f"splash kernels ({k['calls']} self-attention calls of >= {threshold} tokens, {k['passes']:g} passes, "
            "head dim padded to 128 lanes) at bf16 peak, our count: XLA counts none")
    return {**k, "min_tokens": threshold, "recompute": recompute, "note": note}


def _first_lines(text: str, n: int) -> str:
    return "\n".join([line for line in text.splitlines() if line.strip()][:n])[:2000]


def find_max_batch(config, target: targets.Target, cached: bool = False, start: Optional[int] = None,
                   cached_text: bool = False,
                   max_compiles: int = 5, log: Callable[[str], None] = print, devices=None,
                   on_compile: Optional[Callable[[dict], None]] = None) -> dict:
    """The largest per-chip batch whose step fits the chip's HBM, in at most `max_compiles`
    compiles: the package's one search (`planning/search.py`) with a compile as its probe.
    Every compile's result is kept; `on_compile(search so far)` after each one lets a caller
    keep it (a compile of the full step can exhaust the host's memory and be killed)."""
    devices = devices if devices is not None else target.devices()
    n = len(devices)

    def probe(b: int) -> search.Probe:
        r = report(with_batch(config, b, n), target, cached, devices, cached_text=cached_text)
        m = r.get("memory") or {}
        return search.Probe(bool(r["fits"]), m.get("total"), m.get("temp"), r)

    def per_chip(r: dict) -> dict:
        return {"max_per_chip_batch": r["max_batch"], "first_failure": r["first_failure"], "exact": r["exact"],
                "predicted_max_per_chip_batch": r["predicted_max_batch"], "prediction": r["prediction"],
                "compiles": r["probes"], "tried": {str(t["batch"]): _brief(t) for t in r["tried"]},
                "report": r["detail"]}

    found = search.largest_batch(probe, start or max(1, per_chip_batch(config, n)),
                                 capacity=target.chip.hbm_gib * GIB, max_probes=max_compiles, log=log,
                                 on_probe=None if on_compile is None else lambda r: on_compile(per_chip(r)))
    return per_chip(found)


def _brief(t: dict) -> dict:
    return {"fits": t["fits"], "total_gib": t["total_bytes"] / GIB if t["total_bytes"] else None,
            "temp_gib": t["temp_bytes"] / GIB if t["temp_bytes"] else None, "compile_seconds": t["seconds"]}


def summary_lines(r: dict) -> List[str]:
    inputs = "VAE encode in the step" if r["vae_in_step"] else "cached latents" if r["cached_latents"] else \
        "pixel space"
    inputs += ", text encoder in the step" if r.get("text_in_step", True) else ", cached text states"
    chip = r["chip"]
    gpu = chip.get("topology") == "cuda"
    memory = f"{chip['hbm_gib']:.1f} GiB for JAX, {chip['chip_config']}" if gpu else f"{chip['hbm_gib']:.0f} GiB HBM"
    lines = [f"{r['topology']} ({r['topology_name']}, {r['chips']} {'GPUs' if gpu else 'chips'}, "
             f"{chip['device_kind']}, {memory}): per-{'GPU' if gpu else 'chip'} batch {r['per_chip_batch']} (global "
             f"{r['global_batch']}) at {r['resolution']} px, "
             f"{inputs}, remat {r['remat']}, attention {r['attention']}, {fsdp_words(r)}",
             f"attention: {r.get('attention_resolved', r['attention'])}"]
    if r.get("compile_error"):
        lines.append(f"DOES NOT FIT: XLA refused the program: {r['compile_error']}")
    else:
        lines += xla.format_report(r).splitlines()
        unit = "GPU" if gpu else "chip"
        if r.get("images_per_s_per_chip"):
            cal = r.get("calibrated_images_per_s_per_chip")
            cal = f", calibrated {cal:.1f} ({r['calibration']['name']})" if cal else ", no calibration"
            lines.append(f"images/s per {unit}: raw estimate {r['images_per_s_per_chip']:.1f}{cal}")
        lines.append(f"compiled in {r['compile_seconds']:.0f}s")
    return lines


def fsdp_words(r: dict) -> str:
    """"data parallel", or FSDP with how its weights were gathered (a report from before
    `mesh.fsdp_gather` existed gathered per use)."""
    if not r["fsdp"]:
        return "data parallel"
    return f"FSDP (weights gathered {r.get('fsdp_gather') or 'per_use'})"
