"""What a compiled step needs, read from XLA: memory per device against the chip's, the
collectives of the optimized program and their bytes, XLA's FLOPs against ours, and a
step-time estimate labelled with how it was obtained. Used by `aot.py` (compiling for a TPU
slice on any host) and by the trainer at start-up (the same report on real hardware)."""

from __future__ import annotations

import re
from typing import Dict, Optional

GIB = 2**30
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# `%name = TYPE op(` with an optional async -start suffix (the -done half is not counted again)
_INSTR = re.compile(r"=\s*(\(.*?\)|[a-z0-9]+\[[^\]]*\](?:\{[^}]*\})?)\s+(" + "|".join(COLLECTIVES) +
                    r")(-start)?\(")
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")


def memory(compiled, hbm_bytes: Optional[float] = None) -> Dict[str, object]:
    """Per-device bytes: arguments, outputs, aliased (donated, counted once), temporaries,
    generated code, total, and against `hbm_bytes` the margin and FITS / DOES NOT FIT."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0) for k in
           ("argument", "output", "alias", "temp", "generated_code")}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    if hbm_bytes:
        out["hbm"] = int(hbm_bytes)
        out["margin"] = int(hbm_bytes - out["total"])
        out["fits"] = out["margin"] >= 0
    return out


def collectives(hlo_text: str) -> Dict[str, Dict[str, int]]:
    """{kind: {"count", "bytes"}} of the collectives in an optimized HLO module: the bytes of
    each instruction's result (an all-gather's gathered array, a reduce-scatter's shard, an
    all-reduce's reduced array), once per execution of the program (a collective inside a
    loop body counts once). XLA:TPU writes a reduce-scatter as an all-reduce fused with the
    slice each chip keeps (a computation named `all-reduce-scatter*`): counted as the
    reduce-scatter it is, with the shard's bytes."""
    out = {k: {"count": 0, "bytes": 0} for k in COLLECTIVES}
    comp, comp_result = "", ""
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            comp, comp_result = head.group(1), head.group(2)
            continue
        for m in _INSTR.finditer(line):
            kind, shape = m.group(2), m.group(1)
            if kind == "all-reduce" and comp.startswith("all-reduce-scatter"):
                kind, shape = "reduce-scatter", comp_result
            out[kind]["count"] += 1
            out[kind]["bytes"] += _bytes(shape, async_start=bool(m.group(3)))
    return {k: v for k, v in out.items() if v["count"]}


