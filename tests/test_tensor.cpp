// Shape, Tensor and TensorView against hand-computed row-major offsets: every element of a view is
// compared with the element the obvious formula ((i*D1 + j)*D2 + k) addresses in the owning buffer,
// after reshape, operator[], slice, matrix() and the const conversion. Error paths must throw
// gqe::ShapeError with a message that names the shapes. ScratchMatrix: storage that only grows,
// every element written through it read back through a plain Eigen matrix. AlignedBytes and
// ScratchBuffer: the alignment each size gets (a cache line, or a huge page from its threshold).
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "gqe/tensor/aligned_bytes.hpp"
#include "gqe/tensor/scratch_buffer.hpp"
#include "gqe/tensor/scratch_matrix.hpp"
#include "gqe/tensor/tensor.hpp"

namespace {

using gqe::Index;
using gqe::Shape;
using gqe::Tensor;
using gqe::TensorView;

// Values that identify their own offset, exactly representable in every element type used here.
template <class Scalar>
Tensor<Scalar> iota_tensor(Shape shape) {
  Tensor<Scalar> t(shape);
  for (Index i = 0; i < t.numel(); ++i) t.data()[i] = static_cast<Scalar>(i + 1);
  return t;
}

template <class Scalar>
class TensorTest : public ::testing::Test {};
using ElementTypes = ::testing::Types<float, double, std::int32_t>;
TYPED_TEST_SUITE(TensorTest, ElementTypes);

TEST(Shape, DimsRankNumelTailAndEquality) {
  const Shape s{3, 7, 5};
  EXPECT_EQ(s.rank(), 3);
  EXPECT_EQ(s[0], 3);
  EXPECT_EQ(s[1], 7);
  EXPECT_EQ(s[2], 5);
  EXPECT_EQ(s.numel(), 105);
  EXPECT_EQ(s.tail(), (Shape{7, 5}));
  EXPECT_EQ(Shape{9}.tail(), Shape{1});  // rank 1 becomes [1]
  EXPECT_EQ(s.with_first(2), (Shape{2, 7, 5}));
  EXPECT_EQ(s.dims(), (std::vector<Index>{3, 7, 5}));
  EXPECT_EQ(s.str(), "[3, 7, 5]");
  EXPECT_NE(s, (Shape{3, 5, 7}));
  EXPECT_NE(s, (Shape{3, 7, 5, 1}));  // same numel, other rank
  EXPECT_EQ(Shape::of(std::vector<int>{2, 0, 4}), (Shape{2, 0, 4}));
  EXPECT_EQ((Shape{2, 0, 4}).numel(), 0);
  EXPECT_EQ((Shape{2, 3, 1, 4, 5}).numel(), 120);
}

TEST(Shape, RejectsBadRanksAndNegativeDims) {
  EXPECT_THROW((Shape{1, 2, 3, 4, 5, 6}), gqe::ShapeError);
  EXPECT_THROW(Shape(std::initializer_list<Index>{}), gqe::ShapeError);  // Shape{} is the default, rank 0
  EXPECT_THROW((Shape{4, -1}), gqe::ShapeError);
  EXPECT_THROW(Shape::of(std::vector<Index>{}), gqe::ShapeError);
  EXPECT_THROW(Shape::of(std::vector<Index>(6, 1)), gqe::ShapeError);
  EXPECT_THROW(Shape::of(std::vector<long>{3, -2}), gqe::ShapeError);
}

// numel() multiplies the dimensions: a shape whose product overflows is refused when it is made.
TEST(Shape, RefusesShapesWhoseElementCountOverflows) {
  const Index big = Index(1) << 32;
  EXPECT_THROW((Shape{big, big}), gqe::ShapeError);
  EXPECT_THROW((Shape{1 << 20, 1 << 20, 1 << 20}), gqe::ShapeError);
  EXPECT_THROW(Shape::of(std::vector<std::uint64_t>{std::uint64_t(1) << 63}), gqe::ShapeError);
  EXPECT_THROW(Shape::of(std::vector<Index>{3, big, big / 2}), gqe::ShapeError);
  EXPECT_THROW((Shape{2, big}).with_first(big), gqe::ShapeError);
  EXPECT_EQ((Shape{big, 1 << 20}).numel(), Index(1) << 52);
  EXPECT_EQ((Shape{0, big, big}).numel(), 0);  // nothing to overflow
  EXPECT_EQ((Shape{1, Shape::kMaxElements}).numel(), Shape::kMaxElements);
  EXPECT_THROW((Shape{2, Shape::kMaxElements}), gqe::ShapeError);
}

TEST(CheckShape, PassesOnEqualShapesAndNamesBothShapesOtherwise) {
  EXPECT_NO_THROW(gqe::check_shape("x", Shape{4, 3}, Shape{4, 3}));
  try {
    gqe::check_shape("logits", Shape{2, 5, 37}, Shape{2, 37});
    FAIL() << "check_shape accepted [2, 5, 37] for [2, 37]";
  } catch (const gqe::ShapeError& e) {
    EXPECT_EQ(std::string(e.what()), "logits has shape [2, 5, 37]; expected [2, 37]");
  }
  // A ShapeError is a gqe::Error, so one catch clause handles every user-facing failure.
  EXPECT_THROW(gqe::check_shape("w", Shape{3}, Shape{4}), gqe::Error);
}

TYPED_TEST(TensorTest, ConstructionIsZeroAndValuesMustMatchTheShape) {
  using S = TypeParam;
  const Tensor<S> zeros(Shape{3, 7});  // [3, 7]
  ASSERT_EQ(zeros.numel(), 21);
  for (Index i = 0; i < 21; ++i) EXPECT_EQ(zeros.data()[i], S(0));
  const Tensor<S> t(Shape{2, 3}, std::vector<S>{1, 2, 3, 4, 5, 6});  // [2, 3]
  EXPECT_EQ(t(1, 0), S(4));
  EXPECT_EQ(t(0, 2), S(3));
  EXPECT_THROW(Tensor<S>(Shape{2, 3}, std::vector<S>(5)), gqe::ShapeError);
  EXPECT_THROW(Tensor<S>(Shape{2, 3}, std::vector<S>(7)), gqe::ShapeError);
}

TYPED_TEST(TensorTest, ElementAccessFollowsRowMajorOffsets) {
  using S = TypeParam;
  const Index D0 = 3, D1 = 5, D2 = 7, D3 = 2, D4 = 3;
  Tensor<S> t5 = iota_tensor<S>(Shape{D0, D1, D2, D3, D4});  // [3, 5, 7, 2, 3]
  const auto v = t5.view();
  for (Index a = 0; a < D0; ++a)
    for (Index b = 0; b < D1; ++b)
      for (Index c = 0; c < D2; ++c)
        for (Index d = 0; d < D3; ++d)
          for (Index e = 0; e < D4; ++e) {
            const Index offset = (((a * D1 + b) * D2 + c) * D3 + d) * D4 + e;
            ASSERT_EQ(v(a, b, c, d, e), static_cast<S>(offset + 1)) << a << b << c << d << e;
            ASSERT_EQ(&t5(a, b, c, d, e), t5.data() + offset);
          }
  Tensor<S> t3 = iota_tensor<S>(Shape{D0, D1, D2});  // [3, 5, 7]
  EXPECT_EQ(t3(2, 4, 6), static_cast<S>(3 * 5 * 7));
  EXPECT_EQ(t3(1, 2, 3), static_cast<S>((1 * D1 + 2) * D2 + 3 + 1));
  t3(1, 2, 3) = S(-9);
  EXPECT_EQ(t3.data()[(1 * D1 + 2) * D2 + 3], S(-9));
  EXPECT_EQ(t3.view()(1, 2, 3), S(-9));
  const Tensor<S> t4 = iota_tensor<S>(Shape{2, 3, 5, 7});  // [2, 3, 5, 7]
  EXPECT_EQ(t4(1, 2, 3, 4), static_cast<S>(((1 * 3 + 2) * 5 + 3) * 7 + 4 + 1));
  const Tensor<S> t1 = iota_tensor<S>(Shape{11});  // [11]
  EXPECT_EQ(t1(10), S(11));
}

TYPED_TEST(TensorTest, IndexingTheFirstAxisDropsItAndSharesTheData) {
  using S = TypeParam;
  Tensor<S> t = iota_tensor<S>(Shape{3, 5, 7});  // [3, 5, 7]
  const auto row = t.view()[2];                  // [5, 7]
  EXPECT_EQ(row.shape(), (Shape{5, 7}));
  EXPECT_EQ(row.data(), t.data() + 2 * 35);
  for (Index j = 0; j < 5; ++j)
    for (Index k = 0; k < 7; ++k) EXPECT_EQ(row(j, k), t(2, j, k));
  const auto inner = t.view()[1][4];  // [7]
  EXPECT_EQ(inner.shape(), Shape{7});
  EXPECT_EQ(inner(6), t(1, 4, 6));
  const auto scalar = inner[3];  // a rank-1 view indexes to a [1] view
  EXPECT_EQ(scalar.shape(), Shape{1});
  EXPECT_EQ(scalar(0), t(1, 4, 3));
  row(1, 1) = S(77);  // writes through
  EXPECT_EQ(t(2, 1, 1), S(77));
}

TYPED_TEST(TensorTest, SliceSelectsARunOfTheFirstAxis) {
  using S = TypeParam;
  Tensor<S> t = iota_tensor<S>(Shape{13, 3, 5});  // [13, 3, 5]
  const auto s = t.view().slice(4, 6);            // [6, 3, 5]
  EXPECT_EQ(s.shape(), (Shape{6, 3, 5}));
  EXPECT_EQ(s.data(), t.data() + 4 * 15);
  for (Index i = 0; i < 6; ++i)
    for (Index j = 0; j < 3; ++j)
      for (Index k = 0; k < 5; ++k) EXPECT_EQ(s(i, j, k), t(4 + i, j, k));
  EXPECT_EQ(t.view().slice(13, 0).numel(), 0);  // empty at the end
  EXPECT_EQ(t.view().slice(0, 13).data(), t.data());
  // A slice of a slice, then an index: offsets compose.
  EXPECT_EQ(t.view().slice(2, 9).slice(3, 4)[1](2, 4), t(6, 2, 4));
  // Slicing an empty first axis yields an empty view.
  Tensor<S> empty(Shape{0, 4});
  EXPECT_EQ(empty.view().slice(0, 0).shape(), (Shape{0, 4}));
}

TYPED_TEST(TensorTest, ReshapeKeepsTheDataAndRejectsOtherElementCounts) {
  using S = TypeParam;
  Tensor<S> t = iota_tensor<S>(Shape{6, 35});  // [6, 35]
  const auto r = t.view().reshape(Shape{2, 3, 5, 7});  // [2, 3, 5, 7]
  EXPECT_EQ(r.data(), t.data());
  for (Index a = 0; a < 2; ++a)
    for (Index b = 0; b < 3; ++b)
      for (Index c = 0; c < 5; ++c)
        for (Index d = 0; d < 7; ++d) EXPECT_EQ(r(a, b, c, d), t((a * 3 + b), c * 7 + d));
  EXPECT_EQ(r.reshape(Shape{210}).shape(), Shape{210});
  EXPECT_THROW(t.view().reshape(Shape{209}), gqe::ShapeError);
  EXPECT_THROW(t.view().reshape(Shape{6, 36}), gqe::ShapeError);
  EXPECT_THROW(t.view().reshape(Shape{0, 35}), gqe::ShapeError);
  try {
    t.view().reshape(Shape{4, 50});
    FAIL() << "reshape of 210 elements to 200 was accepted";
  } catch (const gqe::ShapeError& e) {
    EXPECT_EQ(std::string(e.what()), "cannot reshape [6, 35] to [4, 50]: element counts differ");
  }
}

TYPED_TEST(TensorTest, MatrixViewsAreRowMajorOverTheFirstAxisOrAGivenRowCount) {
  using S = TypeParam;
  Tensor<S> t = iota_tensor<S>(Shape{3, 5, 7});  // [3, 5, 7]
  auto m = t.view().matrix();                    // [3, 35]
  EXPECT_EQ(m.rows(), 3);
  EXPECT_EQ(m.cols(), 35);
  for (Index i = 0; i < 3; ++i)
    for (Index j = 0; j < 35; ++j) EXPECT_EQ(m(i, j), t(i, j / 7, j % 7));
  auto m15 = t.view().matrix(15);  // [15, 7]
  EXPECT_EQ(m15.cols(), 7);
  for (Index i = 0; i < 15; ++i)
    for (Index j = 0; j < 7; ++j) EXPECT_EQ(m15(i, j), t(i / 5, i % 5, j));
  m15(14, 6) = S(-1);  // writes through to the tensor
  EXPECT_EQ(t(2, 4, 6), S(-1));
  const auto flat = t.view().flat();  // [105]
  EXPECT_EQ(flat.size(), 105);
  EXPECT_EQ(flat(8), t(0, 1, 1));
  const Tensor<S>& ct = t;
  EXPECT_EQ(ct.matrix()(1, 8), t(1, 1, 1));
  EXPECT_EQ(Tensor<S>(Shape{0, 4}).view().matrix().size(), 0);
}

TYPED_TEST(TensorTest, MutableViewsConvertToConstViewsButNotBack) {
  using S = TypeParam;
  static_assert(std::is_convertible_v<TensorView<S>, TensorView<const S>>);
  static_assert(!std::is_convertible_v<TensorView<const S>, TensorView<S>>);
  static_assert(std::is_convertible_v<Tensor<S>&, TensorView<S>>);
  static_assert(std::is_convertible_v<const Tensor<S>&, TensorView<const S>>);
  static_assert(!std::is_convertible_v<const Tensor<S>&, TensorView<S>>);
  static_assert(std::is_same_v<decltype(std::declval<const Tensor<S>&>().view()), TensorView<const S>>);
  Tensor<S> t = iota_tensor<S>(Shape{4, 9});  // [4, 9]
  const TensorView<const S> c = t.view().slice(1, 2);  // [2, 9]
  EXPECT_EQ(c.data(), t.data() + 9);
  EXPECT_EQ(c.shape(), (Shape{2, 9}));
  EXPECT_EQ(c(1, 8), t(2, 8));
  const TensorView<const S> whole = t;  // the owning tensor converts too
  EXPECT_EQ(whole.data(), t.data());
  EXPECT_EQ(whole.shape(), t.shape());
}

TYPED_TEST(TensorTest, ResizeAndFill) {
  using S = TypeParam;
  Tensor<S> t = iota_tensor<S>(Shape{4, 6});  // [4, 6]
  t.resize(Shape{2, 3, 4});
  EXPECT_EQ(t.shape(), (Shape{2, 3, 4}));
  EXPECT_EQ(t(1, 2, 3), S(24));  // the first 24 values are kept in order
  t.resize(Shape{2, 5});
  EXPECT_EQ(t.numel(), 10);
  EXPECT_EQ(t(1, 4), S(10));
  t.fill(S(3));
  for (Index i = 0; i < 10; ++i) EXPECT_EQ(t.data()[i], S(3));
}

// A scratch matrix keeps its storage when it shrinks and when it grows back within what it had;
// it acts as an Eigen matrix of its current shape; moving it hands over the storage.
TEST(ScratchMatrix, GrowsOnlyAndActsAsAnEigenMatrixOfItsShape) {
  gqe::ScratchMatrix<float> m;
  EXPECT_EQ(m.size(), 0);
  m.resize(7, 5);  // [7, 5]
  const float* first = m.data();
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(first) % 64, 0u);
  gqe::Matrix<float> expected(7, 5);
  for (Index r = 0; r < 7; ++r)
    for (Index c = 0; c < 5; ++c) expected(r, c) = static_cast<float>(r * 5 + c + 1);
  m = expected;
  EXPECT_EQ(gqe::Matrix<float>(m), expected);
  EXPECT_EQ(m.row(3).sum(), expected.row(3).sum());

