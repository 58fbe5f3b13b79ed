"""Checksums of a train state's arrays, so a checkpoint whose bytes changed after it was
saved (a flipped bit on a disk, a bucket copied by another tool, gcsfuse) is told from a
good one instead of being trained on or sampled from without a word.

The checksum is computed on the devices that hold the state, a jitted reduction of each
shard where it lies, whose parts add up on the host, so it needs no gather of the arrays
and no collective program, and gives the same value whatever the sharding or topology
that saved or restores the array (a pod saves, a laptop reads). For an array with `n`
elements whose raw bits, widened to uint32, are `u[i]` (i the row-major flat index):

    a = sum_i u[i] * (2 i + 1)                      mod 2**32
    b = sum_i mix(u[i] + i * 0x9E3779B9)            mod 2**32

Sums of uint32 wrap and are exact in any order, so the shards' parts add up to the sum
of the whole array. `a` catches any change of one element for certain (the weight 2i+1 is
odd, hence invertible mod 2**32); `b`, through a nonlinear mixer (murmur3's finaliser),
catches what could cancel in `a`. Two changed elements escape both only by chance (about 2**-64).

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
    """The raw bits of every element widened to uint32, the shape unchanged."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
    if width is None:  # 64-bit values (jax_enable_x64): both halves count
        halves = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
        return halves[..., 0] ^ (halves[..., 1] * jnp.uint32(0x85EBCA6B))
    return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)


def _mix(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


@jax.jit
def _shard_sums(x: jax.Array, start: jax.Array, strides: jax.Array) -> jax.Array:
    """uint32 [2]: the part of (a, b) above that one shard holds. `x` [n0, n1, ...] is the
    shard (at least 1-d), `start` uint32 [ndim] where it begins in the whole array,
    `strides` uint32 [ndim] the whole array's row-major strides (mod 2**32): the flat
    index of each element is the whole array's. Traced, so one program per shard shape."""
    u = _as_uint32(x)
    i = jnp.zeros(u.shape, jnp.uint32)
    for dim in range(u.ndim):
        i = i + (jax.lax.broadcasted_iota(jnp.uint32, u.shape, dim) + start[dim]) * strides[dim]
    a = jnp.sum(u * (i * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    b = jnp.sum(_mix(u + i * _GOLDEN), dtype=jnp.uint32)
    return jnp.stack([a, b])


def _host_shard_sums(x: np.ndarray, start: np.ndarray, strides: np.ndarray) -> np.ndarray:
    """`_shard_sums` in NumPy, for shards in host memory (XLA:CPU devices): the same uint32
    arithmetic, wrapping as it does, with nothing to compile (XLA took 2.4 s to compile the
    programs of the micro test config's state, for each process that saves or restores)."""
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    x = np.ascontiguousarray(x)
    if x.dtype.itemsize == 8:
        halves = x.view(np.uint32).reshape(*x.shape, 2)
        u = halves[..., 0] ^ (halves[..., 1] * np.uint32(0x85EBCA6B))
    else:
        u = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(np.uint32)
    i = np.zeros(u.shape, np.uint32)
    for dim in range(u.ndim):
        axis = (np.arange(u.shape[dim], dtype=np.uint32) + start[dim]) * strides[dim]
        i += axis.reshape([-1 if d == dim else 1 for d in range(u.ndim)])
    a = np.sum(u * (i * np.uint32(2) + np.uint32(1)), dtype=np.uint32)
    h = u + i * _GOLDEN
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return np.array([a, np.sum(h, dtype=np.uint32)], np.uint32)


def _parts(x: jax.Array, on_host: Optional[bool] = None):
    """The (a, b) parts of `x`'s shards on this process's devices: one per distinct piece
    (replica 0 of each), each computed on the device that holds it. No collective: on
    XLA:CPU with 8 simulated devices, a program per array with an all-reduce each, all in
    flight at once, hung in the all-reduce (XLA aborted the trainer)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if not isinstance(x, jax.Array):
        x = jnp.asarray(x)
    shape = x.shape or (1,)
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step % 2**32)
        step *= n
    strides = np.array(strides[::-1], np.uint32)
    parts = []
    for shard in x.addressable_shards:
        if shard.replica_id != 0:
            continue
        data = shard.data if x.ndim else shard.data.reshape(1)
        first = np.array([(sl.start or 0) for sl in shard.index] or [0], np.uint32)
        if on_host if on_host is not None else shard.device.platform == "cpu":
            parts.append(_host_shard_sums(np.asarray(data), first, strides))
        else:
            parts.append(_shard_sums(data, first, strides))  # runs where `data` lies
    return parts


def compute(tree: Any, on_host: Optional[bool] = None) -> Dict[str, Any]:
    """The checksum record of every array in `tree` (JSON-ready). Each process sums the
    pieces its devices hold; with several processes the per-array sums are added over
    processes (one small all-gather), so every process calls it, as every process saves.
    `on_host`: sum in NumPy (default: for shards on CPU devices) or on the device (else)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    arrays = [(path_name(p), x) for p, x in flat if hasattr(x, "shape") and hasattr(x, "dtype")]
    parts = jax.device_get([_parts(x, on_host) for _, x in arrays])  # every piece dispatched, then read once
    sums = np.array([np.sum(np.array(p, np.uint64).reshape(-1, 2), axis=0) if p else [0, 0] for p in parts],
                    np.uint64).reshape(-1, 2)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        sums = np.sum(np.asarray(multihost_utils.process_allgather(sums), np.uint64), axis=0)
    sums = sums % np.uint64(2**32)
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
