"""Checksums of a train state's arrays, so a checkpoint whose bytes changed after it was
saved (a flipped bit on a disk, a bucket copied by another tool, gcsfuse) is told from a
good one instead of being trained on or sampled from without a word.

The checksum is computed on the devices that hold the state, by one jitted reduction, so
it needs no gather to a host and gives the same value whatever the sharding or topology
that saved or restores the array (a pod saves, a laptop reads). For an array with `n`
elements whose raw bits, widened to uint32, are `u[i]` (i the row-major flat index):

    a = sum_i u[i] * (2 i + 1)                      mod 2**32
    b = sum_i mix(u[i] + i * 0x9E3779B9)            mod 2**32

Sums of uint32 wrap and are exact in any order, so XLA may reduce across devices as it
likes. `a` catches any change of one element for certain (the weight 2i+1 is odd, hence
invertible mod 2**32); `b`, through a nonlinear mixer (murmur3's finaliser), catches what
could cancel in `a`. Two changed elements escape both only by chance (about 2**-64).

Saved as the step's `checksums` item (JSON: array path -> "aaaaaaaa-bbbbbbbb", with shape
and dtype), written by Orbax with the step itself, so it is finished exactly when the step
is. Steps saved before checksums existed have no such item and load with a warning.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "smartbrush-checksums-1"
_GOLDEN = np.uint32(0x9E3779B9)


class ChecksumMismatch(Exception):
    """An array of a restored step whose checksum differs from the one saved with it."""

    def __init__(self, path: str, step: Optional[int] = None, detail: str = ""):
        self.path, self.step = path, step  # the step is said by whoever reports it
        super().__init__(f"array {path} does not match the checksum saved with it"
                         f"{' (' + detail + ')' if detail else ''}: its bytes changed after the step was saved")


def path_name(path) -> str:
    """`params/unet/conv_in/kernel` for a tree path, whether the tree holds dataclasses,
    named tuples (attribute keys), dicts or lists: the same name for the state the trainer
    saves and for the plain dicts and lists Orbax restores it into."""
    parts = []
    for key in path:
        for attr in ("name", "key", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _as_uint32(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
    if width is None:  # 64-bit values (jax_enable_x64): both halves count
        halves = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
        return halves[..., 0] ^ (halves[..., 1] * jnp.uint32(0x85EBCA6B))
    return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)


def _flat_index(shape) -> jax.Array:
    """The row-major flat index of every element, uint32 (wrapping past 2**32 elements)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride % 2**32)
        stride *= shape[dim]
    return index


def _mix(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _array_sums(x: jax.Array) -> jax.Array:
    """uint32 [2]: (a, b) above."""
    u = _as_uint32(x)
    if u.ndim == 0:
        u = u[None]
    i = _flat_index(u.shape)
    a = jnp.sum(u * (i * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    b = jnp.sum(_mix(u + i * _GOLDEN), dtype=jnp.uint32)
    return jnp.stack([a, b])


# one small program per distinct (shape, dtype), not one for the whole tree: the demo's
# state (994 arrays, 31 shapes) compiled in 5.4 s this way and in 21 s as one program
_sums = jax.jit(_array_sums)


def compute(tree: Any) -> Dict[str, Any]:
    """The checksum record of every array in `tree` (JSON-ready). A collective when the
    arrays span processes: every process calls it, as every process calls save."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    arrays = [(path_name(p), x) for p, x in flat if hasattr(x, "shape") and hasattr(x, "dtype")]
    sums = jax.device_get([_sums(x) for _, x in arrays])  # dispatched together, read once
    record = {}
    for (name, x), s in zip(arrays, sums):
        record[name] = {"sum": f"{int(s[0]):08x}-{int(s[1]):08x}", "shape": list(x.shape), "dtype": _dtype_name(x)}
    return {"format": FORMAT, "arrays": record}


def _dtype_name(x) -> str:
    dtype = x.dtype
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return "key"
    return np.dtype(dtype).name


def verify(tree: Any, saved: Dict[str, Any], step: Optional[int] = None) -> int:
    """Raise ChecksumMismatch naming the first array of `tree` whose checksum differs from
    `saved` (a record of `compute`); an array of `saved` missing from `tree`, or the other
    way, is a mismatch too (a tree that restored from other files). Returns how many arrays
    were checked."""
    if not isinstance(saved, dict) or saved.get("format") != FORMAT or not isinstance(saved.get("arrays"), dict):
        raise ChecksumMismatch("(the checksum record)", step, "the record is not one this version writes")
    now = compute(tree)["arrays"]
    expected = saved["arrays"]
    for name in sorted(set(now) | set(expected)):
        if name not in expected:
            raise ChecksumMismatch(name, step, "the step's checksum record does not list it")
        if name not in now:
            raise ChecksumMismatch(name, step, "listed in the checksum record but not restored")
        want = expected[name].get("sum") if isinstance(expected[name], dict) else None
        if now[name]["sum"] != want:
            raise ChecksumMismatch(name, step, f"{now[name]['sum']} read, {want} saved")
    return len(now)
