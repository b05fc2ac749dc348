#pragma once
// SwiGLU feed-forward (Llama): down_proj(silu(gate_proj(x)) * up_proj(x)), no biases.
#include "gqe/ops/activations.hpp"
#include "gqe/ops/linear.hpp"
#include "gqe/tensor/tensor.hpp"

namespace gqe {

template <class Scalar>
class FeedForward {
 public:
  FeedForward() = default;
  FeedForward(Index hidden_size, Index intermediate_size) {
    if (hidden_size <= 0 || intermediate_size <= 0)
      fail<ConfigError>("FeedForward sizes are ", hidden_size, " x ", intermediate_size, "; expected positive");
    gate_proj_.setZero(intermediate_size, hidden_size);
    up_proj_.setZero(intermediate_size, hidden_size);
    down_proj_.setZero(hidden_size, intermediate_size);
  }

  template <class Self, class Fn>
  static void visit(Self& self, Fn&& fn) {
    fn("gate_proj.weight", self.gate_proj_);
    fn("up_proj.weight", self.up_proj_);
    fn("down_proj.weight", self.down_proj_);
  }

  // y [R, d] = ffn(x [R, d]).
  void forward(const Eigen::Ref<const Matrix<Scalar>>& x, Eigen::Ref<Matrix<Scalar>> y) const {
    thread_local Matrix<Scalar> gate, up;  // [R, I]
    gate.resize(x.rows(), gate_proj_.rows());
    up.resize(x.rows(), up_proj_.rows());
    linear<Scalar>(x, gate_proj_, gate);
    linear<Scalar>(x, up_proj_, up);
    silu_inplace(gate);
    gate.array() *= up.array();
    linear<Scalar>(gate, down_proj_, y);
  }

 private:
  Matrix<Scalar> gate_proj_;  // [I, d]
  Matrix<Scalar> up_proj_;    // [I, d]
  Matrix<Scalar> down_proj_;  // [d, I]
};

}  // namespace gqe
