// fate's thread pool for the kernels: persistent workers that claim units of work from the caller, who works too.
//
// Why not torch's OpenMP team (at::parallel_for): an OpenMP region ends at a barrier, so a product split over two
// threads waits for the second one to start and finish its half.  When another process holds that core (a
// shared machine, a browser, a second model), the wait is the scheduler's time slice, milliseconds for a product
// of tens of microseconds: two threads then decode slower than one.  Here the work is split in more units than
// threads, each unit is claimed by whoever gets to it first, and the caller returns as soon as every *claimed*
// unit is done: a worker that has not started costs nothing.
//
// The pool holds threads - 1 workers (the caller is the last one) for the largest thread count asked for so far,
// started once and kept for the process: no thread is started per call.  The count per call is torch's
// (at::get_num_threads(), fate-run -t), so torch's intra-op threads and these are never busy at the same time
// beyond it: a product runs here while torch waits for it, torch's operations run while these sleep.
// Idle workers spin for a short while (the next product of a decode step comes within microseconds) and then
// sleep on a futex.
#pragma once

#include <immintrin.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <pthread.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

namespace fate {

class Pool {
 public:
  using Fn = void (*)(void* ctx, int64_t unit);

  static Pool& get() {
    static Pool* pool = make();  // never destroyed: workers may outlive static destruction at exit
    return *pool;
  }

  // fn(ctx, u) for every u in [0, n), spread over `threads` threads (this one included); returns when all are done
  void run(int threads, int64_t n, Fn fn, void* ctx) {
    if (threads <= 1 || n <= 1) {
      for (int64_t u = 0; u < n; ++u) fn(ctx, u);
      return;
    }
    std::lock_guard<std::mutex> one_job(job_);  // one job at a time (callers on several threads take turns)
    grow(threads - 1);
    fn_.store(fn, std::memory_order_relaxed);
    ctx_.store(ctx, std::memory_order_relaxed);
    n_.store(n, std::memory_order_relaxed);
    active_.store(threads - 1, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (word_.load(std::memory_order_relaxed) >> 32) + 1;
    word_.store(gen << 32, std::memory_order_seq_cst);  // publishes the job
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      wake_.fetch_add(1, std::memory_order_seq_cst);
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&wake_), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
    }
    work(gen);
    while (done_.load(std::memory_order_acquire) < n) _mm_pause();  // units other threads claimed
  }

 private:
  Pool() = default;

  static Pool* make() {
    Pool* p = new Pool();
    // a forked child has none of the workers: it starts its own on its first product (until then the caller
    // works alone, which is correct, just not parallel)
    pthread_atfork(nullptr, nullptr, [] { get().forget_workers(); });
    return p;
  }

  void forget_workers() {
    new (&job_) std::mutex();  // the parent's may have been held by the forking thread
    threads_.clear();
    sleepers_.store(0, std::memory_order_relaxed);
  }

  // claim and run units of job `gen` until none is left
  void work(uint64_t gen) {
    for (;;) {
      uint64_t w = word_.load(std::memory_order_acquire);
      if ((w >> 32) != gen) return;
      const int64_t u = static_cast<int64_t>(w & 0xFFFFFFFFu);
      // the job's fields stay as published while any of its units is unclaimed (the caller publishes the next
      // job only after every unit is claimed and done), and a claim succeeds only while the word still says so
      const Fn fn = fn_.load(std::memory_order_relaxed);
      void* ctx = ctx_.load(std::memory_order_relaxed);
      if (u >= n_.load(std::memory_order_relaxed)) return;
      if (word_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel)) {
        fn(ctx, u);
        done_.fetch_add(1, std::memory_order_release);
      }
    }
  }

  void grow(int workers) {
    while (static_cast<int>(threads_.size()) < workers) {
      const int id = static_cast<int>(threads_.size());
      threads_.emplace_back([this, id] { loop(id); });
      threads_.back().detach();
    }
  }

  void loop(int id) {
    uint64_t seen = word_.load(std::memory_order_acquire) >> 32;
    for (;;) {
      uint64_t gen = wait_for_job(seen);
      seen = gen;
      if (id < active_.load(std::memory_order_relaxed)) work(gen);
    }
  }

  // the generation of the next job after `seen`: spin ~200 us, then sleep until woken
  uint64_t wait_for_job(uint64_t seen) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
    for (int i = 0;; ++i) {
      const uint64_t gen = word_.load(std::memory_order_acquire) >> 32;
      if (gen != seen) return gen;
      if ((i & 255) == 255 && std::chrono::steady_clock::now() > until) break;
      _mm_pause();
    }
    for (;;) {
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      const uint32_t v = wake_.load(std::memory_order_seq_cst);
      const uint64_t gen = word_.load(std::memory_order_seq_cst) >> 32;
      if (gen == seen)
        syscall(SYS_futex, reinterpret_cast<uint32_t*>(&wake_), FUTEX_WAIT_PRIVATE, v, nullptr, nullptr, 0);
      sleepers_.fetch_sub(1, std::memory_order_seq_cst);
      const uint64_t now = word_.load(std::memory_order_acquire) >> 32;
      if (now != seen) return now;
    }
  }

  std::mutex job_;
  std::vector<std::thread> threads_;
  std::atomic<uint64_t> word_{0};  // job generation << 32 | next unclaimed unit
  std::atomic<Fn> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<int64_t> n_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> active_{0};    // workers 0 .. active_-1 take part in the current job
  std::atomic<uint32_t> wake_{0};  // futex word, bumped to wake sleepers
  std::atomic<int> sleepers_{0};
};

// f(u) for u in [0, n) over `threads` threads
template <class F>
void parallel(int threads, int64_t n, const F& f) {
  Pool::get().run(threads, n, [](void* ctx, int64_t u) { (*static_cast<const F*>(ctx))(u); },
                  const_cast<void*>(static_cast<const void*>(&f)));
}

}  // namespace fate
