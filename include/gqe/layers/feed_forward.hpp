#pragma once
// SwiGLU feed-forward (Llama): down_proj(silu(gate_proj(x)) * up_proj(x)), no biases; its forward
// with a tape and its backward pass.
#include <algorithm>

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
    if (tape) {
      tape->gate.resize(x.rows(), I);
      tape->up.resize(x.rows(), I);
      tape->hidden.resize(x.rows(), I);
      apply(x, tape->gate, tape->up, tape->hidden, y, accumulate);
      tape->x.assign(x);
      return;
    }
    // Without a tape the rows go through in runs of kRowRun, each with the same two [run, I]
    // buffers, and the hidden activation is written over up: a long prompt's activations take
    // 2 x kRowRun x I values instead of 3 x R x I (at I = 5632 and R = 4096, 46 MB instead of 277),
    // memory that a cold process would also fault in. The library's kernels give a row the same
    // bits whatever rows share its call, so the result is the whole's at once, bit for bit.
    thread_local ScratchMatrix<Scalar> gate, up;  // [run, I]
    const Index rows = std::min(x.rows(), kRowRun);
    gate.resize(rows, I);
    up.resize(rows, I);
    for (Index r0 = 0; r0 < x.rows(); r0 += rows) {
      const Index n = std::min(rows, x.rows() - r0);
      apply(x.middleRows(r0, n), gate.topRows(n), up.topRows(n), up.topRows(n), y.middleRows(r0, n), accumulate);
    }
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
  static constexpr Index kRowRun = detail::kLinearRowTile;  // linear's largest unit of rows

  // y (+)= down_proj(hidden), hidden [n, I] = silu(gate) * up from gate, up [n, I] = x [n, d]
  // projected. hidden may be up (SwiGLU reads each packet before writing it).
  void apply(const Eigen::Ref<const Matrix<Scalar>>& x, Eigen::Ref<Matrix<Scalar>> gate, Eigen::Ref<Matrix<Scalar>> up,
             Eigen::Ref<Matrix<Scalar>> hidden, Eigen::Ref<Matrix<Scalar>> y, bool accumulate) const {
    linear<Scalar>(x, gate_proj_, gate);
    linear<Scalar>(x, up_proj_, up);
    swiglu<Scalar>(gate, up, hidden);
    linear<Scalar>(hidden, down_proj_, y, accumulate);
  }

  Weight gate_proj_;  // [I, d]
  Weight up_proj_;    // [I, d]
  Weight down_proj_;  // [d, I]
};

}  // namespace gqe
