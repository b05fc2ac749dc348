// The stateless ops (rms_norm, RoPE, softmax, SiLU, linear, causal_attention) against slow
// references written in this file from the formulas of docs/model.md, in plain loops over
// double. Inputs are generated in the op's scalar type and converted exactly to double, so that the
// difference measures only the op's own rounding; each tolerance below is derived from the op's
// arithmetic (u = epsilon / 2 is the unit roundoff of the scalar type).
//
// Sizes are deliberately not multiples of the SIMD width, and cross the tiles of linear (256 rows x
// up to 256 outputs) and of attention (128 queries x 256 keys).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "gqe/build_info.hpp"
#include "gqe/layers/attention_cache.hpp"
#include "gqe/ops/activations.hpp"
#include "gqe/ops/attention.hpp"
#include "gqe/ops/gemm_backend.hpp"
#include "gqe/ops/linear.hpp"
#include "gqe/ops/rmsnorm.hpp"
#include "gqe/ops/rope.hpp"
#include "gqe/ops/rows.hpp"
#include "gqe/util/thread_pool.hpp"
#include "support.hpp"

namespace {

using gqe::Index;
template <class S>
using Matrix = gqe::Matrix<S>;
using gqe::testing::eps;
using gqe::testing::MatrixD;
using gqe::testing::random_matrix;
using gqe::testing::relative_error;
using gqe::testing::store_as;
using gqe::testing::to_double;

constexpr double kEpsDouble = std::numeric_limits<double>::epsilon();

template <class S>
class OpsTest : public ::testing::Test {
 protected:
  void TearDown() override { gqe::set_num_threads(gqe::default_thread_count()); }
};
using ScalarTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(OpsTest, ScalarTypes);

// ---- RMSNorm ------------------------------------------------------------------------------------

// y = x / sqrt(mean(x^2) + eps) * w, row by row.
MatrixD reference_rms_norm(const MatrixD& x, const std::vector<double>& w, double eps) {
  MatrixD y(x.rows(), x.cols());
  for (Index r = 0; r < x.rows(); ++r) {
    double sum_sq = 0;
    for (Index c = 0; c < x.cols(); ++c) sum_sq += x(r, c) * x(r, c);
    const double inv_rms = 1.0 / std::sqrt(sum_sq / static_cast<double>(x.cols()) + eps);
    for (Index c = 0; c < x.cols(); ++c) y(r, c) = x(r, c) * inv_rms * w[static_cast<std::size_t>(c)];
  }
  return y;
}

TYPED_TEST(OpsTest, RmsNormMatchesTheFormulaPerRow) {
  using S = TypeParam;
  std::mt19937 rng(1);
  for (Index d : {1, 7, 63, 65, 517}) {
    for (double norm_eps : {1e-5, 1e-6}) {
      SCOPED_TRACE("d = " + std::to_string(d) + ", eps = " + std::to_string(norm_eps));
      Matrix<S> x = random_matrix<S>(6, d, rng);  // [6, d]
      x.row(1) *= S(1e-3);   // mean(x^2) ~ 1e-6: eps is not negligible here
      x.row(2) *= S(40);     // large values
      x.row(3).setZero();    // y = 0, not NaN
      const Matrix<S> w_row = random_matrix<S>(1, d, rng, 0.2, 1.0);
      const gqe::Vector<S> w = w_row.transpose();  // [d]
      Matrix<S> y(6, d);                           // [6, d]
      gqe::rms_norm<S>(x, w.data(), norm_eps, y);

      std::vector<double> wd(static_cast<std::size_t>(d));
      for (Index c = 0; c < d; ++c) wd[static_cast<std::size_t>(c)] = static_cast<double>(w(c));
      const MatrixD ref = reference_rms_norm(to_double(x), wd, static_cast<double>(static_cast<S>(norm_eps)));
      // Elementwise: the sum of d squares (positive terms) is off by at most (d-1)u relative, the
      // square root halves that, and the mean, + eps, sqrt, division and two products round once
      // each: about ((d-1)/2 + 6)u. Bound: (d/2 + 6) eps, twice that.
      const double tol = (0.5 * static_cast<double>(d) + 6) * eps<S>();
      for (Index r = 0; r < 6; ++r)
        for (Index c = 0; c < d; ++c)
          ASSERT_LE(std::abs(static_cast<double>(y(r, c)) - ref(r, c)), tol * std::abs(ref(r, c)))
              << "row " << r << " col " << c << ": " << y(r, c) << " vs " << ref(r, c);

      Matrix<S> in_place = x;  // y may alias x
      gqe::rms_norm<S>(in_place, w.data(), norm_eps, in_place);
      EXPECT_TRUE((in_place.array() == y.array()).all());
    }
  }
}

// ---- RoPE ---------------------------------------------------------------------------------------

// Rotate-half RoPE of every head of x [R, H*d_h], row r at positions[r]; angles in double.
MatrixD reference_rope(const MatrixD& x, Index head_dim, const std::vector<Index>& positions, double theta) {
  const Index half = head_dim / 2;
  MatrixD y = x;
  for (Index r = 0; r < x.rows(); ++r)
    for (Index h = 0; h < x.cols() / head_dim; ++h)
      for (Index i = 0; i < half; ++i) {
        const double inv_freq = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
        const double angle = static_cast<double>(positions[static_cast<std::size_t>(r)]) * inv_freq;
        const double x1 = x(r, h * head_dim + i), x2 = x(r, h * head_dim + half + i);
        // x*cos + rotate_half(x)*sin, rotate_half(x) = concat(-x2, x1)
        y(r, h * head_dim + i) = x1 * std::cos(angle) - x2 * std::sin(angle);
        y(r, h * head_dim + half + i) = x2 * std::cos(angle) + x1 * std::sin(angle);
      }
  return y;
}

TYPED_TEST(OpsTest, RopeRotatesHalvesWithDoubleAnglesAtAnyPosition) {
  using S = TypeParam;
  std::mt19937 rng(2);
  struct Case {
    Index head_dim, heads;
    std::vector<Index> positions;
    double theta;
  };
  std::vector<Index> from_offset(7), large(5), two_segments;
  for (Index r = 0; r < 7; ++r) from_offset[static_cast<std::size_t>(r)] = 37 + r;   // a chunk after 37 cached
  for (Index r = 0; r < 5; ++r) large[static_cast<std::size_t>(r)] = 100000 + r;     // float angles would be wrong
  for (Index p : {0, 1, 2, 3, 11, 12, 13}) two_segments.push_back(p);                // a batch of two sequences
  std::vector<Index> prefill(65);
  for (Index r = 0; r < 65; ++r) prefill[static_cast<std::size_t>(r)] = r;
  const std::vector<Case> cases = {{6, 3, prefill, 10000.0},   {10, 2, from_offset, 10000.0},
                                   {64, 3, large, 10000.0},    {10, 1, large, 500000.0},
                                   {6, 4, two_segments, 10000.0}, {64, 1, {600, 4095, 1 << 20}, 10000.0}};
  for (const auto& c : cases) {
    SCOPED_TRACE("d_h = " + std::to_string(c.head_dim) + ", first position " + std::to_string(c.positions[0]));
    const Index rows = static_cast<Index>(c.positions.size());
    const Matrix<S> x = random_matrix<S>(rows, c.heads * c.head_dim, rng);  // [R, H*d_h]
    gqe::RopeTable<S> table;
    table.compute(c.positions, c.head_dim, c.theta);
    Matrix<S> y = x;
    gqe::apply_rope<S>(y, c.head_dim, table);
    const MatrixD ref = reference_rope(to_double(x), c.head_dim, c.positions, c.theta);
    // Elementwise: cos and sin rounded to S, two products and a sum: |err| <= 2.5 eps (|x1| + |x2|);
    // 3 eps allowed. A double angle is itself only known to |angle| * eps(double) (both sides compute
    // it, possibly in other orders), which at position 1e5 matters for double only. Angles computed
    // in float would be off by ~1e-2 radians at 1e5 and fail by a factor of 1e4.
    const Index half = c.head_dim / 2;
    for (Index r = 0; r < rows; ++r)
      for (Index h = 0; h < c.heads; ++h)
        for (Index i = 0; i < half; ++i) {
          const Index a = h * c.head_dim + i, b = a + half;
          const double angle = static_cast<double>(c.positions[static_cast<std::size_t>(r)]) *
                               std::pow(c.theta, -2.0 * static_cast<double>(i) / static_cast<double>(c.head_dim));
          const double tol = (3 * eps<S>() + 4 * angle * kEpsDouble) *
                             (std::abs(static_cast<double>(x(r, a))) + std::abs(static_cast<double>(x(r, b))));
          ASSERT_LE(std::abs(static_cast<double>(y(r, a)) - ref(r, a)), tol) << "row " << r << " pair " << i;
          ASSERT_LE(std::abs(static_cast<double>(y(r, b)) - ref(r, b)), tol) << "row " << r << " pair " << i;
        }
    if (c.positions[0] == 0) {
      EXPECT_TRUE((y.row(0).array() == x.row(0).array()).all()) << "position 0 is the identity";
    }
  }
}

// ---- softmax and SiLU ---------------------------------------------------------------------------

std::vector<double> reference_softmax(const std::vector<double>& x) {
  const double max = *std::max_element(x.begin(), x.end());
  std::vector<double> p(x.size());
  double sum = 0;
  for (std::size_t i = 0; i < x.size(); ++i) sum += (p[i] = std::exp(x[i] - max));
  for (auto& v : p) v /= sum;
  return p;
}

TYPED_TEST(OpsTest, SoftmaxIsStableForLargeLogitsAndMatchesTheReference) {
  using S = TypeParam;
  std::mt19937 rng(3);
  for (Index n : {1, 7, 63, 65, 130, 200}) {
    for (double offset : {0.0, 1000.0, -1000.0}) {
      SCOPED_TRACE("n = " + std::to_string(n) + ", logits around " + std::to_string(offset));
      Matrix<S> rows = random_matrix<S>(3, n, rng, 4.0, offset);  // [3, n]
      const Matrix<S> before = rows;
      gqe::softmax_inplace(rows.row(1));  // a row of a row-major matrix
      gqe::softmax_inplace(rows.row(2).tail(n));
      for (Index r = 1; r < 3; ++r) {
        std::vector<double> x(static_cast<std::size_t>(n));
        for (Index i = 0; i < n; ++i) x[static_cast<std::size_t>(i)] = static_cast<double>(before(r, i));
        const auto ref = reference_softmax(x);
        const double max = *std::max_element(x.begin(), x.end());
        for (Index i = 0; i < n; ++i) {
          // x_i - max rounds to u|x_i - max|, which exp turns into that relative error; exp itself a
          // few u, the sum of n positive terms (n-1)u, the division u. Allowed: eps (|x_i - max| + n + 6).
          const double want = ref[static_cast<std::size_t>(i)];
          const double tol = eps<S>() * (std::abs(x[static_cast<std::size_t>(i)] - max) + static_cast<double>(n) + 6);
          ASSERT_TRUE(std::isfinite(static_cast<double>(rows(r, i))));
          ASSERT_LE(std::abs(static_cast<double>(rows(r, i)) - want), tol * want + std::numeric_limits<S>::denorm_min())
              << "entry " << i << ": " << rows(r, i) << " vs " << want;
        }
      }
      EXPECT_TRUE((rows.row(0).array() == before.row(0).array()).all()) << "softmax wrote outside its row";
    }
  }
  // A column of a matrix, with -inf entries (masked logits) that must come out exactly 0.
  Matrix<S> m = random_matrix<S>(5, 4, rng);  // [5, 4]
  m(1, 2) = -std::numeric_limits<S>::infinity();
  m(3, 2) = -std::numeric_limits<S>::infinity();
  const Matrix<S> before = m;
  gqe::softmax_inplace(m.col(2));
  std::vector<double> finite = {static_cast<double>(before(0, 2)), static_cast<double>(before(2, 2)),
                                static_cast<double>(before(4, 2))};
  const auto ref = reference_softmax(finite);
  EXPECT_EQ(m(1, 2), S(0));
  EXPECT_EQ(m(3, 2), S(0));
  EXPECT_NEAR(static_cast<double>(m(0, 2)), ref[0], 16 * eps<S>());
  EXPECT_NEAR(static_cast<double>(m(2, 2)), ref[1], 16 * eps<S>());
  EXPECT_NEAR(static_cast<double>(m(4, 2)), ref[2], 16 * eps<S>());
}

TYPED_TEST(OpsTest, SoftmaxPropagatesNaNToTheWholeRow) {
  using S = TypeParam;
  std::mt19937 rng(4);
  for (Index where : {0, 3, 6}) {
    gqe::Vector<S> v = random_matrix<S>(7, 1, rng);  // [7]
    v(where) = std::numeric_limits<S>::quiet_NaN();
    gqe::softmax_inplace(v);
    for (Index i = 0; i < 7; ++i) EXPECT_TRUE(std::isnan(v(i))) << "NaN at " << where << ", entry " << i << " = " << v(i);
  }
}

// The attention kernel's exponentials (scores minus their maximum): within 2 ulp of exp in double
// over the whole range that stays normal, at every lane of a packet; NaN stays NaN; below it the
// result is at most exp(-87) (to rounding), never negative.
TYPED_TEST(OpsTest, SoftmaxExponentialIsExpToWithinTwoUlp) {
  using S = TypeParam;
  using P = gqe::detail::Packet<S>;
  constexpr Index L = gqe::detail::kPacketLanes<S>;
  std::mt19937 rng(41);
  std::uniform_real_distribution<double> spread(-87.0, 0.0), near_zero(-1e-3, 0.0);
  std::vector<S> x = {S(0), S(-0.0), S(-1), S(-0.5), -std::log(S(2)) / 2, S(-86.99)};
  for (int i = 0; i < 20000; ++i) x.push_back(static_cast<S>(i % 4 == 0 ? near_zero(rng) : spread(rng)));
  const std::size_t checked = x.size();  // then 4 arguments below the range, then NaN
  for (S v : {S(-87.5), S(-100), S(-1e30), -std::numeric_limits<S>::infinity(), std::numeric_limits<S>::quiet_NaN()}) x.push_back(v);
  while (x.size() % static_cast<std::size_t>(L) != 0) x.push_back(S(0));
  std::vector<S> y(x.size());
  for (std::size_t i = 0; i < x.size(); i += static_cast<std::size_t>(L))
    Eigen::internal::pstoreu(y.data() + i, gqe::detail::exp_nonpositive<S>(Eigen::internal::ploadu<P>(x.data() + i)));
  for (std::size_t i = 0; i < checked; ++i) {
    const double want = std::exp(static_cast<double>(x[i]));
    const double ulp = std::ldexp(1.0, std::ilogb(want) - std::numeric_limits<S>::digits + 1);
    ASSERT_LE(std::abs(static_cast<double>(y[i]) - want), 2 * ulp) << "exp(" << x[i] << ") = " << y[i] << ", want " << want;
  }
  for (std::size_t i = checked; i < checked + 4; ++i)
    EXPECT_TRUE(y[i] >= S(0) && y[i] <= std::exp(S(-87)) * (1 + 4 * std::numeric_limits<S>::epsilon()))
        << "exp(" << x[i] << ") = " << y[i];
  EXPECT_TRUE(std::isnan(y[checked + 4])) << "exp(NaN) = " << y[checked + 4];
}

TYPED_TEST(OpsTest, SiluMatchesXTimesSigmoid) {
  using S = TypeParam;
  std::mt19937 rng(5);
  Matrix<S> x = random_matrix<S>(7, 65, rng, 4.0);  // [7, 65]
  const S extremes[] = {S(0), S(1e-30), S(-1e-30), S(20), S(-20), S(80), S(-80), S(100), S(-100), S(0.5)};
  for (Index i = 0; i < 10; ++i) x(6, i) = extremes[i];
  Matrix<S> y = x;
  gqe::silu_inplace<S>(y);
  for (Index r = 0; r < x.rows(); ++r)
    for (Index c = 0; c < x.cols(); ++c) {
      const double xd = static_cast<double>(x(r, c));
      const double want = xd / (1.0 + std::exp(-xd));
      // exp a few u, the sum, the division: 8 eps relative; below the smallest normal number the
      // result may underflow (silu(-100) in float), hence the absolute floor.
      ASSERT_LE(std::abs(static_cast<double>(y(r, c)) - want),
                8 * eps<S>() * std::abs(want) + static_cast<double>(std::numeric_limits<S>::min()))
          << "silu(" << xd << ") = " << y(r, c) << ", expected " << want;
    }
  Matrix<S> nan(1, 1);
  nan(0, 0) = std::numeric_limits<S>::quiet_NaN();
  gqe::silu_inplace<S>(nan);
  EXPECT_TRUE(std::isnan(nan(0)));
}

// ---- linear -------------------------------------------------------------------------------------

// y = x w^T: y[r, o] = sum_i x[r, i] * w[o, i].
MatrixD reference_linear(const MatrixD& x, const MatrixD& w) {
  MatrixD y(x.rows(), w.rows());
  for (Index r = 0; r < x.rows(); ++r)
    for (Index o = 0; o < w.rows(); ++o) {
      double s = 0;
      for (Index i = 0; i < x.cols(); ++i) s += x(r, i) * w(o, i);
      y(r, o) = s;
    }
  return y;
}

// A dot product of n random-sign terms has a rounding error that grows like sqrt(n) u relative to
// its (zero-mean, size sqrt(n)) result; 2 sqrt(n) eps is four times that.
template <class S>
double linear_tolerance(Index n) {
  return 2 * std::sqrt(static_cast<double>(n)) * eps<S>();
}

TYPED_TEST(OpsTest, LinearIsXTimesWTransposedAcrossTiles) {
  using S = TypeParam;
  std::mt19937 rng(6);
  struct Size {
    Index rows, in, out;
  };
  // {301, 37, 40}: W narrow enough for one unit of columns, so the rows are cut into two units.
  // Depth 517 and 600: one block with its short tail; 1300: three blocks. Outputs 1 and 130 end in
  // a panel of at most one packet's columns (float or double, whatever the SIMD level).
  for (const Size s : {Size{300, 517, 270}, Size{1, 7, 1}, Size{7, 63, 65}, Size{65, 10, 130}, Size{257, 6, 513}, Size{301, 37, 40},
                       Size{29, 1300, 45}, Size{13, 600, 16}}) {
    SCOPED_TRACE(std::to_string(s.rows) + " x " + std::to_string(s.in) + " x " + std::to_string(s.out));
    const Matrix<S> x = random_matrix<S>(s.rows, s.in, rng);   // [R, in]
    const Matrix<S> w = random_matrix<S>(s.out, s.in, rng);    // [out, in]
    Matrix<S> y(s.rows, s.out);                                // [R, out]
    gqe::linear<S>(x, w, y);
    const MatrixD ref = reference_linear(to_double(x), to_double(w));
    EXPECT_LT(relative_error(y, ref), linear_tolerance<S>(s.in));

    // Strided input and output: x is a column block of a wider matrix, y writes a column block and
    // must leave the columns around it alone.
    Matrix<S> wide_x = random_matrix<S>(s.rows, s.in + 5, rng);  // [R, in + 5]
    wide_x.middleCols(2, s.in) = x;
    Matrix<S> wide_y = Matrix<S>::Constant(s.rows, s.out + 7, S(12345));  // [R, out + 7]
    gqe::linear<S>(wide_x.middleCols(2, s.in), w, wide_y.middleCols(3, s.out));
    EXPECT_LT(relative_error(wide_y.middleCols(3, s.out), ref), linear_tolerance<S>(s.in));
    EXPECT_TRUE((wide_y.leftCols(3).array() == S(12345)).all());
    EXPECT_TRUE((wide_y.rightCols(4).array() == S(12345)).all());
  }
}

// results[i], computed on i + 1 threads, has the bits of results[0], computed on one.
template <class S>
void expect_the_bits_of_one_thread(const std::vector<Matrix<S>>& results, const std::string& what) {
  for (std::size_t i = 1; i < results.size(); ++i)
    EXPECT_EQ(std::memcmp(results[0].data(), results[i].data(), sizeof(S) * static_cast<std::size_t>(results[0].size())), 0)
        << what << " on " << i + 1 << " threads differs from 1 thread";
}

TYPED_TEST(OpsTest, LinearIsBitIdenticalForAnyThreadCount) {
  using S = TypeParam;
  std::mt19937 rng(7);
  const Matrix<S> x = random_matrix<S>(300, 517, rng);  // [300, 517]: 2 x 2 tiles
  const Matrix<S> w = random_matrix<S>(270, 517, rng);  // [270, 517]
  std::vector<Matrix<S>> results;
  for (int threads : {1, 2, 3}) {
    gqe::set_num_threads(threads);
    Matrix<S> y(300, 270);
    gqe::linear<S>(x, w, y);
    results.push_back(y);
  }
  expect_the_bits_of_one_thread(results, "y");
}

// dx = dy W and dW += dy^T x against the obvious products, over shapes whose weight gradient is
// one block (its depth cut into runs of rows, the last one ragged) and shapes of several blocks;
// dx overwritten or accumulated, dW accumulated onto what it held; the same bits for any thread
// count.
TYPED_TEST(OpsTest, LinearBackwardIsTheTransposedProductsForAnyThreadCount) {
  using S = TypeParam;
  std::mt19937 rng(8);
  struct Size {
    Index rows, in, out;
  };
  for (const Size s : {Size{1301, 37, 13}, Size{513, 64, 64}, Size{300, 517, 270}, Size{9, 5, 3}, Size{1030, 300, 70}}) {
    SCOPED_TRACE(std::to_string(s.rows) + " x " + std::to_string(s.in) + " x " + std::to_string(s.out));
    const Matrix<S> x = random_matrix<S>(s.rows, s.in, rng);    // [R, in]
    const Matrix<S> w = random_matrix<S>(s.out, s.in, rng);     // [out, in]
    const Matrix<S> dy = random_matrix<S>(s.rows, s.out, rng);  // [R, out]
    const Matrix<S> dx0 = random_matrix<S>(s.rows, s.in, rng), dw0 = random_matrix<S>(s.out, s.in, rng);
    const MatrixD want_dx = to_double(dy) * to_double(w), want_dw = to_double(dw0) + to_double(dy).transpose() * to_double(x);
    const gqe::WeightMatrix weight{w.data(), gqe::dtype_of<S>(), s.in};
    std::vector<Matrix<S>> dws;
    for (int threads : {1, 2, 3}) {
      gqe::set_num_threads(threads);
      Matrix<S> dx = dx0, dw = dw0;
      gqe::linear_backward<S>(x, weight, dy, dx, false, dw);
      EXPECT_LT(relative_error(dx, want_dx), linear_tolerance<S>(s.out));
      EXPECT_LT(relative_error(dw, want_dw), linear_tolerance<S>(s.rows));
      Matrix<S> dx_sum = dx0, dw_again = dw0;
      gqe::linear_backward<S>(x, weight, dy, dx_sum, true, dw_again);
      EXPECT_LT(relative_error(dx_sum, to_double(dx0) + want_dx), linear_tolerance<S>(s.out));
      dws.push_back(dw);
    }
    expect_the_bits_of_one_thread(dws, "dW");
  }
}

// The cache keeps each written position's key and value of every KV head as given, and their mean
// over the groups when it has one: runs that start inside a tile and cross several, after earlier
// positions that must stay as they were.
TYPED_TEST(OpsTest, KvCacheWritesRunsOfPositionsAcrossTiles) {
  using S = TypeParam;
  std::mt19937 rng(9);
  for (const bool with_mean : {false, true}) {
    SCOPED_TRACE(with_mean ? "with the mean over groups" : "KV heads only");
    gqe::AttentionConfig config;
    config.num_kv_heads = 3;
    config.head_dim = 6;
    if (with_mean) {
      config.type = gqe::AttentionType::gqe;
      config.num_heads = 6;
    }
    const Index G = config.num_kv_heads, dh = config.head_dim, T = 3 * gqe::kKeyTile + 45;
    const Matrix<S> key = random_matrix<S>(T, G * dh + 2, rng), value = random_matrix<S>(T, G * dh + 2, rng);  // rows' stride G*d_h + 2
    gqe::AttentionCache<S> cache(config);
    cache.reserve(T);
    const Index split = gqe::kKeyTile - 6;  // the second run starts 6 positions before a tile ends
    cache.write(0, split, key.data(), value.data(), key.cols());
    cache.write(split, T - split, key.row(split).data(), value.row(split).data(), key.cols());
    std::vector<S> k(static_cast<std::size_t>(dh)), v(static_cast<std::size_t>(dh));
    for (Index pos = 0; pos < T; ++pos) {
      std::vector<double> mean_k(static_cast<std::size_t>(dh)), mean_v(static_cast<std::size_t>(dh));
      for (Index g = 0; g < G; ++g) {
        cache.read(g, pos, k.data(), v.data());
        for (Index c = 0; c < dh; ++c) {
          ASSERT_EQ(k[static_cast<std::size_t>(c)], key(pos, g * dh + c)) << "position " << pos << ", head " << g;
          ASSERT_EQ(v[static_cast<std::size_t>(c)], value(pos, g * dh + c)) << "position " << pos << ", head " << g;
          mean_k[static_cast<std::size_t>(c)] += static_cast<double>(key(pos, g * dh + c)) / static_cast<double>(G);
          mean_v[static_cast<std::size_t>(c)] += static_cast<double>(value(pos, g * dh + c)) / static_cast<double>(G);
        }
      }
      if (!with_mean) continue;
      cache.read(G, pos, k.data(), v.data());
      for (Index c = 0; c < dh; ++c) {
        ASSERT_NEAR(k[static_cast<std::size_t>(c)], mean_k[static_cast<std::size_t>(c)], 8 * eps<S>()) << "position " << pos;
        ASSERT_NEAR(v[static_cast<std::size_t>(c)], mean_v[static_cast<std::size_t>(c)], 8 * eps<S>()) << "position " << pos;
      }
    }
  }
}

// Batch invariance: a row of the product is the same bits whatever other rows share the call, how
// many there are and where the row sits among them; and 16-bit weights used in place give the same
// bits as the same values widened first.
TYPED_TEST(OpsTest, LinearRowsAreTheSameWhateverElseSharesTheCall) {
  using S = TypeParam;
  if (std::is_same_v<S, float> && std::string(gqe::backend::kName) != "eigen")
    GTEST_SKIP() << "float products go to the " << gqe::backend::kName << " backend, whose kernels are not batch invariant";
  std::mt19937 rng(8);
  for (const Index in : {5, 64, 517}) {
    SCOPED_TRACE("in = " + std::to_string(in));
    const Matrix<S> x = random_matrix<S>(300, in, rng);  // [300, in]
    const Matrix<S> w = random_matrix<S>(70, in, rng);   // [70, in]
    Matrix<S> all(300, 70);
    gqe::linear<S>(x, w, all);
    for (const Index first : {0, 1, 13, 255, 299})
      for (const Index count : {1, 2, 12, 13, 40}) {
        if (first + count > 300) continue;
        Matrix<S> part(count, 70);
        gqe::linear<S>(x.middleRows(first, count), w, part);
        ASSERT_TRUE((part.array() == all.middleRows(first, count).array()).all()) << "rows " << first << " + " << count;
      }
    // Another set of companions for the same rows: the rows in reverse order.
    Matrix<S> reversed_x = x.colwise().reverse(), reversed_y(300, 70);
    gqe::linear<S>(reversed_x, w, reversed_y);
    ASSERT_TRUE((reversed_y.colwise().reverse().array() == all.array()).all());
    // Columns: a subset of W's rows gives the same bits for those columns.
    Matrix<S> cols(300, 9);
    gqe::linear<S>(x, Matrix<S>(w.middleRows(31, 9)), cols);
    ASSERT_TRUE((cols.array() == all.middleCols(31, 9).array()).all());
  }
}

// Reports name the backend, and OpenBLAS's kernels: the figures of a build that fell back to its
// generic kernels must say so.
TEST(BuildInfo, NamesTheGemmBackendAndTheKernelsItPicked) {
  const std::string name = gqe::gemm_backend(), kernels = gqe::gemm_backend_kernels();
#if defined(GQE_GEMM_OPENBLAS)
  EXPECT_EQ(name, "openblas");
  EXPECT_FALSE(kernels.empty());
  EXPECT_EQ(gqe::gemm_backend_description(), "openblas (" + kernels + " kernels)");
#else
  EXPECT_TRUE(name == "eigen" || name == "onednn") << name;
  EXPECT_TRUE(kernels.empty()) << kernels;
  EXPECT_EQ(gqe::gemm_backend_description(), name);
#endif
}

// A user of OpenBLAS on a CPU it does not know is told, in one line, that it fell back to kernels
// without AVX2, and how to fix it; vector kernels, other CPUs and other backends draw no warning.
TEST(BuildInfo, WarnsWhenOpenBlasFellBackToKernelsWithoutAvx2) {
  for (const char* old_core : {"Prescott", "Core2", "Nehalem", "Sandybridge", "PRESCOTT", "Piledriver"}) {
    const std::string warning = gqe::gemm_backend_warning(old_core, true);
    EXPECT_NE(warning.find(std::string("\"") + old_core + "\""), std::string::npos) << warning;
    EXPECT_NE(warning.find("OPENBLAS_CORETYPE"), std::string::npos) << warning;
    EXPECT_EQ(warning.find('\n'), std::string::npos) << warning;
    EXPECT_EQ(gqe::gemm_backend_warning(old_core, false), "") << old_core << " on a CPU without AVX2 is its best";
  }
  for (const char* vector_core : {"Haswell", "haswell", "Zen", "SkylakeX", "SKYLAKEX", "CooperLake", "SapphireRapids"})
    EXPECT_EQ(gqe::gemm_backend_warning(vector_core, true), "") << vector_core;
  EXPECT_EQ(gqe::gemm_backend_warning("Unknown", true), "") << "a name not known to lack AVX2 is taken to be fine";
  EXPECT_EQ(gqe::gemm_backend_warning("", true), "") << "backends that do not name their kernels";
#if !defined(GQE_GEMM_OPENBLAS)
  EXPECT_EQ(gqe::gemm_backend_warning(), "");
#endif
#if defined(__linux__) && (defined(__x86_64__) || defined(__i386__))
  // The CPU check against the kernel's own account of the CPU's flags.
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  bool found = false;
  while (!found && std::getline(cpuinfo, line)) found = line.rfind("flags", 0) == 0;
  if (found) {
    const auto has = [&](const std::string& flag) { return (line + " ").find(" " + flag + " ") != std::string::npos; };
    EXPECT_EQ(gqe::cpu_has_avx2_fma(), has("avx2") && has("fma")) << line;
  }
#endif
}

TEST(OpsBf16, SixteenBitWeightsInPlaceEqualTheirWidenedValues) {
  if (std::string(gqe::backend::kName) != "eigen")
    GTEST_SKIP() << "F32 weights go to the " << gqe::backend::kName << " backend, 16-bit ones to the library's kernels";
  std::mt19937 rng(9);
  for (const gqe::DType dtype : {gqe::DType::BF16, gqe::DType::F16})
    for (const Index rows : {1, 3, 40}) {
      const Matrix<float> x = random_matrix<float>(rows, 67, rng);  // [R, 67]
      const Matrix<float> w = random_matrix<float>(45, 67, rng);    // [45, 67]
      std::vector<std::uint16_t> stored(static_cast<std::size_t>(w.size()));
      const Matrix<float> widened = store_as(w, dtype, reinterpret_cast<unsigned char*>(stored.data())).cast<float>();  // exact
      Matrix<float> in_place(rows, 45), reference(rows, 45);
      gqe::linear<float>(x, gqe::WeightMatrix{stored.data(), dtype, 67}, in_place);
      gqe::linear<float>(x, widened, reference);
      EXPECT_TRUE((in_place.array() == reference.array()).all()) << gqe::dtype_name(dtype) << ", " << rows << " rows";
    }
}

// A decode step (at most 4 rows) reads the weights in place, at whatever alignment a mapped file
// gives them; a prefill packs them. Each row of the few-row product must equal, bit for bit, the
// same row computed among 40 (the packed kernel), which must match the float64 reference, for
// every storage type, offset and odd size, including a depth shorter than one visit of the rows.
TEST(OpsDecode, FewRowsReadWeightsInPlaceAtAnyOffsetAsThePackedProductDoes) {
  if (std::string(gqe::backend::kName) != "eigen")
    GTEST_SKIP() << "F32 weights go to the " << gqe::backend::kName << " backend";
  std::mt19937 rng(31);
  struct Size {
    Index in, out;
  };
  for (const gqe::DType dtype : {gqe::DType::F32, gqe::DType::BF16, gqe::DType::F16})
    for (const Size s : {Size{1, 1}, Size{7, 33}, Size{67, 45}, Size{130, 70}, Size{256, 64}, Size{517, 97}})
      for (const Index shift : {0, 1, 3, 5}) {  // in elements of the stored type
        SCOPED_TRACE(std::string(gqe::dtype_name(dtype)) + " " + std::to_string(s.in) + " -> " + std::to_string(s.out) +
                     ", offset " + std::to_string(shift));
        const std::size_t size = gqe::dtype_size(dtype);
        const Matrix<float> w = random_matrix<float>(s.out, s.in, rng);  // [out, in]
        std::vector<unsigned char> bytes(static_cast<std::size_t>(w.size() + shift) * size + 64);  // + room to align
        unsigned char* stored = bytes.data() + (64 - reinterpret_cast<std::uintptr_t>(bytes.data()) % 64) % 64 + shift * size;
        ASSERT_LE(stored + w.size() * size, bytes.data() + bytes.size());
        const MatrixD widened = store_as(w, dtype, stored);  // [out, in]
        const gqe::WeightMatrix weights{stored, dtype, s.in};
        const Matrix<float> x = random_matrix<float>(40, s.in, rng);  // [40, in]
        Matrix<float> all(40, s.out);                                 // [40, out]
        gqe::linear<float>(x, weights, all);
        EXPECT_LT(relative_error(all, reference_linear(to_double(x), widened)), linear_tolerance<float>(s.in));
        for (const Index rows : {1, 2, 4}) {
          Matrix<float> few(rows, s.out);  // [rows, out]
          gqe::linear<float>(Matrix<float>(x.middleRows(5, rows)), weights, few);
          EXPECT_TRUE((few.array() == all.middleRows(5, rows).array()).all()) << rows << " rows";
        }
      }
}

// A weight laid out in panels gives every product the bits of the row-major weight it came from:
// decode steps (1-4 rows), prefill (more rows, several column units), rows gathered against one
// expert's block of rows, for every storage type and odd size, with a depth past the kernels' blocks.
// Its rows and stored bytes read back unchanged, and its old storage is reported read exactly once,
// front to back.
TEST(OpsPanels, PanelLaidWeightsGiveTheRowMajorBits) {
  if (std::string(gqe::backend::kName) != "eigen")
    GTEST_SKIP() << "F32 row-major weights go to the " << gqe::backend::kName << " backend, panels to the library's kernels";
  std::mt19937 rng(47);
  struct Size {
    Index in, out;
  };
  constexpr Index W = gqe::kPanelWidth;
  for (const gqe::DType dtype : {gqe::DType::F32, gqe::DType::BF16, gqe::DType::F16})
    for (const Size s : {Size{1, 1}, Size{7, 33}, Size{67, 45}, Size{130, 70}, Size{67, 300}, Size{2100, 3 * W + 5}}) {
      SCOPED_TRACE(std::string(gqe::dtype_name(dtype)) + " " + std::to_string(s.in) + " -> " + std::to_string(s.out));
      const std::size_t size = gqe::dtype_size(dtype), total = static_cast<std::size_t>(s.in * s.out) * size;
      const Matrix<float> values = random_matrix<float>(s.out, s.in, rng);  // [out, in]
      std::vector<unsigned char> stored(total);
      store_as(values, dtype, stored.data());
      gqe::Weight row_major(gqe::Shape{s.out, s.in});
      row_major.borrow(stored.data(), dtype, nullptr);
      gqe::Weight panels = row_major;
      std::size_t read = 0;
      panels.lay_out_in_panels([&](const void* begin, std::size_t bytes) {
        EXPECT_EQ(static_cast<const unsigned char*>(begin), stored.data() + read);
        read += bytes;
      });
      EXPECT_EQ(read, total);
      ASSERT_TRUE(panels.panels() && panels.owned() && !row_major.panels());
      EXPECT_EQ(panels.row_major_bytes(), std::string(stored.begin(), stored.end()));
      for (const Index r : {Index(0), s.out / 2, s.out - 1}) {
        std::vector<float> a(static_cast<std::size_t>(s.in)), b(a.size());
        row_major.row(r, a.data());
        panels.row(r, b.data());
        EXPECT_EQ(a, b) << "row " << r;
      }
      for (const Index rows : {1, 2, 3, 4, 5, 13, 40}) {
        const Matrix<float> x = random_matrix<float>(rows, s.in, rng);  // [rows, in]
        Matrix<float> want(rows, s.out), got(rows, s.out);               // [rows, out]
        gqe::linear<float>(x, row_major, want);
        gqe::linear<float>(x, panels, got);
        EXPECT_TRUE((got.array() == want.array()).all()) << rows << " rows";
        if (s.out < 3 * W) continue;
        // Rows gathered from x (reversed) against every whole panel from row W on (enough of them
        // at out = 300 for one row's kPanelsAtOnce at a time).
        std::vector<const float*> gathered;
        for (Index i = rows - 1; i >= 0; --i) gathered.push_back(x.row(i).data());
        const Index n = (s.out - W) / W * W;
        Matrix<float> block_want(rows, n), block_got(rows, n);  // [rows, n]
        gqe::backend::weight_product<float>(rows, n, s.in, gathered.data(), gqe::rows_from(row_major.matrix(), W), block_want.data(), n);
        gqe::backend::weight_product<float>(rows, n, s.in, gathered.data(), gqe::rows_from(panels.matrix(), W), block_got.data(), n);
        EXPECT_TRUE((block_got.array() == block_want.array()).all()) << rows << " gathered rows";
      }
    }
}

// linear(..., accumulate) adds x W^T to y where it lies (the residual stream): y0 + x W^T against
// the float64 reference, through every path a product can take (a decode step's in-place or panel
// kernels, a prefill's packed ones, a depth past one block, the backend's sgemm for F32 row-major
// weights), leaving the columns around y alone. With the library's kernels each row also has the
// bits it has among 40 rows (a decode step adds to the hidden state as a prefill does).
TEST(OpsLinear, AccumulateAddsTheProductToTheOutput) {
  std::mt19937 rng(53);
  struct Size {
    Index in, out;
  };
  const bool own_kernels = std::string(gqe::backend::kName) == "eigen";
  for (const gqe::DType dtype : {gqe::DType::F32, gqe::DType::BF16, gqe::DType::F16})
    for (const bool panels : {false, true})
      for (const Size s : {Size{7, 33}, Size{67, 45}, Size{517, 97}, Size{1300, 70}}) {
        SCOPED_TRACE(std::string(gqe::dtype_name(dtype)) + (panels ? " panels " : " ") + std::to_string(s.in) + " -> " +
                     std::to_string(s.out));
        const std::size_t size = gqe::dtype_size(dtype);
        const Matrix<float> values = random_matrix<float>(s.out, s.in, rng);  // [out, in]
        std::vector<unsigned char> stored(static_cast<std::size_t>(values.size()) * size);
        const MatrixD widened = store_as(values, dtype, stored.data());  // [out, in]
        gqe::Weight weight(gqe::Shape{s.out, s.in});
        weight.borrow(stored.data(), dtype, nullptr);
        if (panels) weight.lay_out_in_panels([](const void*, std::size_t) {});
        const Matrix<float> x = random_matrix<float>(40, s.in, rng);  // [40, in]
        const Matrix<float> y0 = random_matrix<float>(40, s.out, rng);  // [40, out]
        const MatrixD want = to_double(y0) + reference_linear(to_double(x), widened);
        Matrix<float> wide = Matrix<float>::Constant(40, s.out + 5, 777.0f);  // [40, out + 5], y at columns 2..
        wide.middleCols(2, s.out) = y0;
        gqe::linear<float>(x, weight, wide.middleCols(2, s.out), true);
        EXPECT_LT(relative_error(wide.middleCols(2, s.out), want), linear_tolerance<float>(s.in + 1));
        EXPECT_TRUE((wide.leftCols(2).array() == 777.0f).all() && (wide.rightCols(3).array() == 777.0f).all());
        for (const Index rows : {1, 3, 4}) {
          Matrix<float> few = y0.middleRows(5, rows);  // [rows, out]
          gqe::linear<float>(Matrix<float>(x.middleRows(5, rows)), weight, few, true);
          EXPECT_LT(relative_error(few, want.middleRows(5, rows)), linear_tolerance<float>(s.in + 1)) << rows << " rows";
          if (own_kernels) {
            EXPECT_TRUE((few.array() == wide.middleCols(2, s.out).middleRows(5, rows).array()).all()) << rows << " rows";
          }
        }
      }
}

// ---- causal attention ---------------------------------------------------------------------------

// One QueryGroup entry of a test: `heads` query heads over `past` cached keys and `count` new
// queries, each in its own strided buffers.
struct EntrySpec {
  Index past, count, heads;
};

template <class S>
struct EntryBuffers {
  static constexpr Index kQueryPad = 5, kQueryOffset = 3;  // query columns inside a wider matrix
  static constexpr Index kOutPad = 7, kOutOffset = 2;
  static constexpr S kSentinel = S(-4242);
  EntrySpec spec;
  Index head_dim;
  Matrix<S> query;  // [count, heads*d_h + kQueryPad], heads at columns kQueryOffset + q*d_h
  Matrix<S> kv;     // [past + count, 3*d_h + 1]: K at columns 1.., V at columns 1 + 2*d_h..
  Matrix<S> out;    // [count, heads*d_h + kOutPad], heads at columns kOutOffset + q*d_h
  gqe::AttentionCache<S> cache;  // kv's rows in the kernel's tiles, one KV head

