"""Ahead-of-time compilation for TPU slices on this CPU host (`smartbrush_jax.train.aot`), through
the libtpu wheel of requirements-dev.txt: the tiny config's step compiled for a v4 slice
with the trainer's own setup; its memory report, the collectives data parallelism and FSDP
must produce, XLA's FLOPs against our count; meshes laid out by the torus and by slice."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from train_helpers import CONFIG, ROOT, tiny_config

from smartbrush_jax.planning import targets
from smartbrush_jax.train import aot, sharding

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu is not installed (pip install -r "
                                  "requirements-dev.txt; it has no wheel for this platform)")


def test_slice_names_map_to_topologies_and_chips():
    t = targets.parse("v4-32")
    assert (t.chips, t.slices, t.topology_name, t.hosts, t.chip.hbm_gib) == (16, 1, "v4:2x2x4", 4, 32)
    t = targets.parse("v5p-128")
    assert (t.chips, t.topology_name, t.chip.hbm_gib) == (64, "v5p:4x4x4", 95)
    t = targets.parse("v5litepod-256")
    assert (t.chips, t.topology_name, t.chip.kind) == (256, "v5e:16x16", "v5e")
    t = targets.parse("2xv5p-128")
    assert (t.chips, t.slices, t.hosts) == (64, 2, 32)
    assert targets.parse("v6e-256").chip.bf16_tflops == 918
    for bad, says in (("v9-8", "unknown TPU kind"), ("v4-33", "v4 slices come as"), ("v4", "not a slice name"),
                      ("v5e-3", "v5e slices come as")):
        with pytest.raises(targets.TargetError, match=says):
            targets.parse(bad)


def test_missing_libtpu_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(targets.TargetError, match="libtpu wheel is not installed"):
        targets.parse("v4-8").devices()


def _cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "smartbrush_jax.cli.aot", f"--config={CONFIG}", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_cli_unknown_topology_exits_2():
    p = _cli("--topology=v9-64", "--cached-latents")  # either spelling of a flag
    assert p.returncode == 2, p.stderr[-2000:]
    assert "unknown TPU kind 'v9'" in p.stderr


def test_find_max_batch_search_is_exact_in_few_compiles(monkeypatch):
    """Memory linear in the batch (a fixed state plus temporaries per image), as XLA's is:
    the search finds the exact largest batch from the line, and remembers every compile."""
    gib = 2**30
    chip = targets.Chip("t", "v4", "TPU v4", 32, 275, 1228, True, 3, "megacore")
    target = targets.Target("v4-8", chip, 4, 1)
    calls = []

    def fake_report(config, target, cached, devices, cached_text=False):
        b = config.train.batch_size // 4
        calls.append(b)
        temp = int(0.73 * gib * b + (0.31 * gib if b > 20 else 0))  # not quite linear above 20
        total = int(3.2 * gib) + temp
        fits = total <= 32 * gib
        return {"fits": fits, "memory": {"total": total, "temp": temp, "fits": fits}}

    monkeypatch.setattr(aot, "report", fake_report)
    config = tiny_config()
    config.train.batch_size = 8 * 4
    r = aot.find_max_batch(config, target, devices=[0] * 4, log=lambda s: None)
    # (32 - 3.2) GiB / 0.73 GiB = 39.45 per image; the 0.31 GiB step above 20 makes it 39
    assert r["max_per_chip_batch"] == 39 and r["first_failure"] == 40 and r["exact"]
    assert r["compiles"] == len(calls) <= 5 and len(set(calls)) == len(calls)  # 8, then near the line
    assert r["predicted_max_per_chip_batch"] == 39


@pytest.fixture(scope="module")
def v4_8():
    if not HAVE_LIBTPU:
        pytest.skip("libtpu is not installed")
    return targets.parse("v4-8")


@pytest.fixture(scope="module")
def reports(v4_8):
    """The tiny config's step (2 images per chip, channels widened to 64 so that every
    kernel splits four ways) compiled for v4-8 data parallel and FSDP: two compiles."""
    out = {}
    for name, shape, fsdp in (("dp", {"data": -1, "fsdp": 1, "tensor": 1}, False),
                              ("fsdp", {"data": 1, "fsdp": -1, "tensor": 1}, True)):
        c = tiny_config()
        c.train.batch_size = 8
        c.model.unet.block_out_channels = (64, 64)
        c.mesh.shape, c.mesh.fsdp = shape, fsdp
        out[name] = aot.report(c, v4_8)
    return out


@needs_libtpu
def test_data_parallel_compile_for_v4_8(reports):
    r = reports["dp"]
    m = r["memory"]
    assert r["fits"] and m["hbm"] == 32 * 2**30 and m["margin"] == m["hbm"] - m["total"]
    assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]
    # the state (params, Adam moments, EMA: f32) is donated and aliased, replicated on every chip
    # (TPU pads small arrays to (8, 128) tiles, so at this size the bytes are several times more)
    assert m["alias"] >= 4 * 4 * r["trainable_parameters"]
    # data parallel: the gradients are all-reduced (f32, once per step), nothing is gathered
    c = r["collectives"]
    assert set(c) == {"all-reduce"}, c
    grads = 4 * r["trainable_parameters"]
    assert 0.98 * grads <= c["all-reduce"]["bytes"] <= 1.02 * grads + 64, (c, grads)
    # XLA counts the whole step (loss, mask degrader, AdamW, EMA) on top of the U-Net's forward
    # and backward that we count; at this size the extra is a large share, for SD v1 ~6%
    ratio = r["flops"]["xla"] / r["flops"]["analytic"]
    assert 1.0 <= ratio <= 1.6, ratio
    # each chip sends 2 x 3/4 of the gradients (a ring over the 4 chips), at v4's 300 GB/s of ICI
    assert c["all-reduce"]["groups"] == {"4": c["all-reduce"]["count"]}
    assert c["all-reduce"]["wire_bytes"] == pytest.approx(2 * 3 / 4 * c["all-reduce"]["bytes"])
    e = r["estimate"]
    assert e["terms"]["collectives"] == pytest.approx(c["all-reduce"]["wire_bytes"] / 300e9)
    assert e["seconds"] == pytest.approx(e["terms"]["ops"] + e["terms"]["collectives"]) and e["method"]
    assert r["estimate_ms"] == pytest.approx(e["seconds"] * 1e3)
    assert "FITS, margin +31.9" in "\n".join(aot.summary_lines(r))


@needs_libtpu
def test_fsdp_compile_gathers_params_and_scatters_grads(reports):
    r, dp = reports["fsdp"], reports["dp"]
    c = r["collectives"]
    grads = 4 * r["trainable_parameters"]
    # each chip gathers the parameters it is missing and receives only its shard of the
    # gradients: reduce-scatters, not all-reduces, carry most of them (the rest: the few
    # parameters too small to split, the loss and norms)
    assert c["all-gather"]["count"] > 0 and c["reduce-scatter"]["count"] > 0, c
    assert c["reduce-scatter"]["bytes"] >= 0.5 * grads / 4, (c, grads)
    assert c["all-reduce"]["bytes"] < 0.5 * grads, (c, grads)
    # mesh.fsdp_gather = "once" (the default): the U-Net's bf16 weights are gathered once a
    # step by our constraint, not again in the recompute and the backward (XLA's per-use
    # gathers: 3.2x here); the frozen text encoder's weights are gathered too, so no layer of
    # it gathers activations (SD v1 on v4-32: 3 GiB a step)
    weights = 2 * r["trainable_parameters"]
    sources = c["all-gather"]["top_sources"]
    unet = sum(x["bytes"] for x in sources if x["op"].endswith("jvp()/sharding_constraint"))
    assert 0.95 * weights <= unet <= 1.2 * weights, (sources, weights)  # (a few small ones stay replicated)
    assert not [x for x in sources if "CLIPTextModel" in x["op"]], sources
    # the state is sharded four ways: what a chip holds is a fraction of data parallel's
    assert r["memory"]["alias"] < 0.5 * dp["memory"]["alias"]


@needs_libtpu
def test_mesh_follows_the_torus_of_a_v4_slice():
    devices = targets.parse("v4-32").devices()  # 16 chips, 2x2x4
    # in an order that says nothing of the torus (as processes list them on a multi-host
    # slice): the layout must come from the chips' coordinates, not from the list
    devices = [devices[i] for i in np.random.default_rng(0).permutation(len(devices))]
    for data, fsdp in ((4, 4), (2, 8), (1, 16)):
        mesh = sharding.make_mesh({"data": data, "fsdp": fsdp, "tensor": 1}, devices=devices)
        assert mesh.devices.shape == (data, fsdp, 1)
        assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
        # every fsdp group is a compact block of the torus (its chips fill their bounding box:
        # its collectives stay on the links among them), not chips scattered over the slice
        for row in mesh.devices[:, :, 0]:
            coords = np.array([d.coords for d in row])
            box = np.prod(coords.max(0) - coords.min(0) + 1)
            assert box == fsdp, coords.tolist()


@needs_libtpu
def test_multislice_mesh_puts_data_over_dcn_and_fsdp_within_a_slice():
    devices = targets.parse("2xv4-8").devices()  # 2 slices of 4 chips
    assert sorted({d.slice_index for d in devices}) == [0, 1]
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, {"data": 2}, devices=devices)
    assert mesh.devices.shape == (2, 4, 1)
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    for i in range(2):
        assert len(set(slices[i].flat)) == 1  # an fsdp group never leaves its slice
    assert slices[0, 0, 0] != slices[1, 0, 0]  # the data axis crosses the slices


def test_find_max_batch_on_a_budget_says_what_it_verified_and_what_it_predicts(monkeypatch):
    chip = targets.Chip("t", "v4", "TPU v4", 32, 275, 1228, True, 3, "megacore")
    gib = 2**30

    def fake_report(config, target, cached, devices, cached_text=False):
        b = config.train.batch_size // 4
        temp = int(0.73 * gib * b)
        total = int(3.2 * gib) + temp
        return {"fits": total <= 32 * gib, "memory": {"total": total, "temp": temp}}

    monkeypatch.setattr(aot, "report", fake_report)
    config = tiny_config()
    config.train.batch_size = 16 * 4
    seen = []  # what a caller can save after each compile (one may exhaust the host and be killed)
    r = aot.find_max_batch(config, targets.Target("v4-8", chip, 4, 1), max_compiles=2, devices=[0] * 4,
                           log=lambda s: None, on_compile=seen.append)
    assert [s["max_per_chip_batch"] for s in seen] == [16, 37] and seen[0]["predicted_max_per_chip_batch"] == 39
    # 16 fits; the line through it and the fixed state says 39.45, 5% under is 37: compiled, fits
    assert (r["compiles"], r["max_per_chip_batch"], r["exact"], r["first_failure"]) == (2, 37, False, None)
    assert r["predicted_max_per_chip_batch"] == 39 and "not compiled" in r["prediction"]


def test_collective_bytes_from_optimized_hlo_text():
    """The forms XLA:TPU prints: async starts (operands, results, scalar contexts), and a
    reduce-scatter written as an all-reduce fused with each chip's slice."""
    from smartbrush_jax.planning.xla import collectives

    hlo = """
%all-reduce-scatter.4 (input.4: f32[3,3,64,64]) -> f32[3,3,64,16] {
  %input.4 = f32[3,3,64,64]{2,3,1,0:T(8,128)S(3)} parameter(0)
  %all-reduce.7 = f32[3,3,64,64]{2,3,1,0:T(8,128)} all-reduce(%input.4), replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %dynamic-slice.5 = f32[3,3,64,16]{2,3,1,0:T(8,128)S(3)} dynamic-slice(%all-reduce.7, %c, %c, %c, %m)
}

ENTRY %main (p: f32[4]) -> f32[4] {
  %cp = (f32[1024,64]{1,0}, f32[1024,64]{1,0}, u32[], u32[]) collective-permute-start(%x), source_target_pairs={{0,1}}
  %cpd = f32[1024,64]{1,0} collective-permute-done(%cp)
  %ag = (bf16[8,128]{1,0}, bf16[32,128]{1,0}) all-gather-start(%y), dimensions={0}, \
metadata={op_name="jit(f)/dot_general" source_file="a.py"}
  %ar = f32[10]{0} all-reduce(%z), to_apply=%add
}
"""
    got = collectives(hlo)
    assert got["all-gather"].pop("top_sources") == [{"op": "jit(f)/dot_general", "count": 1, "bytes": 32 * 128 * 2}]
    assert got["all-reduce"].pop("top_sources") == [{"op": "?", "count": 1, "bytes": 40}]  # no metadata
    for v in got.values():
        v.pop("top_sources", None)
    # what each chip sends: no group size in the text but the reduce-scatter's: unknown
    assert got["all-reduce"].pop("wire_bytes") is None and got["all-reduce"].pop("groups") == {"None": 1}
    assert got["reduce-scatter"].pop("wire_bytes") == 3 * (3 * 3 * 64 * 16 * 4)  # the 3 other shards
    assert got["reduce-scatter"].pop("groups") == {"4": 1}
    for v in got.values():
        v.pop("wire_bytes", None), v.pop("groups", None)
    assert got == {
        "all-reduce": {"count": 1, "bytes": 40, "by_dtype": {"f32": 40}},
        "all-gather": {"count": 1, "bytes": 32 * 128 * 2, "by_dtype": {"bf16": 32 * 128 * 2}},
        "reduce-scatter": {"count": 1, "bytes": 3 * 3 * 64 * 16 * 4, "by_dtype": {"f32": 3 * 3 * 64 * 16 * 4}},
        "collective-permute": {"count": 1, "bytes": 1024 * 64 * 4, "by_dtype": {"f32": 1024 * 64 * 4}}}
    # with the program's device count, a group-less all-reduce spans every device
    assert collectives(hlo, devices=8)["all-reduce"]["wire_bytes"] == 2 * 7 / 8 * 40


