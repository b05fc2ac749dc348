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
#include "gqe/model/transformer.hpp"
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
  if (step < 0) fail<InputError>("learning rate asked for step ", step, "; expected a step >= 0");
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

// Attaches a zeroed gradient to every weight of the model (which must own Scalar weights).
template <class Scalar>
void attach_gradients(Transformer<Scalar>& model) {
  model.for_each_parameter([](const std::string&, Weight& w) {
    w.mutable_data<Scalar>();  // refuses weights it could not update
    w.attach_grad<Scalar>();
  });
}

template <class Scalar>
void zero_gradients(Transformer<Scalar>& model) {
  model.require_gradients();
  model.for_each_parameter([](const std::string&, Weight& w) { std::fill_n(w.grad<Scalar>(), w.numel(), Scalar(0)); });
}

// Global L2 norm of every gradient (in double, in a fixed order).
template <class Scalar>
double global_norm(const Transformer<Scalar>& model) {
  model.require_gradients();
  double sum = 0;
  model.for_each_parameter([&](const std::string&, const Weight& w) {
    sum += Eigen::Map<const Vector<Scalar>>(w.grad<Scalar>(), w.numel()).template cast<double>().squaredNorm();
  });
  return std::sqrt(sum);
}

// Scales the gradients so that their global norm is at most max_norm; returns the norm before.
template <class Scalar>
double clip_global_norm(Transformer<Scalar>& model, double max_norm) {
  if (!(max_norm >= 0)) fail<InputError>("clip norm is ", max_norm, "; expected a number >= 0 (0 = no clipping)");
  const double norm = global_norm(model);
  if (!std::isfinite(norm)) fail<InputError>("the gradient's norm is ", norm, "; the loss diverged (lower --lr?)");
  if (max_norm > 0 && norm > max_norm) {
    const auto factor = static_cast<Scalar>(max_norm / (norm + 1e-6));
    model.for_each_parameter([&](const std::string&, Weight& w) {
      Eigen::Map<Vector<Scalar>>(w.grad<Scalar>(), w.numel()) *= factor;
    });
  }
  return norm;
}

// AdamW over a model's own weights, updated in place; its moments lie beside them, one buffer per
// weight in the model's parameter order.
template <class Scalar>
class AdamW {
 public:
  AdamW() = default;
  AdamW(const Transformer<Scalar>& model, const OptimizerConfig& config) : config_(config) {
    config_.validate();
    model.for_each_parameter([&](const std::string&, const Weight& w) {
      exp_avg_.emplace_back(static_cast<std::size_t>(w.numel()), Scalar(0));
      exp_avg_sq_.emplace_back(static_cast<std::size_t>(w.numel()), Scalar(0));
    });
  }

  const OptimizerConfig& config() const { return config_; }
  Index step() const { return step_; }
  void set_step(Index step) {
    if (step < 0) fail<InputError>("optimizer step is ", step, "; expected >= 0");
    step_ = step;
  }
  // The moments of parameter i (the model's order): [numel] each.
  std::vector<Scalar>& exp_avg(std::size_t i) { return exp_avg_[checked(i)]; }
  std::vector<Scalar>& exp_avg_sq(std::size_t i) { return exp_avg_sq_[checked(i)]; }
  const std::vector<Scalar>& exp_avg(std::size_t i) const { return exp_avg_[checked(i)]; }
  const std::vector<Scalar>& exp_avg_sq(std::size_t i) const { return exp_avg_sq_[checked(i)]; }

  // One update of the model's weights from their gradients at learning rate lr (the step count
  // advances first). The model must be the one (or one of the shape) the optimiser was made for.
  void update(Transformer<Scalar>& model, double lr) {
    if (!(std::isfinite(lr) && lr >= 0)) fail<InputError>("learning rate is ", lr, "; expected a finite number >= 0");
    model.require_gradients();
    std::size_t count = 0;
    model.for_each_parameter([&](const std::string& name, const Weight& w) {
      if (count >= exp_avg_.size() || exp_avg_[count].size() != static_cast<std::size_t>(w.numel()))
        fail<ShapeError>("weight ", name, " (", w.shape().str(), ") has no moments of its size in this optimiser; ",
                         "expected the model it was made for");
      ++count;
    });
    if (count != exp_avg_.size())
      fail<ShapeError>("the model has ", count, " weights, the optimiser moments for ", exp_avg_.size(),
                       "; expected the model it was made for");
    ++step_;
    const double c1 = 1 - std::pow(config_.beta1, static_cast<double>(step_));
    const double c2 = 1 - std::pow(config_.beta2, static_cast<double>(step_));
    std::size_t i = 0;
    model.for_each_parameter([&](const std::string&, Weight& w) {
      const auto decay = static_cast<Scalar>(w.shape().rank() == 2 ? 1 - lr * config_.weight_decay : 1.0);
      update_tensor(w.mutable_data<Scalar>(), w.grad<Scalar>(), exp_avg_[i].data(), exp_avg_sq_[i].data(), w.numel(), decay,
                    static_cast<Scalar>(lr / c1), static_cast<Scalar>(1 / std::sqrt(c2)));
      ++i;
    });
  }

 private:
  std::size_t checked(std::size_t i) const {
    if (i >= exp_avg_.size()) fail<InputError>("no parameter ", i, " in this optimiser, which has ", exp_avg_.size());
    return i;
  }

  // Elementwise, in chunks over the pool: any split of the elements gives the same bits.
  void update_tensor(Scalar* param, const Scalar* grad, Scalar* m, Scalar* v, Index n, Scalar decay, Scalar step_size,
                     Scalar inv_sqrt_c2) const {
    const auto b1 = static_cast<Scalar>(config_.beta1), b2 = static_cast<Scalar>(config_.beta2);
    const auto eps = static_cast<Scalar>(config_.eps);
    constexpr Index kChunk = 1 << 14;
    thread_pool().parallel_for((n + kChunk - 1) / kChunk, [&](Index c) {
      const Index b = c * kChunk, len = std::min(kChunk, n - b);
      Eigen::Map<Vector<Scalar>> p(param + b, len), ms(m + b, len), vs(v + b, len);
      const Eigen::Map<const Vector<Scalar>> g(grad + b, len);
      ms = b1 * ms + (Scalar(1) - b1) * g;
      vs = b2 * vs + (Scalar(1) - b2) * g.cwiseProduct(g);
      p *= decay;
      p.array() -= step_size * ms.array() / (vs.array().sqrt() * inv_sqrt_c2 + eps);
    }, 10.0 * static_cast<double>(n));
  }

  OptimizerConfig config_;
  std::vector<std::vector<Scalar>> exp_avg_, exp_avg_sq_;
  Index step_ = 0;
};

}  // namespace gqe::training
