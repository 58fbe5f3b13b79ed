"""The only non-tensor globals a pickled checkpoint may hold, each admitted as an inert stand-in.

`torch.load(weights_only=True)` refuses every global outside PyTorch's own allowlist
(tensors, plain containers, `_codecs.encode` for bytes). The original Stable Diffusion v1
`.ckpt` releases are PyTorch Lightning checkpoints: beside `state_dict` they hold
`epoch`, `global_step`, `pytorch-lightning_version` and `callbacks`, which pickle a few
more globals. Each is mapped below, by its name in the file, to a stand-in of ours that
rebuilds plain data and nothing else: pytorch_lightning is never imported, no function of
numpy's runs on the file's arguments, and any other global is still refused (and named in
the error). Add an entry only with a comment saying which released file holds it.
"""

from __future__ import annotations

import numpy as np

_NUMBER_KINDS = "biufc?"  # bool, integers, floats, complex: what a numeric dtype can be


class LightningCallback:
    """Stands in for a Lightning callback class that a checkpoint names (as the key of its
    `callbacks` dict). Never instantiated from the file's data: the class object is the key."""


class NumpyDtype:
    """Stands in for `numpy.dtype` when a pickle rebuilds a dtype (`dtype('f8', False,
    True)` then `__setstate__`): only numeric dtypes, with the byte order of the state."""

    def __init__(self, spec, align=False, copy=True):
        dtype = np.dtype(str(spec))
        if dtype.kind not in _NUMBER_KINDS:
            raise ValueError(f"numpy dtype {spec!r} is not numeric")
        self.dtype = dtype

    def __setstate__(self, state):
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else "="
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(order)


def numpy_scalar(dtype, data=None):
    """Stands in for `numpy.core.multiarray.scalar(dtype, bytes)`: the Python number those
    bytes hold (a numpy scalar such as `global_step` in the Lightning metadata)."""
    if not isinstance(dtype, NumpyDtype) or not isinstance(data, (bytes, bytearray)):
        raise ValueError("a numpy scalar needs a numeric dtype and its bytes")
    if len(data) != dtype.dtype.itemsize:
        raise ValueError(f"{len(data)} bytes for a {dtype.dtype} scalar")
    return np.frombuffer(bytes(data), dtype.dtype)[0].item()


# (stand-in, the global's full name in the file)
STAND_INS = (
    # CompVis sd-v1-1 ... sd-v1-4(.ckpt, -full-ema.ckpt): `callbacks` = {ModelCheckpoint: {...}}
    (LightningCallback, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    # the same releases: numpy scalars in the Lightning metadata (written with numpy 1.x)
    (numpy_scalar, "numpy.core.multiarray.scalar"),
    # files written by tools on numpy >= 2 name the same function under numpy._core
    (numpy_scalar, "numpy._core.multiarray.scalar"),
    # the dtype argument of those scalars
    (NumpyDtype, "numpy.dtype"),
)


def safe_globals():
    """The context manager under which `torch.load(weights_only=True)` admits STAND_INS."""
    import torch

    return torch.serialization.safe_globals(list(STAND_INS))
