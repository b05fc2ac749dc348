#pragma once
// AdamW with decoupled weight decay, a learning-rate schedule (linear warm-up, then cosine or
// warmup-stable-decay), and clipping by the global gradient norm.
//
// Weight decay (0.1, as the paper) applies to every matrix: projections, router, embeddings and
// lm_head; not to the RMSNorm weights, which start at one and whose pull toward zero would shrink
// every activation. The update, per element, in the parameters' own type:
//   p *= 1 - lr * wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
//   p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
// Its state (m, v, the step count) is all that a resumed run needs to continue bit-identically.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "gqe/error.hpp"
#include "gqe/training/params.hpp"
#include "gqe/util/thread_pool.hpp"

namespace gqe::training {

enum class Schedule { cosine, wsd };

inline const char* to_string(Schedule s) { return s == Schedule::cosine ? "cosine" : "wsd"; }
inline Schedule schedule_from_string(const std::string& s) {
  if (s == "cosine") return Schedule::cosine;
  if (s == "wsd") return Schedule::wsd;
  fail<ConfigError>("schedule is \"", s, "\"; expected \"cosine\" or \"wsd\"");
}

struct OptimizerConfig {
  double lr = 3e-3;            // peak learning rate
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  double clip_norm = 1.0;      // global gradient norm; 0 = no clipping
  Index warmup_steps = 100;
  Index total_steps = 1000;
  Schedule schedule = Schedule::cosine;
  double min_lr_ratio = 0.1;   // the schedule ends at lr * min_lr_ratio
  double decay_fraction = 0.2; // wsd: the last fraction of the steps decays linearly

  void validate() const {
    const auto in = [](const char* name, double v, double lo, double hi, const char* expected) {
      if (!(v >= lo && v <= hi)) fail<ConfigError>(name, " is ", v, "; expected ", expected);
    };
    in("learning rate", lr, 1e-12, 10.0, "a number in (0, 10]");
    in("beta1", beta1, 0.0, 0.999999, "a number in [0, 1)");
    in("beta2", beta2, 0.0, 0.999999999, "a number in [0, 1)");
    in("adam eps", eps, 1e-30, 1.0, "a number in (0, 1]");
    in("weight decay", weight_decay, 0.0, 1.0, "a number in [0, 1]");
    in("clip norm", clip_norm, 0.0, 1e12, "a number >= 0 (0 = off)");
    in("min_lr_ratio", min_lr_ratio, 0.0, 1.0, "a number in [0, 1]");
    in("decay_fraction", decay_fraction, 0.0, 1.0, "a number in [0, 1]");
    if (total_steps < 1) fail<ConfigError>("steps is ", total_steps, "; expected at least 1");
    if (warmup_steps < 0 || warmup_steps > total_steps)
      fail<ConfigError>("warm-up is ", warmup_steps, " steps; expected 0 to the run's ", total_steps, " steps");
  }
};

// The learning rate of step `step` (0-based): linear warm-up to lr over warmup_steps, then cosine
// down to lr * min_lr_ratio at the last step, or (wsd) constant until the last decay_fraction of
// the steps and linear down to lr * min_lr_ratio.
inline double learning_rate(const OptimizerConfig& c, Index step) {
  const double lr_min = c.lr * c.min_lr_ratio;
  if (step < c.warmup_steps) return c.lr * static_cast<double>(step + 1) / static_cast<double>(c.warmup_steps);
  const double last = static_cast<double>(std::max<Index>(c.total_steps - 1, 1));
  if (c.schedule == Schedule::cosine) {
    const double span = std::max(1.0, last - static_cast<double>(c.warmup_steps));
    const double t = std::min(1.0, static_cast<double>(step - c.warmup_steps) / span);
    return lr_min + 0.5 * (c.lr - lr_min) * (1 + std::cos(3.141592653589793 * t));
  }
  const double decay_steps = std::max(1.0, std::floor(c.decay_fraction * static_cast<double>(c.total_steps)));
  const double decay_start = static_cast<double>(c.total_steps) - decay_steps;
  if (static_cast<double>(step) < decay_start) return c.lr;
  const double t = std::min(1.0, (static_cast<double>(step) - decay_start + 1) / decay_steps);
  return c.lr + (lr_min - c.lr) * t;
}

// Global L2 norm of every gradient (in double, in a fixed order).
template <class Scalar>
double global_norm(const Params<Scalar>& grads) {
  double sum = 0;
  grads.for_each([&](const std::string&, TensorView<const Scalar> g) {
    sum += g.flat().template cast<double>().squaredNorm();
  });
  return std::sqrt(sum);
}

// Scales the gradients so that their global norm is at most max_norm; returns the norm before.
template <class Scalar>
double clip_global_norm(Params<Scalar>& grads, double max_norm) {
  const double norm = global_norm(grads);
  if (!std::isfinite(norm)) fail<InputError>("the gradient's norm is ", norm, "; the loss diverged (lower --lr?)");
  if (max_norm > 0 && norm > max_norm) {
    const auto factor = static_cast<Scalar>(max_norm / (norm + 1e-6));
    grads.for_each([&](const std::string&, TensorView<Scalar> g) { g.flat() *= factor; });
  }
  return norm;
}

template <class Scalar>
class AdamW {
 public:
  AdamW() = default;
  AdamW(const ModelConfig& model, const OptimizerConfig& config) : config_(config), exp_avg_(model), exp_avg_sq_(model) {
    config_.validate();
  }