  m.resize(2, 3);  // shrinks: same storage, row-major over its first 6 values
  EXPECT_EQ(m.data(), first);
  EXPECT_EQ(m.rows(), 2);
  EXPECT_EQ(m.cols(), 3);
  EXPECT_EQ(m(1, 0), 4.0f);
  m.resize(5, 7);  // 35 values: still within what it had
  EXPECT_EQ(m.data(), first);
  m.resize(9, 9);  // more than it had: new storage, values unspecified
  EXPECT_EQ(m.rows(), 9);
  m.setConstant(2.0f);
  m.topRows(2) += gqe::Matrix<float>::Ones(2, 9);
  EXPECT_EQ(m.sum(), 2.0f * 81 + 18);

  gqe::ScratchMatrix<float> copied;
  copied.assign(expected.transpose());  // [5, 7]
  EXPECT_EQ(gqe::Matrix<float>(copied), gqe::Matrix<float>(expected.transpose()));
  const float* storage = copied.data();
  gqe::ScratchMatrix<float> moved(std::move(copied));
  EXPECT_EQ(moved.data(), storage);
  EXPECT_EQ(moved.rows(), 5);
  EXPECT_EQ(copied.size(), 0);
  gqe::ScratchMatrix<float> target;
  target = std::move(moved);
  EXPECT_EQ(target.data(), storage);
  EXPECT_EQ(gqe::Matrix<float>(target), gqe::Matrix<float>(expected.transpose()));
  auto& alias = target;  // moving onto itself keeps it whole
  target = std::move(alias);
  EXPECT_EQ(target.data(), storage);
  ASSERT_EQ(target.rows(), 5);
  ASSERT_EQ(target.cols(), 7);
  EXPECT_EQ(gqe::Matrix<float>(target), gqe::Matrix<float>(expected.transpose()));