# `%name (params) -> RESULT {` (or `ENTRY %name ...`): the computation the next lines belong to
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+(.*?)\s*\{\s*$")


def _bytes(shape: str, async_start: bool = False) -> int:
    if async_start and shape.startswith("("):
        # an async start's tuple holds (operands, results) and, for a collective-permute,
        # scalar u32 contexts after them: the results are the second half of the arrays
        arrays = [a for a in _ARRAY.findall(shape) if a[1]]
        arrays = arrays[len(arrays) // 2:] if len(arrays) > 1 else arrays
    else:
        arrays = _ARRAY.findall(shape)
    size = 0.0
    for dtype, dims in arrays:
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        size += n * _DTYPE_BYTES.get(dtype, 4)
    return int(size)


def costs(compiled) -> Dict[str, Optional[float]]:
    """XLA's own counts for one device's program: flops, bytes accessed, optimal_seconds
    (each None where the backend gives none)."""
    from smartbrush_jax.flops import cost_analysis

    c = cost_analysis(compiled)
    return {"flops": _num(c.get("flops")), "bytes_accessed": _num(c.get("bytes accessed")),
            "optimal_seconds": _num(c.get("optimal_seconds"))}


def _num(v) -> Optional[float]:
    return None if v is None else float(v)


def estimate(xla: Dict[str, Optional[float]], peak_flops: Optional[float], hbm_bytes_per_s: Optional[float],
             analytic_flops: Optional[float] = None) -> dict:
    """A step time only where it is sound: XLA's `optimal_seconds` when it is positive and
    within a factor of 10 of the roofline; otherwise the roofline itself (the larger of
    FLOPs / peak and bytes / HBM bandwidth: a lower bound that ignores collectives and
    overheads), each labelled. The FLOPs are the larger of XLA's count and
    `analytic_flops` (ours): XLA:TPU's count of the SD step with remat comes out below
    the U-Net's own forward + backward, which the step certainly runs."""
    flops, bytes_, opt = xla.get("flops"), xla.get("bytes_accessed"), xla.get("optimal_seconds")
    counted = "XLA's FLOPs"
    if analytic_flops and (not flops or analytic_flops > flops):
        flops, counted = analytic_flops, "our FLOP count (above XLA's)"
    if not (flops and peak_flops):
        return {"seconds": None, "method": "none: no FLOP count or no peak for this device"}
    compute = flops / peak_flops
    memory_s = bytes_ / hbm_bytes_per_s if bytes_ and hbm_bytes_per_s else 0.0
    roof = max(compute, memory_s)
    bound = "compute" if compute >= memory_s else "HBM bandwidth"
    if opt is not None and opt > 0 and roof / 10 <= opt <= roof * 10:
        return {"seconds": opt, "method": "XLA optimal_seconds", "roofline_seconds": roof,
                "optimal_seconds": opt}
    note = "" if opt is None else f" (XLA's optimal_seconds {opt:.4g} was not plausible)"
    return {"seconds": roof, "method": f"roofline, {bound}-bound: max({counted} / peak, XLA's bytes / HBM "
                                       f"bandwidth){note}; a lower bound: collectives and overheads not counted",
            "roofline_seconds": roof, "optimal_seconds": opt, "compute_seconds": compute,
            "hbm_seconds": memory_s}


def format_report(r: dict) -> str:
    """The few lines a user reads: memory and margin, FLOPs, collectives, the estimate."""
    lines = []
    m = r.get("memory") or {}
    if m:
        head = (f"memory per device: {m['total'] / GIB:.2f} GiB (arguments {m['argument'] / GIB:.2f}, outputs "
                f"{m['output'] / GIB:.2f}, aliased {m['alias'] / GIB:.2f}, temporaries {m['temp'] / GIB:.2f})")
        if "hbm" in m:
            verdict = "FITS" if m["fits"] else "DOES NOT FIT"
            head += f" of {m['hbm'] / GIB:.0f} GiB: {verdict}, margin {m['margin'] / GIB:+.2f} GiB"
        lines.append(head)
    f = r.get("flops") or {}
    if f.get("xla"):
        ratio = f"{f['xla'] / f['analytic']:.3f}" if f.get("analytic") else "-"
        lines.append(f"FLOPs per device per step: XLA {f['xla'] / 1e12:.2f} T, our U-Net count "
                     f"{(f.get('analytic') or 0) / 1e12:.2f} T (XLA / ours {ratio})")
    c = r.get("collectives") or {}
    if c:
        lines.append("collectives per step: " + ", ".join(f"{k} x{v['count']} {_size(v['bytes'])}"
                                                        for k, v in c.items()))
    else:
        lines.append("collectives per step: none")
    e = r.get("estimate") or {}
    if e.get("seconds"):
        extra = f", MFU {r['mfu']:.2f}" if r.get("mfu") else ""
        lines.append(f"step time estimate: {e['seconds'] * 1e3:.1f} ms ({e['method']}){extra}")
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def step_report(compiled, *, analytic_flops: Optional[float], peak_flops: Optional[float],
                hbm_bytes: Optional[float] = None, hbm_bytes_per_s: Optional[float] = None) -> dict:
    """Everything above for one compiled step; `analytic_flops`: our model FLOPs per device
    per step (the U-Net's forward and backward), which the MFU counts."""
    xla = costs(compiled)
    try:
        hlo = compiled.as_text() or ""
    except Exception:  # some backends cannot print the optimized module
        hlo = ""
    est = estimate(xla, peak_flops, hbm_bytes_per_s, analytic_flops)
    mfu = analytic_flops / (est["seconds"] * peak_flops) if est.get("seconds") and analytic_flops and peak_flops \
        else None
    return {"memory": memory(compiled, hbm_bytes), "flops": {"xla": xla["flops"], "analytic": analytic_flops},
            "xla_costs": xla, "collectives": collectives(hlo), "estimate": est, "mfu": mfu}


def device_hbm_bytes(device) -> Optional[int]:
    """The memory a real accelerator gives this process (None on a CPU)."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # CPU devices and some runtimes have no memory stats
        return None
    return stats.get("bytes_limit")
