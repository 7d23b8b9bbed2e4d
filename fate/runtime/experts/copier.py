"""A native copy thread for the CPU expert cache: copies (and the emulated link's waits) never take the GIL.

A Python worker thread doing the copies competes with the thread that runs the model for the GIL at every
job (its queue handling, the copy's bookkeeping, the link emulation's sleep), and a one-token decode step
whose layer computes in a few hundred µs loses more to that than a copy costs; a mutex between the two
threads cost as much again on a loaded machine (the copy thread, descheduled while holding it, made the
model's thread wait: 40 µs a submission, 8 ms at worst).  This extension runs one C++ thread with a
priority queue of memcpy jobs between tensors the caller keeps alive, fed through a lock-free ring (the
model's thread never blocks on the copy thread), with ticket states the two threads compare-exchange; it
emulates one serial link itself (a copy of n bytes occupies it for n / rate seconds after the previous one, non-
preemptively), so inline copies (:meth:`Copier.copy_now`, on the calling thread with the GIL released)
and queued ones share one link timeline.  Python never waits for the GIL of the copy thread: it settles the copies landed since it last asked (:meth:`settle`: a ring the copy
thread appends to, walked in C++ on the calling thread, which clears each copy's ``pending`` flag in the
cache's list and counts its bytes — no Python call per copy), or waits for a ticket with the GIL released.  The model's thread waits by spinning (a
sleeping thread's CPU halts, and a virtual one then runs the next microseconds of work several times
slower), as a CUDA event synchronize does by default.

Built on first use with torch's cpp_extension (g++; a few seconds, once per machine); where it cannot be
built, :func:`available` is False and the TransferEngine keeps its Python worker.  The same extension
carries the policy's decode hot paths (:mod:`.native_policy`): :func:`rank_topn`, :func:`value_plan`,
:func:`value_planner` and :func:`queuer`, the decode step (:mod:`.native_step`): :func:`decode_step`, and the expert cache's eviction policies (:mod:`.native_evict`): :func:`eviction_policies`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading

from fate.runtime.experts import native_evict, native_policy, native_step


_SOURCE = r"""
#include <torch/extension.h>
#include <atomic>
#include <algorithm>
#include <chrono>
#include <cstring>
#include <queue>
#include <thread>
#include <vector>
#include <pybind11/stl.h>

// Lock-free between the two threads: the model's thread only ever stores into the submission ring and
// compare-exchanges ticket states, so it never blocks on the copy thread (which a loaded machine may have
// descheduled at any moment).  Times are nanoseconds of the monotonic clock, as Python's perf_counter.

static int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// moved[key] += n (the stats' bytes per precision, a dict); a Python error is left set for the caller
static void add_moved(PyObject* moved, PyObject* key, int64_t n) {
  PyObject* was = PyDict_GetItemWithError(moved, key);  // borrowed
  if (was == nullptr && PyErr_Occurred()) return;
  PyObject* add = PyLong_FromLongLong(n);
  PyObject* sum = add == nullptr || was == nullptr ? add : PyNumber_Add(was, add);
  if (sum != nullptr) PyDict_SetItem(moved, key, sum);
  if (sum != add) Py_XDECREF(sum);
  Py_XDECREF(add);
}

static inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// The model's thread waits by spinning, as a CUDA event synchronize does by default: a thread that sleeps
// lets its (virtual) CPU halt, and what it runs next runs 2-5x slower for a while (cold caches and
// predictors; measured on the 2-core VM: a 0.5 ms sleep makes the next 6 us of numpy take 16 us).
static void spin_until_ns(int64_t t) {
  while (now_ns() < t) cpu_relax();
}

// The copy thread sleeps, but wakes a little early and spins the rest, so the emulated link's copies
// land on time (a sleep's wake-up comes 50-100 us late on a loaded VM).
static void sleep_until_ns(int64_t t) {
  constexpr int64_t EARLY = 150000;
  int64_t left = t - now_ns() - EARLY;
  if (left > 0) std::this_thread::sleep_for(std::chrono::nanoseconds(left));
  spin_until_ns(t);
}

