#pragma once
// Cross-entropy of next-token logits: the language-model loss of training and of gqe-run's
// perplexity, and its gradient.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "gqe/error.hpp"
#include "gqe/tensor/eigen.hpp"
#include "gqe/tensor/tensor.hpp"
#include "gqe/util/thread_pool.hpp"

namespace gqe {

// What masked cross-entropy found over a batch.
struct LossSums {
  double loss = 0;     // sum over counted rows of weight * -log p(target)
  double weight = 0;   // sum of the counted rows' weights
  double correct = 0;  // sum of the weights of rows whose argmax is the target
};

// Refuses targets [R] and weights [R] that cross_entropy cannot count: other sizes than `rows`, a
// weight negative or not finite, a counted row's target outside [0, V).
inline void check_loss_rows(const std::vector<std::int32_t>& targets, const std::vector<float>& weights, Index rows,
                            Index V) {
  if (static_cast<Index>(targets.size()) != rows || static_cast<Index>(weights.size()) != rows)
    fail<ShapeError>("got ", targets.size(), " targets and ", weights.size(), " loss weights for ", rows,
                     " rows; expected one of each per row");
  for (std::size_t r = 0; r < targets.size(); ++r) {
    if (!(weights[r] >= 0) || !std::isfinite(weights[r]))
      fail<InputError>("loss weight ", weights[r], " at row ", r, "; expected a finite number >= 0");
    if (weights[r] != 0 && (targets[r] < 0 || targets[r] >= V))
      fail<InputError>("target id ", targets[r], " at row ", r, " is out of range; expected 0 to ", V - 1);
  }
}

// Cross-entropy of logits [R, V] against targets [R] with per-row weights [R] (0: not counted).
// Returns the sums; when `grad_scale` is non-zero, overwrites the logits with the gradient of
// grad_scale * sum_r weight_r * loss_r (softmax - onehot, scaled), rows of weight 0 with zeros.
// Targets of counted rows must lie in [0, V), weights be finite and >= 0. Rows are summed in order
// after a parallel pass, so the sums are the same for every thread count.
template <class Scalar>
LossSums cross_entropy(Eigen::Ref<Matrix<Scalar>> logits, const std::vector<std::int32_t>& targets,
                       const std::vector<float>& weights, double grad_scale) {
  const Index rows = logits.rows(), V = logits.cols();
  check_loss_rows(targets, weights, rows, V);
  std::vector<double> row_loss(static_cast<std::size_t>(rows), 0.0), row_correct(static_cast<std::size_t>(rows), 0.0);
  constexpr Index kRowsPerUnit = 64;
  const Index units = (rows + kRowsPerUnit - 1) / kRowsPerUnit;
  thread_pool().parallel_for(units, [&](Index unit) {
    const Index end = std::min(rows, (unit + 1) * kRowsPerUnit);
    for (Index r = unit * kRowsPerUnit; r < end; ++r) {
      auto row = logits.row(r);
      const double w = weights[static_cast<std::size_t>(r)];
      if (w == 0) {
        if (grad_scale != 0) row.setZero();
        continue;
      }
      const std::int32_t y = targets[static_cast<std::size_t>(r)];
      Index best = 0;
      const Scalar max = row.maxCoeff(&best);
      const Scalar target_logit = row(y);
      const Scalar sum = (row.array() - max).exp().sum();
      const double lse = static_cast<double>(max) + std::log(static_cast<double>(sum));
      row_loss[static_cast<std::size_t>(r)] = w * (lse - static_cast<double>(target_logit));
      row_correct[static_cast<std::size_t>(r)] = best == y ? w : 0.0;
      if (grad_scale != 0) {
        const Scalar scale = static_cast<Scalar>(grad_scale * w);
        row = ((row.array() - max).exp() / sum) * scale;
        row(y) -= scale;
      }
    }
  }, 8.0 * static_cast<double>(rows * V));
  LossSums s;
  for (Index r = 0; r < rows; ++r) {
    s.loss += row_loss[static_cast<std::size_t>(r)];
    s.correct += row_correct[static_cast<std::size_t>(r)];
    s.weight += weights[static_cast<std::size_t>(r)];
  }
  return s;
}

}  // namespace gqe
