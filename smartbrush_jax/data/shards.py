"""ArrayRecord shards written so that a crash never leaves a file that looks finished: each
shard is written under a hidden temporary name and renamed when it is closed."""

from __future__ import annotations

import os
import shutil
from typing import Callable, List, Tuple


class ShardWriter:
    """Records into shards of at most `shard_size`; shard `i` is named `name(i)` in `folder`
    once closed. `close()` returns [(file name, records)]."""

    def __init__(self, folder: str, name: Callable[[int], str], shard_size: int):
        self.folder, self.name, self.shard_size = folder, name, shard_size
        self.done: List[Tuple[str, int]] = []
        self.writer, self.tmp, self.in_shard = None, None, 0
        self.count = 0

    def write(self, record: bytes) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self.writer is None or self.in_shard == self.shard_size:
            self._close_current()
            self.tmp = os.path.join(self.folder, f".{self.name(len(self.done))}.tmp")
            self.writer, self.in_shard = ArrayRecordWriter(self.tmp, "group_size:1"), 0
        self.writer.write(record)
        self.in_shard += 1
        self.count += 1

    def _close_current(self) -> None:
        if self.writer is not None:
            self.writer.close()
            name = self.name(len(self.done))
            os.replace(self.tmp, os.path.join(self.folder, name))
            self.done.append((name, self.in_shard))
            self.writer = None

    def close(self, allow_empty: bool = False) -> List[Tuple[str, int]]:
        """Finish the last shard; with `allow_empty`, a writer that got no record still
        writes one empty shard (a file every reader expects to find)."""
        if allow_empty and self.writer is None and not self.done:
            from array_record.python.array_record_module import ArrayRecordWriter

            self.tmp = os.path.join(self.folder, f".{self.name(0)}.tmp")
            self.writer, self.in_shard = ArrayRecordWriter(self.tmp, "group_size:1"), 0
        self._close_current()
        return self.done


def link_or_copy(src: str, dst: str) -> None:
    """`dst` becomes `src`'s content: a hard link where the file system has them (no copy,
    no extra space), else a copy under a temporary name renamed when complete."""
    if os.path.lexists(dst):
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:
        tmp = dst + ".tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