enum State : int { FREE = 0, QUEUED = 1, RUNNING = 2, DONE = 3, CANCELLED = 4 };

struct Job { double priority; int64_t seq; int64_t ticket; uint8_t* src; uint8_t* dst; int64_t n; };
struct Later {
  bool operator()(const Job& a, const Job& b) const {  // the top is the lowest priority, then the oldest
    return a.priority != b.priority ? a.priority > b.priority : a.seq > b.seq;
  }
};

class Copier {
  static constexpr int64_t RING = 1 << 12, STATES = 1 << 16, DONE_RING = 1 << 12;

 public:
  // idle_spin_s: how long the idle copy thread polls for work before it sleeps.  Waking a sleeping
  // thread costs the submitting one a futex call and, on a VM, an interrupt to the other CPU (10-30 us
  // measured on the 2-core VM, per prefetch); a thread that polls needs no wake-up but holds a core.
  Copier(double bytes_per_s, double idle_spin_s)
      : rate_(bytes_per_s), idle_spin_ns_((int64_t)(idle_spin_s * 1e9)), ring_(RING), done_ring_(DONE_RING),
        state_(STATES) {
    for (auto& s : state_) s.store(FREE);
    worker_ = std::thread([this] { run(); });
  }
  ~Copier() { close(); }  // (pybind destroys it with the GIL held)

  // addresses, not tensors: the caller keeps both buffers alive (the store's cached blob views, the
  // engine's slot buffers) and a pointer crosses pybind in a fraction of a tensor's cost.  ``flags`` (a list)
  // and ``index``: where the copy's "pending" flag is (the cache's pending[layer][slot]), cleared by settle()
  // once the copy has landed, on the calling thread (the copy thread never touches a Python object);
  // ``moved``: a dict and ``key`` the entry that settle() adds the copy's bytes to (None: not counted).
  int64_t submit(int64_t src, int64_t dst, int64_t n, double priority, pybind11::object flags, int64_t index,
                 pybind11::object moved, pybind11::object key) {
    int64_t h = head_.load(std::memory_order_relaxed);
    TORCH_CHECK(h - tail_.load(std::memory_order_acquire) < RING, "the copy queue is full");
    TORCH_CHECK(flags.is_none() || (PyList_Check(flags.ptr()) && index >= 0 && index < PyList_GET_SIZE(flags.ptr())),
                "submit: flags is a list and index one of its places");
    int64_t t = next_ticket_++;
    TORCH_CHECK(state_[t % STATES].load() >= DONE || state_[t % STATES].load() == FREE, "too many copies outstanding");
    Rec& r = rec_[t % STATES];
    if (settle_rec(r) && PyErr_Occurred()) throw pybind11::error_already_set();  // a landed copy not settled yet
    r = Rec{flags.is_none() ? nullptr : flags.release().ptr(), index, moved.is_none() ? nullptr : moved.release().ptr(),
            key.release().ptr(), n};
    state_[t % STATES].store(QUEUED, std::memory_order_release);
    queued_ns_.fetch_add(duration_ns(n));
    if (priority <= 0) demand_ns_.fetch_add(duration_ns(n));
    ring_[h % RING] = Job{priority, h, t, (uint8_t*)src, (uint8_t*)dst, n};
    head_.store(h + 1, std::memory_order_release);
    work_.fetch_add(1);
    if (sleeping_.load()) work_.notify_one();  // a polling (or copying) thread finds the job itself
    return t;
  }

  // a copy on the calling thread, after whatever is on the link, ahead of everything queued
  void copy_now(int64_t src, int64_t dst, int64_t n) {
    int64_t done = occupy(duration_ns(n));
    pybind11::gil_scoped_release nogil;
    std::memcpy((void*)dst, (const void*)src, n);
    spin_until_ns(done);
  }

