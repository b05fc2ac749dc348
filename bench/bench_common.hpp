#pragma once
// What the benchmarks share: the paper's layer shape, random weights, and the run's context
// (CPU, compiler, flags, threads) recorded in the JSON beside the figures.
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <fstream>
#include <random>
#include <string>

#include "gqe/gqe.hpp"

namespace gqe::bench {

// d = 1024, d_h = 64, N = 16, G = 8 (the paper's main setting); k = 1 for GQE.
inline AttentionConfig paper_layer(AttentionType type) {
  AttentionConfig c;
  c.type = type;
  c.hidden_size = 1024;
  c.num_heads = 16;
  c.num_kv_heads = 8;
  c.head_dim = 64;
  c.top_k = 1;
  return c;
}

// Every parameter drawn from N(0, 1/fan_in): routing then varies from token to token.
template <class Fill>
void random_weights(Fill&& visit, unsigned seed) {
  std::mt19937 rng(seed);
  visit([&](const auto&, auto& m) {
    std::normal_distribution<float> dist(0.0f, 1.0f / std::sqrt(static_cast<float>(m.cols())));
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = dist(rng);
  });
}

inline std::string cpu_name() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown";
}

// Threads from GQE_THREADS (default: the machine's cores), and the context lines of the JSON.
struct Context {
  Context() {
    if (const char* t = std::getenv("GQE_THREADS")) set_num_threads(std::atoi(t));
    benchmark::AddCustomContext("cpu", cpu_name());
    benchmark::AddCustomContext("compiler", GQE_BENCH_COMPILER);
    benchmark::AddCustomContext("flags", GQE_BENCH_FLAGS);
    benchmark::AddCustomContext("gqe_threads", std::to_string(num_threads()));
#ifdef GQE_USE_BLAS
    benchmark::AddCustomContext("projections", "OpenBLAS (GQE_USE_BLAS)");
#else
    benchmark::AddCustomContext("projections", "Eigen");
#endif
  }
};

}  // namespace gqe::bench
