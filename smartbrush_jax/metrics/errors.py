"""The one error type the metrics library raises for bad inputs, files and folders."""

from smartbrush_jax.errors import InputError


class MetricsError(InputError, ValueError):
    """A metric cannot be computed from what it was given (missing weights, wrong shapes, empty mask...)."""