  // settle every queued copy that has landed since the last call: clear its flag (False into flags[index])
  // and add its bytes to moved[key] — on the calling thread, with the GIL, where the acquire load of the
  // copy thread's count orders the copy's bytes before whatever reads the slot next.  One call a layer
  // instead of a Python call per landed copy.  Returns how many were settled.
  int64_t settle() {
    std::vector<int64_t> got;
    if (!landed_since(got)) {  // more than the ring remembers: every open record whose copy is done
      got.clear();
      for (int64_t i = 0; i < STATES; ++i)
        if (rec_[i].n >= 0 && state_[i].load(std::memory_order_acquire) == DONE) got.push_back(i);
    }
    int64_t done = 0;
    for (int64_t t : got) done += settle_rec(rec_[t % STATES]);
    if (PyErr_Occurred()) throw pybind11::error_already_set();
    return done;
  }

  // wait for the copy ``t``, then settle what has landed (``t`` among them)
  void wait(int64_t t) {
    {
      pybind11::gil_scoped_release nogil;
      auto& s = state_[t % STATES];
      // spin (see spin_until_ns) for as long as a few copies take; block beyond that (a stuck link)
      int64_t give_up = now_ns() + 20000000;
      while (s.load(std::memory_order_acquire) < DONE && now_ns() < give_up) cpu_relax();
      for (int v = s.load(std::memory_order_acquire); v < DONE; v = s.load(std::memory_order_acquire)) s.wait(v);
    }
    settle();
    settle_rec(rec_[t % STATES]);  // in case the ring overran since (settle() then found it done already)
  }

  // a queued copy leaves the queue: true; one already on the link (or done): false
  bool cancel(int64_t t) {
    int expected = QUEUED;
    if (!state_[t % STATES].compare_exchange_strong(expected, CANCELLED)) return false;
    rec_[t % STATES].clear();  // never lands: its flag is the caller's again
    return true;
  }

  // when the link will have moved the copy on it and everything queued so far (demand_only: only the
  // queued demand loads, priority <= 0, which go first), in seconds
  double free_at(bool demand_only) {
    int64_t base = std::max(now_ns(), link_free_.load());
    return (base + std::max<int64_t>(0, (demand_only ? demand_ns_ : queued_ns_).load())) * 1e-9;
  }

  void close() {
    if (closed_.exchange(true)) return;
    work_.fetch_add(1);
    work_.notify_one();
    if (worker_.joinable()) worker_.join();
    for (auto& r : rec_) r.clear();  // (with the GIL: close() is called from Python)
  }

 private:
  // what settle() does for a landed copy, kept by the submitting thread (the copy thread never reads it):
  // n < 0 is an empty record
  struct Rec {
    PyObject* flags = nullptr;  // owned references
    int64_t index = 0;
    PyObject* moved = nullptr;
    PyObject* key = nullptr;
    int64_t n = -1;
    void clear() {
      Py_CLEAR(flags);
      Py_CLEAR(moved);
      Py_CLEAR(key);
      n = -1;
    }
  };

  // the tickets landed since the last call, into ``got``; false if the ring overran meanwhile
  bool landed_since(std::vector<int64_t>& got) {
    const int64_t h = done_head_.load(std::memory_order_acquire), t = done_tail_;
    done_tail_ = h;
    if (h - t > DONE_RING) return false;
    for (int64_t i = t; i < h; ++i) got.push_back(done_ring_[i % DONE_RING]);
    // the copy thread may have gone on writing meanwhile: an entry read above is valid unless overwritten
    return done_head_.load(std::memory_order_acquire) - t <= DONE_RING;
  }

  int64_t settle_rec(Rec& r) {  // 1 if it settled a copy, 0 if the record was empty (settled already)
    if (r.n < 0) return 0;
    if (r.flags != nullptr) {
      Py_INCREF(Py_False);
      PyList_SetItem(r.flags, (Py_ssize_t)r.index, Py_False);  // steals the reference, drops the old item's
    }
    if (r.moved != nullptr) add_moved(r.moved, r.key, r.n);
    r.clear();
    return 1;
  }

