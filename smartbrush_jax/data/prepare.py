"""Prepared folders: examples read from the raw formats (`sources.py`) written into
ArrayRecord shards (`seg-NNNNN-of-MMMMM.array_record`, `t2i-...`) plus `metadata.json`
(counts per source, classes, skipped records by reason). Every example is decoded and
checked once (`validate.py`), so training reads clean records; records are plain bytes +
JSON (`records.py`), never pickles. A source that fails mid-way is counted and what it
gave is kept. The command is `smartbrush_jax/cli/prepare.py` (`python -m
smartbrush_jax.data.prepare`)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, Iterable, List

from smartbrush_jax.data.records import encode_mask, pack_record
from smartbrush_jax.data.sources import RawExample
from smartbrush_jax.data.validate import ALL_REASONS, Counter
from smartbrush_jax.errors import InputError

FORMAT_VERSION = 1


class ShardWriter:
    """Writes records into shards of `shard_size`, named `-of-` the total at close."""

    def __init__(self, out: str, prefix: str, shard_size: int):
        self.out, self.prefix, self.shard_size = out, prefix, shard_size
        self.paths: List[str] = []
        self.writer = None
        self.count = 0

    def write(self, record: bytes) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self.writer is None or self.count % self.shard_size == 0:
            self._close_current()
            path = os.path.join(self.out, f".{self.prefix}-{len(self.paths):05d}.tmp")
            self.paths.append(path)
            self.writer = ArrayRecordWriter(path, "group_size:1")
        self.writer.write(record)
        self.count += 1

    def _close_current(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def close(self) -> List[str]:
        self._close_current()
        final = []
        for i, tmp in enumerate(self.paths):
            path = os.path.join(self.out, f"{self.prefix}-{i:05d}-of-{len(self.paths):05d}.array_record")
            os.replace(tmp, path)
            final.append(os.path.basename(path))
        return final


def to_record(ex: RawExample) -> bytes:
    fields = {"id": ex.id, "source": ex.source, "kind": ex.kind, "label": ex.label, "caption": ex.caption,
              "image": ex.image_bytes}
    if ex.mask is not None:
        fields["mask"] = encode_mask(ex.mask)
        fields["box"] = ex.box
    return pack_record(fields)


def prepare(out: str, readers: Dict[str, Iterable[RawExample]], counts: Dict[str, Counter], shard_size: int = 5000,
            captioner=None, progress: bool = True, extra_meta: dict = None) -> dict:
    """Drain `readers` (name -> iterator of RawExample) into shards; return the metadata."""
    os.makedirs(out, exist_ok=True)
    writers = {"seg": ShardWriter(out, "seg", shard_size), "t2i": ShardWriter(out, "t2i", shard_size)}
    per_source = {"seg": Counter(), "t2i": Counter()}
    classes = set()
    generated = []
    start, n = time.time(), 0
    for name, reader in readers.items():
        pending: List[RawExample] = []
        for ex in _guarded(reader, name, counts.setdefault(name, Counter())):
            if captioner is not None and ex.kind == "seg" and not ex.caption:
                pending.append(ex)
                if len(pending) >= captioner.batch_size:
                    n += _flush(pending, captioner, writers, per_source, classes, generated)
                continue
            _write(ex, writers, per_source, classes)
            n += 1
            if progress and n % 1000 == 0:
                print(f"  prepare: {n} examples ({n / (time.time() - start):.0f}/s) [{name}]", file=sys.stderr)
        if pending:
            n += _flush(pending, captioner, writers, per_source, classes, generated)
    meta = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "components": {k: {"count": w.count, "files": w.close(), "sources": dict(per_source[k])}
                       for k, w in writers.items()},
        "classes": sorted(classes),
        "skipped": {name: {r: c.get(r, 0) for r in ALL_REASONS if c.get(r, 0)} for name, c in counts.items()},
        "other_counts": {name: {r: v for r, v in c.items() if r not in ALL_REASONS} for name, c in counts.items()},
        **(extra_meta or {}),
    }
    if generated:
        with open(os.path.join(out, "blip_captions.jsonl"), "w") as f:
            f.writelines(json.dumps(g) + "\n" for g in generated)
    with open(os.path.join(out, "metadata.json"), "w") as f:
        json.dump(meta, f, indent=2)
    if progress:
        print(f"  prepare: {n} examples in {time.time() - start:.0f}s", file=sys.stderr)
    return meta


def _guarded(reader, name: str, counts: Counter):
    """The reader's examples until it ends or fails: a failure mid-way (a shard cut short,
    a file gone, a reader's bug) is counted `unreadable_source` with a warning and its
    traceback; what it yielded before stays written, and the next source is read."""
    import traceback

    n = 0
    it = iter(reader)
    while True:
        try:
            ex = next(it)
        except StopIteration:
            return
        except InputError:
            raise
        except Exception as e:
            counts["unreadable_source"] += 1
            print(f"warning: {name}: reading stopped after {n} examples ({type(e).__name__}: {e}); they are kept, "
                  "the other sources are read", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            return
        n += 1
        yield ex


def is_prepared(folder: str) -> bool:
    """A folder this command wrote: our metadata.json, not a latent cache's."""
    try:
        with open(os.path.join(folder, "metadata.json")) as f:
            meta = json.load(f)
        return "format_version" in meta and "components" in meta and not meta.get("latents")
    except (OSError, ValueError, TypeError):
        return False


def _write(ex, writers, per_source, classes):
    writers[ex.kind].write(to_record(ex))
    per_source[ex.kind][ex.source] += 1
    if ex.label:
        classes.add(ex.label)


def _flush(pending, captioner, writers, per_source, classes, generated) -> int:
    caps = captioner.caption([captioner.crop(ex.image, ex.box) for ex in pending])
    for ex, cap in zip(pending, caps):
        ex.caption = cap
        generated.append({"annotation_id": ex.id.split(":", 1)[1], "caption": cap})
        _write(ex, writers, per_source, classes)
    n = len(pending)
    pending.clear()
    return n


if __name__ == "__main__":
    from smartbrush_jax.cli.prepare import main

    sys.exit(main())
