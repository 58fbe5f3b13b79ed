"""The one error type the metrics library raises for bad inputs, files and folders."""


class MetricsError(ValueError):
    """A metric cannot be computed from what it was given (missing weights, wrong shapes, empty mask...)."""
