"""The one report of a compiled step, read from XLA once: memory per device against the
chip's, the collectives of the optimized program and their bytes, XLA's FLOPs against our
analytic count, and a step-time estimate labelled with how it was obtained. Used by
`train/aot.py` (compiling for a TPU slice on any host) and by the trainer at start-up (the
same report on real hardware, logged and kept in summary.json).

    r = step_report(compiled, analytic_flops=..., devices=8, peak_flops=..., hbm_bytes=...)
    print(format_report(r))

This module is the only reader of XLA's cost analysis (`costs`) in the package."""

from __future__ import annotations

import re
from typing import Dict, Optional

from smartbrush_jax.planning.estimate import Spec, calibrate, describe, step_estimate, wire_factor

GIB = 2**30
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# `%name = TYPE op(` with an optional async -start suffix (the -done half is not counted again)
_INSTR = re.compile(r"=\s*(\(.*?\)|[a-z0-9]+\[[^\]]*\](?:\{[^}]*\})?)\s+(" + "|".join(COLLECTIVES) +
                    r")(-start)?\(")
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# replica groups as XLA prints them: explicit `{{0,1,2,3},{4,...}}` or iota `[groups,size]<=[n]`
_GROUPS = re.compile(r"replica_groups=(?:\{\{([0-9,]*)\}|\[(\d+),(\d+)\]<=)")
TOP_SOURCES, SOURCE_CHARS = 8, 160  # per kind: the JAX ops (metadata op_name, its tail) that moved the most


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


def group_size(line: str, devices: Optional[int]) -> Optional[int]:
    """Chips in one replica group of a collective's HLO line (`devices` when the line gives
    none: XLA prints `replica_groups={}` for all of them)."""
    m = _GROUPS.search(line)
    if m and m.group(1) is not None and m.group(1):
        return len(m.group(1).split(","))
    if m and m.group(3):
        return int(m.group(3))
    return devices


def collectives(program, devices: Optional[int] = None) -> Dict[str, Dict[str, int]]:
    """{kind: {"count", "bytes", "by_dtype"}} of the collectives in an optimized program: the bytes of
    each instruction's result (an all-gather's gathered array, a reduce-scatter's shard, an
    all-reduce's reduced array), once per execution of the program (a collective inside a
    loop body counts once). XLA:TPU writes a reduce-scatter as an all-reduce fused with the
    slice each chip keeps (a computation named `all-reduce-scatter*`): counted as the
    reduce-scatter it is, with the shard's bytes. Each kind also has `by_dtype` (bytes) and
    `top_sources`: the JAX ops (HLO metadata `op_name`) whose collectives moved the most.

    `program`: a compiled executable, whose HLO modules are walked instruction by
    instruction (only the collectives are printed, one line each: the whole module as text
    costs seconds for SD), or optimized HLO text as XLA prints it.

    Each kind also has `wire_bytes`: what each chip sends over its links for them
    (`wire_factor` x bytes, with each instruction's replica group size, `devices` where the
    HLO gives none), and `groups` ({size: count}); `wire_bytes` is None where a group size
    is unknown."""
    out = {k: {"count": 0, "bytes": 0, "by_dtype": {}, "wire_bytes": 0.0, "groups": {}} for k in COLLECTIVES}
    sources: Dict[str, Dict[str, list]] = {}
    lines = _text_instructions(program) if isinstance(program, str) else _module_instructions(program)
    for comp, comp_result, line in lines:
        for m in _INSTR.finditer(line):
            kind, shape = m.group(2), m.group(1)
            if kind == "all-reduce" and comp.startswith("all-reduce-scatter"):
                kind, shape = "reduce-scatter", comp_result()
            out[kind]["count"] += 1
            total = 0
            for dtype, n in _bytes_by_dtype(shape, async_start=bool(m.group(3))).items():
                total += n
                out[kind]["by_dtype"][dtype] = out[kind]["by_dtype"].get(dtype, 0) + n
            out[kind]["bytes"] += total
            n = group_size(line, devices)
            groups = out[kind]["groups"]
            groups[str(n)] = groups.get(str(n), 0) + 1
            if n is None or out[kind]["wire_bytes"] is None:
                out[kind]["wire_bytes"] = None
            else:
                out[kind]["wire_bytes"] += wire_factor(kind, n) * total
            op = _OP_NAME.search(line)
            src = sources.setdefault(kind, {}).setdefault(op.group(1)[-SOURCE_CHARS:] if op else "?", [0, 0])
            src[0], src[1] = src[0] + 1, src[1] + total
    for kind, ops in sources.items():  # the ops that moved the most: what to look at first
        top = sorted(ops.items(), key=lambda x: -x[1][1])[:TOP_SOURCES]
        out[kind]["top_sources"] = [{"op": op, "count": c, "bytes": b} for op, (c, b) in top]
    return {k: v for k, v in out.items() if v["count"]}


