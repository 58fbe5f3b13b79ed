"""`bench/maxdiffusion_aot.py`: MaxDiffusion's SD2 U-Net train step compiled for a TPU slice on
this host. Without a checkout it says "skipped" and exits 0; with one (MAXDIFFUSION_DIR, a
clone of github.com/AI-Hypercomputer/maxdiffusion), the tiny U-Net's step compiles for v5p-8
and its report has the estimate and the gradients' all-reduce over every chip."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "maxdiffusion_aot.py")
CHECKOUT = os.environ.get("MAXDIFFUSION_DIR")


def _run(*args, timeout):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(120)
def test_without_a_checkout_it_skips_and_exits_0(tmp_path):
    p = _run("--maxdiffusion", str(tmp_path / "no-such-checkout"), "--topology", "v5p-8", "--tiny", timeout=100)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "skipped" in p.stdout and "not a MaxDiffusion checkout" in p.stdout


@pytest.mark.timeout(120)
def test_bad_batch_exits_2(tmp_path):
    os.makedirs(tmp_path / "src" / "maxdiffusion" / "models")
    (tmp_path / "src" / "maxdiffusion" / "models" / "unet_2d_condition_flax.py").write_text("")
    p = _run("--maxdiffusion", str(tmp_path), "--per-chip-batch", "0", timeout=100)
    assert p.returncode == 2 and "--per-chip-batch 0" in p.stderr, p.stderr[-2000:]


@pytest.mark.timeout(900)
@pytest.mark.skipif(not CHECKOUT, reason="MAXDIFFUSION_DIR (a MaxDiffusion checkout) is not set")
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_tiny_step_compiles_for_v5p_8_with_the_gradients_all_reduce(tmp_path):
    out = tmp_path / "tiny.json"
    p = _run("--maxdiffusion", CHECKOUT, "--topology", "v5p-8", "--per-chip-batch", "2", "--tiny", "--json",
             str(out), timeout=840)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    r = json.loads(out.read_text())
    assert (r["program"], r["chips"], r["global_batch"], r["fits"]) == ("maxdiffusion_sd2_unet", 4, 8, True)
    assert r["estimate"]["seconds"] > 0 and r["estimate"]["method"] and r["images_per_s_per_chip"] > 0
    assert r["xla_costs"]["flops"] > 0 and r["flops"]["analytic"] > 0 and r["memory"]["total"] > 0
    assert r["custom_calls"].get("tpu_custom_call", 0) >= 3  # their splash kernels: 3 calls at 16x16
    ar = r["collectives"]["all-reduce"]  # data parallel: every gradient summed over the 4 chips
    elements = sum(n / {"bf16": 2, "f32": 4}.get(d, 4) for d, n in ar["by_dtype"].items())
    assert elements >= 0.9 * r["trainable_parameters"], (elements, r["trainable_parameters"])
    assert set(ar["groups"]) == {"4"}
    assert r["libtpu_flags_in_their_scripts"] and not r["their_flags_set"]
