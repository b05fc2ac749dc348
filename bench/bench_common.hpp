#pragma once
// What the benchmarks share: the paper's layer shape, random weights, positions, and counters of
// useful work per iteration beside the machine's measured ceilings. The run's context (CPU,
// compiler, flags, SIMD level, backend, threads, ceilings) is added by main.cpp.
#include <benchmark/benchmark.h>

#include <cmath>
#include <random>
#include <vector>

#include "gqe/layers/attention_config.hpp"
#include "probes.hpp"
#include "gqe/tensor/tensor.hpp"
#include "gqe/tensor/weight.hpp"

namespace gqe::bench {

// d = 1024, d_h = 64, N = 16, G = 8 (the paper's main setting); k = 1 of M = 2 for GQE.
inline AttentionConfig paper_layer(AttentionType type) {
  AttentionConfig c;
  c.type = type;
  c.variant = GqeVariant::gqe;
  c.hidden_size = 1024;
  c.num_heads = 16;
  c.num_kv_heads = 8;
  c.head_dim = 64;
  c.top_k = 1;
  return c;
}

// w [out, in] drawn from N(0, 1/in). For the router this gives logits of standard deviation about
// that of x, so that the experts a token keeps vary from token to token (mixed routing, as after
// training), rather than the all-zero initial router's tie that sends every token to expert 0.
template <class Scalar>
void fill_random(Scalar* data, Index size, Index fan_in, std::mt19937& rng) {
  std::normal_distribution<double> dist(0.0, 1.0 / std::sqrt(static_cast<double>(fan_in)));
  for (Index i = 0; i < size; ++i) data[i] = static_cast<Scalar>(dist(rng));
}

// Every weight a layer's static visit(layer, fn) yields, (name, Weight&), given random values.
template <class Layer>
void randomize_layer(Layer& layer, unsigned seed) {
  std::mt19937 rng(seed);
  Layer::visit(layer, [&](const char*, Weight& w) { fill_random(w.allocate<float>(), w.numel(), w.cols(), rng); });
}

// Positions first .. first + count - 1.
inline std::vector<Index> positions(Index first, Index count) {
  std::vector<Index> p(static_cast<std::size_t>(count));
  for (Index i = 0; i < count; ++i) p[static_cast<std::size_t>(i)] = first + i;
  return p;
}

// `amount` of something done by one iteration, reported per second of (real) time.
inline benchmark::Counter rate(double amount) {
  return benchmark::Counter(amount, benchmark::Counter::kIsIterationInvariantRate);
}

// The machine's ceilings measured at the start of the run (main.cpp).
inline MachinePeaks& machine_peaks() {
  static MachinePeaks peaks;
  return peaks;
}

// Useful GFLOP/s of `flops` per iteration, and their share of the measured FMA peak of the
// library's threads.
inline void report_flops(benchmark::State& state, double flops) {
  state.counters["GFLOP"] = rate(flops * 1e-9);
  if (machine_peaks().fma_gflops_all > 0) state.counters["of_peak"] = rate(flops * 1e-9 / machine_peaks().fma_gflops_all);
}
// GB/s of `bytes` read per iteration, and their share of the measured read bandwidth.
inline void report_bytes(benchmark::State& state, double bytes) {
  state.counters["GB"] = rate(bytes * 1e-9);
  if (machine_peaks().read_gbps > 0) state.counters["of_bandwidth"] = rate(bytes * 1e-9 / machine_peaks().read_gbps);
}

}  // namespace gqe::bench
