"""`--config FILE` and its `--config.section.field=value` overrides looked at before absl
parses the flags (where ml_collections turns any problem with the file into a traceback, an
override of a field that does not exist into an AttributeError, and one it cannot parse into
absl's usage text and exit 1): exit 2 with one line saying what is wrong."""

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
    path, _, arg = path.partition(":")  # `file.py:arg` passes an argument to get_config
    problem = None
    module = None
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
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # noqa: BLE001  (the file's own code)
        print(f"error: --config {path}: get_config() raised {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
    for a in argv[1:]:
        if a.startswith("--config.") and len(a) > len("--config."):
            problem = unknown_field(config, a[len("--config."):].split("=", 1)[0])
            if problem:
                print(f"error: {a.split('=', 1)[0]}: {problem}", file=sys.stderr)
                sys.exit(2)


# fields that were renamed: an old override names the new field
RENAMED = {"model.attention_impl": "model.attention (auto, xla, chunked, splash or cudnn; '' is now auto)"}


def unknown_field(config, dotted: str):
    """What is wrong with the override path `section.field` of `config`, or None."""
    if dotted in RENAMED:
        return f"config.{dotted} was renamed: use config.{RENAMED[dotted]}"
    node, seen = config, "config"
    for part in dotted.split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else None
        if keys is None:
            return f"{seen} is a value, not a section"
        if part not in keys:
            return f"{seen} has no field {part!r} (it has: {', '.join(sorted(map(str, keys)))})"
        node, seen = node[part], f"{seen}.{part}"
    return None


def parse_flags(argv):
    """absl's flag parsing with its errors as `error: ...` and exit 2 (absl prints its usage
    text and exits 1): `app.run(main, flags_parser=parse_flags)`."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = str(e)
        if message.startswith("flag "):
            message = message[len("flag "):]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
