#pragma once
// Rotary position embedding, rotate-half form (Hugging Face Llama): element i pairs with i + d_h/2,
// x' = x*cos + rotate_half(x)*sin, rotate_half(x) = concat(-x2, x1), angle = position * theta^(-2i/d_h).
// The angles are computed in double: in float their error grows with the position.
#include "gqe/tensor/eigen.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "gqe/tensor/tensor.hpp"
#include "gqe/util/thread_pool.hpp"

namespace gqe {

// cos and sin of every (row, frequency) for a run of rows with given positions.
template <class Scalar>
struct RopeTable {
  Matrix<Scalar> cos;  // [R, d_h/2]
  Matrix<Scalar> sin;  // [R, d_h/2]

  // positions[r] is the absolute position of row r.
  void compute(const std::vector<Index>& positions, Index head_dim, double theta) {
    const Index half = head_dim / 2;
    cos.resize(static_cast<Index>(positions.size()), half);
    sin.resize(static_cast<Index>(positions.size()), half);
    for (Index i = 0; i < half; ++i) {
      const double inv_freq = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
      for (Index r = 0; r < cos.rows(); ++r) {
        const double angle = static_cast<double>(positions[static_cast<std::size_t>(r)]) * inv_freq;
        cos(r, i) = static_cast<Scalar>(std::cos(angle));
        sin(r, i) = static_cast<Scalar>(std::sin(angle));
      }
    }
  }

  // The table of the inverse rotation (angle -> -angle): RoPE is orthogonal, so its backward pass
  // is apply_rope with this table.
  RopeTable inverse() const {
    RopeTable t;
    t.cos = cos;
    t.sin = -sin;
    return t;
  }
};

// Rotates every head of x [R, H*d_h] in place, row r by the angles of table row r; runs of rows
// are units of the library's pool.
template <class Scalar>
void apply_rope(Eigen::Ref<Matrix<Scalar>> x, Index head_dim, const RopeTable<Scalar>& table) {
  const Index half = head_dim / 2, heads = x.cols() / head_dim;
  assert(x.cols() == heads * head_dim && table.cos.rows() == x.rows() && table.cos.cols() == half);
  parallel_rows(x.rows(), 3.0 * static_cast<double>(x.cols()), [&](Index r) {
    const Scalar* c = table.cos.row(r).data();
    const Scalar* s = table.sin.row(r).data();
    for (Index h = 0; h < heads; ++h) {
      Scalar* x1 = x.row(r).data() + h * head_dim;
      Scalar* x2 = x1 + half;
      for (Index i = 0; i < half; ++i) {
        const Scalar a = x1[i], b = x2[i];
        x1[i] = a * c[i] - b * s[i];
        x2[i] = b * c[i] + a * s[i];
      }
    }
  });
}

}  // namespace gqe
