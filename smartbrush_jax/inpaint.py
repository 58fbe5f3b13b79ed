"""`python -m smartbrush_jax.inpaint`: the documented path of the inpainting command, kept
working; the command is `smartbrush_jax/cli/inpaint.py`, the library `inpainting.Inpainter`."""

if __name__ == "__main__":
    import sys

    from smartbrush_jax.cli.inpaint import main

    sys.exit(main())
