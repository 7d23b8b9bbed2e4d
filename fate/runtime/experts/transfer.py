"""TransferEngine: copies expert blobs from the memory-mapped bundle into device cache slots.

One worker thread serves a priority queue of copy jobs: demand loads (a layer is waiting) jump ahead
of prefetches, and prefetches run in the order their prediction ranked them. Each job copies one
blob into its slot buffer and sets the cache entry's ``ready`` event; the forward pass waits on that
event only for the experts it actually needs.

On CPU the "device" slots are a RAM pool and the copy is a memcpy from the page cache; a ``Throttle``
(fate.runtime.experts.link) can make the link as slow as a PCIe generation. On CUDA the copy goes through a
pinned staging buffer and a dedicated copy stream, so it overlaps compute.
"""

from __future__ import annotations

import heapq
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from fate.runtime.experts.store import ExpertStore


@dataclass(order=True)
class _Job:
    priority: float
    seq: int
    layer: int = field(compare=False)
    expert: int = field(compare=False)
    precision: str = field(compare=False)
    slot: int = field(compare=False)
    entry: object = field(compare=False)  # anything with a threading.Event ``ready``


class TransferEngine:
    DEMAND = 0.0  # priority of a load a layer is waiting for

    def __init__(self, store: ExpertStore, slots_per_layer: list[int], slot_bytes: int, device: torch.device,
                 throttle=None, stats=None):
        self.store, self.device, self.throttle, self.stats = store, device, throttle, stats
        self.slot_bytes = slot_bytes
        self.buffers: dict[int, torch.Tensor] = {
            i: torch.empty((n, slot_bytes), dtype=torch.uint8, device=device)
            for i, n in enumerate(slots_per_layer) if n > 0}
        self._q: queue.PriorityQueue[_Job] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._error: BaseException | None = None
        self._cuda = device.type == "cuda"
        if self._cuda:
            self._stream = torch.cuda.Stream(device=device)
            self._staging = torch.empty(slot_bytes, dtype=torch.uint8).pin_memory()
            # (layer, slot) → event recorded on the compute stream after the slot's last read: kernels run
            # after the host has moved on, so a slot the cache gave up may still be read on the device
            self._last_read: dict[tuple[int, int], torch.cuda.Event] = {}
        self.copy_seconds = 0.0
        self._worker = threading.Thread(target=self._run, name="fate-transfer", daemon=True)
        self._worker.start()

    @property
    def device_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers.values())

    def slot(self, layer: int, slot: int, nbytes: int) -> torch.Tensor:
        return self.buffers[layer][slot, :nbytes]

    def read_done(self, layer: int, slot: int) -> None:
        """The forward pass has queued its last read of ``slot``: a later copy into it waits for that read
        on the device (CUDA only; on CPU the read has happened when this is called)."""
        if self._cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._last_read[(layer, slot)] = ev

    def submit(self, layer: int, expert: int, precision: str, slot: int, entry, priority: float) -> None:
        """Queue a copy of (layer, expert, precision) into ``slot``; ``entry.ready`` is set when done."""
        if self._error is not None:
            raise self._error
        self._q.put(_Job(priority, next(self._seq), layer, expert, precision, slot, entry))

    def wait(self, entry) -> float:
        """Block until ``entry`` is ready; return the seconds waited (the stall)."""
        if entry.ready.is_set():
            return 0.0
        t = time.perf_counter()
        while not entry.ready.wait(0.05):
            if self._error is not None:
                raise self._error
        return time.perf_counter() - t

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job.layer < 0:  # close()
                return
            if getattr(job.entry, "released", False):
                continue  # dropped before its turn (a prefetch nobody needs): its slot may hold another expert now
            try:
                self._copy(job)
            except BaseException as e:  # surface in the forward pass (e.g. a checksum error)
                self._error = e
                job.entry.ready.set()

    def promote(self, entry) -> None:
        """A queued prefetch that a layer now waits for becomes a demand load (ahead of other prefetches;
        a copy already on the link is not interrupted: moving a prefetch in pieces that yield to demand
        loads was tried and lost 10 points of hit rate, docs/BENCHMARKS.md)."""
        with self._q.mutex:
            q = self._q.queue
            for job in q:
                if job.entry is entry and job.priority > self.DEMAND:
                    job.priority = self.DEMAND
                    heapq.heapify(q)
                    return

    def _copy(self, job: _Job) -> None:
        blob = self.store.blob(job.layer, job.expert, job.precision)  # crc32 checked on first read
        n = blob.numel()
        t = time.perf_counter()
        dst = self.buffers[job.layer][job.slot, :n]
        if self._cuda:
            staging = self._staging[:n]
            staging.copy_(blob)
            with torch.cuda.stream(self._stream):
                ev = self._last_read.pop((job.layer, job.slot), None)
                if ev is not None:
                    self._stream.wait_event(ev)
                dst.copy_(staging, non_blocking=True)
            self._stream.synchronize()
        else:
            dst.copy_(blob)
        if self.throttle is not None:
            self.throttle.transfer(n)
        self.copy_seconds += time.perf_counter() - t
        if self.stats is not None:
            self.stats.moved(job.precision, n)
        job.entry.ready.set()

    def close(self) -> None:
        self._q.put(_Job(float("inf"), next(self._seq), -1, -1, "", -1, None))
        self._worker.join(timeout=5)
