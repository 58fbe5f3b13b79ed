"""The PyTorch side of smartbrush_jax (diffusers/transformers models; importable without JAX)."""

from smartbrush_jax.pytorch.pipeline import PipelineError, SamplerSettings, SmartBrushPipeline, read_settings

__all__ = ["PipelineError", "SamplerSettings", "SmartBrushPipeline", "read_settings"]
