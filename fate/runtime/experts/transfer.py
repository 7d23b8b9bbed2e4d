"""TransferEngine: copies expert blobs from the memory-mapped bundle into device cache slots, over one link.

Demand loads (a layer is waiting) go before prefetches, and prefetches in the order of their priority; a
copy already on the link is not interrupted (moving prefetches in pieces that yield to demand loads was
tried and lost 10 points of hit rate, docs/BENCHMARKS.md).  The cache (:mod:`.residency`) says which slot
a copy goes to; this module moves the bytes and clears the slot's ``pending`` flag when they have landed.

* **CPU.** The "device" slots are a RAM pool and a copy is a memcpy from the page cache (µs for a
  small expert).  A one-token step's demand loads are copied on the calling thread when the copy is short
  (:func:`copies_inline`): handing a copy of a few µs to another thread and waiting for it costs more than
  the copy.  Prefetches, a prefill's demand loads and any longer copy go to a copy thread — the native one
  of :mod:`.copier` (C++, it never takes the GIL, so it costs the model's thread nothing), or a Python
  worker where that cannot be built — while the layer computes its cached experts.  The emulated link
  (``--link``) makes every copy, inline or not, as slow as a PCIe generation on one serial link timeline:
  its copies are the copy thread's, as a device's are its copy engine's.
* **CUDA.** Every copy goes through the worker: the blob is copied into one of a pool of pinned staging
  buffers, then to the slot on a copy stream, after the compute stream's last read of that slot (an event);
  an event recorded after the copy is what the compute stream waits on — the host never synchronizes the
  compute stream for a copy.

The engine's policy (:mod:`.offload`) asks :meth:`free_at` when the link will be idle and
:meth:`copy_seconds` what a copy costs, to fetch only what can land before it is needed.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time

import torch

from fate.errors import EngineError
from fate.runtime.experts import copier as native_copier
from fate.runtime.experts.residency import ExpertCache

_QUEUED, _RUNNING, _VOID = 0, 1, 2
IDLE_SPIN_SECONDS = 2e-3  # a few layers' compute: the copy thread stays awake through a decode step
# A one-token step's demand load is copied on the model's thread only when it takes no longer than this: a
# hand-off to the copy thread and the wait for it cost a few µs, and a longer copy (an emulated link's, or a
# large expert's memcpy) leaves the thread free to compute the layer's cached experts and queue the next
# layers' prefetches meanwhile.
INLINE_MAX_SECONDS = 20e-6


def copies_inline(copy_seconds: float) -> bool:
    """Whether a one-token step's demand load of ``copy_seconds`` is copied on the model's thread (CPU)."""
    return copy_seconds <= INLINE_MAX_SECONDS


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class TransferEngine:
    DEMAND = 0.0  # priority of a load a layer is waiting for

    def __init__(self, store, cache: ExpertCache, slot_bytes: int, device: torch.device, throttle=None, stats=None,
                 copy_seconds: dict[str, float] | None = None, staging: int = 4,
                 compute_threads: int | None = None):
        self.store, self.cache, self.device, self.throttle, self.stats = store, cache, device, throttle, stats
        self.slot_bytes = slot_bytes
        self.buffers: dict[int, torch.Tensor] = {
            i: torch.empty((n, slot_bytes), dtype=torch.uint8, device=device)
            for i, n in enumerate(cache.n_slots) if n > 0}
        self._cuda = device.type == "cuda"
        self.tracks_reads = self._cuda  # whether before_read / read_done do anything (a device's stream order)
        self.inline = not self._cuda  # CPU: a one-token step copies its short demand loads itself
        self._inline: dict[str, bool] = {}  # precision -> whether its demand loads are copied on this thread
        self._native = None
        # per layer, slot -> the ticket of the last native copy queued into it: what cancel, promote and wait
        # ask the copier about while the slot is pending (a slot is given to no other expert while its copy is
        # queued or on the link, so that is the slot's one outstanding copy)
        self._tickets: list[dict[int, int]] = [{} for _ in cache.n_slots]
        self._moved = stats.bytes_by_precision if stats is not None else None  # the native copier adds to it
        self._base = {i: b.data_ptr() for i, b in self.buffers.items()}  # slot s of layer i: base + s * slot_bytes
        if not self._cuda and native_copier.available():
            rate = throttle.spec.bytes_per_s if throttle is not None and throttle.active else 0.0
            # where the model's compute threads (``compute_threads``: the run's -t, which fate's kernels or
            # torch use) leave a core free, the copy thread polls for work between layers rather than
            # sleeping (a wake-up per prefetch costs the model's thread 10-30 µs on a VM); where they do
            # not, a polling copy thread would take turns with a compute thread
            spare = _cpus() > (compute_threads or torch.get_num_threads())
            self._native = native_copier.Copier(rate, IDLE_SPIN_SECONDS if spare else 0.0)
        # what one copy takes: the profile's measurement (memcpy) or the emulated link's, whichever is slower
        self._copy_s = dict(copy_seconds or {})
        self._heap: list = []  # (priority, seq, layer, slot, gen)
        self._state: dict[tuple[int, int, int], int] = {}  # (layer, slot, gen) -> queued / running / void
        self._queued_s = 0.0  # link time of the queued (not yet started) copies
        self._queued_demand_s = 0.0  # of those, the demand loads'
        self._demand: set[tuple[int, int, int]] = set()  # (layer, slot, gen) of the queued demand loads
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)  # the worker waits here for copies to do
        self._landed_cv = threading.Condition(self._lock)  # a waiting layer waits here for a copy to land
        self._error: BaseException | None = None
        self._closed = False
        if self._cuda:
            self._stream = torch.cuda.Stream(device=device)
            self._staging = [torch.empty(slot_bytes, dtype=torch.uint8).pin_memory() for _ in range(max(1, staging))]
            self._staging_free: list[torch.cuda.Event | None] = [None] * len(self._staging)
            self._next_staging = 0
            # (layer, slot) -> event on the compute stream after the slot's last read: kernels run after the
            # host has moved on, so a slot the cache gave up may still be read on the device
            self._last_read: dict[tuple[int, int], torch.cuda.Event] = {}
            self._landed: dict[tuple[int, int], torch.cuda.Event] = {}  # (layer, slot) -> event after its copy
        self.copy_seconds_total = 0.0
        self._worker = None
        if self._native is None:
            self._worker = threading.Thread(target=self._run, name="fate-transfer", daemon=True)
            self._worker.start()

    # -- figures the policy reads ------------------------------------------------------------------
    @property
    def device_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers.values())

    @staticmethod
    def now() -> float:
        return time.perf_counter()

    def copy_seconds(self, precision: str) -> float:
        """Link time of one copy of an expert at ``precision``."""
        t = self._copy_s.get(precision, 0.0)
        if self.throttle is not None and self.throttle.active:
            t = max(t, self.store.blob_bytes(precision) / self.throttle.spec.bytes_per_s)
        return t

    def free_at(self, demand_only: bool = False) -> float:
        """When the link will have finished the copy on it and every copy queued so far — only the demand
        loads (which go first) with ``demand_only`` (an estimate: the emulated link's own timeline, or now,
        plus the queued copies)."""
        if self._native is not None:
            return self._native.free_at(demand_only)
        base = self.now()
        if self.throttle is not None and self.throttle.active:
            base = max(base, self.throttle.link_free_at)
        return base + (self._queued_demand_s if demand_only else self._queued_s)

    # -- slots -------------------------------------------------------------------------------------
    def slot(self, layer: int, slot: int, nbytes: int) -> torch.Tensor:
        return self.buffers[layer][slot, :nbytes]

    def before_read(self, layer: int, slot: int) -> None:
        """About to compute from ``slot``: on CUDA the compute stream waits (on the device) for its copy."""
        if self._cuda:
            ev = self._landed.get((layer, slot))
            if ev is not None:
                torch.cuda.current_stream(self.device).wait_event(ev)

    def read_done(self, layer: int, slot: int) -> None:
        """The forward pass has queued its last read of ``slot``: a later copy into it waits for that read
        on the device (CUDA only; on CPU the read has happened when this is called)."""
        if self._cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._last_read[(layer, slot)] = ev

    # -- queueing ----------------------------------------------------------------------------------
    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _copies_inline(self, layer: int, slot: int) -> bool:
        return self.inline_demand(self.cache.precision_at[layer][slot])

    def inline_demand(self, precision: str) -> bool:
        """Whether a one-token step's demand load at ``precision`` is copied on the calling thread."""
        v = self._inline.get(precision)
        if v is None:
            v = self._inline[precision] = self.inline and copies_inline(self.copy_seconds(precision))
        return v

    def demand(self, layer: int, slot: int, *, inline: bool) -> None:
        """Copy the expert the cache put in ``slot`` now (``inline`` and a short copy: on this thread) or ahead
        of every prefetch."""
        self._check()
        gen = self.cache.gen[layer][slot]
        if inline and self._copies_inline(layer, slot):
            self._copy(layer, slot, gen, inline=True)
        else:
            self._push(self.DEMAND, layer, slot, gen)

    def prefetch(self, layer: int, slot: int, priority: float) -> None:
        """Queue the copy into ``slot`` behind every demand load and every prefetch of a lower priority."""
        self._check()
        self._push(priority, layer, slot, self.cache.gen[layer][slot])

    def native_queue(self, precision: str, queued: list[list[int]]):
        """A native object queueing the value rule's decisions (:mod:`.native_policy`'s ``Queuer``): each one's
        slot reserved in the cache and its copy at ``precision`` submitted to the native copier, as
        :meth:`.offload.Offloader._queue_planned` does through :meth:`.residency.ExpertCache.reserve` and
        :meth:`prefetch`, the slot appended to ``queued[layer]`` — or None without the native copier."""
        make = native_copier.queuer() if self._native is not None else None
        if make is None:
            return None
        bases = [self._base.get(i, 0) for i in range(len(self.cache.n_slots))]
        return make(self.cache, self._native, bases, self.slot_bytes, self._tickets, self._moved,
                    self.store.blob_address, precision, queued)

    def poll(self, layer: int) -> None:
        """Settle the native copies that have landed since, whatever their layer: their ``pending`` flags
        cleared and their bytes counted in one native call (:meth:`.copier.Copier.settle`), on this thread —
        the copy thread never touches the cache."""
        if self._native is not None:
            self._native.settle()

    def _push(self, priority: float, layer: int, slot: int, gen: int) -> None:
        if self._native is not None:
            cache = self.cache
            precision = cache.precision_at[layer][slot]
            src, n = self.store.blob_address(layer, cache.expert_at[layer][slot], precision)
            self._tickets[layer][slot] = self._native.submit(src, self._base[layer] + slot * self.slot_bytes, n, priority,
                                                             cache.pending[layer], slot, self._moved, precision)
            return
        with self._cv:
            key = (layer, slot, gen)
            self._state[key] = _QUEUED
            c = self.copy_seconds(self.cache.precision_at[layer][slot])
            self._queued_s += c
            if priority == self.DEMAND:
                self._queued_demand_s += c
                self._demand.add(key)
            heapq.heappush(self._heap, (priority, next(self._seq), layer, slot, gen))
            self._cv.notify_all()

    def _dequeued(self, key: tuple[int, int, int]) -> None:
        """A queued copy leaves the queue (taken off it, or started): its link time leaves the totals."""
        c = self.copy_seconds(self.cache.precision_at[key[0]][key[1]])
        self._queued_s = max(0.0, self._queued_s - c)
        if key in self._demand:
            self._demand.discard(key)
            self._queued_demand_s = max(0.0, self._queued_demand_s - c)

    def _take(self, layer: int, slot: int, gen: int) -> bool:
        """Take a queued copy off the queue (it is void for the worker); False if it was not queued."""
        key = (layer, slot, gen)
        if self._state.get(key) != _QUEUED:
            return False
        self._state[key] = _VOID
        self._dequeued(key)
        return True

    def promote(self, layer: int, slot: int, *, inline: bool) -> None:
        """A queued prefetch that a layer now waits for becomes a demand load: copied at once on this thread
        (``inline`` and a short copy, CPU) or moved ahead of every other prefetch.  One already on the link is
        left to land."""
        gen = self.cache.gen[layer][slot]
        inline = inline and self._copies_inline(layer, slot)
        if self._native is not None:
            ticket = self._tickets[layer].get(slot)
            if ticket is not None and self._native.cancel(ticket):
                if inline:
                    self._copy(layer, slot, gen, inline=True)
                else:
                    self._push(self.DEMAND, layer, slot, gen)
            return
        with self._cv:
            taken = self._take(layer, slot, gen)
        if taken:
            if inline:
                self._copy(layer, slot, gen, inline=True)
            else:
                self._push(self.DEMAND, layer, slot, gen)

    def cancel(self, layer: int, slot: int) -> bool:
        """Cancel the queued copy into ``slot`` (True); one already on the link cannot be (False)."""
        if self._native is not None:
            ticket = self._tickets[layer].get(slot)
            return ticket is not None and self._native.cancel(ticket)
        with self._cv:
            return self._take(layer, slot, self.cache.gen[layer][slot])

    def wait(self, layer: int, slot: int) -> float:
        """Block until the copy into ``slot`` has landed; return the seconds waited (the stall)."""
        pending = self.cache.pending[layer]
        if not pending[slot]:
            return 0.0
        t = time.perf_counter()
        if self._native is not None:
            ticket = self._tickets[layer].get(slot)
            if ticket is None:
                raise EngineError(f"layer {layer}: waiting for slot {slot}, but no copy into it is queued")
            self._native.wait(ticket)  # and settles it (with whatever else has landed)
            return time.perf_counter() - t
        with self._lock:
            while pending[slot]:
                self._check()
                if self._state.get((layer, slot, self.cache.gen[layer][slot]), _VOID) == _VOID:
                    raise EngineError(f"layer {layer}: waiting for slot {slot}, but no copy into it is queued")
                self._landed_cv.wait(0.05)
        return time.perf_counter() - t

    # -- the worker --------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._closed:
                        return
                    while self._heap and self._state.get(self._heap[0][2:]) != _QUEUED:
                        _, _, layer, slot, gen = heapq.heappop(self._heap)
                        self._state.pop((layer, slot, gen), None)
                    if self._heap:
                        break
                    self._cv.wait()
                _, _, layer, slot, gen = heapq.heappop(self._heap)
                self._state[(layer, slot, gen)] = _RUNNING
                self._dequeued((layer, slot, gen))
            try:
                self._copy(layer, slot, gen)
            except BaseException as e:  # surface in the forward pass (e.g. a checksum error)
                with self._lock:
                    self._error = e
                    self._landed_cv.notify_all()

    def _copy(self, layer: int, slot: int, gen: int, inline: bool = False) -> None:
        cache = self.cache
        expert, precision = cache.expert_at[layer][slot], cache.precision_at[layer][slot]
        t = time.perf_counter()
        if self._native is not None:  # inline: on this thread, on the native link's timeline
            src, n = self.store.blob_address(layer, expert, precision)  # crc32 checked on first read
            self._native.copy_now(src, self._base[layer] + slot * self.slot_bytes, n)
            self.copy_seconds_total += time.perf_counter() - t
            if self.stats is not None:
                self.stats.moved(precision, n)
            cache.landed(layer, slot, gen)  # only ever inline: the copy thread's own copies settle in poll()
            return
        blob = self.store.blob(layer, expert, precision)  # crc32 checked on first read
        n = blob.numel()
        dst = self.buffers[layer][slot, :n]
        if self._cuda:
            i = self._next_staging
            self._next_staging = (i + 1) % len(self._staging)
            busy = self._staging_free[i]
            if busy is not None:
                busy.synchronize()  # this staging buffer's last copy to the device is done (worker thread only)
            staging = self._staging[i][:n]
            staging.copy_(blob)
            with torch.cuda.stream(self._stream):
                ev = self._last_read.pop((layer, slot), None)
                if ev is not None:
                    self._stream.wait_event(ev)
                dst.copy_(staging, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._stream)
            self._staging_free[i] = done
            self._landed[(layer, slot)] = done
        else:
            dst.copy_(blob)
        if self.throttle is not None and self._native is None:
            self.throttle.transfer(n)
        self.copy_seconds_total += time.perf_counter() - t
        if self.stats is not None:
            self.stats.moved(precision, n)
        if inline:  # on the thread that reads the slot: nobody to wake
            cache.landed(layer, slot, gen)
            return
        with self._lock:
            cache.landed(layer, slot, gen)
            self._state.pop((layer, slot, gen), None)
            self._landed_cv.notify_all()

    def close(self) -> None:
        if self._native is not None:
            self._native.close()
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=5)
