#pragma once
// A row-major [rows, cols] matrix for the scratch of a forward (activations, tapes), used as any
// Eigen map. Its storage only grows and is never zero-filled: a decode step after a prefill keeps
// the prefill's buffer, the next prefill reuses it, and nothing is faulted in again. Buffers from
// 1 MB on sit on transparent huge pages (see ScratchBuffer). resize() keeps no values, as Eigen's
// does not.
#include <cstddef>
#include <new>
#include <utility>

#include "gqe/tensor/scratch_buffer.hpp"
#include "gqe/tensor/tensor.hpp"

namespace gqe {

template <class Scalar>
class ScratchMatrix : public Eigen::Map<Matrix<Scalar>, Eigen::Aligned64> {
  using Base = Eigen::Map<Matrix<Scalar>, Eigen::Aligned64>;

 public:
  ScratchMatrix() : Base(nullptr, 0, 0) {}
  ScratchMatrix(const ScratchMatrix&) = delete;
  ScratchMatrix& operator=(const ScratchMatrix&) = delete;
  ScratchMatrix(ScratchMatrix&& other) noexcept : Base(nullptr, 0, 0) { *this = std::move(other); }
  ScratchMatrix& operator=(ScratchMatrix&& other) noexcept {
    if (this == &other) return *this;
    storage_ = std::move(other.storage_);
    rebind(other.rows(), other.cols());
    other.rebind(0, 0);
    return *this;
  }
  using Base::operator=;  // element-wise assignment from an expression of the same shape

  // Throws ShapeError, as a Shape does, for a negative size or more elements than a Shape may hold.
  void resize(Index rows, Index cols) {
    if (rows == this->rows() && cols == this->cols()) return;
    storage_.reserve(Shape{rows, cols}.numel());
    rebind(rows, cols);
  }
  // Resized to `value`'s shape and filled with it (what `=` does for an Eigen matrix).
  template <class Derived>
  void assign(const Eigen::MatrixBase<Derived>& value) {
    resize(value.rows(), value.cols());
    Base::operator=(value);
  }

 private:
  // Eigen's own Ref rebinds its Map base the same way.
  void rebind(Index rows, Index cols) {
    ::new (static_cast<Base*>(this)) Base(storage_.data(), rows, cols);
  }

  detail::ScratchBuffer<Scalar> storage_;
};

}  // namespace gqe
