#pragma once
// A small pool of the library's own threads. parallel_for hands out work units by index; every unit
// is computed the same way whatever the thread count, so results are bit-identical for any count.
// Several user threads may call parallel_for at once (each call is its own job); a call made from
// inside a pool worker runs serially, so nesting cannot deadlock.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "gqe/error.hpp"
#include "gqe/tensor/tensor.hpp"

namespace gqe {

class ThreadPool {
 public:
  // threads = total workers including the caller; 1 means run everything on the calling thread.
  explicit ThreadPool(int threads) {
    if (threads < 1 || threads > 1024) fail<ConfigError>("thread count is ", threads, "; expected 1 to 1024");
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { work(); });
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }

  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls fn(i) for every i in [0, count), on up to threads() threads; returns when all are done.
  // An exception thrown by fn is rethrown here (the first one; the other units still finish).
  // Allocates nothing: the job lives on the caller's thread, and the caller withdraws its helper
  // slots that no worker took before it returns.
  // `flops`, when given, estimates the whole job: below kMinParallelFlops waking workers costs more
  // than it saves (a decode step's small products), and the units run on the calling thread.
  static constexpr double kMinParallelFlops = 1 << 20;

  template <class Fn>
  void parallel_for(Index count, Fn&& fn, double flops = kMinParallelFlops) {
    if (count <= 0) return;
    if (workers_.empty() || count == 1 || inside_worker() || flops < kMinParallelFlops) {
      for (Index i = 0; i < count; ++i) fn(i);
      return;
    }
    thread_local Job job;
    job.reset(count, [&fn](Index i) { fn(i); });  // one reference: std::function stores it inline
    const Index helpers = std::min<Index>(static_cast<Index>(workers_.size()), count - 1);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (Index h = 0; h < helpers; ++h) queue_.push_back(&job);
    }
    wake_.notify_all();
    inside_worker() = true;  // a parallel_for inside fn runs serially here too
    job.run();
    inside_worker() = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.erase(std::remove(queue_.begin(), queue_.end(), &job), queue_.end());
    }
    std::unique_lock<std::mutex> lock(job.mutex);
    job.finished.wait(lock, [&] { return job.done == job.count && job.helpers_inside == 0; });
    if (job.error) std::rethrow_exception(std::exchange(job.error, nullptr));
  }

 private:
  struct Job {
    Index count = 0;
    std::function<void(Index)> body;
    std::atomic<Index> next{0};
    std::mutex mutex;
    std::condition_variable finished;
    Index done = 0;            // units finished
    Index helpers_inside = 0;  // workers that took a slot of this job and have not left run()
    std::exception_ptr error;

    void reset(Index units, std::function<void(Index)> fn) {
      count = units;
      body = std::move(fn);
      next = 0;
      done = 0;
    }
    void run() {
      for (Index i; (i = next.fetch_add(1)) < count;) {
        std::exception_ptr caught;
        try {
          body(i);
        } catch (...) {
          caught = std::current_exception();
        }
        std::lock_guard<std::mutex> lock(mutex);
        if (caught && !error) error = caught;
        if (++done == count) finished.notify_all();
      }
    }
  };

  static bool& inside_worker() {
    thread_local bool flag = false;
    return flag;
  }

  void work() {
    inside_worker() = true;
    for (;;) {
      Job* job = nullptr;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;
        job = queue_.back();
        queue_.pop_back();
        std::lock_guard<std::mutex> job_lock(job->mutex);
        ++job->helpers_inside;  // under mutex_: the caller, withdrawing its slots, will wait for us
      }
      job->run();
      std::lock_guard<std::mutex> job_lock(job->mutex);
      if (--job->helpers_inside == 0) job->finished.notify_all();
    }
  }

  std::vector<std::thread> workers_;
  std::vector<Job*> queue_;  // helper slots of running jobs; its capacity is kept
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
};

namespace detail {
inline std::unique_ptr<ThreadPool>& default_pool_slot() {
  static std::unique_ptr<ThreadPool> pool;
  return pool;
}
inline std::mutex& default_pool_mutex() {
  static std::mutex m;
  return m;
}
}  // namespace detail

inline int default_thread_count() { return static_cast<int>(std::max(1u, std::thread::hardware_concurrency())); }

// The pool the library's layers use; created on first use with default_thread_count() threads.
inline ThreadPool& thread_pool() {
  std::lock_guard<std::mutex> lock(detail::default_pool_mutex());
  auto& slot = detail::default_pool_slot();
  if (!slot) slot = std::make_unique<ThreadPool>(default_thread_count());
  return *slot;
}

// Sets the number of threads of the library's pool. Not to be called while inference runs.
inline void set_num_threads(int threads) {
  auto pool = std::make_unique<ThreadPool>(threads);
  std::lock_guard<std::mutex> lock(detail::default_pool_mutex());
  detail::default_pool_slot() = std::move(pool);
}

inline int num_threads() { return thread_pool().threads(); }

}  // namespace gqe
