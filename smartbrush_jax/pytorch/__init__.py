"""The PyTorch side of smartbrush_jax (diffusers/transformers models; importable without JAX)."""

from smartbrush_jax.pytorch.pipeline import PipelineError, SmartBrushPipeline, read_settings

__all__ = ["PipelineError", "SmartBrushPipeline", "read_settings"]
