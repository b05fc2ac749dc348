#pragma once
// A small pool of the library's own threads. parallel_for hands out work units by index; every unit
// is computed the same way whatever the thread count, so results are bit-identical for any count.
// Several user threads may call parallel_for at once (each call is its own job), and a unit may call
// parallel_for too: its job's units go to threads that are free, and the thread that posted it runs
// whatever no one took, so nesting cannot deadlock (a thread waits only for units already running).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cmath>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sched.h>
#endif

#include "gqe/error.hpp"
#include "gqe/tensor/tensor.hpp"

namespace gqe {

class ThreadPool {
 public:
  // threads = total workers including the caller; 1 means run everything on the calling thread.
  // When the system refuses a thread (memory or process limits), the ones started are stopped and
  // ConfigError says how many could start: no pool, nothing left running.
  explicit ThreadPool(int threads) {
    if (threads < 1 || threads > 1024) fail<ConfigError>("thread count is ", threads, "; expected 1 to 1024");
    workers_.reserve(static_cast<std::size_t>(threads - 1));
    std::string refused;  // why, when a thread could not start
    bool all_started = true;
    try {
      for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { work(); });
    } catch (const std::exception& e) {
      refused = e.what();
      all_started = false;
    }
    if (!all_started) {
      const std::size_t started = workers_.size() + 1;
      stop();
      fail<ConfigError>("the system refused to start thread ", started + 1, " of ", threads, " (", refused,
                        "); expected a thread count the system allows (", started, " could start)");
    }
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  ~ThreadPool() { stop(); }

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
    // Inside a unit, a job is posted only while some worker is idle: when none is, no one would take
    // its slots, and posting them costs more than a small product's own work.
    if (workers_.empty() || count == 1 || flops < kMinParallelFlops || nesting() >= kMaxNesting ||
        (nesting() > 0 && idle_.load(std::memory_order_relaxed) == 0)) {
      std::exception_ptr error;  // as on many threads: every unit runs, the first exception is rethrown
      for (Index i = 0; i < count; ++i) {
        try {
          fn(i);
        } catch (...) {
          if (!error) error = std::current_exception();
        }
      }
      if (error) std::rethrow_exception(error);
      return;
    }
    Job& job = job_at(nesting());
    job.reset(count, [&fn](Index i) { fn(i); });  // one reference: std::function stores it inline
    const Index helpers = std::min<Index>(static_cast<Index>(workers_.size()), count - 1);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (Index h = 0; h < helpers; ++h) queue_.push_back(&job);
    }
    queued_.fetch_add(helpers);  // after unlocking: a spinning worker that sees it finds mutex_ free
    wake_.notify_all();
    ++nesting();
    job.run();
    --nesting();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto untaken = std::remove(queue_.begin(), queue_.end(), &job);
      queued_.fetch_sub(static_cast<Index>(queue_.end() - untaken));
      queue_.erase(untaken, queue_.end());
    }
    const auto finished = [&] { return job.done.load() == job.count && job.helpers_inside.load() == 0; };
    spin_until(finished);
    std::unique_lock<std::mutex> lock(job.mutex);
    job.finished.wait(lock, finished);
    if (job.error) std::rethrow_exception(std::exchange(job.error, nullptr));
  }

 private:
  struct Job {
    Index count = 0;
    std::function<void(Index)> body;
    std::atomic<Index> next{0};
    std::mutex mutex;
    std::condition_variable finished;
    // Read without `mutex` by a spinning caller. done is counted without it too, but the unit that
    // completes the count notifies under it, so a waiter that checked just before cannot miss it;
    // helpers_inside changes under it.
    std::atomic<Index> done{0};            // units finished
    std::atomic<Index> helpers_inside{0};  // workers that took a slot of this job and have not left run()
    std::exception_ptr error;

    void reset(Index units, std::function<void(Index)> fn) {
      count = units;
      body = std::move(fn);
      next = 0;
      done = 0;
    }
    void run() {
      for (Index i; (i = next.fetch_add(1)) < count;) {
        try {
          body(i);
        } catch (...) {
          std::lock_guard<std::mutex> lock(mutex);
          if (!error) error = std::current_exception();
        }
        if (done.fetch_add(1) + 1 == count) {  // the last unit: the lock orders this before the waiter's check
          std::lock_guard<std::mutex> lock(mutex);
          finished.notify_all();
        }
      }
    }
  };

  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
    workers_.clear();
  }

  // How many jobs' units this thread is inside (as their poster or as a helper): a parallel_for
  // inside a unit uses the next of this thread's jobs. Deeper than kMaxNesting, calls run serially.
  static constexpr int kMaxNesting = 6;
  static int& nesting() {
    thread_local int depth = 0;
    return depth;
  }
  static Job& job_at(int depth) {
    thread_local Job jobs[kMaxNesting];
    return jobs[depth];
  }

  void work() {
    for (;;) {
      Job* job = nullptr;
      idle_.fetch_add(1, std::memory_order_relaxed);
      spin_until([&] { return queued_.load() > 0 || stopping_.load(); });
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;
        job = queue_.back();
        queue_.pop_back();
        queued_.fetch_sub(1);
        std::lock_guard<std::mutex> job_lock(job->mutex);
        ++job->helpers_inside;  // under mutex_: the caller, withdrawing its slots, will wait for us
      }
      idle_.fetch_sub(1, std::memory_order_relaxed);
      ++nesting();
      job->run();
      --nesting();
      std::lock_guard<std::mutex> job_lock(job->mutex);
      if (--job->helpers_inside == 0) job->finished.notify_all();
    }
  }

  // Waiting threads spin (yielding the CPU to any other runnable thread) for up to kSpin before they
  // sleep: a training step or a prefill calls the pool every few hundred microseconds, and waking a
  // sleeping thread costs tens of microseconds on a virtual machine, where an idle CPU halts.
  static constexpr std::chrono::microseconds kSpin{1000};
  template <class Ready>
  static void spin_until(Ready ready) {
    const auto until = std::chrono::steady_clock::now() + kSpin;
    while (!ready() && std::chrono::steady_clock::now() < until) std::this_thread::yield();
  }

  std::atomic<Index> queued_{0};  // queue_.size() as a hint for spinning workers (the queue decides)
  std::atomic<int> idle_{0};      // workers waiting for a slot, as a hint for nested calls
  std::vector<std::thread> workers_;
  std::vector<Job*> queue_;  // helper slots of running jobs; its capacity is kept
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<bool> stopping_{false};
};

