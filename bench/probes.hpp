#pragma once
// The machine's own ceilings, measured in the same run as the figures compared with them: the
// float32 FMA peak (independent multiply-add chains in registers, on one thread and on all) and the
// memory read bandwidth (a buffer far larger than the caches, read by every thread).
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <thread>
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

}  // namespace detail

// The best of three trials of `threads` threads running FMA chains at once, in GFLOP/s.
inline double fma_peak(int threads) {
  constexpr long kIterations = 20'000'000;
  double best = 0;
  for (int trial = 0; trial < 3; ++trial) {
    double total = 0;
    for (double rate : detail::on_threads(threads, [](int) { return detail::fma_chains_per_second(kIterations); }))
      total += rate;
    best = std::max(best, total);
  }
  return best * 1e-9;
}

// The best of three passes of `threads` threads each reading its share of a 512 MiB buffer, in GB/s.
inline double read_bandwidth(int threads) {
  using namespace Eigen::internal;
  constexpr std::size_t kBytes = std::size_t(512) << 20, kFloats = kBytes / sizeof(float);
  auto buffer = gqe::detail::AlignedBytes::allocate(kBytes);
  auto* data = reinterpret_cast<float*>(buffer.get());
  detail::on_threads(threads, [&](int t) {  // first touch by the thread that reads it later
    const std::size_t begin = kFloats / static_cast<std::size_t>(threads) * static_cast<std::size_t>(t);
    std::fill(data + begin, data + begin + kFloats / static_cast<std::size_t>(threads), 1.0f);
    return 0.0;
  });
  double best = 0;
  for (int pass = 0; pass < 3; ++pass) {
    const auto start = std::chrono::steady_clock::now();
    detail::on_threads(threads, [&](int t) {
      const std::size_t n = kFloats / static_cast<std::size_t>(threads), begin = n * static_cast<std::size_t>(t);
      detail::Packet sum[4] = {pzero(detail::Packet{}), pzero(detail::Packet{}), pzero(detail::Packet{}), pzero(detail::Packet{})};
      for (std::size_t i = begin; i + 4 * detail::kLanes <= begin + n; i += 4 * detail::kLanes)
        for (int j = 0; j < 4; ++j) sum[j] = padd(sum[j], pload<detail::Packet>(data + i + static_cast<std::size_t>(j * detail::kLanes)));
      volatile float sink = predux(padd(padd(sum[0], sum[1]), padd(sum[2], sum[3])));
      (void)sink;
      return 0.0;
    });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, static_cast<double>(kBytes) / seconds);
  }
  return best * 1e-9;
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
