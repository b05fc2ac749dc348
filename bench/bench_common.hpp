#pragma once
// What the benchmarks share: the paper's layer shape, random weights, positions, and a counter of
// useful work per iteration. The run's context (CPU, compiler, flags, threads) is added by main.cpp.
#include <benchmark/benchmark.h>

#include <cmath>
#include <random>
#include <vector>

#include "gqe/layers/attention_config.hpp"
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

}  // namespace gqe::bench
