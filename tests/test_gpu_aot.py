"""Ahead-of-time compiles for an 8-GPU H100 or H200 node on this CPU host
(`smartbrush-aot --target=h100`, `planning/gpus.py`): with the jax CUDA plugin of
.venv-gpu-aot (`make .venv-gpu-aot`, which `make test` builds) the widened tiny step
compiles through a deviceless CUDA topology and reports memory per GPU against what JAX's
allocator gives; without the plugin the command exits 2 with the one-line reason."""

import json
import os
import subprocess
import sys

import pytest
from train_helpers import CONFIG, ROOT

from smartbrush_jax.planning import gpus, targets

pytestmark = pytest.mark.timeout(900)
GPU_PY = os.path.join(ROOT, ".venv-gpu-aot", "bin", "python")
WIDE = ["--config.train.batch_size=16", "--config.model.dtype=bfloat16",
        "--config.model.unet.block_out_channels=(64,64)", "--config.model.unet.cross_attention_dim=64",
        "--config.model.text.hidden_size=64", "--config.data.resolution=32"]


def _aot(python, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("JAX_PLATFORMS", None)  # the command sets what it needs
    return subprocess.run([python, "-m", "smartbrush_jax.cli.aot", f"--config={CONFIG}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=800)


def test_gpu_names_and_their_target_configs():
    t = gpus.parse("h100")
    assert (t.count, t.hosts, t.topology_name, t.gpu.sms) == (8, 1, "cuda 1x1x8", 132)
    assert gpus.parse("h200x16").hosts == 2 and gpus.parse("H100_SXM").gpu.name == "h100"
    text = gpus.target_config(gpus.GPUS["h200"])
    assert "device_memory_size: 151397597184" in text and "major: 9" in text and 'name: "NVIDIA H200' in text
    for bad in ("a100", "h100x12", "h100xx"):
        with pytest.raises(targets.TargetError, match="--target"):
            gpus.parse(bad)
    # what a step must fit: JAX's allocator takes 75% of the card unless told otherwise
    assert t.chip.hbm_gib == pytest.approx(0.75 * 84_942_979_072 / 2**30)


def test_without_the_cuda_plugin_the_command_exits_2_with_the_reason():
    p = _aot(sys.executable, "--target=h100")
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot compile for h100: the jax CUDA plugin is not installed") and \
        "make .venv-gpu-aot" in last and "Traceback" not in p.stderr
    p = _aot(sys.executable, "--target=h100", "--topology=v4-8")
    assert p.returncode == 2 and "give one of --topology" in p.stderr


@pytest.mark.skipif(not os.path.exists(GPU_PY), reason="no .venv-gpu-aot (make .venv-gpu-aot; make test builds it)")
def test_the_step_compiles_for_h100_and_h200_nodes(tmp_path):
    out = {}
    for gpu in ("h100", "h200"):
        f = tmp_path / f"{gpu}.json"
        p = _aot(GPU_PY, f"--target={gpu}", "--config.model.attention=cudnn", *WIDE, f"--json={f}")
        assert p.returncode == 0, p.stderr[-3000:]
        assert "FITS" in p.stdout and "GPUs" in p.stdout, p.stdout
        out[gpu] = json.loads(f.read_text())
    h100, h200 = out["h100"], out["h200"]
    assert h100["chip"]["device_kind"] == "NVIDIA H100 80GB HBM3" and h100["chips"] == 8
    assert h100["jax-cuda12-plugin"] == "0.10.2" and h100["per_chip_batch"] == 2
    m = h100["memory"]
    assert m["fits"] and 0 < m["total"] < 0.1 * 2**30 and m["hbm"] == pytest.approx(0.75 * 84_942_979_072)
    # the same program on either card: the same bytes, more room on the H200
    assert h200["memory"]["argument"] == m["argument"] and h200["memory"]["margin"] > m["margin"]
    assert "all-reduce" in h100["collectives"]  # data parallel over the node's 8 GPUs
    # no cost analysis from XLA:GPU here: no step time is claimed, the bound is labelled
    assert h100["estimate"]["seconds"] is None and "no cost analysis" in h100["estimate"]["method"]
    assert "cuDNN flash attention" in h100["attention_resolved"]
