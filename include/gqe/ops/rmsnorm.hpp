#pragma once
// RMSNorm as Hugging Face Llama computes it: x * rsqrt(mean(x^2) + eps) * weight, per row.
#include "gqe/tensor/eigen.hpp"

#include "gqe/tensor/tensor.hpp"

namespace gqe {

// y [R, d] = rmsnorm(x [R, d]) * weight [d]. y may alias x.
template <class Scalar>
void rms_norm(const Eigen::Ref<const Matrix<Scalar>>& x, const Vector<Scalar>& weight, double eps,
              Eigen::Ref<Matrix<Scalar>> y) {
  assert(x.cols() == weight.size() && y.rows() == x.rows() && y.cols() == x.cols());
  for (Index r = 0; r < x.rows(); ++r) {
    const Scalar inv_rms = Scalar(1) / std::sqrt(x.row(r).squaredNorm() / Scalar(x.cols()) + Scalar(eps));
    y.row(r) = (x.row(r).array() * inv_rms) * weight.transpose().array();
  }
}

}  // namespace gqe