  const OptimizerConfig& config() const { return config_; }
  Index step() const { return step_; }
  void set_step(Index step) {
    if (step < 0) fail<InputError>("optimizer step is ", step, "; expected >= 0");
    step_ = step;
  }
  Params<Scalar>& exp_avg() { return exp_avg_; }
  Params<Scalar>& exp_avg_sq() { return exp_avg_sq_; }
  const Params<Scalar>& exp_avg() const { return exp_avg_; }
  const Params<Scalar>& exp_avg_sq() const { return exp_avg_sq_; }

  // One update of params from grads at learning rate lr (the step count advances first).
  void update(Params<Scalar>& params, const Params<Scalar>& grads, double lr) {
    ++step_;
    const double c1 = 1 - std::pow(config_.beta1, static_cast<double>(step_));
    const double c2 = 1 - std::pow(config_.beta2, static_cast<double>(step_));
    const auto b1 = static_cast<Scalar>(config_.beta1), b2 = static_cast<Scalar>(config_.beta2);
    const auto step_size = static_cast<Scalar>(lr / c1);
    const auto inv_sqrt_c2 = static_cast<Scalar>(1 / std::sqrt(c2));
    const auto eps = static_cast<Scalar>(config_.eps);
    auto p = params.views();
    const auto g = grads.views();
    auto m = exp_avg_.views();
    auto v = exp_avg_sq_.views();
    for (std::size_t t = 0; t < p.size(); ++t) {
      const auto decay = static_cast<Scalar>(p[t].rank() == 2 ? 1 - lr * config_.weight_decay : 1.0);
      auto pt = p[t].flat();
      const auto gt = g[t].flat();
      auto mt = m[t].flat();
      auto vt = v[t].flat();
      // Elementwise: any split of the elements gives the same bits.
      constexpr Index kChunk = 1 << 14;
      const Index n = pt.size(), chunks = (n + kChunk - 1) / kChunk;
      thread_pool().parallel_for(chunks, [&](Index c) {
        const Index b = c * kChunk, len = std::min(kChunk, n - b);
        auto ps = pt.segment(b, len);
        const auto gs = gt.segment(b, len);
        auto ms = mt.segment(b, len);
        auto vs = vt.segment(b, len);
        ms = b1 * ms + (Scalar(1) - b1) * gs;
        vs = b2 * vs + (Scalar(1) - b2) * gs.cwiseProduct(gs);
        ps *= decay;
        ps.array() -= step_size * ms.array() / (vs.array().sqrt() * inv_sqrt_c2 + eps);
      }, 10.0 * static_cast<double>(n));
    }
  }

 private:
  OptimizerConfig config_;
  Params<Scalar> exp_avg_, exp_avg_sq_;
  Index step_ = 0;
};

}  // namespace gqe::training
