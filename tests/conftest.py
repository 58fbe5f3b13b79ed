import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from sd_fixtures import write_sd_folder  # noqa: E402


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    """A tiny random SD pipeline folder (safetensors) and the torch models it holds."""
    path = str(tmp_path_factory.mktemp("sd_tiny"))
    return path, write_sd_folder(path)
