"""smartbrush_jax: SmartBrush (text- and shape-guided object inpainting) in JAX/Flax."""

__version__ = "0.1.0"
