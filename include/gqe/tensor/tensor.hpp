#pragma once
// Row-major tensors of rank 1..5 ([B, T, G, M, d_h] at most): an owning Tensor and a non-owning
// TensorView. Views reshape and slice along the first axis without copying, and expose Eigen Maps
// so that the maths is written with Eigen. Shapes are checked where user data enters (check_shape);
// indexing inside the hot path is checked by debug asserts only.
#include "gqe/tensor/eigen.hpp"

#include <algorithm>
#include <array>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "gqe/error.hpp"

namespace gqe {

using Index = std::ptrdiff_t;

template <class Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class Scalar>
using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
template <class Scalar>
using RowVector = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
// Map of a row-major matrix, mutable or const according to the constness of Scalar.
template <class Scalar>
using MatrixMap = Eigen::Map<std::conditional_t<std::is_const_v<Scalar>,
                                                const Matrix<std::remove_const_t<Scalar>>,
                                                Matrix<std::remove_const_t<Scalar>>>>;
// A row-major block with a row stride: one head's columns inside a [T, H*d_h] matrix.
template <class Scalar>
using StridedMatrixMap =
    Eigen::Map<std::conditional_t<std::is_const_v<Scalar>, const Matrix<std::remove_const_t<Scalar>>,
                                  Matrix<std::remove_const_t<Scalar>>>,
               Eigen::Unaligned, Eigen::OuterStride<>>;

class Shape {
 public:
  static constexpr int kMaxRank = 5;
  // Elements of one tensor: their bytes in any scalar type (at most 8 bytes each) fit an Index.
  static constexpr Index kMaxElements = PTRDIFF_MAX / 8;

  Shape() = default;
  Shape(std::initializer_list<Index> dims) {
    if (dims.size() < 1 || dims.size() > kMaxRank)
      fail<ShapeError>("tensor rank ", dims.size(), "; expected 1 to ", kMaxRank);
    for (Index d : dims) {
      if (d < 0) fail<ShapeError>("tensor dimension ", d, "; expected >= 0");
      dims_[static_cast<std::size_t>(rank_++)] = d;
    }
    check_size();
  }
  template <class Container>
  static Shape of(const Container& dims) {
    Shape s;
    if (dims.size() < 1 || dims.size() > kMaxRank)
      fail<ShapeError>("tensor rank ", dims.size(), "; expected 1 to ", kMaxRank);
    for (auto d : dims) {
      if (d < 0) fail<ShapeError>("tensor dimension ", d, "; expected >= 0");
      if (static_cast<std::uintmax_t>(d) > static_cast<std::uintmax_t>(kMaxElements))
        fail<ShapeError>("tensor dimension ", d, "; expected at most ", kMaxElements);
      s.dims_[static_cast<std::size_t>(s.rank_++)] = static_cast<Index>(d);
    }
    s.check_size();
    return s;
  }

  int rank() const { return rank_; }
  Index operator[](int axis) const {
    assert(axis >= 0 && axis < rank_);
    return dims_[static_cast<std::size_t>(axis)];
  }
  // Never overflows: every Shape is checked against kMaxElements when it is made.
  Index numel() const {
    Index n = 1;
    for (int i = 0; i < rank_; ++i) n *= dims_[static_cast<std::size_t>(i)];
    return n;
  }
  // Shape without its first axis (a rank-1 shape becomes [1]).
  Shape tail() const {
    Shape s;
    if (rank_ == 1) return Shape{1};
    for (int i = 1; i < rank_; ++i) s.dims_[static_cast<std::size_t>(s.rank_++)] = dims_[static_cast<std::size_t>(i)];
    return s;
  }
  Shape with_first(Index first) const {
    Shape s = *this;
    s.dims_[0] = first;
    if (first < 0) fail<ShapeError>("tensor dimension ", first, "; expected >= 0");
    s.check_size();
    return s;
  }
  std::vector<Index> dims() const { return {dims_.begin(), dims_.begin() + rank_}; }
  friend bool operator==(const Shape& a, const Shape& b) {
    return a.rank_ == b.rank_ && std::equal(a.dims_.begin(), a.dims_.begin() + a.rank_, b.dims_.begin());
  }
  friend bool operator!=(const Shape& a, const Shape& b) { return !(a == b); }
  std::string str() const {
    std::string s = "[";
    for (int i = 0; i < rank_; ++i) s += (i ? ", " : "") + std::to_string(dims_[static_cast<std::size_t>(i)]);
    return s + "]";
  }

 private:
  // Refuses a shape whose element count would overflow (a hostile file's shape, a config's product).
  void check_size() const {
    Index n = 1;
    bool zero = false;
    for (int i = 0; i < rank_; ++i) zero = zero || dims_[static_cast<std::size_t>(i)] == 0;
    if (zero) return;
    for (int i = 0; i < rank_; ++i) {
      const Index d = dims_[static_cast<std::size_t>(i)];
      if (n > kMaxElements / d) fail<ShapeError>("tensor shape ", str(), " has more than ", kMaxElements, " elements");
      n *= d;
    }
  }