  int64_t duration_ns(size_t n) const { return rate_ > 0 ? (int64_t)((double)n / rate_ * 1e9) : 0; }

  int64_t occupy(int64_t dur) {  // the link from max(now, its end) for dur: returns when the copy is done
    int64_t cur = link_free_.load(), start, end;
    do {
      start = std::max(now_ns(), cur);
      end = start + dur;
    } while (!link_free_.compare_exchange_weak(cur, end));
    return end;
  }

  void run() {
    std::priority_queue<Job, std::vector<Job>, Later> q;
    while (true) {
      int seen = work_.load(std::memory_order_acquire);
      int64_t h = head_.load(std::memory_order_acquire);
      for (int64_t i = tail_.load(); i < h; ++i) q.push(ring_[i % RING]);
      tail_.store(h, std::memory_order_release);
      if (closed_.load()) return;
      if (q.empty()) {
        int64_t until = now_ns() + idle_spin_ns_;
        while (work_.load(std::memory_order_acquire) == seen && now_ns() < until) cpu_relax();
        if (work_.load() != seen) continue;
        sleeping_.store(true);  // then re-check: a submit either sees the flag or changed work_ first
        if (work_.load() == seen) work_.wait(seen);
        sleeping_.store(false);
        continue;
      }
      Job j = q.top();
      q.pop();
      int64_t dur = duration_ns(j.n);
      queued_ns_.fetch_sub(dur);
      if (j.priority <= 0) demand_ns_.fetch_sub(dur);
      auto& s = state_[j.ticket % STATES];
      int expected = QUEUED;
      if (!s.compare_exchange_strong(expected, RUNNING)) continue;  // cancelled meanwhile
      int64_t done = occupy(dur);
      std::memcpy(j.dst, j.src, j.n);
      sleep_until_ns(done);
      int64_t dh = done_head_.load(std::memory_order_relaxed);
      done_ring_[dh % DONE_RING] = j.ticket;  // an overrun is seen by settle() from the count alone
      done_head_.store(dh + 1, std::memory_order_release);
      s.store(DONE, std::memory_order_release);
      s.notify_all();
    }
  }

  double rate_;
  int64_t idle_spin_ns_;
  std::vector<Job> ring_;
  std::vector<int64_t> done_ring_;  // tickets of landed copies: the copy thread writes, settle() reads
  std::atomic<int64_t> done_head_{0};
  int64_t done_tail_ = 0;  // the model's thread's
  std::vector<std::atomic<int>> state_;
  std::vector<Rec> rec_ = std::vector<Rec>(STATES);  // per ticket (as state_): the model's thread's
  std::atomic<int64_t> head_{0}, tail_{0}, link_free_{0}, queued_ns_{0}, demand_ns_{0};
  std::atomic<int> work_{0};
  std::atomic<bool> closed_{false}, sleeping_{false};
  int64_t next_ticket_ = 1;
  std::thread worker_;
};

