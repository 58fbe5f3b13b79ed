"""`--config FILE` looked at before absl parses the flags (where ml_collections turns any
problem with the file into a traceback): exit 2 with one line saying what is wrong."""

from __future__ import annotations

import os
import sys


def check_config_file(argv) -> None:
    """ml_collections loads `--config` while absl parses the flags, where any problem is a
    traceback: look at the file first and exit 2 with one line saying what is wrong."""
    path = None
    for i, a in enumerate(argv[1:], 1):
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
    if path is None:
        return
    path = path.split(":", 1)[0]  # `file.py:arg` passes an argument to get_config
    problem = None
    if not os.path.isfile(path):
        problem = "no such file"
    elif not path.endswith(".py"):
        problem = "not a Python config file (configs/*.py, defining get_config())"
    else:
        import importlib.util

        try:
            spec = importlib.util.spec_from_file_location("smartbrush_config_check", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            if not callable(getattr(module, "get_config", None)):
                problem = "defines no get_config()"
        except Exception as e:  # whatever the file raises: SyntaxError, NameError, ImportError, ...
            problem = f"cannot be loaded ({type(e).__name__}: {e})"
    if problem:
        print(f"error: --config {path}: {problem}", file=sys.stderr)
        sys.exit(2)
