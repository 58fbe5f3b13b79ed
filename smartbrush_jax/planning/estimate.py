"""The one step-time estimate of the package, from what XLA says of a compiled step, and its
calibration against steps someone measured. `smartbrush-aot`, `bench/` and the trainer's
start-up report all call `step_estimate`; nothing else turns costs into seconds.

The raw estimate is a sum of labelled terms, each optimistic or pessimistic in a known way:

- `ops`: XLA's per-op cost model as libtpu sums it. libtpu's `optimal_seconds` equals, to
  within 3% in every v5p compile we made, total FLOPs / peak + total bytes / HBM bandwidth:
  compute and memory of every op added, never overlapped (pessimistic), each at the spec
  sheet's peak (optimistic). The term is that sum, formed from XLA's FLOPs and bytes (our
  analytic FLOP count, less what the kernels run, where it is higher: XLA:TPU's count of a
  rematerialised step is below the model's own forward + backward), or libtpu's
  `optimal_seconds` where that is higher. On v4 libtpu counts -1 s for every `ConcatBitcast`
  custom call, so its figure is negative; that sentinel is added back first
  (`SENTINEL_CALLS`), which leaves it at 0.89-1.02x of the sum.
- `kernels`: Pallas kernels (splash attention) are custom calls XLA counts nothing for;
  their FLOPs with the head dimension padded to 128 lanes, at the MXU's peak (optimistic).
  The attention they run is taken out of the analytic count above, so it is counted once.
- `collectives`: what each chip sends over ICI for the step's collectives (a ring or torus
  algorithm over each collective's replica group: `wire_factor`) over the chip's ICI
  bandwidth, not overlapped with compute (pessimistic: XLA's async collectives overlap
  much of the gradients' all-reduce with the backward pass), at the links' spec rate
  (optimistic). Multi-slice DCN traffic is counted at ICI rate (optimistic).
- host and dispatch time, input pipeline: not counted (optimistic).

The calibrated figure is the raw estimate times measured / estimated of a program whose
step time was published (`bench/results/calibration.json`, written by `bench/calibrate.py`):
a number a team can book a pod on, with the calibration named beside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Optional

# custom calls libtpu's cost model (0.0.42) counts as -1 s each, added back: ConcatBitcast on
# v4 (every v4 compile: optimal_seconds ~ -(their count)); the async-call markers with
# MaxDiffusion's LIBTPU_INIT_ARGS (a tiny v5p compile: -12 s with 6 + 6 of them)
SENTINEL_CALLS = ("ConcatBitcast", "PrepareAsyncCallStart", "PrepareAsyncCallDone")
SENTINEL_SECONDS = 1.0
CALIBRATION_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "results", "calibration.json")
TERMS = {
    "ops": "XLA's per-op FLOPs / peak + bytes / HBM bandwidth, summed as libtpu's optimal_seconds does "
           "(pessimistic: no overlap of compute and memory; optimistic: spec peak for both)",
    "kernels": "Pallas kernels XLA does not count (splash attention, head dim padded to 128 lanes) at the MXU's "
               "peak (optimistic)",
    "collectives": "bytes each chip sends over ICI for the step's collectives / the chip's ICI bandwidth "
                   "(pessimistic: no overlap with compute; optimistic: spec link rate)",
    "not counted": "host, dispatch and input pipeline time (optimistic)",
}


@dataclasses.dataclass(frozen=True)
class Spec:
    """What the estimate needs of one chip (per chip, spec sheet)."""

    kind: str  # "v5p", "v4", "h100", ... (the calibration's key)
    peak_flops: Optional[float]  # bf16 dense FLOP/s
    hbm_bytes_per_s: Optional[float]
    ici_bytes_per_s: Optional[float]  # all of the chip's inter-chip links together


def spec_of_chip(chip) -> Spec:
    """A `targets.Chip` (or a report's `chip` dict) as a Spec."""
    get = chip.get if isinstance(chip, dict) else lambda k, d=None: getattr(chip, k, d)
    ici = get("ici_gbps")
    return Spec(get("kind"), get("bf16_tflops") * 1e12 if get("bf16_tflops") else None,
                get("hbm_gbps") * 1e9 if get("hbm_gbps") else None, ici * 1e9 if ici else None)


def spec_of_device(device, peak_flops: Optional[float] = None) -> Spec:
    """The Spec of a real device, by its `device_kind` (a TPU chip of `targets.CHIPS`, a GPU
    of `gpus.GPUS`); `peak_flops` (the config's `train.peak_tflops`) overrides the peak.
    Unknown kinds (a CPU) get only what is given."""
    from smartbrush_jax.planning import flops, gpus, targets

    kind = str(getattr(device, "device_kind", ""))
    for chip in targets.CHIPS.values():
        if chip.device_kind == kind:
            s = spec_of_chip(chip)
            return dataclasses.replace(s, peak_flops=peak_flops or s.peak_flops)
    for g in gpus.GPUS.values():
        if g.device_kind == kind:
            return Spec(g.name, peak_flops or g.bf16_tflops * 1e12, g.hbm_gbps * 1e9, g.nvlink_gbps * 1e9)
    return Spec(kind or "unknown", peak_flops or flops.peak_flops_per_device(device), None, None)


def step_estimate(xla_costs: Dict[str, Optional[float]], spec: Spec, *, analytic_flops: Optional[float] = None,
                  kernel: Optional[dict] = None, collectives: Optional[dict] = None,
                  custom_calls: Optional[dict] = None, devices: int = 1) -> dict:
    """The raw step-time estimate per device (module docstring) from a compiled step's
    `xla.costs`, `xla.collectives`, custom-call counts, our analytic FLOPs per device and the
    kernels' FLOPs (`{"step", "step_padded", "note"}` per device). Returns `seconds` (None
    where no sound figure exists), `terms` ({name: seconds}), `how` ({name: words}) and a
    one-line `method`."""
    flops_xla, bytes_, opt = xla_costs.get("flops"), xla_costs.get("bytes_accessed"), xla_costs.get("optimal_seconds")
    peak, hbm = spec.peak_flops, spec.hbm_bytes_per_s
    if not peak:
        return {"seconds": None, "method": "none: no peak FLOP/s for this device (set train.peak_tflops)"}
    k_step = float((kernel or {}).get("step") or 0.0)
    k_padded = float((kernel or {}).get("step_padded") or 0.0)
    ours = (analytic_flops - k_step) if analytic_flops else None  # what XLA's ops run, by our count
    if not (flops_xla or bytes_ or opt):
        bound = (ours or 0) / peak + k_padded / peak
        return {"seconds": None, "peak_seconds": bound or None,
                "method": "none: XLA gave no cost analysis for this target (a deviceless GPU compile); our FLOP count "
                          f"at the device's peak would take {bound * 1e3:.1f} ms, a bound, not an estimate"}
    how, terms = {}, {}
    n_sentinel = sum(int((custom_calls or {}).get(name, 0)) for name in SENTINEL_CALLS)
    corrected = opt + n_sentinel * SENTINEL_SECONDS if opt is not None else None
    counted = "XLA's FLOPs"
    if ours and flops_xla and ours > flops_xla:
        counted = "our FLOP count (above XLA's; the kernels' own left out)"
    additive = max(flops_xla or 0, ours or 0) / peak + ((bytes_ or 0) / hbm if hbm else 0.0)
    how["ops"] = f"{counted} / peak + XLA's bytes / HBM bandwidth, summed as libtpu does"
    use_opt = corrected is not None and additive < corrected <= additive * 3  # more than 3x: not the same model
    sentinel = f" with its {n_sentinel} sentinel custom calls (-1 s each: ConcatBitcast...) added back" if n_sentinel \
        else ""
    if use_opt:
        how["ops"] = f"libtpu's optimal_seconds{sentinel}, above {how['ops']} ({additive * 1e3:.1f} ms)"
    elif corrected is not None:
        how["ops"] += f" (libtpu's optimal_seconds{sentinel}: {corrected * 1e3:.1f} ms, not above it)"
    terms["ops"] = corrected if use_opt else additive
    if not hbm:
        how["ops"] += "; no HBM bandwidth known: FLOPs only"
    if k_padded:
        terms["kernels"] = k_padded / peak
        how["kernels"] = (kernel or {}).get("note") or "Pallas kernels at peak"
    wire, unknown = _wire_bytes(collectives or {}, devices)
    if wire and spec.ici_bytes_per_s:
        terms["collectives"] = wire / spec.ici_bytes_per_s
        how["collectives"] = (f"{wire / 2**30:.2f} GiB sent per chip over {spec.ici_bytes_per_s / 1e9:.0f} GB/s of ICI"
                              + (" (group size assumed: every chip)" if unknown else ""))
    elif wire:
        how["collectives"] = "not counted: no ICI bandwidth known for this chip"
    seconds = sum(terms.values())
    method = " + ".join(f"{k} {v * 1e3:.1f} ms" for k, v in terms.items())
    return {"seconds": seconds, "terms": terms, "how": how, "method": f"raw estimate: {method}",
            "optimal_seconds": opt, "sentinels": n_sentinel, "additive_seconds": additive}


def _wire_bytes(collectives: dict, devices: int):
    """Bytes per chip over the links, and whether a group size had to be assumed (a report
    written before `xla.collectives` read replica groups: every chip of the program)."""
    total, assumed = 0.0, False
    for kind, v in collectives.items():
        if v.get("wire_bytes") is not None:
            total += v["wire_bytes"]
        else:
            total += wire_factor(kind, devices) * v.get("bytes", 0)
            assumed = True
    return total, assumed


def wire_factor(kind: str, group: int) -> float:
    """Bytes each chip sends over its links per byte of the collective's result, for a
    bandwidth-optimal (ring or torus) algorithm over `group` chips: an all-reduce moves its
    array twice (reduce-scatter then all-gather) less the chip's own share, an all-gather
    the others' shares of its result, a reduce-scatter (whose result is one shard) the
    other shards, a collective-permute its array once."""
    n = max(1, int(group))
    return {"all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n, "reduce-scatter": float(n - 1),
            "all-to-all": (n - 1) / n}.get(kind, 1.0)



def load_calibration(path: Optional[str] = None) -> Optional[dict]:
    """bench/results/calibration.json (or `path`, or $SMARTBRUSH_CALIBRATION); None when absent."""
    path = path or os.environ.get("SMARTBRUSH_CALIBRATION") or CALIBRATION_FILE
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def calibrate(seconds: Optional[float], kind: str, per_chip_batch: int,
              calibration: Optional[dict] = None) -> dict:
    """The calibrated step time and images/s per chip: `seconds` x the calibration's ratio
    (measured / estimated) for this chip kind, named: the ratio of its point at this batch
    per chip where one was measured, else the points' geometric mean. Another kind's ratio is
    used only where this kind has none, and then said (`borrowed`)."""
    cal = calibration if calibration is not None else load_calibration()
    ratios = (cal or {}).get("ratios") or {}
    if not seconds or not ratios:
        return {"calibration": None}
    entry, borrowed = ratios.get(kind), False
    if entry is None:
        entry, borrowed = ratios.get(cal.get("default_kind", "")), True
    if entry is None:
        return {"calibration": None}
    ratio, which = entry["ratio"], "geometric mean of its points"
    same = (entry.get("by_per_chip_batch") or {}).get(str(per_chip_batch))
    if same:  # a point measured at this batch per chip: its own ratio
        ratio, which = same, f"its point at {per_chip_batch} per chip"
    out = seconds * ratio
    return {"calibrated_seconds": out, "calibrated_images_per_s_per_chip": per_chip_batch / out if per_chip_batch
            else None, "calibration": {**entry, "ratio": ratio, "which": which, "kind": kind, "borrowed": borrowed}}


def describe(est: dict, cal: Optional[dict] = None) -> str:
    """One line: raw estimate with its terms, and the calibrated figure with its source."""
    if not est.get("seconds"):
        return f"step time estimate: {est.get('method', 'none')}"
    line = f"step time estimate: {est['seconds'] * 1e3:.1f} ms raw ({est['method'].removeprefix('raw estimate: ')})"
    c = (cal or {}).get("calibration")
    if c:
        line += (f"; calibrated {cal['calibrated_seconds'] * 1e3:.1f} ms (x{c['ratio']:.3f}, {c.get('which', '')}: "
                 f"{c['name']}{', borrowed from ' + c['measured_on'] if c.get('borrowed') else ''})")
    return line


def from_report(r: dict, calibration: Optional[dict] = None) -> dict:
    """The estimate of a stored compile report (a `smartbrush-aot --json` file of any date),
    recomputed from the counts it holds by this module's rule; the chip's ICI bandwidth from
    today's table where the report predates it. Returns {"estimate", "estimate_ms",
    "images_per_s_per_chip", "mfu", "calibrated", "calibration",
    "calibrated_images_per_s_per_chip"}."""
    from smartbrush_jax.planning import targets

    chip = dict(r["chip"])
    if not chip.get("ici_gbps") and chip.get("kind") in targets.CHIPS:
        chip["ici_gbps"] = targets.CHIPS[chip["kind"]].ici_gbps
    spec = spec_of_chip(chip)
    analytic = (r.get("flops") or {}).get("analytic")
    est = step_estimate(r["xla_costs"], spec, analytic_flops=analytic, kernel=r.get("kernel_flops"),
                        collectives=r.get("collectives"), custom_calls=r.get("custom_calls"),
                        devices=int(r.get("chips") or 1))
    out = {"estimate": est, "estimate_ms": est["seconds"] * 1e3 if est.get("seconds") else None,
           "images_per_s_per_chip": None, "mfu": None, "calibrated": {"calibration": None}, "calibration": None,
           "calibrated_images_per_s_per_chip": None}
    if est.get("seconds"):
        b = r["per_chip_batch"]
        cal = calibrate(est["seconds"], spec.kind, b, calibration)
        out.update(images_per_s_per_chip=b / est["seconds"], calibrated=cal, calibration=cal.get("calibration"),
                   calibrated_images_per_s_per_chip=cal.get("calibrated_images_per_s_per_chip"),
                   mfu=analytic / (est["seconds"] * spec.peak_flops) if analytic else None)
    return out
