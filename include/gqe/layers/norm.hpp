#pragma once
// The RMSNorm layer: its weight [d], forward (with a tape) and backward.
#include <vector>

#include "gqe/ops/rmsnorm.hpp"
#include "gqe/tensor/tensor.hpp"
#include "gqe/tensor/weight.hpp"

namespace gqe {

template <class Scalar>
struct NormTape {
  Matrix<Scalar> x;         // [R, d]: the input
  std::vector<Scalar> inv;  // [R]: 1 / rms of each row
};

template <class Scalar>
class RmsNorm {
 public:
  RmsNorm() = default;
  RmsNorm(Index size, double eps) : weight_(Shape{size}), eps_(eps) {}

  Weight& weight() { return weight_; }  // [d], stored as Scalar
  const Weight& weight() const { return weight_; }

  // y [R, d] = rmsnorm(x [R, d]) * weight. y may alias x only without a tape.
  void forward(const Eigen::Ref<const Matrix<Scalar>>& x, Eigen::Ref<Matrix<Scalar>> y, NormTape<Scalar>* tape = nullptr) const {
    check_shape("RMSNorm input", Shape{x.rows(), x.cols()}, Shape{x.rows(), weight_.numel()});
    check_shape("RMSNorm output", Shape{y.rows(), y.cols()}, Shape{x.rows(), weight_.numel()});
    if (!weight_.bound()) fail<InputError>("RMSNorm weight is not loaded; expected a loaded or initialised model");
    if (tape) {
      tape->x = x;
      tape->inv.resize(static_cast<std::size_t>(x.rows()));
    }
    rms_norm<Scalar>(x, weight_.data<Scalar>(), eps_, y, tape ? tape->inv.data() : nullptr);
  }

  // dx [R, d] (+)= dL/dx from dy; the weight's gradient accumulated.
  void backward(const NormTape<Scalar>& tape, const Eigen::Ref<const Matrix<Scalar>>& dy, Eigen::Ref<Matrix<Scalar>> dx,
                bool accumulate_dx) {
    rms_norm_backward<Scalar>(tape.x, weight_.data<Scalar>(), tape.inv.data(), dy, dx, accumulate_dx, weight_.grad<Scalar>());
  }

 private:
  Weight weight_;  // [d]
  double eps_ = 1e-6;
};

}  // namespace gqe
