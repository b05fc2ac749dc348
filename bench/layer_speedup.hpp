#pragma once
// gqe-bench --layer-speedup: one attention layer of any shape, dense GQA (N query heads over G KV
// heads) against GQE (N experts in G groups, k kept, a variant), prefill of T tokens from an empty
// cache. Interleaved rounds after a warm-up; the speed-up is the median of the rounds' ratios,
// printed as one JSON object beside the FLOP model's ceiling. With `peak`, each round is followed
// by one trial of the FMA probe on the library's threads, and both layers' useful GFLOP/s are
// given as shares of the median trial: the peak measured in turn with the layers, which on a
// shared machine moves from run to run more than they do.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

#include "bench_common.hpp"
#include "gqe/layers/attention.hpp"
#include "probes.hpp"

namespace gqe::bench {

struct LayerShape {
  Index hidden = 1024, heads = 16, kv_heads = 8, head_dim = 64, top_k = 1, tokens = 4096;
  GqeVariant variant = GqeVariant::gqe;
  int rounds = 5;
  bool peak = false;  // also the FMA peak, in turn with the rounds
};

namespace detail {

// One layer's prefill of x from an empty cache, timed; its output and cache are kept from call to
// call (as a model keeps them), so that a round measures the layer, not fresh pages.
struct TimedLayer {
  const Attention<float>& layer;
  Matrix<float> y;              // [T, d]
  AttentionCache<float> cache;
  TimedLayer(const Attention<float>& l, Index tokens) : layer(l), y(tokens, l.config().hidden_size), cache(l.config()) {
    cache.reserve(tokens);
  }
  double seconds(const Matrix<float>& x, const RopeTable<float>& rope) {
    cache.clear();
    const std::vector<Segment<float>> segments{{&cache, 0, x.rows()}};
    const auto start = std::chrono::steady_clock::now();
    layer.forward(x, segments, rope, y);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
};
}  // namespace detail

inline int run_layer_speedup(const LayerShape& s) {
  AttentionConfig dense;
  dense.hidden_size = s.hidden;
  dense.num_heads = s.heads;
  dense.num_kv_heads = s.kv_heads;
  dense.head_dim = s.head_dim;
  AttentionConfig routed = dense;
  routed.type = AttentionType::gqe;
  routed.top_k = s.top_k;
  routed.variant = s.variant;
  Attention<float> gqa(dense), gqe_layer(routed);  // validate the shape
  randomize_layer(gqa, 1);
  randomize_layer(gqe_layer, 2);
  Matrix<float> x(s.tokens, s.hidden);  // [T, d]
  std::mt19937 rng(3);
  fill_random(x.data(), x.size(), 1, rng);
  RopeTable<float> rope;
  rope.compute(positions(0, s.tokens), s.head_dim, dense.rope_theta);
  detail::TimedLayer dense_run(gqa, s.tokens), gqe_run(gqe_layer, s.tokens);
  dense_run.seconds(x, rope);  // warm-up: workspaces sized, pages touched
  gqe_run.seconds(x, rope);
  std::vector<double> dense_s, gqe_s, ratios, peaks;
  for (int r = 0; r < s.rounds; ++r) {
    dense_s.push_back(dense_run.seconds(x, rope));
    gqe_s.push_back(gqe_run.seconds(x, rope));
    ratios.push_back(dense_s.back() / gqe_s.back());
    if (s.peak) {
      // The pool's workers spin for up to a millisecond after a job before they sleep: let them,
      // so that the probe's threads have the cores to themselves.
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      peaks.push_back(fma_peak(num_threads(), 1));
    }
  }
  const double dense_ms = 1e3 * detail::median(dense_s), gqe_ms = 1e3 * detail::median(gqe_s);
  const double dense_flops = dense.prefill_flops(s.tokens), gqe_flops = routed.prefill_flops(s.tokens);
  std::printf("{\"tokens\": %td, \"dense_ms\": %.3f, \"gqe_ms\": %.3f, \"speedup\": %.4f, \"flop_ceiling\": %.4f, "
              "\"active_query_heads\": %td, \"rounds\": %d, \"threads\": %d",
              s.tokens, dense_ms, gqe_ms, detail::median(ratios), dense_flops / gqe_flops, routed.active_heads(), s.rounds,
              num_threads());
  if (s.peak) {
    // Useful GFLOP/s (the FLOP model's) of each layer's median time, against the median trial.
    const double dense_gflops = dense_flops / dense_ms * 1e-6, gqe_gflops = gqe_flops / gqe_ms * 1e-6;
    const double peak = detail::median(peaks);
    std::printf(", \"dense_gflops\": %.1f, \"gqe_gflops\": %.1f, \"fma_peak_gflops\": %.1f, \"fma_peak_range\": [%.1f, %.1f], "
                "\"dense_of_peak\": %.4f, \"gqe_of_peak\": %.4f",
                dense_gflops, gqe_gflops, peak, *std::min_element(peaks.begin(), peaks.end()),
                *std::max_element(peaks.begin(), peaks.end()), dense_gflops / peak, gqe_gflops / peak);
  }
  std::printf("}\n");
  return 0;
}

}  // namespace gqe::bench
