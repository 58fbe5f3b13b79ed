"""`python -m smartbrush_jax.app`: the inpainting web app (the command is
`smartbrush_jax/cli/app.py`, the page `smartbrush_jax/app/page.py`)."""

if __name__ == "__main__":
    import sys

    from smartbrush_jax.cli.app import main

    sys.exit(main())
