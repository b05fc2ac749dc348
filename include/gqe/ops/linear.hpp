#pragma once
// Y = X W^T, the projection of every layer (W is [out, in] like torch). The product is split into
// tiles fixed by the shapes alone, each tile one single-threaded GEMM, and the tiles are spread over
// the library's pool: the result is bit-identical whatever the thread count.
#include "gqe/tensor/eigen.hpp"

#include "gqe/tensor/tensor.hpp"
#include "gqe/util/thread_pool.hpp"

#ifdef GQE_USE_BLAS
#include <cblas.h>
#endif

namespace gqe {
namespace detail {
// Tile sizes: large enough that each GEMM runs near the machine's rate, small enough to share
// out among threads. Rows of X per tile, output features per tile.
constexpr Index kLinearRowTile = 256;
constexpr Index kLinearColTile = 256;

// Products of fewer rows (a decode step's) stay with Eigen under GQE_USE_BLAS: each OpenBLAS call
// has a fixed cost that a single row's product does not repay. Fixed by the shape alone, so
// results stay bit-identical for every thread count.
constexpr Index kBlasMinRows = 16;

// One tile, single-threaded: y = x w^T.
template <class Scalar, class X, class W, class Y>
void gemm_tile(const X& x, const W& w, Y&& y) {
#ifdef GQE_USE_BLAS
  if constexpr (std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>) {
    if (x.rows() < kBlasMinRows) {
      y.noalias() = x * w.transpose();
      return;
    }
    // The library parallelises over tiles itself: OpenBLAS's own threads would change its blocking
    // with the thread count (results no longer bit-identical) and oversubscribe the cores.
    static const bool pinned = (openblas_set_num_threads(1), true);
    (void)pinned;
    const auto m = static_cast<int>(x.rows()), n = static_cast<int>(w.rows()), k = static_cast<int>(x.cols());
    const auto lda = static_cast<int>(x.outerStride()), ldb = static_cast<int>(w.outerStride()),
               ldc = static_cast<int>(y.outerStride());
    if constexpr (std::is_same_v<Scalar, float>)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, x.data(), lda, w.data(), ldb, 0.0f,
                  y.data(), ldc);
    else
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0, x.data(), lda, w.data(), ldb, 0.0,
                  y.data(), ldc);
    return;
  }
#endif
  y.noalias() = x * w.transpose();
}
}  // namespace detail

// y [R, out] = x [R, in] * w^T, w [out, in]. y must not alias x or w.
template <class Scalar>
void linear(const Eigen::Ref<const Matrix<Scalar>>& x, const Matrix<Scalar>& w, Eigen::Ref<Matrix<Scalar>> y) {
  assert(x.cols() == w.cols() && y.rows() == x.rows() && y.cols() == w.rows());
  const Index rows = x.rows(), cols = w.rows();
  const Index row_tiles = (rows + detail::kLinearRowTile - 1) / detail::kLinearRowTile;
  const Index col_tiles = (cols + detail::kLinearColTile - 1) / detail::kLinearColTile;
  thread_pool().parallel_for(row_tiles * col_tiles, [&](Index unit) {
    const Index r0 = (unit / col_tiles) * detail::kLinearRowTile, c0 = (unit % col_tiles) * detail::kLinearColTile;
    const Index nr = std::min(detail::kLinearRowTile, rows - r0), nc = std::min(detail::kLinearColTile, cols - c0);
    detail::gemm_tile<Scalar>(x.middleRows(r0, nr), w.middleRows(c0, nc), y.block(r0, c0, nr, nc));
  }, 2.0 * static_cast<double>(rows) * static_cast<double>(cols) * static_cast<double>(x.cols()));
}

}  // namespace gqe
