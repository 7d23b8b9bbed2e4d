"""A native copy thread for the CPU expert cache: copies (and the emulated link's waits) never take the GIL.

A Python worker thread doing the copies competes with the thread that runs the model for the GIL at every
job (its queue handling, the copy's bookkeeping, the link emulation's sleep), and a one-token decode step
whose layer computes in a few hundred µs loses more to that than a copy costs.  This extension runs one
C++ thread with a priority queue of memcpy jobs between tensors the caller keeps alive; it emulates one
serial link itself (a copy of n bytes occupies it for n / rate seconds after the previous one, non-
preemptively), so inline copies (:meth:`Copier.copy_now`, on the calling thread with the GIL released)
and queued ones share one link timeline.  Python never waits for the GIL of the copy thread: it asks
whether a ticket is done, or waits for it with the GIL released.

Built on first use with torch's cpp_extension (g++; a few seconds, once per machine); where it cannot be
built, :func:`available` is False and the TransferEngine keeps its Python worker.
"""

from __future__ import annotations

import os
import shutil
import threading

_NAME = "fate_copier_v1"  # change with the source: torch caches builds by name

_SOURCE = r"""
#include <torch/extension.h>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <queue>
#include <thread>
#include <unordered_map>
#include <vector>

static double now_s() {  // CLOCK_MONOTONIC, as Python's time.perf_counter
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

static void sleep_until_s(double t) {
  double left = t - now_s();
  if (left > 0) std::this_thread::sleep_for(std::chrono::duration<double>(left));
}

struct Job {
  double priority; int64_t seq; int64_t ticket;
  uint8_t* src; uint8_t* dst; int64_t n;
  bool operator<(const Job& o) const {  // std::priority_queue is a max-heap: invert
    return priority != o.priority ? priority > o.priority : seq > o.seq;
  }
};

enum State { QUEUED = 0, RUNNING = 1, DONE = 2, CANCELLED = 3 };

class Copier {
 public:
  explicit Copier(double bytes_per_s) : rate_(bytes_per_s), worker_([this] { run(); }) {}
  ~Copier() { close(); }

  int64_t submit(torch::Tensor src, torch::Tensor dst, double priority) {
    TORCH_CHECK(src.is_contiguous() && dst.is_contiguous() && src.nbytes() == dst.nbytes(), "src/dst: contiguous, same size");
    std::lock_guard<std::mutex> g(m_);
    int64_t t = next_ticket_++;
    state_[t] = QUEUED;
    queued_s_ += seconds(src.nbytes());
    q_.push(Job{priority, seq_++, t, (uint8_t*)src.data_ptr(), (uint8_t*)dst.data_ptr(), (int64_t)src.nbytes()});
    cv_.notify_one();
    return t;
  }

  // a copy on the calling thread, after whatever is on the link, ahead of everything queued
  void copy_now(torch::Tensor src, torch::Tensor dst) {
    TORCH_CHECK(src.is_contiguous() && dst.is_contiguous() && src.nbytes() == dst.nbytes(), "src/dst: contiguous, same size");
    double done;
    {
      std::lock_guard<std::mutex> g(m_);
      double start = std::max(now_s(), link_free_);
      done = start + seconds(src.nbytes());
      link_free_ = done;
    }
    pybind11::gil_scoped_release nogil;
    std::memcpy(dst.data_ptr(), src.data_ptr(), src.nbytes());
    sleep_until_s(done);
  }

  bool done(int64_t t) {
    std::lock_guard<std::mutex> g(m_);
    auto it = state_.find(t);
    return it == state_.end() || it->second >= DONE;
  }

  void wait(int64_t t) {
    pybind11::gil_scoped_release nogil;
    std::unique_lock<std::mutex> g(m_);
    done_cv_.wait(g, [&] { auto it = state_.find(t); return it == state_.end() || it->second >= DONE; });
  }

  // a queued job leaves the queue: true; one already on the link (or done): false
  bool cancel(int64_t t) {
    std::lock_guard<std::mutex> g(m_);
    auto it = state_.find(t);
    if (it == state_.end() || it->second != QUEUED) return false;
    it->second = CANCELLED;
    cancelled_.push_back(t);
    return true;
  }

  void forget(int64_t t) {  // the caller has seen it done: drop its record
    std::lock_guard<std::mutex> g(m_);
    auto it = state_.find(t);
    if (it != state_.end() && it->second >= DONE) state_.erase(it);
  }

  double free_at() {  // when the link will have moved everything queued so far
    std::lock_guard<std::mutex> g(m_);
    return std::max(now_s(), link_free_) + queued_s_;
  }

  void close() {
    {
      std::lock_guard<std::mutex> g(m_);
      if (closed_) return;
      closed_ = true;
      cv_.notify_all();
    }
    if (worker_.joinable()) worker_.join();
  }

 private:
  double seconds(size_t n) const { return rate_ > 0 ? (double)n / rate_ : 0.0; }

  void run() {
    std::unique_lock<std::mutex> g(m_);
    while (true) {
      cv_.wait(g, [&] { return closed_ || !q_.empty(); });
      if (closed_) return;
      Job j = q_.top();
      q_.pop();
      double dur = seconds(j.n);
      queued_s_ = std::max(0.0, queued_s_ - dur);
      auto it = state_.find(j.ticket);
      if (it == state_.end() || it->second != QUEUED) {  // cancelled
        if (it != state_.end()) state_.erase(it);
        continue;
      }
      it->second = RUNNING;
      double start = std::max(now_s(), link_free_);
      double done = start + dur;
      link_free_ = done;
      g.unlock();
      std::memcpy(j.dst, j.src, j.n);
      sleep_until_s(done);
      g.lock();
      state_[j.ticket] = DONE;
      done_cv_.notify_all();
    }
  }

  double rate_;
  std::mutex m_;
  std::condition_variable cv_, done_cv_;
  std::priority_queue<Job> q_;
  std::unordered_map<int64_t, int> state_;
  std::vector<int64_t> cancelled_;
  int64_t next_ticket_ = 1, seq_ = 0;
  double link_free_ = 0.0, queued_s_ = 0.0;
  bool closed_ = false;
  std::thread worker_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Copier>(m, "Copier")
      .def(pybind11::init<double>())
      .def("submit", &Copier::submit)
      .def("copy_now", &Copier::copy_now)
      .def("done", &Copier::done)
      .def("wait", &Copier::wait)
      .def("cancel", &Copier::cancel)
      .def("forget", &Copier::forget)
      .def("free_at", &Copier::free_at)
      .def("close", &Copier::close);
}
"""

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

            _module = X.load_inline(_NAME, cpp_sources=_SOURCE, extra_cflags=["-O2"], verbose=False)
        except Exception as e:  # no ninja, a broken toolchain, ...: the Python worker serves
            why = f"the copier did not build ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            _module = None
        return _module


def available() -> bool:
    return _load() is not None


def Copier(bytes_per_s: float):  # noqa: N802 - the native class
    """A native copy thread over one emulated link of ``bytes_per_s`` (0: as fast as memcpy)."""
    return _load().Copier(float(bytes_per_s))
