"""Prepared folders: examples read from the raw formats (`sources.py`), checked once
(`validate.py`), written as `tf.train.Example` records (`records.py`) into ArrayRecord shards
that form a TFDS dataset (`tfds_info.py`), plus `metadata.json` (counts per source, classes,
skipped records by reason). The command is `smartbrush_jax/cli/prepare.py`.

How a run goes (in `OUT.partial`, renamed to `OUT` when complete):

1. The inputs are split into work units (`units.py`): `--unit-images` images of COCO or
   OpenImages (an image's annotations stay together), or one webdataset tar.
2. `manifest.json` records the fingerprint of the inputs and options (paths, sizes and
   modification times of the files, the settings that change records). A rerun into the
   same `OUT.partial` with the same fingerprint resumes; another fingerprint is refused.
3. The units run on `--workers` processes (a fork pool; `1` runs them in this process).
   Each writes its shards and then, atomically, its summary `units/KEY.json`: the summaries
   are the manifest of finished units, and a rerun redoes only the units without one.
4. When every unit is done, the unit shards are linked (hard links: no copy) under their
   TFDS names in plan order -- seg shards of every unit, then t2i shards -- and
   `dataset_info.json`, `features.json`, `blip_captions.jsonl` and `metadata.json` written.

Records, skip counts and their order depend on the inputs only, not on the number of
workers: the plan is fixed, each unit's records come out in its own reading order, and
ids are the source's own (`coco:<annotation id>`, `openimages:<mask file>`,
`laion:<tar>:<key>`).
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from typing import Dict, Iterable, Optional

from smartbrush_jax.data import tfds_info
from smartbrush_jax.data.shards import link_or_copy
from smartbrush_jax.data.units import KINDS, Job, read_summary, run_unit, set_job, unit_key
from smartbrush_jax.data.validate import ALL_REASONS, Counter
from smartbrush_jax.errors import Failure, InputError

FORMAT_VERSION = 2
MANIFEST = "manifest.json"


class ListSource:
    """Examples already in memory (tests, small tools) as a source of one work unit."""

    def __init__(self, examples: Iterable):
        self.examples = list(examples)

    def units(self) -> list:
        return [0]

    def read(self, unit, counts: Counter):
        return iter(self.examples)


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def prepare(out: str, sources: Dict[str, object], *, counts: Optional[Dict[str, Counter]] = None,
            shard_size: int = 5000, workers: int = 1, captioning=None, progress: bool = True,
            extra_meta: Optional[dict] = None, fingerprint: Optional[dict] = None) -> dict:
    """Write the examples of `sources` (name -> source) into the folder `out` (resuming the
    units an earlier run into `out` finished); return the metadata. `counts`: skips counted
    before (e.g. a captions side-file's bad lines), by source name. `captioning`: a
    `captioning.CaptionSpec` to caption objects that have no caption."""
    units_dir = os.path.join(out, "units")
    os.makedirs(units_dir, exist_ok=True)
    plan = [(name, i, u) for name, source in sources.items() for i, u in enumerate(source.units())]
    _check_manifest(out, {"format_version": FORMAT_VERSION, "shard_size": shard_size, "units": len(plan),
                          **(fingerprint or {})})
    if os.path.isfile(os.path.join(out, "metadata.json")):  # assembled, then stopped while cleaning up
        return _finish(out)
    summaries = {}
    for name, i, _ in plan:
        s = read_summary(units_dir, unit_key(name, i))
        if s is not None:
            summaries[s["key"]] = s
    todo = [j for j, (name, i, _) in enumerate(plan) if unit_key(name, i) not in summaries]
    report = Progress(len(plan), len(summaries), progress)
    if summaries and todo:
        report.say(f"resuming {out}: {len(summaries)} of {len(plan)} work units were finished, {len(todo)} to do")
    job = Job(units_dir, sources, plan, shard_size)
    if workers <= 1 or len(todo) <= 1:
        _run_here(job, todo, captioning, report, summaries)
    else:
        _run_pool(job, todo, workers, captioning, report, summaries)
    meta = _assemble(out, plan, summaries, sources, counts or {}, extra_meta)
    report.finish()
    return meta


class Progress:
    """A line every `every` seconds: units and examples done, examples/s, ETA."""

    def __init__(self, total: int, done_before: int, enabled: bool = True, every: float = 10.0):
        self.total, self.done, self.enabled, self.every = total, done_before, enabled, every
        self.start = self.last = time.time()
        self.new_units, self.examples = 0, 0

    def say(self, text: str) -> None:
        if self.enabled:
            print(f"  prepare: {text}", file=sys.stderr, flush=True)

    def add(self, summary: dict) -> None:
        self.done += 1
        self.new_units += 1
        self.examples += summary["examples"]
        if time.time() - self.last >= self.every:
            self.tick()

    def tick(self) -> None:
        self.last = now = time.time()
        rate = self.examples / max(now - self.start, 1e-9)
        eta = (now - self.start) / self.new_units * (self.total - self.done) if self.new_units else float("nan")
        self.say(f"{self.done}/{self.total} work units ({100 * self.done / max(self.total, 1):.0f}%), "
                 f"{self.examples} examples, {rate:.0f} examples/s, ETA {_duration(eta)}")

    def done_line(self) -> str:
        return f"{self.examples} examples in {time.time() - self.start:.0f}s"

    def finish(self) -> None:
        self.say(f"{self.new_units} work units, {self.done_line()}")


def _duration(s: float) -> str:
    if s != s:
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _check_manifest(out: str, fingerprint: dict) -> None:
    path = os.path.join(out, MANIFEST)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                old = json.load(f)["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            old = None  # cut short before the first unit: nothing to keep
        if old is not None and old != json.loads(json.dumps(fingerprint)):
            differ = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != json.loads(json.dumps(
                fingerprint.get(k))))
            raise InputError(f"{out} holds an interrupted prepare of other inputs or options (they differ in: "
                             f"{', '.join(differ)}): rerun with the same ones to resume it, or pass --restart to "
                             "start over")
        if old is not None:
            return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"fingerprint": fingerprint, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, f, indent=2)
    os.replace(tmp, path)


def _run_here(job: Job, todo, captioning, report, summaries) -> None:
    job.captioner = captioning.load(captioning.devices()[0]) if captioning is not None and todo else None
    set_job(job)
    try:
        for j in todo:
            s = run_unit(j)
            summaries[s["key"]] = s
            report.add(s)
    finally:
        set_job(None)


def _run_pool(job: Job, todo, workers: int, captioning, report, summaries) -> None:
    from smartbrush_jax.data.captioning import CaptionService

    service = CaptionService(captioning, workers) if captioning is not None else None
    # fork: the workers share the plan (millions of annotations) copy-on-write; a process
    # that has started JAX's threads must not fork, and sends each worker a copy instead
    forked = "jax" not in sys.modules
    ctx = mp.get_context("fork" if forked else "forkserver")
    slots = ctx.Value("i", 0)
    set_job(job)
    try:
        queues = (service.requests, service.replies) if service is not None else None
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                                    initargs=(slots, queues, None if forked else job)) as pool:
            pending = {pool.submit(run_unit, j): j for j in todo}
            while pending:
                done, _ = concurrent.futures.wait(pending, timeout=2.0,
                                                  return_when=concurrent.futures.FIRST_COMPLETED)
                if not done:
                    if service is not None:
                        service.check()
                    if time.time() - report.last >= report.every:
                        report.tick()
                    continue
                for f in done:
                    j = pending.pop(f)
                    try:
                        s = f.result()
                    except concurrent.futures.process.BrokenProcessPool:
                        # a worker killed (out of memory, a crash in a native library): the pool
                        # cannot go on, and a multiprocessing.Pool would wait for its unit for ever
                        raise Failure(
                            f"a prepare worker process died (killed for memory, or a crash in a native library) "
                            f"with {len(pending) + 1} unit(s) unfinished, {unit_key(*job.plan[j][:2])} among them; the "
                            f"{len(summaries)} finished unit(s) are kept: rerun the same command to resume, with "
                            "--workers 1 to see which record it is") from None
                    summaries[s["key"]] = s
                    report.add(s)
    finally:
        set_job(None)
        if service is not None:
            service.stop()


def _init_worker(slots, queues, job) -> None:
    from smartbrush_jax.data import units
    from smartbrush_jax.data.captioning import CaptionClient

    if job is not None:
        units.set_job(job)
    with slots.get_lock():
        slot = slots.value
        slots.value += 1
    if queues is not None:
        requests, replies = queues
        units._JOB.captioner = CaptionClient(slot, requests, replies[slot])


def _assemble(out: str, plan, summaries, sources, counts, extra_meta) -> dict:
    """Link the unit shards under their TFDS names and write the metadata."""
    units_dir = os.path.join(out, "units")
    for stale in glob.glob(os.path.join(out, tfds_info.DATASET_NAME["prepared"] + "-*")):
        os.remove(stale)  # links of an assembly cut short (ours: this is OUT.partial)
    keys = [unit_key(name, i) for name, i, _ in plan]
    ordered = [(kind, f, n) for kind in KINDS for key in keys for f, n in summaries[key]["files"][kind]]
    components, names, lengths = {}, [], []
    for j, (kind, f, n) in enumerate(ordered):
        name = tfds_info.shard_name("prepared", j, len(ordered))
        link_or_copy(os.path.join(units_dir, f), os.path.join(out, name))
        comp = components.setdefault(kind, {"count": 0, "files": [], "shard_lengths": []})
        comp["count"] += n
        comp["files"].append(name)
        comp["shard_lengths"].append(n)
        names.append(name)
        lengths.append(n)
    all_counts = {name: Counter(counts.get(name, {})) for name in list(counts) + list(sources)}
    classes = set()
    for name, source in sources.items():
        all_counts[name].update(getattr(source, "plan_counts", {}))
    for kind in KINDS:
        components.setdefault(kind, {"count": 0, "files": [], "shard_lengths": []})["sources"] = {}
    for key in keys:
        s = summaries[key]
        all_counts[s["source"]].update(s["counts"])
        classes.update(s["classes"])
        for kind, per in s["sources"].items():
            src = components[kind]["sources"]
            for k, v in per.items():
                src[k] = src.get(k, 0) + v
    num_bytes = sum(os.path.getsize(os.path.join(out, n)) for n in names)
    tfds_info.write_info(out, "prepared", [os.path.join(out, n) for n in names], lengths, num_bytes)
    captions = [os.path.join(units_dir, k + ".blip.jsonl") for k in keys]
    if any(os.path.isfile(p) for p in captions):
        with open(os.path.join(out, "blip_captions.jsonl"), "w") as f:
            for p in captions:
                if os.path.isfile(p):
                    with open(p) as g:
                        for line in g:
                            row = json.loads(line)
                            f.write(json.dumps({"annotation_id": row["annotation_id"], "caption": row["caption"]})
                                    + "\n")
    meta = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "components": components,
        "classes": sorted(classes),
        "skipped": {name: {r: c[r] for r in ALL_REASONS if c.get(r, 0)} for name, c in all_counts.items()},
        "other_counts": {name: {r: v for r, v in c.items() if r not in ALL_REASONS} for name, c in all_counts.items()},
        "tfds": {"name": tfds_info.DATASET_NAME["prepared"], "split": tfds_info.SPLIT,
                 "order": "seg shards, then t2i shards"},
        **(extra_meta or {}),
    }
    tmp = os.path.join(out, "metadata.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(out, "metadata.json"))
    return _finish(out)


def _finish(out: str) -> dict:
    """Remove the work files of an assembled folder (the manifest last); its metadata."""
    shutil.rmtree(os.path.join(out, "units"), ignore_errors=True)
    if os.path.exists(os.path.join(out, MANIFEST)):
        os.remove(os.path.join(out, MANIFEST))
    with open(os.path.join(out, "metadata.json")) as f:
        return json.load(f)


def is_prepared(folder: str) -> bool:
    """A folder this command wrote: our metadata.json, not a latent cache's."""
    try:
        with open(os.path.join(folder, "metadata.json")) as f:
            meta = json.load(f)
        return "format_version" in meta and "components" in meta and not meta.get("latents")
    except (OSError, ValueError, TypeError):
        return False
