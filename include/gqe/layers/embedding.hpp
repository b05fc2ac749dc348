#pragma once
// Token embeddings [V, d]: rows looked up by token id (in the weight's stored dtype, converted),
// and the backward pass that adds each row's gradient to its token's row.
#include <cstdint>

#include "gqe/tensor/tensor.hpp"
#include "gqe/tensor/weight.hpp"

namespace gqe {

template <class Scalar>
class Embedding {
 public:
  Embedding() = default;
  Embedding(Index vocab_size, Index hidden_size) : weight_(Shape{vocab_size, hidden_size}) {}

  Weight& weight() { return weight_; }  // [V, d]
  const Weight& weight() const { return weight_; }

  // rows [R, d]: row r = the embedding of tokens[r] (ids checked by the caller).
  void forward(const std::int32_t* tokens, Eigen::Ref<Matrix<Scalar>> rows) const {
    if (!weight_.bound()) fail<InputError>("token embeddings are not loaded; expected a loaded or initialised model");
    for (Index r = 0; r < rows.rows(); ++r) weight_.row(tokens[r], rows.data() + r * rows.outerStride());
  }

  // The weight's gradient += dy's row r at row tokens[r], rows in order.
  void backward(const std::int32_t* tokens, const Eigen::Ref<const Matrix<Scalar>>& dy) {
    auto grad = weight_.grad_matrix<Scalar>();
    for (Index r = 0; r < dy.rows(); ++r) grad.row(tokens[r]) += dy.row(r);
  }

 private:
  Weight weight_;  // [V, d]
};

}  // namespace gqe
