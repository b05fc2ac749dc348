#pragma once
// What several test files share: random matrices, relative errors against a double reference,
// values stored as a checkpoint's bytes, and a weight as an Eigen matrix the test can read and write.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>

#include "gqe/tensor/dtype.hpp"
#include "gqe/tensor/eigen.hpp"
#include "gqe/tensor/weight.hpp"

namespace gqe::testing {

using MatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// S's machine epsilon, as a double.
template <class S>
constexpr double eps() {
  return static_cast<double>(std::numeric_limits<S>::epsilon());
}

// Entries drawn from N(mean, sigma) and rounded to S.
template <class S>
Matrix<S> random_matrix(Index rows, Index cols, std::mt19937& rng, double sigma = 1.0, double mean = 0.0) {
  std::normal_distribution<double> dist(mean, sigma);
  Matrix<S> m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) m(i, j) = static_cast<S>(dist(rng));
  return m;
}

template <class Derived>
MatrixD to_double(const Eigen::MatrixBase<Derived>& m) {
  return m.template cast<double>();
}

// ||got - want||_F / ||want||_F.
template <class Derived>
double relative_error(const Eigen::MatrixBase<Derived>& got, const MatrixD& want) {
  return (to_double(got) - want).norm() / want.norm();
}

// `values` [rows, cols] stored as `dtype` (F32, BF16 or F16) at `out`, which has room for
// values.size() elements of it at any alignment, as a checkpoint holds them. Returns what is
// stored, widened exactly: the weight every product with those bytes is compared against.
inline MatrixD store_as(const Matrix<float>& values, DType dtype, unsigned char* out) {
  if (dtype != DType::F32 && dtype != DType::BF16 && dtype != DType::F16)
    throw std::invalid_argument("store_as: expected F32, BF16 or F16");
  const std::size_t size = dtype_size(dtype);
  MatrixD stored(values.rows(), values.cols());
  for (Index i = 0; i < values.size(); ++i) {
    float v = values.data()[i];
    if (dtype != DType::F32) {
      const std::uint16_t h = dtype == DType::BF16 ? float_to_bf16(v) : float_to_half(v);
      std::memcpy(out + static_cast<std::size_t>(i) * size, &h, size);
      v = dtype == DType::BF16 ? bf16_to_float(h) : half_to_float(h);
    } else {
      std::memcpy(out + static_cast<std::size_t>(i) * size, &v, size);
    }
    stored.data()[i] = v;
  }
  return stored;
}

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