// A share of a pool: parallel_for and threads() as ThreadPool's, with the pool kept alive for as
// long as the share is. thread_pool().parallel_for(...) holds it for the whole call, so that
// set_num_threads on another thread cannot destroy the pool under a running call.
class SharedPool {
 public:
  explicit SharedPool(std::shared_ptr<ThreadPool> pool) : pool_(std::move(pool)) {}
  template <class Fn>
  void parallel_for(Index count, Fn&& fn, double flops = ThreadPool::kMinParallelFlops) const {
    pool_->parallel_for(count, std::forward<Fn>(fn), flops);
  }
  int threads() const { return pool_->threads(); }
  ThreadPool& operator*() const { return *pool_; }
  ThreadPool* operator->() const { return pool_.get(); }

 private:
  std::shared_ptr<ThreadPool> pool_;
};

namespace detail {
inline std::shared_ptr<ThreadPool>& default_pool_slot() {
  static std::shared_ptr<ThreadPool> pool;
  return pool;
}
inline std::mutex& default_pool_mutex() {
  static std::mutex m;
  return m;
}

// The first line of a small file, or "" when it cannot be read.
inline std::string first_line(const std::filesystem::path& file) {
  std::ifstream in(file);
  std::string line;
  std::getline(in, line);
  return line;
}

// CPUs that the cgroup CPU quota allows, rounded up (0: no quota found). `self_cgroup` is the text
// of /proc/self/cgroup, `root` the cgroup file system's mount (/sys/fs/cgroup). The quota of every
// ancestor applies too: the smallest is taken. cgroup v2 writes cpu.max ("max 100000" or "150000
// 100000"); v1 cpu.cfs_quota_us (-1: none) and cpu.cfs_period_us under the cpu controller's mount.
inline int cgroup_cpu_limit(const std::string& self_cgroup, const std::filesystem::path& root) {
  namespace fs = std::filesystem;
  double best = 0;
  const auto consider = [&](double quota, double period) {
    if (quota > 0 && period > 0 && (best == 0 || quota / period < best)) best = quota / period;
  };
  const auto walk = [&](const fs::path& base, std::string path, bool v2) {
    for (;;) {
      const fs::path dir = base / fs::path(path).relative_path();
      if (v2) {
        std::istringstream max(first_line(dir / "cpu.max"));
        std::string quota;
        double period = 0;
        if (max >> quota >> period && quota != "max") consider(std::strtod(quota.c_str(), nullptr), period);
      } else {
        consider(std::strtod(first_line(dir / "cpu.cfs_quota_us").c_str(), nullptr),
                 std::strtod(first_line(dir / "cpu.cfs_period_us").c_str(), nullptr));
      }
      const std::size_t slash = path.find_last_of('/');
      if (path.empty() || slash == std::string::npos) break;
      path = path.substr(0, slash);  // "/a/b" -> "/a" -> "" (the mount itself)
    }
  };
  std::istringstream lines(self_cgroup);
  for (std::string line; std::getline(lines, line);) {
    // hierarchy-id:controllers:path; v2 is "0::path".
    const std::size_t a = line.find(':'), b = a == std::string::npos ? a : line.find(':', a + 1);
    if (b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
    if (controllers.empty()) {
      walk(root, path, true);
      continue;
    }
    bool cpu = false;
    std::istringstream names(controllers);
    for (std::string name; std::getline(names, name, ',');) cpu = cpu || name == "cpu";
    if (!cpu) continue;
    // The walk ends at the mount itself, where a container sees its own cgroup.
    for (const auto& mount : {controllers, std::string("cpu")}) walk(root / mount, path, false);
  }
  return best > 0 ? static_cast<int>(std::min(1024.0, std::ceil(best - 1e-9))) : 0;
}
}  // namespace detail

// The threads this process may use: the CPUs of its affinity mask, within its cgroup's CPU quota
// (a container's limit), at least 1 and at most 1024.
inline int default_thread_count() {
  int cpus = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
#ifdef __linux__
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0) cpus = std::max(1, CPU_COUNT(&set));
  std::ifstream self("/proc/self/cgroup");
  std::ostringstream text;
  text << self.rdbuf();
  const int quota = detail::cgroup_cpu_limit(text.str(), "/sys/fs/cgroup");
  if (quota > 0) cpus = std::min(cpus, quota);
#endif
  return std::clamp(cpus, 1, 1024);
}

