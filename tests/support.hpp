#pragma once
// What several test files share: a weight as an Eigen matrix the test can read and write.
#include <algorithm>

#include "gqe/tensor/weight.hpp"

namespace gqe::testing {

// The weight's values as a [rows, cols] matrix of S, giving it owned zero storage of S first when
// it has none of that type (a freshly built layer's weights have only their shapes).
template <class S>
MatrixMap<S> matrix_of(Weight& w) {
  if (!w.owned() || w.dtype() != dtype_of<S>()) {
    S* data = w.allocate<S>();
    std::fill(data, data + w.numel(), S(0));
  }
  return {w.mutable_data<S>(), w.rows(), w.cols()};
}
template <class S>
MatrixMap<const S> matrix_of(const Weight& w) {
  return {w.data<S>(), w.rows(), w.cols()};
}

}  // namespace gqe::testing
