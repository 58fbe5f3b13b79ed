"""The commands: argument parsing and reporting around the library. Each is a console
script (pyproject.toml) and `python -m smartbrush_jax.cli.<name>`; the paths the README
documents (`python -m smartbrush_jax.train`, `.inpaint`, `.export`, `.convert`,
`.data.prepare`, `.data.latents`, `.data.synthetic`) lead here too."""
