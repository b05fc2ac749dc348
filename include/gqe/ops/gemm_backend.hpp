#pragma once
// Who computes the products with the weights (projections, gathered expert queries, feed-forward,
// head): the library's own kernels (gemm_bt, the default), or OpenBLAS / oneDNN when gqe is built
// with GQE_GEMM=openblas or onednn (compile definitions GQE_GEMM_OPENBLAS / GQE_GEMM_ONEDNN, carried
// by the gqe::gqe target). Attention tiles and 16-bit weights always use the library's kernels.
//
// Batch invariance holds with every backend: a backend's kernels choose their blocking and their
// edge code by the product's size, so the library hands it fixed blocks of kBackendRows rows (the
// last one padded with zero rows): every row is computed by the same code path whatever else
// shares the call. Each block is computed single-threaded inside one of the library's work units,
// and the host program's thread settings of the backend are restored after every call.
#include <algorithm>
#include <mutex>
#include <type_traits>
#include <vector>

#include "gqe/ops/gemm.hpp"
#include "gqe/tensor/dtype.hpp"
#include "gqe/tensor/tensor.hpp"

#if defined(GQE_GEMM_OPENBLAS) && defined(GQE_GEMM_ONEDNN)
#error "GQE_GEMM_OPENBLAS and GQE_GEMM_ONEDNN are exclusive: choose one backend"
#endif
#if defined(GQE_GEMM_OPENBLAS)
#include <cblas.h>
#elif defined(GQE_GEMM_ONEDNN)
#include <dnnl.h>
#include <omp.h>
#endif

namespace gqe::backend {

#if defined(GQE_GEMM_OPENBLAS)
inline constexpr const char* kName = "openblas";
#elif defined(GQE_GEMM_ONEDNN)
inline constexpr const char* kName = "onednn";
#else
inline constexpr const char* kName = "eigen";
#endif

#if defined(GQE_GEMM_OPENBLAS) || defined(GQE_GEMM_ONEDNN)
// Rows per backend call.
inline constexpr Index kBackendRows = 64;

namespace detail {

#if defined(GQE_GEMM_OPENBLAS)
// OpenBLAS's thread count is one global setting. While any of the library's calls runs it is 1 (the
// library's pool supplies the parallelism); the first call in saves the host's value, the last one
// out restores it.
class OpenBlasSingleThread {
 public:
  OpenBlasSingleThread() {
    std::lock_guard<std::mutex> lock(mutex());
    if (users()++ == 0) {
      saved() = openblas_get_num_threads();
      openblas_set_num_threads(1);
    }
  }
  ~OpenBlasSingleThread() {
    std::lock_guard<std::mutex> lock(mutex());
    if (--users() == 0) openblas_set_num_threads(saved());
  }
  OpenBlasSingleThread(const OpenBlasSingleThread&) = delete;
  OpenBlasSingleThread& operator=(const OpenBlasSingleThread&) = delete;

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static int& users() {
    static int n = 0;
    return n;
  }
  static int& saved() {
    static int n = 1;
    return n;
  }
};
#endif

// One block of exactly kBackendRows rows: c [rows, n] = a [rows, k] w^T, in float.
inline void float_block(Index n, Index k, const float* a, Index lda, const float* w, Index ldw, float* c, Index ldc) {
#if defined(GQE_GEMM_OPENBLAS)
  const OpenBlasSingleThread single;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(kBackendRows), static_cast<int>(n),
              static_cast<int>(k), 1.0f, a, static_cast<int>(lda), w, static_cast<int>(ldw), 0.0f, c, static_cast<int>(ldc));
#else
  // oneDNN runs on OpenMP: this thread's own team size is set to one for the call and restored.
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const dnnl_status_t status = dnnl_sgemm('N', 'T', kBackendRows, n, k, 1.0f, a, lda, w, ldw, 0.0f, c, ldc);
  omp_set_num_threads(saved);
  if (status != dnnl_success) fail<Error>("oneDNN's sgemm failed with status ", static_cast<int>(status));
#endif
}

}  // namespace detail
#endif

// C [m, n] = A [m, k] W^T with W stored [n, k] (see gemm_bt). Single-threaded.
template <class Scalar>
void weight_product(Index m, Index n, Index k, const Scalar* a, Index lda, const WeightMatrix& w, Scalar* c, Index ldc) {
#if defined(GQE_GEMM_OPENBLAS) || defined(GQE_GEMM_ONEDNN)
  if constexpr (std::is_same_v<Scalar, float>) {
    if (w.dtype == DType::F32 && k > 0) {
      const auto* weights = static_cast<const float*>(w.data);
      thread_local std::vector<float> padded_a, padded_c;
      for (Index i0 = 0; i0 < m; i0 += kBackendRows) {
        const Index rows = std::min(kBackendRows, m - i0);
        if (rows == kBackendRows) {
          detail::float_block(n, k, a + i0 * lda, lda, weights, w.stride, c + i0 * ldc, ldc);
          continue;
        }
        padded_a.assign(static_cast<std::size_t>(kBackendRows * k), 0.0f);
        padded_c.resize(static_cast<std::size_t>(kBackendRows * n));
        for (Index i = 0; i < rows; ++i) std::copy_n(a + (i0 + i) * lda, k, padded_a.data() + i * k);
        detail::float_block(n, k, padded_a.data(), k, weights, w.stride, padded_c.data(), n);
        for (Index i = 0; i < rows; ++i) std::copy_n(padded_c.data() + i * n, n, c + (i0 + i) * ldc);
      }
      return;
    }
  }
#endif
  gemm_bt<Scalar>(m, n, k, a, lda, w, c, ldc);
}

}  // namespace gqe::backend