_OPCODES = {"kAllReduce", "kAllReduceStart", "kAllGather", "kAllGatherStart", "kReduceScatter", "kAllToAll",
            "kCollectivePermute", "kCollectivePermuteStart"}


def _module_instructions(compiled):
    """(computation name, its result shape (lazily), instruction line) of each collective."""
    try:
        modules = compiled.runtime_executable().hlo_modules()
    except Exception:  # a backend without HLO modules: no collectives can be read
        return
    for module in modules:
        for comp in module.computations():
            name = comp.name
            for instr in comp.instructions():
                if instr.opcode.name in _OPCODES:
                    yield name, lambda c=comp: _root_shape(c), instr.to_string()


def _root_shape(comp) -> str:
    """The result shape of a computation: its root, the one instruction nothing uses."""
    for instr in comp.instructions():
        if not instr.users() and instr.opcode.name != "kParameter":
            line = instr.to_string()
            return line.split("=", 1)[1].strip().split(" ", 1)[0] if "=" in line else ""
    return ""


def _text_instructions(hlo_text: str):
    comp, comp_result = "", ""
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            comp, comp_result = head.group(1), head.group(2)
            continue
        yield comp, lambda r=comp_result: r, line


# `%name (params) -> RESULT {` (or `ENTRY %name ...`): the computation the next lines belong to
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+(.*?)\s*\{\s*$")


def _dtypes(v: dict) -> str:
    """" (bf16 3.2 GiB, f32 1.5 GiB)" where a collective moves more than one dtype (of note)."""
    parts = [(d, n) for d, n in sorted((v.get("by_dtype") or {}).items(), key=lambda x: -x[1]) if n >= v["bytes"] / 100]
    return f" ({', '.join(f'{d} {_size(n)}' for d, n in parts)})" if len(parts) > 1 else ""


def _bytes_by_dtype(shape: str, async_start: bool = False) -> Dict[str, int]:
    if async_start and shape.startswith("("):
        # an async start's tuple holds (operands, results) and, for a collective-permute,
        # scalar u32 contexts after them: the results are the second half of the arrays
        arrays = [a for a in _ARRAY.findall(shape) if a[1]]
        arrays = arrays[len(arrays) // 2:] if len(arrays) > 1 else arrays
    else:
        arrays = _ARRAY.findall(shape)
    out: Dict[str, int] = {}
    for dtype, dims in arrays:
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        out[dtype] = out.get(dtype, 0) + int(n * _DTYPE_BYTES.get(dtype, 4))
    return out


def costs(compiled) -> Dict[str, Optional[float]]:
    """XLA's cost analysis of a compiled program (`jax.jit(f).lower(...).compile()`), per
    device for a sharded program: flops, bytes accessed, optimal_seconds (each None where
    the backend gives none or a count that is not positive)."""
    try:
        c = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        c = None
    if isinstance(c, (list, tuple)):  # older JAX: one dict per program
        c = c[0] if c else None
    c = dict(c or {})
    flops = _num(c.get("flops"))
    return {"flops": flops if flops and flops > 0 else None, "bytes_accessed": _num(c.get("bytes accessed")),
            "optimal_seconds": _num(c.get("optimal_seconds"))}


def _num(v) -> Optional[float]:
    return None if v is None else float(v)


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
    if f.get("model_flops_per_step") is not None:
        lines.append(_flops_line(f))
    c = r.get("collectives") or {}
    if c:
        lines.append("collectives per step: " + ", ".join(f"{k} x{v['count']} {_size(v['bytes'])}{_dtypes(v)}"
                                                        for k, v in c.items()))
    else:
        lines.append("collectives per step: none")
    e = r.get("estimate") or {}
    if e.get("method"):
        lines.append(describe(e, r.get("calibrated")))
    if e.get("seconds"):
        lines += [f"  {name}: {e['terms'][name] * 1e3:.1f} ms, {e['how'][name]}" for name in e["terms"]]
        lines += [f"  {name}: {words}" for name, words in e["how"].items() if name not in e["terms"]]
        if r.get("mfu"):
            lines.append(f"  MFU {r['mfu']:.2f} of our U-Net FLOPs at the raw estimate")
    return "\n".join(lines)


def _flops_line(f: dict) -> str:
    xla = "unavailable" if f["xla_flops_per_step"] is None else (
        f"{f['xla_flops_per_step'] / 1e12:.4g} TFLOP ({f['devices']} x {f['xla'] / 1e12:.4g}), "
        f"ratio XLA/model {f['xla_over_model']:.3f}")
    peak = f.get("peak_flops_per_device")
    peak = "unknown: no MFU" if not peak else f"{peak / 1e12:.0f} TFLOP/s"
    return (f"FLOPs per step: model (U-Net fwd+bwd, analytic) {f['model_flops_per_step'] / 1e12:.4g} TFLOP; "
            f"XLA cost analysis {xla}; device peak {peak}")


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def step_report(compiled, *, analytic_flops: Optional[float], spec: Spec, devices: int = 1,
                hbm_bytes: Optional[float] = None, kernel: Optional[dict] = None,
                per_chip_batch: Optional[int] = None) -> dict:
    """Everything above for one compiled step, each read from XLA once, and the package's
    one step-time estimate (`estimate.step_estimate`) with its calibration. `analytic_flops`:
    our model FLOPs per device per step (the U-Net's forward and backward), which the MFU
    counts; `devices`: how many run the program (a global step is `devices` x the per-device
    counts); `kernel`: the FLOPs per device of kernels XLA does not count. `flops` also says
    XLA's count of the global step against ours: XLA's holds the frozen text encoder and VAE
    encoder, the optimizer and elementwise work, and skips padded conv taps, so the ratio
    is not 1 (~1.04 for the pixel-space test model; ~1.44 expected for SD v1 at 512 px with
    the VAE in the step)."""
    xla = costs(compiled)
    coll = collectives(compiled, devices)
    calls = custom_calls(compiled)
    est = step_estimate(xla, spec, analytic_flops=analytic_flops, kernel=kernel, collectives=coll,
                        custom_calls=calls, devices=devices)
    peak = spec.peak_flops
    mfu = analytic_flops / (est["seconds"] * peak) if est.get("seconds") and analytic_flops and peak else None
    model = analytic_flops * devices if analytic_flops else None
    xla_step = xla["flops"] * devices if xla["flops"] else None
    flops = {"xla": xla["flops"], "analytic": analytic_flops, "devices": devices, "model_flops_per_step": model,
             "xla_flops_per_step": xla_step, "xla_over_model": xla_step / model if xla_step and model else None,
             "peak_flops_per_device": peak}
    out = {"memory": memory(compiled, hbm_bytes), "flops": flops, "xla_costs": xla, "collectives": coll,
           "custom_calls": calls, "estimate": est, "estimate_ms": est["seconds"] * 1e3 if est.get("seconds") else None,
           "mfu": mfu}
    if kernel:
        out["kernel_flops"] = kernel
    if est.get("seconds") and per_chip_batch:
        out["images_per_s_per_chip"] = per_chip_batch / est["seconds"]
        cal = calibrate(est["seconds"], spec.kind, per_chip_batch)
        out["calibrated"] = cal
        out["calibration"] = cal.get("calibration")
        out["calibrated_images_per_s_per_chip"] = cal.get("calibrated_images_per_s_per_chip")
    return out


def custom_calls(compiled) -> dict:
    """Custom-call targets of the optimized program and how many of each: the evidence of
    which kernels ran (`tpu_custom_call` is a Pallas/Mosaic kernel, `__cudnn$fmha...` cuDNN's
    attention), and libtpu's `ConcatBitcast`s, which its v4 cost model counts as -1 s each."""
    try:
        text = compiled.as_text()
    except Exception:  # a backend without HLO text
        return {}
    out: dict = {}
    for name in re.findall(r'custom_call_target="([^"]+)"', text):
        out[name] = out.get(name, 0) + 1
    return out


def device_hbm_bytes(device) -> Optional[int]:
    """The memory a real accelerator gives this process (None on a CPU)."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # CPU devices and some runtimes have no memory stats
        return None
    return stats.get("bytes_limit")
