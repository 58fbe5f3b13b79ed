import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a hub
# One persistent XLA compilation cache for this session, inherited by every trainer the
# tests start: the same micro step is compiled once instead of in each of ~25 processes
# (a trainer start goes from ~25 s to ~11 s). A cached executable is the one XLA would
# build again, so runs compared bit for bit stay comparable. Fresh per session.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="smartbrush_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from sd_fixtures import write_sd_folder  # noqa: E402


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    """A tiny random SD pipeline folder (safetensors) and the torch models it holds."""
    path = str(tmp_path_factory.mktemp("sd_tiny"))
    return path, write_sd_folder(path)


def built_once(tmp_path_factory, name: str, build) -> str:
    """`build(folder)` run by the first test process that asks for `name`, the folder then
    shared by every process of the session (pytest-xdist workers included: each would
    otherwise train its own copy). Tests only read these folders (they copy before writing)."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's root, common to the workers
    target, done = base / name, base / f"{name}.built"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the others wait here while one builds
        if not done.exists():
            if target.exists():
                shutil.rmtree(target)  # a build that failed half-way in another worker
            target.mkdir(parents=True)
            build(str(target))
            done.touch()
    return str(target)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The micro trainer config (tests/configs/tiny_train.py) run for 4 steps: its synthetic
    data in `data/`, checkpoints at steps 2 and 4. Tests copy it (train_helpers.copy_run)."""
    from train_helpers import train

    def build(folder):
        proc = train(os.path.join(folder, "run"), "--config.train.steps=4")
        assert proc.returncode == 0, proc.stderr[-3000:]

    return os.path.join(built_once(tmp_path_factory, "tiny_run", build), "run")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """A run of the demo config (configs/cpu_demo.py) cut to 4 steps on 64 scenes: the
    real architecture and workdir layout, trained just enough to have a checkpoint."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def build(work):
        env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
        proc = subprocess.run(
            [sys.executable, "-m", "smartbrush_jax.train", f"--config={root}/configs/cpu_demo.py",
             f"--workdir={work}", "--config.train.steps=4", "--config.data.synthetic_scenes=64",
             "--config.train.sample_every=0", "--config.train.checkpoint_every=4", "--config.optim.warmup_steps=1",
             "--config.train.log_every=2"],
            capture_output=True, text=True, timeout=900, env=env, cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]

    return built_once(tmp_path_factory, "demo_run", build)


@pytest.fixture(scope="session")
def demo_export(demo_run, tmp_path_factory):
    """`demo_run` exported to a diffusers folder by `smartbrush-export`."""
    from smartbrush_jax.cli.export import main

    def build(folder):
        assert main(["--workdir", demo_run, "--out", os.path.join(folder, "model")]) == 0

    return os.path.join(built_once(tmp_path_factory, "demo_export", build), "model")
