// kvtile/attention/cpu/thread_pool.hpp: the small thread pool the CPU kernels run on.
//
// parallel_for(n, f) calls f(i) for every i in [0, n) on the pool's threads (the calling thread
// is one of them) and returns when all calls are done. Items are handed out one at a time from
// an atomic counter, so uneven items (causal tiles) balance themselves. The first exception an
// item throws is rethrown in the caller after the loop has drained. One parallel_for runs at a
// time per pool; a parallel_for issued from inside an item runs serially on that thread.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "kvtile/core/config.hpp"
#include "kvtile/core/error.hpp"

KVTILE_NAMESPACE_BEGIN
namespace attention::cpu {

class thread_pool {
 public:
  // threads: how many threads run items, the caller included; 0 = one per hardware thread.
  explicit thread_pool(int threads = 0) {
    KVTILE_REQUIRE(threads >= 0, errc::invalid_argument, "thread_pool: threads must be >= 0, got ", threads);
    if (threads == 0) threads = std::max(1, int(std::thread::hardware_concurrency()));
    for (int t = 1; t < threads; ++t) workers_.emplace_back([this] { worker_loop(); });
  }
  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;
  ~thread_pool() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }

  int size() const { return int(workers_.size()) + 1; }

  template <class F>
  void parallel_for(std::int64_t n, F&& f) {
    if (n <= 0) return;
    if (inside_item() || workers_.empty() || n == 1) {
      for (std::int64_t i = 0; i < n; ++i) f(i);
      return;
    }
    std::lock_guard run_lock(run_mutex_);
    std::function<void(std::int64_t)> fn = [&f](std::int64_t i) { f(i); };
    {
      std::lock_guard lock(mutex_);
      job_ = &fn;
      count_ = n;
      next_.store(0);
      error_ = nullptr;
      busy_ = int(workers_.size());
      ++generation_;
    }
    wake_.notify_all();
    drain();
    std::unique_lock lock(mutex_);
    done_.wait(lock, [this] { return busy_ == 0; });
    job_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

  // The pool kernels use when the caller passes none: one thread per hardware thread.
  static thread_pool& global() {
    static thread_pool pool;
    return pool;
  }

 private:
  static bool& inside_item() {
    thread_local bool inside = false;
    return inside;
  }

  void drain() {
    inside_item() = true;
    for (std::int64_t i; (i = next_.fetch_add(1)) < count_;) {
      try {
        (*job_)(i);
      } catch (...) {
        std::lock_guard lock(mutex_);
        if (!error_) error_ = std::current_exception();
        next_.store(count_);  // stop handing out items
      }
    }
    inside_item() = false;
  }

  void worker_loop() {
    std::uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      drain();
      std::lock_guard lock(mutex_);
      if (--busy_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mutex_;  // one parallel_for at a time
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(std::int64_t)>* job_ = nullptr;
  std::int64_t count_ = 0;
  std::atomic<std::int64_t> next_{0};
  std::exception_ptr error_;
  std::uint64_t generation_ = 0;
  int busy_ = 0;
  bool stop_ = false;
};

}  // namespace attention::cpu
KVTILE_NAMESPACE_END
