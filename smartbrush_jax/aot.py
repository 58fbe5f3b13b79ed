"""`python -m smartbrush_jax.aot`: the ahead-of-time compile command under its short path,
kept working; the command is `smartbrush_jax/cli/aot.py` (`smartbrush-aot`), the library
`smartbrush_jax/train/aot.py`."""

if __name__ == "__main__":
    from smartbrush_jax.cli.aot import console

    console()
