#pragma once
// The machine's own ceilings, measured in the same run as the figures compared with them: the
// float32 FMA peak (independent multiply-add chains in registers, on one thread and on all) and the
// memory read bandwidth (a buffer far larger than the caches, read by every thread; the median of
// five passes).
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <thread>
#include <utility>
#include <vector>

#include "gqe/ops/gemm.hpp"
#include "gqe/tensor/eigen.hpp"
#include "gqe/tensor/aligned_bytes.hpp"

namespace gqe::bench {

struct MachinePeaks {
  double fma_gflops_one = 0;  // one thread
  double fma_gflops_all = 0;  // `threads` threads
  double read_gbps = 0;       // `threads` threads
  int threads = 1;
};

namespace detail {

using Packet = gqe::detail::GemmShape<float>::Packet;
constexpr int kLanes = gqe::detail::GemmShape<float>::kLanes;
constexpr int kChains = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 16 : 12;

// FLOPs per second of kChains independent FMA chains on this thread.
inline double fma_chains_per_second(long iterations) {
  using namespace Eigen::internal;
  Packet acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = pset1<Packet>(1e-3f * static_cast<float>(i));
  volatile float b_value = 0.999f, c_value = 1e-4f;  // not constants the compiler could fold
  const float b_read = b_value, c_read = c_value;
  const Packet b = pset1<Packet>(b_read), c = pset1<Packet>(c_read);
  const auto start = std::chrono::steady_clock::now();
  for (long it = 0; it < iterations; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < kChains; ++i) acc[i] = pmadd(acc[i], b, c);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  float sum = 0;
  for (int i = 0; i < kChains; ++i) sum += predux(acc[i]);
  volatile float sink = sum;  // keeps the chains
  (void)sink;
  return 2.0 * kLanes * kChains * static_cast<double>(iterations) / seconds;
}

// Runs fn(thread index) on `threads` threads at once; returns the results.
template <class Fn>
std::vector<double> on_threads(int threads, Fn&& fn) {
  std::vector<double> results(static_cast<std::size_t>(threads));
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { results[static_cast<std::size_t>(t)] = fn(t); });
  for (auto& p : pool) p.join();
  return results;
}

// The median of `values` (not empty).
inline double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

}  // namespace detail

// The best of `trials` trials of `threads` threads running FMA chains at once, in GFLOP/s (a
// trial takes about 50 ms).
inline double fma_peak(int threads, int trials = 3) {
  constexpr long kIterations = 20'000'000;
  double best = 0;
  for (int trial = 0; trial < trials; ++trial) {
    double total = 0;
    for (double rate : detail::on_threads(threads, [](int) { return detail::fma_chains_per_second(kIterations); }))
      total += rate;
    best = std::max(best, total);
  }
  return best * 1e-9;
}

// A 512 MiB buffer, far larger than the caches, that `threads` threads read at once, each its own
// share (first touched by the thread that reads it later) as four streams side by side, asking for
// every line 2 KB ahead of its loads. That is the fastest way to read that we found here: one
// plain stream per thread read 25-35% slower, so it would understate what the memory gives a kernel
// that reads several streams and prefetches. One pass is noisy on a shared machine (the neighbours'
// memory traffic comes and goes), so rates are medians of passes: the typical pass, which is what a
// long run of decode steps meets, rather than the luckiest.
class ReadProbe {
 public:
  static constexpr std::size_t kBytes = std::size_t(512) << 20;

  explicit ReadProbe(int threads) : threads_(threads), buffer_(gqe::detail::AlignedBytes::allocate(kBytes)) {
    detail::on_threads(threads_, [&](int t) {
      std::fill(data() + share_floats() * static_cast<std::size_t>(t), data() + share_floats() * static_cast<std::size_t>(t + 1), 1.0f);
      return 0.0;
    });
  }

  // GB/s of one pass over the whole buffer.
  double pass() const {
    using namespace Eigen::internal;
    using detail::Packet;
    constexpr std::size_t kLine = 64 / sizeof(float), kAhead = 2048 / sizeof(float);
    const auto start = std::chrono::steady_clock::now();
    detail::on_threads(threads_, [&](int t) {
      const std::size_t stream = stream_floats();
      const float* p[kStreams];
      for (std::size_t s = 0; s < kStreams; ++s) p[s] = data() + share_floats() * static_cast<std::size_t>(t) + s * stream;
      Packet sum[4] = {pzero(Packet{}), pzero(Packet{}), pzero(Packet{}), pzero(Packet{})};
      for (std::size_t i = 0; i < stream; i += kStep)
        for (std::size_t s = 0; s < kStreams; ++s) {
          for (std::size_t line = 0; line < kStep; line += kLine) __builtin_prefetch(p[s] + i + line + kAhead);
          for (std::size_t j = 0; j < 4; ++j) sum[j] = padd(sum[j], pload<Packet>(p[s] + i + j * detail::kLanes));
        }
      volatile float sink = predux(padd(padd(sum[0], sum[1]), padd(sum[2], sum[3])));
      (void)sink;
      return 0.0;
    });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return static_cast<double>(bytes_read()) / seconds * 1e-9;
  }

 private:
  static constexpr std::size_t kFloats = kBytes / sizeof(float), kStreams = 4;
  static constexpr std::size_t kStep = 4 * detail::kLanes;  // floats a stream advances by: 4 packets
  std::size_t share_floats() const { return kFloats / static_cast<std::size_t>(threads_); }
  std::size_t stream_floats() const { return share_floats() / kStreams / kStep * kStep; }
  std::size_t bytes_read() const { return stream_floats() * kStreams * static_cast<std::size_t>(threads_) * sizeof(float); }
  float* data() const { return reinterpret_cast<float*>(buffer_.get()); }

  int threads_;
  gqe::detail::AlignedBytes::Pointer buffer_;
};

// The memory read bandwidth of `threads` threads: the median of five passes of a ReadProbe, in GB/s.
inline double read_bandwidth(int threads) {
  const ReadProbe probe(threads);
  std::vector<double> passes;
  for (int pass = 0; pass < 5; ++pass) passes.push_back(probe.pass());
  return detail::median(std::move(passes));
}

inline MachinePeaks measure_peaks(int threads) {
  MachinePeaks p;
  p.threads = threads;
  p.fma_gflops_one = fma_peak(1);
  p.fma_gflops_all = threads == 1 ? p.fma_gflops_one : fma_peak(threads);
  p.read_gbps = read_bandwidth(threads);
  return p;
}

}  // namespace gqe::bench