// The pool the library's layers use; created on first use with default_thread_count() threads.
inline SharedPool thread_pool() {
  std::lock_guard<std::mutex> lock(detail::default_pool_mutex());
  auto& slot = detail::default_pool_slot();
  if (!slot) slot = std::make_shared<ThreadPool>(default_thread_count());
  return SharedPool(slot);
}

// Sets the number of threads of the library's pool. Safe while other threads run inference: their
// calls in flight finish on the pool they started with, which is destroyed after the last one.
// When the new pool cannot start (ConfigError), the old one stays.
inline void set_num_threads(int threads) {
  auto pool = std::make_shared<ThreadPool>(threads);
  std::lock_guard<std::mutex> lock(detail::default_pool_mutex());
  detail::default_pool_slot().swap(pool);  // the old pool is released after the lock, by `pool`
}

inline int num_threads() { return thread_pool().threads(); }

// Calls fn(r) for every row r in [0, rows): runs of 64 rows are units of the library's pool, for
// row-wise work (norms, activations, residual adds) that would otherwise leave the other threads
// idle between two products. work_per_row estimates a row's cost in flops (see parallel_for).
template <class Fn>
void parallel_rows(Index rows, double work_per_row, Fn&& fn) {
  constexpr Index kRowsPerUnit = 64;
  thread_pool().parallel_for((rows + kRowsPerUnit - 1) / kRowsPerUnit, [&](Index unit) {
    const Index end = std::min(rows, (unit + 1) * kRowsPerUnit);
    for (Index r = unit * kRowsPerUnit; r < end; ++r) fn(r);
  }, work_per_row * static_cast<double>(rows));
}

}  // namespace gqe
