#pragma once
// RMSNorm as Hugging Face Llama computes it: y = x * rsqrt(mean(x^2) + eps) * weight, per row, and
// its backward pass.
#include <cmath>

#include "gqe/ops/rows.hpp"
#include "gqe/tensor/eigen.hpp"
#include "gqe/tensor/tensor.hpp"
#include "gqe/util/thread_pool.hpp"

namespace gqe {

// 1 / rms of the row x[0 .. d): rsqrt(mean(x^2) + eps).
template <class Scalar>
Scalar inverse_rms(const Scalar* x, Index d, double eps) {
  return Scalar(1) / std::sqrt(detail::row_dot(x, x, d) / Scalar(d) + Scalar(eps));
}

// y [R, d] = rmsnorm(x [R, d]) * weight [d]; inv_rms [R] receives each row's 1/rms when given
// (the backward pass needs it). y may alias x. Runs of rows are units of the library's pool.
template <class Scalar>
void rms_norm(const Eigen::Ref<const Matrix<Scalar>>& x, const Scalar* weight, double eps, Eigen::Ref<Matrix<Scalar>> y,
              Scalar* inv_rms = nullptr) {
  assert(y.rows() == x.rows() && y.cols() == x.cols());
  const Index d = x.cols();
  parallel_rows(x.rows(), 4.0 * static_cast<double>(d), [&](Index r) {
    const Scalar* in = x.data() + r * x.outerStride();
    Scalar* out = y.data() + r * y.outerStride();
    const Scalar inv = inverse_rms(in, d, eps);
    if (inv_rms) inv_rms[r] = inv;
    for (Index c = 0; c < d; ++c) out[c] = (in[c] * inv) * weight[c];
  });
}

// For y = x * inv_rms * weight per row: dweight [d] += sum_r dy * x * inv_rms, and
// dx [R, d] (+)= inv_rms * (g - x * inv_rms^2 * mean(g * x)), g = dy * weight. Row by row, so
// that dweight's sum over rows runs in one fixed order.
template <class Scalar>
void rms_norm_backward(const Eigen::Ref<const Matrix<Scalar>>& x, const Scalar* weight, const Scalar* inv_rms,
                       const Eigen::Ref<const Matrix<Scalar>>& dy, Eigen::Ref<Matrix<Scalar>> dx, bool accumulate_dx,
                       Scalar* dweight) {
  const Index d = x.cols();
  assert(dy.rows() == x.rows() && dx.rows() == x.rows());
  for (Index r = 0; r < x.rows(); ++r) {
    const Scalar inv = inv_rms[r];
    const Scalar* in = x.data() + r * x.outerStride();
    const Scalar* g = dy.data() + r * dy.outerStride();
    Scalar* out = dx.data() + r * dx.outerStride();
    Scalar dot = 0;
    for (Index c = 0; c < d; ++c) {
      dweight[c] += g[c] * in[c] * inv;
      dot += g[c] * weight[c] * in[c];
    }
    const Scalar k = inv * inv * inv * dot / Scalar(d);
    for (Index c = 0; c < d; ++c) {
      const Scalar v = inv * g[c] * weight[c] - k * in[c];
      out[c] = accumulate_dx ? out[c] + v : v;
    }
  }
}

}  // namespace gqe