"""

_BINDINGS = r"""
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  bind_evict(m);
  m.def("rank_topn", &rank_topn);
  m.def("value_plan", &value_plan);
  pybind11::class_<ValuePlanner>(m, "ValuePlanner")
      .def(pybind11::init<torch::Tensor, int64_t, int64_t, int64_t, pybind11::list, int64_t, int64_t, double, double, double,
                          pybind11::object, pybind11::object>(),
           pybind11::arg("w"), pybind11::arg("E"), pybind11::arg("H"), pybind11::arg("n"), pybind11::arg("made"),
           pybind11::arg("layer"), pybind11::arg("k"), pybind11::arg("t_layer"), pybind11::arg("t_copy"),
           pybind11::arg("host"), pybind11::arg("cache"), pybind11::arg("queuer") = pybind11::none())
      .def("__call__", &ValuePlanner::operator())
      .def_property_readonly("queues", &ValuePlanner::queues);
  pybind11::class_<Queuer>(m, "Queuer")
      .def(pybind11::init<pybind11::object, pybind11::object, std::vector<int64_t>, int64_t, pybind11::list,
                          pybind11::object, pybind11::object, pybind11::object, pybind11::list>())
      .def("queue", &Queuer::queue);
  pybind11::class_<DecodeStep>(m, "DecodeStep")
      .def(pybind11::init<pybind11::object, bool, double, double, double, std::vector<bool>, int64_t>())
      .def("__call__", &DecodeStep::operator());
  pybind11::class_<Copier>(m, "Copier")
      .def(pybind11::init<double, double>())
      .def("submit", &Copier::submit, pybind11::arg("src"), pybind11::arg("dst"), pybind11::arg("n"),
           pybind11::arg("priority"), pybind11::arg("flags") = pybind11::none(), pybind11::arg("index") = 0,
           pybind11::arg("moved") = pybind11::none(), pybind11::arg("key") = pybind11::none())
      .def("copy_now", &Copier::copy_now)
      .def("settle", &Copier::settle)
      .def("wait", &Copier::wait)
      .def("cancel", &Copier::cancel)
      .def("free_at", &Copier::free_at)
      .def("close", &Copier::close);
}
"""

_FULL_SOURCE = _SOURCE + native_policy.SOURCE + native_step.SOURCE + native_evict.SOURCE + _BINDINGS
_NAME = "fate_copier_" + hashlib.sha1(_FULL_SOURCE.encode()).hexdigest()[:10]  # torch caches builds by name

_lock = threading.Lock()
_module = None
_tried = False
why = ""


def _load():
    global _module, _tried, why
    with _lock:
        if _tried:
            return _module
        _tried = True
        if os.environ.get("FATE_NATIVE", "1") == "0":
            why = "FATE_NATIVE=0"
            return None
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            why = "no C++ compiler"
            return None
        try:
            from torch.utils import cpp_extension as X  # pulls in setuptools: only when the copier loads

            _module = X.load_inline(_NAME, cpp_sources=_FULL_SOURCE, extra_cflags=["-O3", "-std=c++20"], verbose=False)
        except Exception as e:  # no ninja, a broken toolchain, ...: the Python worker serves
            why = f"the copier did not build ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            _module = None
        return _module


def available() -> bool:
    return _load() is not None


def Copier(bytes_per_s: float, idle_spin_s: float = 0.0):  # noqa: N802 - the native class
    """A native copy thread over one emulated link of ``bytes_per_s`` (0: as fast as memcpy) that polls
    for work ``idle_spin_s`` before it sleeps (use it where a core is free: no wake-up per copy)."""
    return _load().Copier(float(bytes_per_s), float(idle_spin_s))


def _native(name: str):
    mod = _load()
    return None if mod is None else getattr(mod, name)


def rank_topn():
    """The native one-token ranking ``rank_topn(w_ptr, x_ptr, groups, E, H, n) -> [[expert, ...], ...]``
    (see the source), or None where the extension is not built."""
    return _native("rank_topn")


def value_plan():
    """The native value-rule decisions (:mod:`.native_policy`; the arguments of
    :func:`fate.runtime.experts.offload.value_plan`), or None where the extension is not built."""
    return _native("value_plan")


def value_planner():
    """The native class that runs the one-token prediction and the value rule in one call for one layer
    (:mod:`.native_policy`), or None where the extension is not built."""
    return _native("ValuePlanner")


def queuer():
    """The native class that queues the value rule's decisions on the cache and a native copier
    (:mod:`.native_policy`; :meth:`.transfer.TransferEngine.native_queue` makes one), or None where the
    extension is not built."""
    return _native("Queuer")


def decode_step():
    """The native class running fate's decode step for one MoE layer before its experts are computed
    (:mod:`.native_step`), or None where the extension is not built."""
    return _native("DecodeStep")


def eviction_policies():
    """The module holding the native eviction policies ``NativeLRUPolicy``, ``NativeLFUPolicy``,
    ``NativeLRFUPolicy`` and ``NativeARCPolicy`` (:mod:`.native_evict`), or None where the extension is not
    built."""
    return _load()
