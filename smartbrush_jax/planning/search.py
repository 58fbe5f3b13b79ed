"""The largest batch that fits, in few probes: the one search of the package.

A probe is whatever tells, for one batch size, whether the step fits: a compile for a
TPU slice (`train/aot.py`, `smartbrush-aot --find-max-batch`), or a compile and two
steps on the device at hand (`bench/unet_step.py --find-max-batch`). Memory grows about
linearly with the batch, so the probes' peak bytes give a line and the line predicts the
batch that fills the device; without a memory figure the search doubles, then bisects.

    result = largest_batch(probe, start=16, capacity=95 * 2**30, max_probes=5)

No JAX: the probe brings its own framework.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, List, Optional

PREDICTION = "memory linear in the batch through the fitting probes (not compiled or run)"


@dataclasses.dataclass
class Probe:
    """What one probe found. `total_bytes`: the peak memory of the batch; `temp_bytes`: the
    part that grows with it (XLA's temporaries), which lets a single fitting probe give
    the line (through it and the fixed rest: parameters and optimizer state)."""

    fits: bool
    total_bytes: Optional[float] = None
    temp_bytes: Optional[float] = None
    detail: Optional[dict] = None  # the probe's own report, kept in the result


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error of either framework (XLA: RESOURCE_EXHAUSTED, "Ran out of
    memory", "... exceeds ... memory"; torch: OutOfMemoryError), as opposed to a bug that
    a search must not swallow."""
    text = f"{type(exc).__name__}: {exc}"
    return (any(s in text for s in ("RESOURCE_EXHAUSTED", "OutOfMemoryError", "out of memory", "Out of memory",
                                    "Ran out of memory"))
            or ("exceeds" in text and "memory" in text))


def largest_batch(probe: Callable[[int], Probe], start: int, *, capacity: Optional[float] = None,
                  limit: Optional[int] = None, granularity: int = 1, max_probes: Optional[int] = None,
                  budget_s: Optional[float] = None, log: Optional[Callable[[str], None]] = None,
                  on_probe: Optional[Callable[[dict], None]] = None) -> dict:
    """The largest batch (a multiple of `granularity`, at most `limit`) whose probe fits.

    The next probe is where the memory line reaches `capacity` (5% under it while the line
    rests on one probe), kept strictly between what is known to fit and what is known not
    to; without a line, twice the largest fit (or half the first failure), then the
    midpoint. The search ends when the bracket is one granularity wide (`exact`), at
    `limit`, after `max_probes`, or when the next probe would end after `budget_s`.
    `on_probe(result so far)` after each probe lets a caller keep what was found (a probe
    may exhaust the host and be killed).

    Returns {"max_batch": largest fit or None, "first_failure": smallest failure or None,
    "exact", "predicted_max_batch" (the line's answer below the first failure, or None),
    "prediction" (how it was made), "probes", "tried": [{batch, fits, seconds, total_bytes,
    temp_bytes}], "detail": the largest fit's probe detail}.
    """
    g = max(1, granularity)
    t_end = None if budget_s is None else time.time() + budget_s
    lo, hi, b = 0, None, start
    tried: Dict[int, dict] = {}
    found: Dict[int, Probe] = {}
    while True:
        t0 = time.time()
        p = probe(b)
        dt = time.time() - t0
        found[b] = p
        tried[b] = {"batch": b, "fits": bool(p.fits), "seconds": round(dt, 1), "total_bytes": p.total_bytes,
                    "temp_bytes": p.temp_bytes}
        if log is not None:
            mem = f" ({p.total_bytes / 2**30:.2f} GiB)" if p.total_bytes else ""
            log(f"  batch {b}: {'fits' if p.fits else 'does not fit'}{mem} [{dt:.0f}s]")
        if p.fits:
            lo = max(lo, b)
        else:
            hi = b if hi is None else min(hi, b)
        if on_probe is not None:
            on_probe(_result(tried, found, lo, hi, g, limit, capacity))
        if max_probes is not None and len(tried) >= max_probes:
            break
        if t_end is not None and time.time() + dt > t_end:
            break
        nxt = _next(tried, found, lo, hi, g, limit, capacity)
        if nxt is None:
            break
        b = nxt
    return _result(tried, found, lo, hi, g, limit, capacity)


def memory_line(found: Dict[int, Probe], capacity: Optional[float]) -> Optional[float]:
    """The batch at which memory reaches `capacity` on the line through the two largest
    fitting probes; with one, through it and its fixed part (all but the temporaries,
    which grow in proportion to the batch). None without capacity or memory figures."""
    if not capacity:
        return None
    fits = sorted((b, p) for b, p in found.items() if p.fits and p.total_bytes)
    if not fits:
        return None
    if len(fits) >= 2:
        (b1, p1), (b2, p2) = fits[-2], fits[-1]
        per = (p2.total_bytes - p1.total_bytes) / (b2 - b1)
        return b2 + (capacity - p2.total_bytes) / per if per > 0 else None
    b1, p1 = fits[0]
    if not p1.temp_bytes:
        return None
    return b1 * (capacity - (p1.total_bytes - p1.temp_bytes)) / p1.temp_bytes


def _next(tried, found, lo: int, hi: Optional[int], g: int, limit: Optional[int],
          capacity: Optional[float]) -> Optional[int]:
    down = lambda x: max(g, int(x) // g * g)  # noqa: E731
    line = memory_line(found, capacity)
    n_fits = sum(1 for p in found.values() if p.fits and p.total_bytes)
    aim = None if line is None else (line if n_fits >= 2 else 0.95 * line)
    if hi is None:  # everything so far fits: grow
        if limit is not None and lo >= limit:
            return None
        cand = max(down(aim) if aim else 2 * lo, lo + g)
        cand = min(cand, limit) if limit is not None else cand
    else:
        if hi - lo <= g:
            return None
        if not lo:  # nothing fits yet: halve
            cand = down(hi / 2)
        elif aim and lo < aim < hi:
            cand = down(aim)
        else:
            cand = down(lo + (hi - lo) / 2)
        cand = min(max(cand, lo + g), hi - g)
        if cand <= lo or cand >= hi:
            return None
    if cand in tried:  # the line's guess was probed already: bisect what is left
        top = hi if hi is not None else (4 * lo if limit is None else limit + g)
        cand = max(down(lo + (top - lo) / 2), lo + g)
        if cand in tried or (hi is not None and cand >= hi):
            return None
    return cand


def _result(tried, found, lo: int, hi: Optional[int], g: int, limit: Optional[int],
            capacity: Optional[float]) -> dict:
    exact = (hi is not None and hi - lo <= g) or (hi is None and limit is not None and lo >= limit)
    line = memory_line(found, capacity)
    if line is not None and hi is not None:
        line = min(line, hi - 1)
    rows: List[dict] = [tried[b] for b in sorted(tried)]
    return {"max_batch": lo or None, "first_failure": hi, "exact": exact,
            "predicted_max_batch": None if line is None else max(lo, int(line)), "prediction": PREDICTION,
            "probes": len(tried), "limit": limit, "tried": rows,
            "detail": found[lo].detail if lo in found else None}
