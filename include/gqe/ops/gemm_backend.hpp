#pragma once
// Who computes the products with the weights (projections, gathered expert queries, feed-forward,
// head): the library's own kernels (gemm_bt, the default), or OpenBLAS / oneDNN when gqe is built
// with GQE_GEMM=openblas or onednn (compile definitions GQE_GEMM_OPENBLAS / GQE_GEMM_ONEDNN, carried
// by the gqe::gqe target). Attention tiles and 16-bit weights always use the library's kernels.
//
// Each product is computed single-threaded inside one of the library's work units, which are fixed
// by the shapes, so results stay bit-identical for every thread count with every backend; the host
// program's thread settings of the backend are restored after every call. Batch invariance (a row's
// bits independent of the other rows of the product) is the library's own kernels' property: a
// backend's kernels pick their code path by the product's size and by where a row falls in their
// register blocks, so with openblas or onednn a token's result may change with its companions.
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

// c [m, n] = a [m, k] w^T (or += when accumulate) in float, on this thread.
inline void float_product(Index m, Index n, Index k, const float* a, Index lda, const float* w, Index ldw, float* c, Index ldc,
                          bool accumulate) {
  const float beta = accumulate ? 1.0f : 0.0f;
#if defined(GQE_GEMM_OPENBLAS)
  const OpenBlasSingleThread single;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), 1.0f, a,
              static_cast<int>(lda), w, static_cast<int>(ldw), beta, c, static_cast<int>(ldc));
#else
  // oneDNN runs on OpenMP: this thread's own team size is set to one for the call and restored.
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const dnnl_status_t status = dnnl_sgemm('N', 'T', m, n, k, 1.0f, a, lda, w, ldw, beta, c, ldc);
  omp_set_num_threads(saved);
  if (status != dnnl_success) fail<Error>("oneDNN's sgemm failed with status ", static_cast<int>(status));
#endif
}

}  // namespace detail
#endif

// C [m, n] = A [m, k] W^T (accumulate: C += A W^T) with W stored [n, k] (gemm_bt). Single-threaded.
template <class Scalar>
void weight_product(Index m, Index n, Index k, const Scalar* a, Index lda, const WeightMatrix& w, Scalar* c, Index ldc,
                    bool accumulate = false) {
#if defined(GQE_GEMM_OPENBLAS) || defined(GQE_GEMM_ONEDNN)
  if constexpr (std::is_same_v<Scalar, float>) {
    if (w.dtype == DType::F32 && !w.panels && k > 0) {  // 16-bit and panel-laid weights stay with the library's kernels
      detail::float_product(m, n, k, a, lda, static_cast<const float*>(w.data), w.stride, c, ldc, accumulate);
      return;
    }
  }
#endif
  gemm_bt<Scalar>(m, n, k, a, lda, w, c, ldc, accumulate);
}

// The same with A's row i at rows[i] (k consecutive values each): rows gathered from anywhere.
// The library's kernels read them where they are; a backend gets them copied together first.
template <class Scalar>
void weight_product(Index m, Index n, Index k, const Scalar* const* rows, const WeightMatrix& w, Scalar* c, Index ldc) {
#if defined(GQE_GEMM_OPENBLAS) || defined(GQE_GEMM_ONEDNN)
  if constexpr (std::is_same_v<Scalar, float>) {
    if (w.dtype == DType::F32 && !w.panels && k > 0) {
      thread_local std::vector<float> gathered;
      gathered.resize(static_cast<std::size_t>(m * k));
      for (Index i = 0; i < m; ++i) std::copy_n(rows[i], k, gathered.data() + i * k);
      detail::float_product(m, n, k, gathered.data(), k, static_cast<const float*>(w.data), w.stride, c, ldc, false);
      return;
    }
  }
#endif
  gemm<Scalar>(m, n, k, LhsMatrix<Scalar>{nullptr, 0, 1, rows}, RhsMatrix{w.data, w.dtype, w.stride, true, w.panels}, c, ldc, false);
}

}  // namespace gqe::backend
