#pragma once
// Softmax, SiLU and SwiGLU (forward and backward). Row by row in whole packets (see rows.hpp), so
// that every element's arithmetic is the same wherever it sits.
#include <algorithm>
#include <cmath>
#include <limits>

#include "gqe/ops/rows.hpp"
#include "gqe/tensor/eigen.hpp"
#include "gqe/tensor/tensor.hpp"
#include "gqe/util/thread_pool.hpp"

namespace gqe {

// In-place softmax of one row or column of logits, element by element in index order; subtracting
// the maximum keeps exp in range. A row holding NaN becomes NaN (propagated, never hidden).
// Takes a const reference so that temporary blocks bind (Eigen's idiom for writable expressions).
template <class Derived>
void softmax_inplace(const Eigen::MatrixBase<Derived>& values) {
  using Scalar = typename Derived::Scalar;
  auto& v = values.const_cast_derived();
  Scalar max = v(0);
  for (Index i = 1; i < v.size(); ++i) max = std::isnan(max) || std::isnan(v(i)) ? std::numeric_limits<Scalar>::quiet_NaN() : std::max(max, v(i));
  Scalar sum = 0;
  for (Index i = 0; i < v.size(); ++i) sum += v(i) = std::exp(v(i) - max);
  for (Index i = 0; i < v.size(); ++i) v(i) /= sum;
}

namespace detail {
// silu(z) = z * sigmoid(z) = z / (1 + exp(-z)), of a packet.
template <class Packet>
Packet psilu(const Packet& z) {
  using namespace Eigen::internal;
  return pdiv(z, padd(pset1<Packet>(typename unpacket_traits<Packet>::type(1)), pexp(pnegate(z))));
}
}  // namespace detail

// silu of every element of a row-major matrix, in place.
template <class Scalar>
void silu_inplace(Eigen::Ref<Matrix<Scalar>> values) {
  for (Index r = 0; r < values.rows(); ++r) {
    Scalar* row = values.data() + r * values.outerStride();
    detail::map_row(row, row, values.cols(), [](const auto& z) { return detail::psilu(z); });
  }
}

// h [R, I] = silu(gate) * up (SwiGLU's hidden activation); runs of rows are units of the
// library's pool. h may be gate or up: each packet is read before it is written.
template <class Scalar>
void swiglu(const Eigen::Ref<const Matrix<Scalar>>& gate, const Eigen::Ref<const Matrix<Scalar>>& up,
            Eigen::Ref<Matrix<Scalar>> h) {
  using namespace Eigen::internal;
  const Index n = gate.cols();
  parallel_rows(gate.rows(), 20.0 * static_cast<double>(n), [&](Index r) {  // an exponential and a division each
    const Scalar* g = gate.data() + r * gate.outerStride();
    const Scalar* u = up.data() + r * up.outerStride();
    Scalar* out = h.data() + r * h.outerStride();
    for (Index j = 0; j < n; j += detail::kPacketLanes<Scalar>)
      detail::store_partial(out, j, n, pmul(detail::psilu(detail::load_partial(g, j, n)), detail::load_partial(u, j, n)));
  });
}

// For h = silu(gate) * up: d_gate = dh * up * silu'(gate), d_up = dh * silu(gate), where
// silu'(z) = s * (1 + z * (1 - s)), s = sigmoid(z). d_gate and d_up may not alias the inputs.
template <class Scalar>
void swiglu_backward(const Eigen::Ref<const Matrix<Scalar>>& gate, const Eigen::Ref<const Matrix<Scalar>>& up,
                     const Eigen::Ref<const Matrix<Scalar>>& dh, Eigen::Ref<Matrix<Scalar>> d_gate,
                     Eigen::Ref<Matrix<Scalar>> d_up) {
  for (Index r = 0; r < gate.rows(); ++r)
    for (Index c = 0; c < gate.cols(); ++c) {
      const Scalar z = gate(r, c), s = Scalar(1) / (Scalar(1) + std::exp(-z));
      d_up(r, c) = dh(r, c) * z * s;
      d_gate(r, c) = dh(r, c) * up(r, c) * s * (Scalar(1) + z * (Scalar(1) - s));
    }
}

}  // namespace gqe