  // Sizes a Shape would refuse are refused, and the matrix keeps what it had.
  EXPECT_THROW(target.resize(-1, 3), gqe::ShapeError);
  EXPECT_THROW(target.resize(3, -1), gqe::ShapeError);
  EXPECT_THROW(target.resize(Index{1} << 40, Index{1} << 40), gqe::ShapeError);
  EXPECT_EQ(target.rows(), 5);
  EXPECT_EQ(target.data(), storage);
}

// Small buffers sit on a cache line, large ones on a 2 MB (huge page) boundary: from 2 MB on by
// default, from 1 MB on for scratch (so that scratch just under 2 MB takes one huge page instead of
// 512 small ones). Every requested byte is writable.
TEST(AlignedBytes, AlignsToACacheLineAndLargeBuffersToAHugePage) {
  constexpr std::size_t kMB = std::size_t(1) << 20;
  const auto address = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p); };
  for (const std::size_t bytes : {std::size_t(1), std::size_t(100), std::size_t(64 * 1024), kMB - 64, kMB, 2 * kMB - 4096,
                                  2 * kMB, 5 * kMB + 3}) {
    const auto plain = gqe::detail::AlignedBytes::allocate(bytes);
    EXPECT_EQ(address(plain.get()) % (bytes >= 2 * kMB ? 2 * kMB : 64), 0u) << bytes << " bytes";
    std::memset(plain.get(), 0x5a, bytes);
    EXPECT_EQ(plain[bytes - 1], 0x5a);

    gqe::detail::ScratchBuffer<unsigned char> scratch;
    unsigned char* data = scratch.reserve(static_cast<Index>(bytes));
    EXPECT_EQ(address(data) % (bytes >= kMB ? 2 * kMB : 64), 0u) << bytes << " bytes of scratch";
    std::memset(data, 0x5a, bytes);
    EXPECT_EQ(data[bytes - 1], 0x5a);
  }
}

}  // namespace
