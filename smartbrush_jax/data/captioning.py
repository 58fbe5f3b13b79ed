"""BLIP on accelerators for `prepare`: one captioning process per device, fed by the decode
workers.

    workers (decode, crop) --requests queue--> captioner on cuda:0 --reply queue of the worker--> worker
                                           \\-> captioner on cuda:1 ...

Every worker sends the crops of one work unit (often hundreds) and waits for their
captions; whichever device is free takes the next request and runs it in batches of
`--blip-batch`, so the devices stay busy while the workers decode the next units. The
captioners are started with `spawn` (CUDA does not survive a fork) and load the model once;
a model that cannot be loaded is an InputError before any work, a captioner that dies
mid-run (out of GPU memory, a killed process) stops the run with its exit code (what is
finished stays, a rerun resumes).
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import queue
from typing import List

from smartbrush_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class CaptionSpec:
    model_dir: str
    device: str = "cpu"  # cpu | cuda (every GPU torch sees) | cuda:N
    batch: int = 16
    dtype: str = "auto"  # float16 on a GPU, float32 on the CPU; or float16 | bfloat16 | float32

    def devices(self) -> List[str]:
        """The devices to run a captioner on: InputError for one that is not there."""
        if self.device == "cpu":
            return ["cpu"]
        if not (self.device == "cuda" or self.device.startswith("cuda:")):
            raise InputError(f"--blip-device {self.device}: use cpu, cuda (every GPU) or cuda:N")
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise InputError(f"--blip-device {self.device}: torch sees no GPU (is this torch build a CUDA one?)")
        if self.device == "cuda":
            return [f"cuda:{i}" for i in range(n)]
        index = self.device.split(":", 1)[1]
        if not index.isdigit() or int(index) >= n:
            raise InputError(f"--blip-device {self.device}: torch sees {n} GPU(s) (cuda:0 to cuda:{n - 1})")
        return [self.device]

    def load(self, device: str):
        from smartbrush_jax.data.blip import BlipCaptioner

        return BlipCaptioner(self.model_dir, self.batch, device=device, dtype=self.dtype)


class CaptionService:
    """The captioner processes, one per device of `spec`; `client(slot)` for worker `slot`
    of `n_clients`."""

    def __init__(self, spec: CaptionSpec, n_clients: int, start_timeout: float = 900.0):
        self.devices = spec.devices()
        ctx = mp.get_context("spawn")
        self.requests = ctx.Queue()
        self.replies = [ctx.Queue() for _ in range(n_clients)]
        status = ctx.Queue()
        self.procs = [ctx.Process(target=_serve, args=(spec, d, self.requests, self.replies, status), daemon=True,
                                  name=f"blip-{d}") for d in self.devices]
        for p in self.procs:
            p.start()
        try:
            for _ in self.procs:  # each reports once its model is loaded (or why it is not)
                kind, device, message = self._status(status, start_timeout)
                if kind == "error":
                    raise InputError(message)
        except BaseException:
            self.stop()
            raise

    def _status(self, status, timeout: float):
        waited = 0.0
        while True:
            try:
                return status.get(timeout=1.0)
            except queue.Empty:
                waited += 1.0
                self.check()
                if waited > timeout:
                    raise RuntimeError(f"BLIP captioners did not load within {timeout:.0f}s") from None

    def client(self, slot: int) -> "CaptionClient":
        return CaptionClient(slot, self.requests, self.replies[slot])

    def check(self) -> None:
        """RuntimeError when a captioner process has died."""
        for p in self.procs:
            if p.exitcode is not None:
                raise RuntimeError(f"the BLIP captioner on {p.name[5:]} exited with code {p.exitcode} (out of "
                                   "memory? killed?); finished work units are kept: rerun the same command to "
                                   "resume")

    def stop(self) -> None:
        for _ in self.procs:
            self.requests.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join()


class CaptionClient:
    """What a worker calls: `caption(crops)` -> captions, computed by whichever captioner is free."""

    def __init__(self, slot: int, requests, reply):
        self.slot, self.requests, self.reply = slot, requests, reply

    def caption(self, crops) -> List[str]:
        self.requests.put((self.slot, list(crops)))
        kind, value = self.reply.get()
        if kind == "error":
            raise RuntimeError(f"BLIP captioning failed: {value}")
        return value


def _serve(spec: CaptionSpec, device: str, requests, replies, status) -> None:
    try:
        captioner = spec.load(device)
    except Exception as e:  # InputError from the loader, CUDA errors, ...
        status.put(("error", device, f"--blip-model {spec.model_dir} on {device}: {e}"))
        return
    status.put(("ready", device, ""))
    while True:
        item = requests.get()
        if item is None:
            return
        slot, crops = item
        try:
            replies[slot].put(("ok", captioner.caption(crops)))
        except Exception as e:  # reported to the worker, which stops the run with it
            replies[slot].put(("error", f"{type(e).__name__}: {e}"))