@pytest.mark.parametrize("name,topology,compiled_file,vae_in_step", [
    ("tpu_v4", "v4-32", "search/v4-32_chunked_full_b32_gather-once_vae.json", True),
    ("tpu_v5p", "v5p-128", "search/v5p-128_splash_none_b16_vae.json", True),
    ("tpu_v5p", "v5p-32", "search/v5p-32_splash_none_b64.json", False),  # the same run, 64 per chip
    ("tpu_v5p_sd2", "v5p-128", "search/v5p-128_sd2_splash_none_b16.json", False),
    ("tpu_v5p_sdxl", "v5p-128", "search/v5p-128_sdxl_splash_dots_with_no_batch_dims_saveable_b16_gather-once.json",
     False)])
def test_shipped_tpu_configs_are_what_was_compiled(name, topology, compiled_file, vae_in_step):
    """Each TPU config validates for its slice, and its committed ahead-of-time compile
    (in bench/results/: the figures its docstring quotes; SD v1's with the VAE in the step,
    SD 2.x's and SDXL's on cached latents, as their docstrings run them) is of this very step:
    the same config file, resolution, batch per chip, remat, attention, mesh and dtype, and
    it fits."""
    import importlib.util
    import json

    from smartbrush_jax.config import validate

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    target = targets.parse(topology)
    validate(c, target.chips, target.hosts, data=False)
    assert compiled_file in mod.__doc__
    with open(os.path.join(ROOT, "bench", "results", compiled_file)) as f:
        r = json.load(f)
    compiled = r["report"] if "report" in r else r
    assert compiled["fits"] and compiled["memory"]["margin"] > 0.10 * compiled["memory"]["hbm"]
    assert compiled["per_chip_batch"] == c.train.batch_size // target.chips
    assert (compiled["remat"], compiled["attention"], compiled["dtype"], compiled["fsdp"]) == \
        (c.model.remat, c.model.attention, c.model.dtype, c.mesh.fsdp)
    assert compiled["mesh"] == dict(c.mesh.shape) and compiled["vae_in_step"] == vae_in_step
    assert compiled["config"] == f"{name}.py" and compiled["resolution"] == c.data.resolution
    if c.mesh.fsdp:  # how the weights reach the layers; files without the field predate "once"
        assert compiled.get("fsdp_gather", "per_use") == c.mesh.fsdp_gather


