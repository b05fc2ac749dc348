#pragma once
// SwiGLU feed-forward (Llama): down_proj(silu(gate_proj(x)) * up_proj(x)), no biases; its forward
// with a tape and its backward pass.
#include "gqe/ops/activations.hpp"
#include "gqe/ops/linear.hpp"
#include "gqe/tensor/scratch_matrix.hpp"
#include "gqe/tensor/tensor.hpp"
#include "gqe/tensor/weight.hpp"

namespace gqe {

template <class Scalar>
struct FeedForwardTape {
  ScratchMatrix<Scalar> x;       // [R, d]
  ScratchMatrix<Scalar> gate;    // [R, I], before SiLU
  ScratchMatrix<Scalar> up;      // [R, I]
  ScratchMatrix<Scalar> hidden;  // [R, I], silu(gate) * up: down_proj's input
};

template <class Scalar>
class FeedForward {
 public:
  FeedForward() = default;
  FeedForward(Index hidden_size, Index intermediate_size) {
    if (hidden_size <= 0 || intermediate_size <= 0)
      fail<ConfigError>("FeedForward sizes are ", hidden_size, " x ", intermediate_size, "; expected positive");
    gate_proj_ = Weight(Shape{intermediate_size, hidden_size});
    up_proj_ = Weight(Shape{intermediate_size, hidden_size});
    down_proj_ = Weight(Shape{hidden_size, intermediate_size});
  }

  template <class Self, class Fn>
  static void visit(Self& self, Fn&& fn) {
    fn("gate_proj.weight", self.gate_proj_);
    fn("up_proj.weight", self.up_proj_);
    fn("down_proj.weight", self.down_proj_);
  }

  // y [R, d] = ffn(x [R, d]), or y += ffn(x) with accumulate (a residual stream); a tape, when given,
  // keeps what backward() needs.
  void forward(const Eigen::Ref<const Matrix<Scalar>>& x, Eigen::Ref<Matrix<Scalar>> y, FeedForwardTape<Scalar>* tape = nullptr,
               bool accumulate = false) const {
    const Index d = down_proj_.rows(), I = gate_proj_.rows();
    check_shape("feed-forward input", Shape{x.rows(), x.cols()}, Shape{x.rows(), d});
    check_shape("feed-forward output", Shape{y.rows(), y.cols()}, Shape{x.rows(), d});
    if (!gate_proj_.bound() || !up_proj_.bound() || !down_proj_.bound())
      fail<InputError>("feed-forward weights are not loaded; expected a loaded or initialised model");
    thread_local FeedForwardTape<Scalar> scratch;
    FeedForwardTape<Scalar>& t = tape ? *tape : scratch;
    t.gate.resize(x.rows(), I);
    t.up.resize(x.rows(), I);
    t.hidden.resize(x.rows(), I);
    linear<Scalar>(x, gate_proj_, t.gate);
    linear<Scalar>(x, up_proj_, t.up);
    swiglu<Scalar>(t.gate, t.up, t.hidden);
    linear<Scalar>(t.hidden, down_proj_, y, accumulate);
    if (tape) tape->x.assign(x);
  }

  // dx [R, d] (overwritten) from dy [R, d]; weights' gradients accumulated.
  void backward(const FeedForwardTape<Scalar>& tape, const Matrix<Scalar>& dy, Matrix<Scalar>& dx) {
    thread_local Matrix<Scalar> d_hidden, d_gate, d_up;  // [R, I]
    const Index R = tape.x.rows(), I = gate_proj_.rows();
    d_hidden.resize(R, I);
    d_gate.resize(R, I);
    d_up.resize(R, I);
    linear_backward<Scalar>(tape.hidden, down_proj_.matrix(), dy, d_hidden, false, down_proj_.grad_matrix<Scalar>());
    swiglu_backward<Scalar>(tape.gate, tape.up, d_hidden, d_gate, d_up);
    dx.resize(R, tape.x.cols());
    linear_backward<Scalar>(tape.x, gate_proj_.matrix(), d_gate, dx, false, gate_proj_.grad_matrix<Scalar>());
    linear_backward<Scalar>(tape.x, up_proj_.matrix(), d_up, dx, true, up_proj_.grad_matrix<Scalar>());
  }

 private:
  Weight gate_proj_;  // [I, d]
  Weight up_proj_;    // [I, d]
  Weight down_proj_;  // [d, I]
};

}  // namespace gqe
