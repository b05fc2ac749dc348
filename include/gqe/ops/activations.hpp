#pragma once
// Numerically stable softmax and SiLU.
#include "gqe/tensor/eigen.hpp"

#include <cmath>

#include "gqe/tensor/tensor.hpp"

namespace gqe {

// In-place softmax of one row or column of logits; subtracting the maximum keeps exp in range.
// A row holding NaN becomes NaN (it is propagated, never hidden).
// Takes a const reference so that temporary blocks bind (Eigen's idiom for writable expressions).
template <class Derived>
void softmax_inplace(const Eigen::MatrixBase<Derived>& values) {
  auto& v = values.const_cast_derived();
  const auto max = v.maxCoeff();
  v = (v.array() - max).exp();
  v /= v.sum();
}

// silu(x) = x * sigmoid(x) = x / (1 + exp(-x)), elementwise in place.
template <class Derived>
void silu_inplace(const Eigen::MatrixBase<Derived>& values) {
  using Scalar = typename Derived::Scalar;
  auto& v = values.const_cast_derived();
  v = v.array() / (Scalar(1) + (-v.array()).exp());
}

}  // namespace gqe