  EntryBuffers(EntrySpec s, Index dh, std::mt19937& rng) : spec(s), head_dim(dh), cache(one_head(dh)) {
    // Scores q.k / sqrt(d_h) of standard deviation 1.5^2: peaked enough that the mask matters.
    query = random_matrix<S>(s.count, s.heads * dh + kQueryPad, rng, 1.5);
    kv = random_matrix<S>(s.past + s.count, 3 * dh + 1, rng, 1.5);
    out = Matrix<S>::Constant(s.count, s.heads * dh + kOutPad, kSentinel);
    cache.reserve(s.past + s.count);
    for (Index j = 0; j < s.past + s.count; ++j) cache.write(j, kv.row(j).data() + 1, kv.row(j).data() + 1 + 2 * dh);
  }
  static gqe::AttentionConfig one_head(Index dh) {
    gqe::AttentionConfig c;
    c.num_kv_heads = 1;
    c.head_dim = dh;
    return c;
  }
  gqe::QueryGroup<S> head() {
    gqe::QueryGroup<S> h;
    h.query = query.data() + kQueryOffset;
    h.query_stride = query.cols();
    h.kv = cache.head(0);
    h.out = out.data() + kOutOffset;
    h.out_stride = out.cols();
    h.past = spec.past;
    h.count = spec.count;
    h.heads = spec.heads;
    return h;
  }
  // Query i of the chunk sits at position past + i and sees keys 0 .. past + i (bottom-right mask):
  // out = softmax(q K^T / sqrt(d_h)) V over those keys. Result [count, heads*d_h].
  MatrixD reference() const {
    const Index dh = head_dim;
    MatrixD result(spec.count, spec.heads * dh);
    const double scale = 1.0 / std::sqrt(static_cast<double>(dh));
    for (Index q = 0; q < spec.heads; ++q)
      for (Index i = 0; i < spec.count; ++i) {
        const Index keys = spec.past + i + 1;
        std::vector<double> scores(static_cast<std::size_t>(keys));
        for (Index j = 0; j < keys; ++j) {
          double dot = 0;
          for (Index c = 0; c < dh; ++c)
            dot += static_cast<double>(query(i, kQueryOffset + q * dh + c)) * static_cast<double>(kv(j, 1 + c));
          scores[static_cast<std::size_t>(j)] = dot * scale;
        }
        const auto p = reference_softmax(scores);
        for (Index c = 0; c < dh; ++c) {
          double acc = 0;
          for (Index j = 0; j < keys; ++j) acc += p[static_cast<std::size_t>(j)] * static_cast<double>(kv(j, 1 + 2 * dh + c));
          result(i, q * dh + c) = acc;
        }
      }
    return result;
  }
  // Queries [past, past + count) of head(), after `past` cached positions: one piece of a sequence
  // cut into chunks or decode steps.
  gqe::QueryGroup<S> piece(Index past, Index count) {
    gqe::QueryGroup<S> g = head();
    g.query += past * g.query_stride;
    g.out += past * g.out_stride;
    g.past = past;
    g.count = count;
    return g;
  }
  auto result() const { return out.middleCols(kOutOffset, spec.heads * head_dim); }
  bool padding_untouched() const {
    return (out.leftCols(kOutOffset).array() == kSentinel).all() &&
           (out.rightCols(kOutPad - kOutOffset).array() == kSentinel).all();
  }
};

// Scores carry about sqrt(d_h) u of error relative to their size, which exp turns into relative
// errors of the probabilities; the weighted sum of up to L values adds about sqrt(L) u relative to
// its result; the online softmax rescales a few more times per key tile. Allowed:
// 4 (sqrt(d_h) + sqrt(L) + 4) eps, norm-wise over each entry's output.
template <class S>
double attention_tolerance(Index head_dim, Index keys) {
  return 4 * (std::sqrt(static_cast<double>(head_dim)) + std::sqrt(static_cast<double>(keys)) + 4) * eps<S>();
}

// Runs all specs as one causal_attention call and checks every entry against the reference.
template <class S>
void check_attention(Index head_dim, const std::vector<EntrySpec>& specs, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<EntryBuffers<S>> buffers;
  for (const auto& s : specs) buffers.emplace_back(s, head_dim, rng);
  std::vector<gqe::QueryGroup<S>> heads;
  for (auto& b : buffers) heads.push_back(b.head());
  gqe::causal_attention(heads, head_dim, S(1) / std::sqrt(S(head_dim)));
  for (const auto& b : buffers) {
    SCOPED_TRACE("d_h = " + std::to_string(head_dim) + ", past = " + std::to_string(b.spec.past) +
                 ", count = " + std::to_string(b.spec.count) + ", heads = " + std::to_string(b.spec.heads));
    const MatrixD ref = b.reference();
    EXPECT_LT(relative_error(b.result(), ref), attention_tolerance<S>(head_dim, b.spec.past + b.spec.count));
    // The last query row alone: an error confined to late positions must not hide in the norm.
    const Index last = b.spec.count - 1;
    EXPECT_LT((to_double(b.result().row(last)) - ref.row(last)).norm() / ref.row(last).norm(),
              attention_tolerance<S>(head_dim, b.spec.past + b.spec.count));
    EXPECT_TRUE(b.padding_untouched()) << "attention wrote outside its output columns";
  }
}

TYPED_TEST(OpsTest, AttentionPrefillMatchesTheCausalReference) {
  for (Index dh : {6, 10, 64})
    for (Index count : {1, 7, 63, 65, 130, 200, 300}) {
      const Index heads = 1 + count % 3;  // 1 to 3 query heads per KV head
      check_attention<TypeParam>(dh, {{0, count, heads}}, static_cast<unsigned>(100 + dh + count));
    }
}

TYPED_TEST(OpsTest, AttentionChunkAfterAPastIsAlignedBottomRight) {
  for (Index dh : {6, 10, 64})
    for (Index past : {5, 130})
      for (Index count : {3, 70})
        check_attention<TypeParam>(dh, {{past, count, 2}}, static_cast<unsigned>(200 + dh + past + count));
  // More than one query tile after more than one key tile of past.
  check_attention<TypeParam>(10, {{300, 130, 1}}, 299);
}

TYPED_TEST(OpsTest, AttentionDecodeSeesTheWholePast) {
  for (Index dh : {6, 10, 64})
    for (Index past : {0, 1, 6, 127, 255, 256, 511, 512, 600})
      for (Index heads : {1, 2, 3, 13})  // 1, 2 rows: gemm's wide tiles; 13: more than one register tile
        check_attention<TypeParam>(dh, {{past, 1, heads}}, static_cast<unsigned>(300 + dh + past + heads));
}

// Keys come in chunks of kKeyChunk positions, merged in order; a decode step over more than one
// chunk runs them as separate units. Queries before, at and after chunk boundaries, alone and
// beside a prefill entry (which takes the one-unit-per-query-tile path).
TYPED_TEST(OpsTest, AttentionAcrossKeyChunksMatchesTheCausalReference) {
  constexpr Index C = gqe::detail::kKeyChunk;
  for (Index past : {C - 1, C, 2 * C + 37})
    for (Index heads : {1, 2, 5}) check_attention<TypeParam>(6, {{past, 1, heads}}, static_cast<unsigned>(700 + past + heads));
  check_attention<TypeParam>(6, {{C - 3, 7, 2}, {2 * C + 1, 2, 1}}, 710);  // short chunks that cross a boundary
  check_attention<TypeParam>(6, {{C + 5, 1, 2}, {0, 200, 2}}, 711);        // decode beside a prefill
}

TYPED_TEST(OpsTest, AttentionEntriesOfDifferentLengthsInOneCall) {
  // As a batch of segments: each entry has its own past and count and number of tiles.
  const std::vector<EntrySpec> mixed = {{0, 300, 2}, {130, 3, 1}, {600, 1, 3}, {5, 70, 3}, {0, 1, 1}};
  check_attention<TypeParam>(10, mixed, 400);
  check_attention<TypeParam>(64, mixed, 401);
}

// A query's output depends on its own position and values only: the same bits when its sequence
// is run as one prefill, in chunks appended to the cache, or one token at a time.
TYPED_TEST(OpsTest, AttentionGivesEachQueryTheSameBitsHoweverTheSequenceIsCut) {
  using S = TypeParam;
  for (const Index dh : {10, 64}) {
    std::mt19937 rng(static_cast<unsigned>(600 + dh));
    EntryBuffers<S> b({0, 300, 2}, dh, rng);
    const auto run = [&](const std::vector<std::pair<Index, Index>>& cuts) {  // (past, count) pieces
      b.out.setConstant(EntryBuffers<S>::kSentinel);
      std::vector<gqe::QueryGroup<S>> groups;
      for (const auto& [past, count] : cuts) groups.push_back(b.piece(past, count));
      gqe::causal_attention(groups, dh, S(1) / std::sqrt(S(dh)));
      return Matrix<S>(b.result());
    };
    const Matrix<S> prefill = run({{0, 300}});
    EXPECT_TRUE((run({{0, 1}, {1, 129}, {130, 71}, {201, 99}}).array() == prefill.array()).all()) << "chunks, d_h " << dh;
    std::vector<std::pair<Index, Index>> steps;
    for (Index t = 0; t < 300; ++t) steps.emplace_back(t, 1);
    EXPECT_TRUE((run(steps).array() == prefill.array()).all()) << "one at a time, d_h " << dh;
  }
}

// The same past a key chunk: a prefill merges a query's chunks in turn, decode steps (the chunks
// as separate units, merged after) and short chunks must give the same bits.
TYPED_TEST(OpsTest, AttentionGivesTheSameBitsAcrossKeyChunksHoweverTheSequenceIsCut) {
  using S = TypeParam;
  constexpr Index C = gqe::detail::kKeyChunk, T = C + 200, dh = 6;
  std::mt19937 rng(800);
  EntryBuffers<S> b({0, T, 2}, dh, rng);
  const auto run = [&](const std::vector<std::pair<Index, Index>>& cuts) {  // (past, count): one call each, in order
    b.out.setConstant(EntryBuffers<S>::kSentinel);
    for (const auto& [past, count] : cuts)
      gqe::causal_attention(std::vector<gqe::QueryGroup<S>>{b.piece(past, count)}, dh, S(1) / std::sqrt(S(dh)));
    return Matrix<S>(b.result().bottomRows(T - (C - 40)));  // the rows around and past the boundary
  };
  const Matrix<S> prefill = run({{0, T}});
  std::vector<std::pair<Index, Index>> cuts{{0, C - 40}};
  for (Index t = C - 40; t < T;) {  // steps of 1, 2 and 3 queries
    const Index count = std::min<Index>(1 + t % 3, T - t);
    cuts.emplace_back(t, count);
    t += count;
  }
  EXPECT_TRUE((run(cuts).array() == prefill.array()).all()) << "decode steps and short chunks";
  for (int threads : {1, 3}) {
    gqe::set_num_threads(threads);
    EXPECT_TRUE((run(cuts).array() == prefill.array()).all()) << "threads " << threads;
  }
}

TYPED_TEST(OpsTest, AttentionIsBitIdenticalForAnyThreadCount) {
  using S = TypeParam;
  const std::vector<EntrySpec> mixed = {{0, 300, 2}, {130, 70, 1}, {600, 1, 3}};
  std::vector<std::vector<S>> results;  // every entry's output buffer, concatenated
  for (int threads : {1, 2, 3}) {
    gqe::set_num_threads(threads);
    std::mt19937 rng(500);  // the same inputs every time
    std::vector<EntryBuffers<S>> buffers;
    for (const auto& s : mixed) buffers.emplace_back(s, 10, rng);
    std::vector<gqe::QueryGroup<S>> heads;
    for (auto& b : buffers) heads.push_back(b.head());
    gqe::causal_attention(heads, 10, S(1) / std::sqrt(S(10)));
    std::vector<S> all;
    for (const auto& b : buffers) all.insert(all.end(), b.out.data(), b.out.data() + b.out.size());
    results.push_back(all);
  }
  for (std::size_t i = 1; i < results.size(); ++i)
    EXPECT_TRUE(results[i] == results[0]) << "threads " << i + 1 << " differ from 1 thread";
}

}  // namespace
