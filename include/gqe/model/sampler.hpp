#pragma once
// Sampling of the next token from one row of logits, in gqe-run's order: temperature (0 = greedy),
// then top-k, then top-p, drawing from a seeded generator. Reproducible: the same seed and logits
// give the same tokens on every platform (no std:: distribution, whose output is unspecified).
// NaN logits are refused. Infinite ones are limits: greedy takes the first +inf; sampling draws
// among the +inf logits alone, equally, when there are any; -inf logits are never drawn, and all
// of them -inf is refused.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "gqe/error.hpp"
#include "gqe/tensor/tensor.hpp"

namespace gqe {

struct SamplerConfig {
  double temperature = 0.0;  // 0: greedy
  Index top_k = 0;           // 0: off
  double top_p = 1.0;        // 1: off
  std::uint64_t seed = 0;

  void validate() const {
    if (!(temperature >= 0) || !std::isfinite(temperature))
      fail<ConfigError>("temperature is ", temperature, "; expected a finite number >= 0");
    if (top_k < 0) fail<ConfigError>("top_k is ", top_k, "; expected >= 0 (0 = off)");
    if (!(top_p > 0 && top_p <= 1)) fail<ConfigError>("top_p is ", top_p, "; expected a number in (0, 1]");
  }
};

class Sampler {
 public:
  explicit Sampler(const SamplerConfig& config) : config_(config), rng_(config.seed) { config_.validate(); }

  const SamplerConfig& config() const { return config_; }

  // Draws a token id from logits [V].
  template <class Scalar>
  std::int32_t sample(const Scalar* logits, Index vocab) {
    if (vocab <= 0) fail<ShapeError>("sampler got ", vocab, " logits; expected at least one");
    bool drawable = false;  // some logit above -inf
    for (Index i = 0; i < vocab; ++i) {
      if (std::isnan(logits[i])) fail<InputError>("logit ", i, " is NaN; the model's output is not finite");
      drawable = drawable || logits[i] > -std::numeric_limits<Scalar>::infinity();
    }
    if (!drawable) fail<InputError>("all ", vocab, " logits are -inf; the model's output is not finite");
    if (config_.temperature == 0.0)  // greedy: the first maximum
      return static_cast<std::int32_t>(std::max_element(logits, logits + vocab) - logits);

    // Candidates by descending logit, ties to the lower id.
    order_.resize(static_cast<std::size_t>(vocab));
    std::iota(order_.begin(), order_.end(), Index(0));
    const auto by_logit = [&](Index a, Index b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
    const Index keep = config_.top_k > 0 ? std::min(config_.top_k, vocab) : vocab;
    std::partial_sort(order_.begin(), order_.begin() + keep, order_.end(), by_logit);
    order_.resize(static_cast<std::size_t>(keep));

    // Softmax of logits / temperature over the candidates, in double. The differences to the top
    // logit are divided, not the logits: a tiny temperature then sends the others to exp(-inf) = 0
    // instead of making inf - inf = NaN. A +inf logit takes all the probability: +inf logits share
    // it equally, the others get none (the limit of the softmax).
    probs_.resize(order_.size());
    const double top = static_cast<double>(logits[order_[0]]);
    double sum = 0;
    for (std::size_t i = 0; i < order_.size(); ++i) {
      const double l = static_cast<double>(logits[order_[i]]);
      sum += probs_[i] = std::isinf(top) ? (std::isinf(l) && l > 0 ? 1.0 : 0.0) : std::exp((l - top) / config_.temperature);
    }
    // Top-p: the shortest prefix whose probability reaches top_p (at least one token).
    std::size_t n = order_.size();
    if (config_.top_p < 1.0) {
      double cumulative = 0;
      for (std::size_t i = 0; i < order_.size(); ++i) {
        cumulative += probs_[i] / sum;
        if (cumulative >= config_.top_p) {
          n = i + 1;
          break;
        }
      }
    }
    const double total = std::accumulate(probs_.begin(), probs_.begin() + static_cast<std::ptrdiff_t>(n), 0.0);
    const double u = uniform() * total;
    double cumulative = 0;
    for (std::size_t i = 0; i < n; ++i) {
      cumulative += probs_[i];
      if (u < cumulative) return static_cast<std::int32_t>(order_[i]);
    }
    return static_cast<std::int32_t>(order_[n - 1]);
  }

 private:
  // Uniform in [0, 1) from the top 53 bits of the generator.
  double uniform() { return static_cast<double>(rng_() >> 11) * 0x1.0p-53; }

  SamplerConfig config_;
  std::mt19937_64 rng_;
  std::vector<Index> order_;
  std::vector<double> probs_;
};

}  // namespace gqe
