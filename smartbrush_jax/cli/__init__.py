"""The commands: argument parsing and reporting around the library, and nothing the
library imports. Each is a console script (`smartbrush-<name>`, pyproject.toml) and
`python -m smartbrush_jax.cli.<name>`; the three paths the design card documents
(`python -m smartbrush_jax.train`, `python -m smartbrush_jax.inpaint`,
`python -m smartbrush_jax.app`) are shims that only call their command here."""