  std::array<Index, kMaxRank> dims_{};
  int rank_ = 0;
};

// Throws ShapeError unless `actual` equals `expected`; `what` names the tensor in the message.
// (A string_view, so that the always-on checks of a decode step allocate nothing.)
inline void check_shape(std::string_view what, const Shape& actual, const Shape& expected) {
  if (actual != expected)
    fail<ShapeError>(what, " has shape ", actual.str(), "; expected ", expected.str());
}

// Non-owning view of contiguous row-major data. Scalar may be const.
template <class Scalar>
class TensorView {
 public:
  using Value = std::remove_const_t<Scalar>;

  TensorView() = default;
  TensorView(Scalar* data, Shape shape) : data_(data), shape_(shape) {}
  // A view of mutable data converts to a view of const data.
  template <class Other, class = std::enable_if_t<std::is_same_v<const Other, Scalar> &&
                                                  !std::is_same_v<Other, Scalar>>>
  TensorView(const TensorView<Other>& other) : data_(other.data()), shape_(other.shape()) {}

  Scalar* data() const { return data_; }
  const Shape& shape() const { return shape_; }
  int rank() const { return shape_.rank(); }
  Index dim(int axis) const { return shape_[axis]; }
  Index numel() const { return shape_.numel(); }

  // The same data under another shape with the same element count.
  TensorView reshape(Shape shape) const {
    if (shape.numel() != numel())
      fail<ShapeError>("cannot reshape ", shape_.str(), " to ", shape.str(), ": element counts differ");
    return {data_, shape};
  }
  // Entry i of the first axis, one rank lower (rank 1 gives a [1] view).
  TensorView operator[](Index i) const {
    assert(i >= 0 && i < shape_[0]);
    const Shape t = shape_.tail();
    return {data_ + i * t.numel(), t};
  }
  // Entries [begin, begin + count) of the first axis.
  TensorView slice(Index begin, Index count) const {
    assert(begin >= 0 && count >= 0 && begin + count <= shape_[0]);
    const Index inner = shape_[0] ? numel() / shape_[0] : 0;
    return {data_ + begin * inner, shape_.with_first(count)};
  }
  // The data as a [dim(0), numel/dim(0)] row-major matrix.
  MatrixMap<Scalar> matrix() const {
    const Index rows = shape_[0];
    return {data_, rows, rows ? numel() / rows : 0};
  }
  // The data as a [rows, numel/rows] matrix.
  MatrixMap<Scalar> matrix(Index rows) const {
    assert(rows > 0 && numel() % rows == 0);
    return {data_, rows, numel() / rows};
  }
  Eigen::Map<std::conditional_t<std::is_const_v<Scalar>, const Vector<Value>, Vector<Value>>> flat() const {
    return {data_, numel()};
  }
  Scalar& operator()(Index i) const { return at({i}); }
  Scalar& operator()(Index i, Index j) const { return at({i, j}); }
  Scalar& operator()(Index i, Index j, Index k) const { return at({i, j, k}); }
  Scalar& operator()(Index i, Index j, Index k, Index l) const { return at({i, j, k, l}); }
  Scalar& operator()(Index i, Index j, Index k, Index l, Index m) const { return at({i, j, k, l, m}); }

 private:
  Scalar& at(std::initializer_list<Index> idx) const {
    assert(static_cast<int>(idx.size()) == shape_.rank());
    Index offset = 0;
    int axis = 0;
    for (Index i : idx) {
      assert(i >= 0 && i < shape_[axis]);
      offset = offset * shape_[axis++] + i;
    }
    return data_[offset];
  }

  Scalar* data_ = nullptr;
  Shape shape_{};
};

// Owning row-major tensor; zero-initialised.
template <class Scalar>
class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(Shape shape) : storage_(static_cast<std::size_t>(shape.numel()), Scalar(0)), shape_(shape) {}
  Tensor(Shape shape, std::vector<Scalar> values) : storage_(std::move(values)), shape_(shape) {
    if (static_cast<Index>(storage_.size()) != shape.numel())
      fail<ShapeError>("tensor of shape ", shape.str(), " needs ", shape.numel(), " values; got ",
                       storage_.size());
  }

  // Changes the shape; keeps the allocation when it is large enough (no allocation per token).
  void resize(Shape shape) {
    storage_.resize(static_cast<std::size_t>(shape.numel()));
    shape_ = shape;
  }
  void fill(Scalar value) { std::fill(storage_.begin(), storage_.end(), value); }

  Scalar* data() { return storage_.data(); }
  const Scalar* data() const { return storage_.data(); }
  const Shape& shape() const { return shape_; }
  int rank() const { return shape_.rank(); }
  Index dim(int axis) const { return shape_[axis]; }
  Index numel() const { return shape_.numel(); }

  TensorView<Scalar> view() { return {storage_.data(), shape_}; }
  TensorView<const Scalar> view() const { return {storage_.data(), shape_}; }
  operator TensorView<Scalar>() { return view(); }
  operator TensorView<const Scalar>() const { return view(); }
  MatrixMap<Scalar> matrix() { return view().matrix(); }
  MatrixMap<const Scalar> matrix() const { return view().matrix(); }
  template <class... I>
  Scalar& operator()(I... i) { return view()(static_cast<Index>(i)...); }
  template <class... I>
  const Scalar& operator()(I... i) const { return view()(static_cast<Index>(i)...); }

 private:
  std::vector<Scalar> storage_;
  Shape shape_{};
};

}  // namespace gqe
