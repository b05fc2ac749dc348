#pragma once
// y = x W^T, the projection of every layer (W is [out, in] like torch, in any stored dtype), and its
// backward pass. The products are split into units of (rows, columns) fixed by the shapes alone,
// each computed single-threaded by the kernels of gemm.hpp, and the units are spread over the
// library's pool: bit-identical results whatever the thread count, and (the kernels' property)
// whatever other rows share the call.
#include <algorithm>
#include <vector>

#include "gqe/ops/gemm.hpp"
#include "gqe/ops/gemm_backend.hpp"
#include "gqe/tensor/eigen.hpp"
#include "gqe/tensor/tensor.hpp"
#include "gqe/tensor/weight.hpp"
#include "gqe/util/thread_pool.hpp"

namespace gqe {
namespace detail {
// Rows of x per unit: at most kLinearRowTile, fewer where W's columns make fewer than
// kLinearMinUnits units (a narrow W, such as GQE's shared query head or the router, would leave all
// but one thread idle), but not under kLinearMinRows. The rows of a unit are a multiple of 12, every
// build's register tile. A function of the shapes alone, so the results never depend on the
// thread count.
constexpr Index kLinearRowTile = 1024, kLinearMinUnits = 2, kLinearMinRows = 96;
inline Index linear_row_tile(Index rows, Index col_tiles) {
  const Index row_tiles = std::max((rows + kLinearRowTile - 1) / kLinearRowTile, (kLinearMinUnits + col_tiles - 1) / std::max<Index>(col_tiles, 1));
  const Index tile = ((rows + row_tiles - 1) / row_tiles + 11) / 12 * 12;
  return std::clamp<Index>(tile, std::min(kLinearMinRows, std::max<Index>(rows, 1)), kLinearRowTile);
}
// Columns (rows of W) per unit: about 512 KB of W per MB of L2 for a product of many rows, the
// panels a unit packs for one depth block and keeps in cache (a deeper W is packed a block at a
// time, so its depth past a block does not narrow the unit: [4096 x 2816] x [2816 x 1024] 1.09x
// as fast with 256 columns as with 64); 512 KB for a decode step (kFewRows rows or fewer), which
// streams W once, all of its depth. A multiple of 32, so that units start on a panel of a
// panel-laid W, and at least two panels, which a decode step streams side by side (one alone
// leaves a row's chains waiting on each other); at least four for one row against a panel-laid W,
// which gemm streams four at a time.
inline Index linear_col_tile(Index in, Index rows, bool panels) {
  static_assert(32 % kPanelWidth == 0);
  constexpr Index kMin = std::max<Index>(32, 2 * kPanelWidth);
  const Index bytes = (Index(512) << 10) * (rows <= kFewRows ? 1 : l2_scale());
  const Index depth = rows <= kFewRows ? in : std::min(in, GemmShape<float>::packed_depth());
  const Index least = rows == 1 && panels ? std::max<Index>(kMin, kPanelsAtOnce * kPanelWidth) : kMin;
  return std::clamp<Index>(bytes / (4 * std::max<Index>(depth, 1)) / 32 * 32, least, 256);
}
}  // namespace detail

// y [R, out] = x [R, in] * W^T, W stored [out, in]; with accumulate, y += x W^T (a residual stream
// added to where it lies: each output's chain starts from y's value). y must not alias x.
template <class Scalar>
void linear(const Eigen::Ref<const Matrix<Scalar>>& x, const WeightMatrix& w, Eigen::Ref<Matrix<Scalar>> y, bool accumulate = false) {
  assert(y.rows() == x.rows());
  const Index rows = x.rows(), cols = y.cols(), in = x.cols();
  const Index col_tile = detail::linear_col_tile(in, rows, w.panels), col_tiles = (cols + col_tile - 1) / col_tile;
  const Index row_tile = detail::linear_row_tile(rows, col_tiles), row_tiles = (rows + row_tile - 1) / row_tile;
  thread_pool().parallel_for(row_tiles * col_tiles, [&](Index unit) {
    const Index r0 = (unit / col_tiles) * row_tile, c0 = (unit % col_tiles) * col_tile;
    const Index nr = std::min(row_tile, rows - r0), nc = std::min(col_tile, cols - c0);
    backend::weight_product<Scalar>(nr, nc, in, x.data() + r0 * x.outerStride(), x.outerStride(), rows_from(w, c0),
                                    y.data() + r0 * y.outerStride() + c0, y.outerStride(), accumulate);
  }, 2.0 * static_cast<double>(rows) * static_cast<double>(cols) * static_cast<double>(in));
}

template <class Scalar>
void linear(const Eigen::Ref<const Matrix<Scalar>>& x, const Weight& w, Eigen::Ref<Matrix<Scalar>> y, bool accumulate = false) {
  assert(w.cols() == x.cols() && w.rows() == y.cols());
  linear<Scalar>(x, w.matrix(), y, accumulate);
}
// The same with the weight given as a matrix [out, in] of Scalar.
template <class Scalar>
void linear(const Eigen::Ref<const Matrix<Scalar>>& x, const Eigen::Ref<const Matrix<Scalar>>& w, Eigen::Ref<Matrix<Scalar>> y,
            bool accumulate = false) {
  assert(w.cols() == x.cols() && w.rows() == y.cols());
  linear<Scalar>(x, WeightMatrix{w.data(), dtype_of<Scalar>(), w.outerStride()}, y, accumulate);
}

// For y [R, out] = x [R, in] W^T: dx [R, in] = dy W (or += when accumulate_dx; skipped when dx is
// empty) and dW [out, in] += dy^T x. Units of dW own whole output blocks; a small dW (fewer blocks
// than kMinWeightBlocks) also cuts its depth, the rows, into fixed runs whose partial sums are added
// in run order. Both cuts follow the shapes alone: bit-identical gradients for every thread count.
template <class Scalar>
void linear_backward(const Eigen::Ref<const Matrix<Scalar>>& x, const WeightMatrix& w, const Eigen::Ref<const Matrix<Scalar>>& dy,
                     Eigen::Ref<Matrix<Scalar>> dx, bool accumulate_dx, Eigen::Ref<Matrix<Scalar>> dw) {
  const Index rows = x.rows(), in = x.cols(), out = dy.cols();
  assert(dy.rows() == rows && dw.rows() == out && dw.cols() == in && !w.panels);  // trained weights are row-major
  constexpr Index kTile = 256;
  const double flops = 2.0 * static_cast<double>(rows) * static_cast<double>(in) * static_cast<double>(out);
  if (rows == 0) return;
  const Index in_tiles = (in + kTile - 1) / kTile;
  if (dx.size() > 0) {
    assert(dx.rows() == rows && dx.cols() == in);
    const Index row_tiles = (rows + kTile - 1) / kTile;
    thread_pool().parallel_for(row_tiles * in_tiles, [&](Index unit) {
      const Index r0 = (unit / in_tiles) * kTile, c0 = (unit % in_tiles) * kTile;
      const Index nr = std::min(kTile, rows - r0), nc = std::min(kTile, in - c0);
      const RhsMatrix b{static_cast<const unsigned char*>(w.data) + static_cast<std::size_t>(c0) * dtype_size(w.dtype), w.dtype,
                        w.stride, false};
      gemm<Scalar>(nr, nc, out, LhsMatrix<Scalar>{dy.data() + r0 * dy.outerStride(), dy.outerStride(), 1}, b,
                   dx.data() + r0 * dx.outerStride() + c0, dx.outerStride(), accumulate_dx);
    }, flops);
  }
  constexpr Index kOutTile = 64, kMinWeightBlocks = 4, kDepthRun = 512;
  const Index out_tiles = (out + kOutTile - 1) / kOutTile, blocks = out_tiles * in_tiles;
  const Index runs = blocks >= kMinWeightBlocks ? 1 : (rows + kDepthRun - 1) / kDepthRun;
  const Index run_rows = runs == 1 ? rows : kDepthRun;
  thread_local std::vector<Scalar> partial_sums;  // [runs - 1][out, in]: runs 1.. (run 0 adds to dW itself)
  if (runs > 1) partial_sums.resize(static_cast<std::size_t>((runs - 1) * out * in));
  Scalar* const partials = partial_sums.data();  // the calling thread's buffer, which the workers fill
  thread_pool().parallel_for(blocks * runs, [&](Index unit) {
    const Index block = unit % blocks, run = unit / blocks;
    const Index o0 = (block / in_tiles) * kOutTile, c0 = (block % in_tiles) * kTile, r0 = run * run_rows;
    const Index no = std::min(kOutTile, out - o0), nc = std::min(kTile, in - c0), nr = std::min(run_rows, rows - r0);
    Scalar* target = run == 0 ? dw.data() + o0 * dw.outerStride() + c0 : partials + ((run - 1) * out + o0) * in + c0;
    const Index target_stride = run == 0 ? dw.outerStride() : in;
    gemm<Scalar>(no, nc, nr, LhsMatrix<Scalar>{dy.data() + r0 * dy.outerStride() + o0, 1, dy.outerStride()},
                 rhs_of(x.data() + r0 * x.outerStride() + c0, x.outerStride(), false), target, target_stride, run == 0);
  }, flops);
  for (Index run = 1; run < runs; ++run)
    dw += Eigen::Map<const Matrix<Scalar>>(partials + (run - 1) * out * in, out, in);
}

}  // namespace gqe
