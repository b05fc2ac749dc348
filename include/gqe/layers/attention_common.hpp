#pragma once
// What GQA and GQE attention share: the K/V projections into the cache, RoPE, and the scratch
// buffers that one forward call reuses from the last (no allocation per decoded token).
#include <cmath>
#include <vector>

#include "gqe/layers/attention_cache.hpp"
#include "gqe/layers/attention_config.hpp"
#include "gqe/ops/attention.hpp"
#include "gqe/ops/linear.hpp"
#include "gqe/ops/rope.hpp"
#include "gqe/tensor/tensor.hpp"

namespace gqe {

namespace detail {

template <class Scalar>
struct AttentionWorkspace {
  Matrix<Scalar> key;    // [R, G*d_h]
  Matrix<Scalar> value;  // [R, G*d_h]
  Matrix<Scalar> query;  // [R, heads*d_h]
  Matrix<Scalar> out;    // [R, slots*d_h]
  std::vector<AttentionHead<Scalar>> heads;
};

template <class Scalar>
AttentionWorkspace<Scalar>& attention_workspace() {
  thread_local AttentionWorkspace<Scalar> ws;
  return ws;
}

// K = x Wk^T and V = x Wv^T for all rows, RoPE on K, written to each segment's cache after its
// cached positions (and the mean over groups, when the cache keeps one). Cache lengths are not
// advanced here: the caller advances them once attention has read the old lengths.
template <class Scalar>
void append_key_values(const AttentionConfig& c, const Eigen::Ref<const Matrix<Scalar>>& x,
                       const Matrix<Scalar>& k_proj, const Matrix<Scalar>& v_proj, const RopeTable<Scalar>& rope,
                       const std::vector<Segment<Scalar>>& segments, AttentionWorkspace<Scalar>& ws) {
  const Index G = c.num_kv_heads, dh = c.head_dim, rows = x.rows();
  ws.key.resize(rows, G * dh);
  ws.value.resize(rows, G * dh);
  linear<Scalar>(x, k_proj, ws.key);
  linear<Scalar>(x, v_proj, ws.value);
  apply_rope<Scalar>(ws.key, dh, rope);
  for (const auto& s : segments) {
    AttentionCache<Scalar>& cache = *s.cache;
    cache.ensure(cache.length() + s.count);
    const Index past = cache.length();
    for (Index g = 0; g < G; ++g) {
      MatrixMap<Scalar>(cache.key(g) + past * dh, s.count, dh) = ws.key.block(s.row_begin, g * dh, s.count, dh);
      MatrixMap<Scalar>(cache.value(g) + past * dh, s.count, dh) = ws.value.block(s.row_begin, g * dh, s.count, dh);
    }
    if (cache.has_mean()) {
      auto mean_k = MatrixMap<Scalar>(cache.mean_key() + past * dh, s.count, dh);
      auto mean_v = MatrixMap<Scalar>(cache.mean_value() + past * dh, s.count, dh);
      mean_k.setZero();
      mean_v.setZero();
      for (Index g = 0; g < G; ++g) {
        mean_k += ws.key.block(s.row_begin, g * dh, s.count, dh);
        mean_v += ws.value.block(s.row_begin, g * dh, s.count, dh);
      }
      mean_k /= Scalar(G);
      mean_v /= Scalar(G);
    }
  }
}

// `heads` query heads in columns [col, col + heads*d_h) of `query` against cache rows `key`/`value`
// (stride d_h), writing output columns [out_col, out_col + heads*d_h) of `out`, for one segment.
template <class Scalar>
AttentionHead<Scalar> make_head(const Segment<Scalar>& s, const Matrix<Scalar>& query, Index col,
                                const Scalar* key, const Scalar* value, Matrix<Scalar>& out, Index out_col,
                                Index head_dim, Index heads = 1) {
  AttentionHead<Scalar> h;
  h.query = query.data() + s.row_begin * query.cols() + col;
  h.query_stride = query.cols();
  h.key = key;
  h.value = value;
  h.kv_stride = head_dim;
  h.out = out.data() + s.row_begin * out.cols() + out_col;
  h.out_stride = out.cols();
  h.past = s.cache->length();
  h.count = s.count;
  h.heads = heads;
  return h;
}

template <class Scalar>
void advance_caches(const std::vector<Segment<Scalar>>& segments) {
  for (const auto& s : segments) s.cache->advance(s.count);
}

template <class Scalar>
Scalar attention_scale(Index head_dim) {
  return Scalar(1) / std::sqrt(Scalar(head_dim));
}

}  // namespace detail
}  // namespace gqe