@needs_libtpu
def test_config_attention_and_remat_are_what_the_compiled_step_used(v4_8, reports):
    """A step with `model.attention=splash` compiles the Pallas kernel for the TPU (Mosaic
    custom calls in the optimized HLO; XLA's attention has none), its remat policy is the
    one in the step's program, and the report counts the kernels' FLOPs XLA cannot see."""
    from smartbrush_jax.train.step import abstract_batch

    c = tiny_config()
    c.train.batch_size, c.data.resolution = 8, 32  # 16x16 = 256 tokens at the attention level
    c.model.unet.block_out_channels = (64, 64)
    c.model.attention, c.model.remat, c.model.splash_min_tokens = "splash", "attention_saveable", 256
    r = aot.report(c, v4_8)
    assert r["custom_calls"].get("tpu_custom_call", 0) >= 4  # forward and backward kernels
    assert "tpu_custom_call" not in reports["dp"]["custom_calls"]  # XLA's attention: none
    assert (r["attention"], r["remat"], r["splash_min_tokens"]) == ("splash", "attention_saveable", 256)
    k = r["kernel_flops"]
    # the 16x16 level: one down, the mid and two up transformers; remat keeps their outputs
    assert k["calls"] == 4 and not k["recompute"] and k["passes"] == 3.5
    # 2 x 2 x batch x heads x tokens^2 x head dim, forward, for each call
    assert k["forward"] == 4 * (2 * 2 * 2 * 2 * 256 * 256 * 32)
    assert k["step_padded"] == k["step"] * 4  # head dim 32 runs on 128 lanes
    e = r["estimate"]
    assert e["terms"]["kernels"] == pytest.approx(k["step_padded"] / 275e12)
    assert e["seconds"] == pytest.approx(sum(e["terms"].values())) and e["seconds"] > e["terms"]["ops"]
    assert "splash kernels" in e["how"]["kernels"] and "kernels: " in "\n".join(aot.summary_lines(r))

    # the remat policy: the attention outputs and the kernel's residuals, by name, in the program
    from smartbrush_jax.train.step import build_models, build_step

    models = build_models(c, weights=False)
    mesh = sharding.make_mesh(dict(c.mesh.shape), devices=v4_8.devices())
    state, frozen, step_fn = build_step(c, models, mesh, np.zeros(77, np.int32), materialize=False)
    text = str(step_fn.trace(state, frozen, abstract_batch(c, models, mesh)).jaxpr)
    assert "saveable_names=frozenset({'attention_out', 'splash_residuals'})" in text.replace(
        "'splash_residuals', 'attention_out'", "'attention_out', 'splash_residuals'")
    assert "pallas_call" in text and "shard_map" in text
