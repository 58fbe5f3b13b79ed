"""`python -m smartbrush_jax.train`: the documented path of the training command, kept
working; the command is `smartbrush_jax/cli/train.py`, the trainer `smartbrush_jax/train/loop.py`."""

if __name__ == "__main__":
    from smartbrush_jax.cli.train import console

    console()
