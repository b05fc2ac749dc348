#pragma once
// Backward passes of the stateless ops: the projection y = x W^T, RMSNorm, RoPE, SwiGLU, and the
// masked cross-entropy of a language model. Each takes what its forward saw and the gradient of
// its output; parameter gradients are accumulated (+=), so that one buffer can gather a tensor's
// gradient from several uses (tied embeddings, experts' rows of q_proj).
//
// Parallel work is cut into units fixed by the shapes alone, and every sum over rows runs inside a
// single unit, so that gradients are bit-identical whatever the thread count.
#include "gqe/tensor/eigen.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "gqe/ops/rope.hpp"
#include "gqe/tensor/tensor.hpp"
#include "gqe/util/thread_pool.hpp"

namespace gqe::training {

namespace detail {
constexpr Index kGradRowTile = 256;  // rows of dY per dX unit
constexpr Index kGradColTile = 256;  // input features per unit
constexpr Index kGradOutTile = 64;   // output features per dW unit
}  // namespace detail

// For y [R, out] = x [R, in] w^T, w [out, in]: dw [out, in] += dy^T x, and dx [R, in] = dy w (or
// += when accumulate_dx). dx may be an empty matrix (no input gradient wanted).
template <class Scalar>
void linear_backward(const Eigen::Ref<const Matrix<Scalar>>& x, const Eigen::Ref<const Matrix<Scalar>>& w,
                     const Eigen::Ref<const Matrix<Scalar>>& dy, Eigen::Ref<Matrix<Scalar>> dx, bool accumulate_dx,
                     Eigen::Ref<Matrix<Scalar>> dw) {
  const Index rows = x.rows(), in = x.cols(), out = w.rows();
  assert(w.cols() == in && dy.rows() == rows && dy.cols() == out && dw.rows() == out && dw.cols() == in);
  const double flops = 2.0 * static_cast<double>(rows) * static_cast<double>(in) * static_cast<double>(out);
  if (rows == 0) return;
  if (dx.size() > 0) {
    assert(dx.rows() == rows && dx.cols() == in);
    const Index row_tiles = (rows + detail::kGradRowTile - 1) / detail::kGradRowTile;
    const Index col_tiles = (in + detail::kGradColTile - 1) / detail::kGradColTile;
    thread_pool().parallel_for(row_tiles * col_tiles, [&](Index unit) {
      const Index r0 = (unit / col_tiles) * detail::kGradRowTile, c0 = (unit % col_tiles) * detail::kGradColTile;
      const Index nr = std::min(detail::kGradRowTile, rows - r0), nc = std::min(detail::kGradColTile, in - c0);
      auto block = dx.block(r0, c0, nr, nc);
      if (accumulate_dx)
        block.noalias() += dy.middleRows(r0, nr) * w.middleCols(c0, nc);
      else
        block.noalias() = dy.middleRows(r0, nr) * w.middleCols(c0, nc);
    }, flops);
  }
  const Index out_tiles = (out + detail::kGradOutTile - 1) / detail::kGradOutTile;
  const Index in_tiles = (in + detail::kGradColTile - 1) / detail::kGradColTile;
  thread_pool().parallel_for(out_tiles * in_tiles, [&](Index unit) {
    const Index o0 = (unit / in_tiles) * detail::kGradOutTile, c0 = (unit % in_tiles) * detail::kGradColTile;
    const Index no = std::min(detail::kGradOutTile, out - o0), nc = std::min(detail::kGradColTile, in - c0);
    dw.block(o0, c0, no, nc).noalias() += dy.middleCols(o0, no).transpose() * x.middleCols(c0, nc);
  }, flops);
}

// 1 / rms of every row of x [R, d], as rms_norm computes it: rsqrt(mean(x^2) + eps).
template <class Scalar>
void rms_inverse(const Eigen::Ref<const Matrix<Scalar>>& x, double eps, Vector<Scalar>& inv_rms) {
  inv_rms.resize(x.rows());
  for (Index r = 0; r < x.rows(); ++r)
    inv_rms(r) = Scalar(1) / std::sqrt(x.row(r).squaredNorm() / Scalar(x.cols()) + Scalar(eps));
}

// For y = x * inv_rms * weight per row: dweight [d] += sum_r dy * x * inv_rms, and
// dx [R, d] (+)= inv_rms * (g - x * inv_rms^2 * mean(g * x)), g = dy * weight.
template <class Scalar>
void rms_norm_backward(const Eigen::Ref<const Matrix<Scalar>>& x, const Vector<Scalar>& weight,
                       const Vector<Scalar>& inv_rms, const Eigen::Ref<const Matrix<Scalar>>& dy,
                       Eigen::Ref<Matrix<Scalar>> dx, bool accumulate_dx, Vector<Scalar>& dweight) {
  const Index d = x.cols();
  assert(weight.size() == d && dy.rows() == x.rows() && dx.rows() == x.rows() && dweight.size() == d);
  // Row by row: dweight's sum over rows runs in one fixed order.
  for (Index r = 0; r < x.rows(); ++r) {
    const Scalar inv = inv_rms(r);
    dweight.array() += dy.row(r).transpose().array() * x.row(r).transpose().array() * inv;
    const Scalar dot = (dy.row(r).transpose().array() * weight.array() * x.row(r).transpose().array()).sum();
    const Scalar c = inv * inv * inv * dot / Scalar(d);
    if (accumulate_dx)
      dx.row(r).array() += inv * dy.row(r).array() * weight.transpose().array() - c * x.row(r).array();
    else
      dx.row(r).array() = inv * dy.row(r).array() * weight.transpose().array() - c * x.row(r).array();
  }
}

// The table of the inverse rotation (angle -> -angle): RoPE is orthogonal, so its backward applies
// the transposed rotation, which is apply_rope with this table.
template <class Scalar>
RopeTable<Scalar> inverse_rope(const RopeTable<Scalar>& table) {
  RopeTable<Scalar> inverse;
  inverse.cos = table.cos;
  inverse.sin = -table.sin;
  return inverse;
}

// silu(z) and its derivative sigmoid(z) * (1 + z * (1 - sigmoid(z))).
template <class Scalar>
Scalar silu(Scalar z) {
  return z / (Scalar(1) + std::exp(-z));
}
template <class Scalar>
Scalar silu_grad(Scalar z) {
  const Scalar s = Scalar(1) / (Scalar(1) + std::exp(-z));
  return s * (Scalar(1) + z * (Scalar(1) - s));
}

// What masked cross-entropy found over a batch.
struct LossSums {
  double loss = 0;       // sum over counted rows of weight * -log p(target)
  double weight = 0;     // sum of the counted rows' weights
  double correct = 0;    // sum of the weights of rows whose argmax is the target
};

// Cross-entropy of logits [R, V] against targets [R] with per-row weights [R] (0: not counted).
// Returns the sums; when `grad_scale` is non-zero, overwrites the logits with the gradient of
// grad_scale * sum_r weight_r * loss_r (softmax - onehot, scaled), rows of weight 0 with zeros.
// Targets of counted rows must lie in [0, V) (checked by the caller's data).
template <class Scalar>
LossSums cross_entropy(Eigen::Ref<Matrix<Scalar>> logits, const std::vector<std::int32_t>& targets,
                       const std::vector<float>& weights, double grad_scale) {
  const Index rows = logits.rows(), V = logits.cols();
  assert(static_cast<Index>(targets.size()) == rows && static_cast<Index>(weights.size()) == rows);
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

}  // namespace gqe::training
